"""`peftjax.weighted_adapters.add_weighted_adapter` against the real peft library (0.21.2) on the same adapters:
every combination type gives the same per-module delta weights and the same logits within 1e-5 (DARE with the
masks peft drew, recorded from its random_pruning)."""

from __future__ import annotations

import jax
import numpy as np
import peft
import peft.utils.merge_utils as merge_utils
import pytest
import torch

import peftjax as pj
from peftjax import interop
from peftjax import tree as ptree
from peftjax.methods import lora
from peftjax.weighted_adapters import add_weighted_adapter
from test_prompts import _batch, _torch_model, checkpoints  # noqa: F401 (a fixture)

KIND = "llama"
ADAPTERS = {  # name -> peft config: first, second, third share rank 4; wide has rank 6 and other targets
    "first": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "second": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "third": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "wide": dict(r=6, lora_alpha=12, target_modules=["q_proj", "down_proj"]),
}
ABC, ABD = ("first", "second", "third"), ("first", "second", "wide")
# (combination_type, adapters, weights, majority_sign_method)
CASES = [
    ("linear", ABC, [0.7, -0.4, 1.3], "total"),
    ("cat", ABD, [0.7, -0.4, 1.3], "total"),
    ("svd", ABD, [0.7, -0.4, 1.3], "total"),
    ("ties", ABC, [0.7, -0.4, 1.3], "total"),
    ("ties", ABC, [0.7, 0.4, 1.3], "frequency"),
    ("ties_svd", ABD, [0.7, -0.4, 1.3], "total"),
    ("dare_linear", ABC, [0.7, -0.4, 1.3], "total"),
    ("dare_ties", ABC, [0.7, -0.4, 1.3], "frequency"),
    ("dare_linear_svd", ABD, [0.7, 0.4, 1.3], "total"),
    ("dare_ties_svd", ABD, [0.7, -0.4, 1.3], "total"),
    ("magnitude_prune", ABC, [0.7, -0.4, 1.3], "total"),
    ("magnitude_prune_svd", ABD, [0.7, -0.4, 1.3], "total"),
]
DENSITY = 0.5
LOGITS = ("cat", "ties", "dare_ties", "ties_svd")  # the cases whose logits are compared too (each one compiles)
# Two float32 SVDs (LAPACK in torch, XLA's here) of the same merged delta agree to ~1e-5 of its top singular value.
SVD_TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def setup(checkpoints, tmp_path_factory):
  """(peft model holding the ADAPTERS with random factors, our base model and params, {name: (cfg, tree)} read back)."""
  torch_model = peft.get_peft_model(_torch_model(KIND), peft.LoraConfig(**ADAPTERS["first"]), adapter_name="first")
  for name, kwargs in list(ADAPTERS.items())[1:]:
    torch_model.add_adapter(name, peft.LoraConfig(**kwargs))
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for name, param in torch_model.named_parameters():
      if "lora_" in name:
        param.copy_(torch.tensor(rng.normal(0, 0.3, param.shape).astype(np.float32)))
  folder = tmp_path_factory.mktemp("weighted")
  torch_model.save_pretrained(str(folder), selected_adapters=list(ADAPTERS))
  model, params = pj.models.from_pretrained(checkpoints(KIND))
  ours = {n: interop.load_adapter(str(folder / n), params) for n in ADAPTERS}
  return torch_model.eval(), model, params, ours


def _lora_layers(torch_model) -> dict:
  """{our module path: peft LoraLayer}."""
  return {name.removeprefix("base_model.model.").replace(".", "/").replace("layers/", "layers_"): m
          for name, m in torch_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _recorded_masks(log, layers, names) -> dict:
  """{(our path, adapter index, kind): keep mask in our layout} for the tensors peft's random_pruning saw."""
  masks = {}
  for tensor, mask in log:
    found = []
    for path, layer in layers.items():
      for i, n in enumerate(names):
        if n not in layer.lora_A:
          continue
        for kind, value in (("lora_A", layer.lora_A[n].weight), ("lora_B", layer.lora_B[n].weight),
                            ("delta", layer.get_delta_weight(n))):
          if value.shape == tensor.shape and torch.equal(value.detach(), tensor):
            found.append((path, i, kind))
    assert len(found) == 1, found
    masks[found[0]] = mask.numpy().T
  return masks


@pytest.mark.parametrize("combination_type,names,weights,sign", CASES,
                         ids=[f"{c[0]}-{c[3]}" if c[3] != "total" else c[0] for c in CASES])
def test_add_weighted_adapter_matches_peft(setup, combination_type, names, weights, sign, monkeypatch):
  torch_model, model, params, ours = setup
  new = f"{combination_type}_{sign}"
  log = []
  real_random_pruning = merge_utils.random_pruning

  def recording(tensor, density, rescale):
    state = torch.get_rng_state()
    pruned = real_random_pruning(tensor, density, rescale)
    torch.set_rng_state(state)
    log.append((tensor.detach().clone(), torch.bernoulli(torch.full_like(tensor, density))))
    return pruned
  monkeypatch.setattr(merge_utils, "random_pruning", recording)
  torch_model.add_weighted_adapter(list(names), weights, new, combination_type=combination_type, density=DENSITY,
                                   majority_sign_method=sign)
  layers = _lora_layers(torch_model)
  masks = _recorded_masks(log, layers, list(names)) if combination_type.startswith("dare") else None
  assert (len(log) > 0) == combination_type.startswith("dare")

  cfg, tree = add_weighted_adapter([ours[n][0] for n in names], [ours[n][1] for n in names], weights,
                                   combination_type, density=DENSITY, majority_sign_method=sign, masks=masks)
  theirs_cfg = torch_model.peft_config[new]
  assert cfg.rank == theirs_cfg.r and set(cfg.targets) == set(theirs_cfg.target_modules)
  modules = lora.adapter_modules(tree)
  assert set(modules) == {p for p, layer in layers.items() if new in layer.lora_A}
  tolerance = SVD_TOLERANCE if combination_type.endswith("svd") else 1e-5
  for path, adapter in modules.items():
    theirs = layers[path].get_delta_weight(new).detach().numpy().T
    np.testing.assert_allclose(np.asarray(lora.low_rank_update(cfg, path, adapter)), theirs, atol=tolerance)
  if combination_type not in LOGITS or sign != "total":
    return

  batch = _batch(KIND)
  torch_model.set_adapter(new)
  with torch.no_grad():
    expected = torch_model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  got = np.asarray(jax.jit(pj.apply(cfg, model.apply))(params, tree, **batch))
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(got[real], expected[real], atol=tolerance)
  plain = np.asarray(model.apply({"params": params}, **batch))
  assert np.max(np.abs(got - plain)) > 1e-2  # the combination changes the outputs


def test_dare_draws_from_rng_and_rescales(setup):
  """Without masks the DARE masks come from `rng`: reproducible, each entry kept with probability density,
  kept entries rescaled by 1 / density (checked on one adapter with weight 1: A_new = sqrt(s) A * keep / d)."""
  _, _, _, ours = setup
  cfg, tree = ours["first"]
  args = ([cfg, cfg], [tree, jax.tree.map(lambda x: 0 * x, tree)], [1.0, 1.0], "dare_linear")
  first = add_weighted_adapter(*args, density=0.3, rng=jax.random.key(1))[1]
  np.testing.assert_array_equal(ptree.flatten(first)[next(iter(ptree.flatten(first)))],
                                ptree.flatten(add_weighted_adapter(*args, density=0.3, rng=jax.random.key(1))[1])[
                                    next(iter(ptree.flatten(first)))])
  kept = []
  for path, value in ptree.flatten(first).items():
    if path.endswith("lora_A"):
      original = np.asarray(ptree.flatten(tree)[path]) * np.sqrt(cfg.scaling(cfg.rank))
      nonzero = np.asarray(value) != 0
      np.testing.assert_allclose(np.asarray(value)[nonzero], original[nonzero] / 0.3, rtol=1e-5)
      kept.append(nonzero.mean())
  assert abs(np.mean(kept) - 0.3) < 0.05


def test_bad_arguments_are_one_sentence(setup):
  _, _, _, ours = setup
  (ca, ta), (cd, td) = ours["first"], ours["wide"]
  with pytest.raises(ValueError, match="combination_type='mean' is not valid"):
    add_weighted_adapter([ca, cd], [ta, td], [1, 1], "mean")
  with pytest.raises(ValueError, match="needs adapters of one rank; got ranks \\[4, 6\\]"):
    add_weighted_adapter([ca, cd], [ta, td], [1, 1], "linear")
  with pytest.raises(ValueError, match="needs density in \\[0, 1\\], got None"):
    add_weighted_adapter([ca, ca], [ta, ta], [1, 1], "ties")
  with pytest.raises(ValueError, match="pass rng="):
    add_weighted_adapter([ca, ca], [ta, ta], [1, 1], "dare_linear", density=0.5)
