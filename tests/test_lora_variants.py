"""LoRA variants against Hugging Face PEFT: rank/alpha patterns, rsLoRA, DoRA, PiSSA and gaussian init, files."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import peftjax as pj
from peftjax import interop, tree
from peftjax.methods import dora, lora
from peftjax.models import t5

VOCAB = 100
TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
            feed_forward_proj="relu")
PATTERNS = dict(rank=4, alpha=8, targets=("o", "q", "v"),
                rank_pattern={"v": 2, r"decoder\.block\.1\.layer\.0\.SelfAttention\.q": 6},
                alpha_pattern={"o": 32, "encoder.block.0.layer.0.SelfAttention.q": 2})
DORA = dict(rank=4, alpha=8, targets=("q", "v"))


def _torch_t5(folder: str | None = None):
  from transformers import T5Config, T5ForConditionalGeneration
  if folder is not None:
    return T5ForConditionalGeneration.from_pretrained(folder).eval()
  torch.manual_seed(0)
  model = T5ForConditionalGeneration(T5Config(**TINY))
  with torch.no_grad():  # uneven norms
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.uniform_(0.5, 2.0)
  return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("t5"))
  _torch_t5().save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def t5_model(checkpoint):
  return t5.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  input_ids = rng.integers(2, VOCAB, (2, 7))
  attention_mask = np.ones((2, 7), np.int64)
  attention_mask[1, 5:] = 0
  decoder_input_ids = np.concatenate([np.zeros((2, 1), np.int64), rng.integers(2, VOCAB, (2, 4))], axis=1)
  return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)


def _torch_logits(model, batch) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(model, cfg, params, adapters, batch):
  args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
  if cfg is None:
    return model.apply({"params": params}, *args)
  return pj.apply(cfg, model.apply)(params, adapters, *args)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _tree_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(_max_diff, a, b)))


def _randomize(adapters, seed=3):
  """Non-zero A and B (0.1 N(0,1)); DoRA magnitudes scaled by U(0.5, 1.5) from their init."""
  flat = tree.flatten(adapters)
  keys = dict(zip(flat, jax.random.split(jax.random.key(seed), len(flat))))
  out = {}
  for path, leaf in flat.items():
    if path.endswith(dora.MAGNITUDE):
      out[path] = leaf * jax.random.uniform(keys[path], leaf.shape, minval=0.5, maxval=1.5)
    else:
      out[path] = 0.1 * jax.random.normal(keys[path], leaf.shape)
  return tree.unflatten(out)


def _peft_model(torch_model, cfg, **kwargs):
  import peft
  return peft.get_peft_model(torch_model, peft.LoraConfig(
      r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), use_rslora=cfg.use_rslora,
      rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern),
      use_dora=isinstance(cfg, dora.DoraConfig), **kwargs))


def _sorted_patterns(cfg):
  return dataclasses.replace(cfg, rank_pattern=tuple(sorted(cfg.rank_pattern)),
                             alpha_pattern=tuple(sorted(cfg.alpha_pattern)))


def _copy_into_peft(peft_model, adapters):
  modules = dict(peft_model.named_modules())
  with torch.no_grad():
    for path, adapter in lora.adapter_modules(adapters).items():
      layer = modules[f"base_model.model.{tree.hf_name(path)}"]
      layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(adapter["lora_A"]).T))
      layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(adapter["lora_B"]).T))
      if dora.MAGNITUDE in adapter:
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(np.asarray(adapter[dora.MAGNITUDE])))
  return peft_model.eval()


def test_pattern_config():
  cfg = pj.LoraConfig(rank=4, alpha=8, rank_pattern={"v": 2, "q": 6}, alpha_pattern=[("block.1.*q", 3)])
  assert cfg.rank_pattern == (("v", 2), ("q", 6)) and cfg.alpha_pattern == (("block.1.*q", 3.0),)
  assert hash(cfg) == hash(pj.LoraConfig(rank=4, alpha=8, rank_pattern=(("v", 2), ("q", 6)),
                                         alpha_pattern={"block.1.*q": 3}))
  assert cfg.module_rank("encoder/block_0/layer_0/SelfAttention/v") == 2
  assert cfg.module_rank("encoder/block_0/layer_0/SelfAttention/k") == 4
  assert cfg.module_rank("encoder/block_0/layer_0/SelfAttention/vq") == 4  # keys match whole trailing name parts
  assert cfg.module_scaling("decoder/block_1/layer_0/SelfAttention/q") == 3 / 6
  assert cfg.module_scaling("decoder/block_0/layer_0/SelfAttention/q") == 8 / 6
  assert dataclasses.replace(cfg, use_rslora=True).module_scaling("x/v") == 8 / np.sqrt(2)
  # our '/'-joined paths match too (T5 v1.1's 'wi_0' is one PyTorch name, not a list index)
  assert pj.LoraConfig(rank_pattern={"wi_0": 2}).module_rank("encoder/block_0/layer_1/DenseReluDense/wi_0") == 2
  with pytest.raises(ValueError, match=r"LoraConfig.rank_pattern key '\(q' is not a valid regular expression"):
    pj.LoraConfig(rank_pattern={"(q": 2})
  with pytest.raises(ValueError, match=r"LoraConfig.rank_pattern\['q'\] must be a positive integer, got 0"):
    pj.LoraConfig(rank_pattern={"q": 0})
  with pytest.raises(ValueError, match=r"LoraConfig.init='olora' is not supported; valid: \['default', 'gaussian'"):
    pj.LoraConfig(init="olora")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_patterns_match_hf_peft(checkpoint, t5_model, batch, use_rslora):
  model, params = t5_model
  cfg = pj.LoraConfig(**PATTERNS, use_rslora=use_rslora)
  adapters = pj.init(cfg, jax.random.key(0), params)
  modules = lora.adapter_modules(adapters)
  ranks = {path: m["lora_A"].shape[1] for path, m in modules.items()}
  assert ranks["encoder/block_0/layer_0/SelfAttention/v"] == ranks["decoder/block_1/layer_1/EncDecAttention/v"] == 2
  assert ranks["decoder/block_1/layer_0/SelfAttention/q"] == 6
  assert ranks["decoder/block_1/layer_1/EncDecAttention/q"] == 4
  assert ranks["encoder/block_1/layer_0/SelfAttention/o"] == 4
  assert all(m["lora_B"].shape[0] == ranks[p] for p, m in modules.items())
  assert cfg.module_scaling("encoder/block_1/layer_0/SelfAttention/o") == (32 / 2 if use_rslora else 32 / 4)
  assert cfg.module_scaling("encoder/block_0/layer_0/SelfAttention/q") == (2 / 2 if use_rslora else 2 / 4)

  base = _logits(model, None, params, None, batch)
  np.testing.assert_array_equal(_logits(model, cfg, params, adapters, batch), base)
  adapters = _randomize(adapters)
  unmerged = _logits(model, cfg, params, adapters, batch)
  assert _max_diff(unmerged, base) > 1e-2
  merged = pj.merge(cfg, params, adapters)
  assert _max_diff(_logits(model, None, merged, None, batch), unmerged) < 1e-5
  assert _tree_diff(pj.unmerge(cfg, merged, adapters), params) < 1e-6

  peft_model = _peft_model(_torch_t5(checkpoint), cfg)
  torch_modules = dict(peft_model.named_modules())
  for path in modules:
    layer = torch_modules[f"base_model.model.{tree.hf_name(path)}"]
    assert layer.r["default"] == ranks[path] and layer.scaling["default"] == pytest.approx(cfg.module_scaling(path))
  assert len([m for m in torch_modules if m.endswith(".lora_A.default")]) == len(modules) == 18
  trainable, total = peft_model.get_nb_trainable_parameters()
  assert (tree.count(adapters), tree.count(adapters) + tree.count(params)) == (trainable, total)
  assert _max_diff(_torch_logits(_copy_into_peft(peft_model, adapters), batch), unmerged) < 1e-4


def test_patterns_adapter_files_both_ways(checkpoint, t5_model, batch, tmp_path):
  from peft import PeftModel
  model, params = t5_model
  cfg = pj.LoraConfig(**PATTERNS)
  adapters = _randomize(pj.init(cfg, jax.random.key(0), params))
  expected = _logits(model, cfg, params, adapters, batch)
  ours = str(tmp_path / "ours")
  interop.save_lora_adapter(ours, cfg, adapters)
  with open(os.path.join(ours, "adapter_config.json")) as f:
    config = json.load(f)
  assert config["rank_pattern"] == PATTERNS["rank_pattern"] and config["alpha_pattern"] == PATTERNS["alpha_pattern"]
  loaded_cfg, loaded = interop.load_lora_adapter(ours, params)
  assert loaded_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
  peft_model = PeftModel.from_pretrained(_torch_t5(checkpoint), ours).eval()
  assert _max_diff(_torch_logits(peft_model, batch), expected) < 1e-4

  theirs = str(tmp_path / "theirs")
  _copy_into_peft(_peft_model(_torch_t5(checkpoint), cfg), adapters).save_pretrained(theirs)
  their_cfg, their_adapters = interop.load_lora_adapter(theirs, params)
  assert their_cfg == _sorted_patterns(cfg)  # PEFT writes its JSON with sorted keys
  assert _tree_diff(their_adapters, adapters) == 0.0

  bad = pj.LoraConfig(**{**PATTERNS, "rank_pattern": {}})
  with pytest.raises(ValueError, match=r"adapter 'decoder/block_0/layer_0/SelfAttention/v' has rank 2 but "
                                       r"LoraConfig gives it rank 4 \(from rank and rank_pattern\)"):
    interop.save_lora_adapter(str(tmp_path / "bad"), bad, adapters)


class BiasMLP(nn.Module):
  """Dense layers with biases: DoRA leaves the bias outside the rescaled term."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(16, name="q")(x))
    h = jnp.tanh(nn.Dense(16, name="v")(h))
    return nn.Dense(5, name="o")(h)


class OneDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="q")(x)


class TorchBiasMLP(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.q, self.v, self.o = torch.nn.Linear(6, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 5)

  def forward(self, x):
    return self.o(torch.tanh(self.v(torch.tanh(self.q(x)))))


def test_dora_identity_merge_unmerge(t5_model, batch):
  model, params = t5_model
  cfg = dora.DoraConfig(**DORA)
  adapters = pj.init(cfg, jax.random.key(0), params)
  q = adapters["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]
  assert q["lora_A"].shape == (32, 4) and q["lora_B"].shape == (4, 32) and q[dora.MAGNITUDE].shape == (32,)
  kernel = params["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]
  np.testing.assert_allclose(q[dora.MAGNITUDE], np.linalg.norm(np.asarray(kernel), axis=0), rtol=1e-6)
  base = _logits(model, None, params, None, batch)
  assert _max_diff(_logits(model, cfg, params, adapters, batch), base) < 1e-6

  adapters = _randomize(adapters)
  unmerged = _logits(model, cfg, params, adapters, batch)
  assert _max_diff(unmerged, base) > 1e-2
  merged = pj.merge(cfg, params, adapters)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert _max_diff(_logits(model, None, merged, None, batch), unmerged) < 1e-5
  merged_q = merged["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]
  trained_q = adapters["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]
  np.testing.assert_allclose(np.linalg.norm(np.asarray(merged_q), axis=0), trained_q[dora.MAGNITUDE], rtol=1e-5)
  norms = dora.weight_norms(cfg, params, adapters)
  assert _tree_diff(dora.unmerge(cfg, merged, adapters, norms), params) < 1e-5
  with pytest.raises(ValueError, match=r"dora.unmerge needs norms=dora.weight_norms\(cfg, params, adapters\)"):
    pj.unmerge(cfg, merged, adapters)


def test_dora_matches_hf_peft(checkpoint, t5_model, batch):
  model, params = t5_model
  cfg = dora.DoraConfig(**DORA)
  adapters = _randomize(pj.init(cfg, jax.random.key(0), params))
  peft_model = _peft_model(_torch_t5(checkpoint), cfg)
  trainable, total = peft_model.get_nb_trainable_parameters()
  assert (tree.count(adapters), tree.count(adapters) + tree.count(params)) == (trainable, total)
  # peft's own magnitude init is the same norm
  layer = dict(peft_model.named_modules())["base_model.model.decoder.block.1.layer.1.EncDecAttention.v"]
  initial = pj.init(cfg, jax.random.key(0), params)["decoder"]["block_1"]["layer_1"]["EncDecAttention"]["v"]
  np.testing.assert_allclose(layer.lora_magnitude_vector["default"].weight.detach().numpy(),
                             initial[dora.MAGNITUDE], rtol=1e-5)
  expected = _torch_logits(_copy_into_peft(peft_model, adapters), batch)
  assert _max_diff(_logits(model, cfg, params, adapters, batch), expected) < 1e-4


def test_dora_with_bias_and_patterns_matches_hf_peft_values_and_gradients():
  torch.manual_seed(0)
  torch_model = TorchBiasMLP()
  params = {name: {"kernel": jnp.asarray(layer.weight.detach().numpy().T), "bias": jnp.asarray(layer.bias.detach())}
            for name, layer in (("q", torch_model.q), ("v", torch_model.v), ("o", torch_model.o))}
  x = np.random.default_rng(0).normal(size=(3, 4, 6)).astype(np.float32)
  weights = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
  cfg = dora.DoraConfig(rank=3, alpha=6, targets=("q", "v", "o"), rank_pattern={"v": 2}, alpha_pattern={"o": 1})
  model = BiasMLP()
  adapters = _randomize(pj.init(cfg, jax.random.key(0), params))
  loss = lambda a: jnp.sum(pj.apply(cfg, model.apply)(params, a, x) * weights)  # noqa: E731
  value, grads = jax.jit(jax.value_and_grad(loss))(adapters)

  peft_model = _copy_into_peft(_peft_model(torch_model, cfg), adapters)
  torch_loss = (peft_model(torch.tensor(x)) * torch.tensor(weights)).sum()
  torch_loss.backward()
  assert abs(float(value) - torch_loss.item()) < 1e-4
  modules = dict(peft_model.named_modules())
  for name in ("q", "v", "o"):
    layer = modules[f"base_model.model.{name}"]
    np.testing.assert_allclose(grads[name]["lora_A"], layer.lora_A["default"].weight.grad.numpy().T, atol=1e-4)
    np.testing.assert_allclose(grads[name]["lora_B"], layer.lora_B["default"].weight.grad.numpy().T, atol=1e-4)
    np.testing.assert_allclose(grads[name][dora.MAGNITUDE], layer.lora_magnitude_vector["default"].weight.grad.numpy(),
                               atol=1e-4)
  merged = pj.merge(cfg, params, adapters)
  jax.tree.map(np.testing.assert_array_equal, {k: v["bias"] for k, v in merged.items()},
               {k: v["bias"] for k, v in params.items()})
  np.testing.assert_allclose(model.apply({"params": merged}, x), pj.apply(cfg, model.apply)(params, adapters, x),
                             atol=1e-5)


def test_dora_dropout_uses_dropped_input_for_both_terms():
  """With dropout DoRA adds (f - 1) x' W + f s x' A B (x' the dropped-out input, f = m / ||W + s A B||): a LoRA
  of rank r + out on the same dropout mask, with A' = [A, W] and B' = [f s B; diag(f - 1)] at scaling 1, computes
  exactly that."""
  model = OneDense()
  x = jax.random.normal(jax.random.key(0), (4, 6))
  params = model.init(jax.random.key(1), x)["params"]
  cfg = dora.DoraConfig(rank=2, alpha=4, dropout=0.5, targets=("q",))
  adapters = _randomize(pj.init(cfg, jax.random.key(2), params))
  a, b, m = (adapters["q"][k] for k in ("lora_A", "lora_B", dora.MAGNITUDE))
  kernel = params["q"]["kernel"]
  f = m / jnp.linalg.norm(kernel + 2.0 * a @ b, axis=0)
  equivalent = pj.LoraConfig(rank=2 + 8, alpha=10, dropout=0.5, targets=("q",))
  lora_adapters = {"q": {"lora_A": jnp.concatenate([a, kernel], axis=1),
                         "lora_B": jnp.concatenate([f * 2.0 * b, jnp.diag(f - 1)], axis=0)}}
  dora_fn, lora_fn = jax.jit(pj.apply(cfg, model.apply)), jax.jit(pj.apply(equivalent, model.apply))
  rngs = {"dropout": jax.random.key(5)}
  dropped = dora_fn(params, adapters, x, rngs=rngs)
  np.testing.assert_allclose(dropped, lora_fn(params, lora_adapters, x, rngs=rngs), atol=1e-5)
  merged = pj.merge(cfg, params, adapters)  # without a dropout rng the call is deterministic
  np.testing.assert_allclose(dora_fn(params, adapters, x), model.apply({"params": merged}, x), atol=1e-5)
  assert _max_diff(dropped, dora_fn(params, adapters, x)) > 1e-3


class ScannedBlocks(nn.Module):
  """Three Dense blocks under nn.scan: parameters and DoRA adapters stacked on a leading layer axis."""

  @nn.compact
  def __call__(self, x):
    block = lambda module, carry, _: (jnp.tanh(module(carry)), None)  # noqa: E731
    layers = nn.scan(block, variable_axes={"params": 0, "dora": 0}, split_rngs={"params": True}, length=3)
    x, _ = layers(nn.Dense(16, name="q"), x, None)
    return x


def test_dora_scanned_layers_stack_adapters_and_merge():
  model = ScannedBlocks()
  x = jax.random.normal(jax.random.key(0), (4, 16))
  params = model.init(jax.random.key(1), x)["params"]
  cfg = dora.DoraConfig(rank=2, alpha=4, targets=("q",))
  adapters = pj.init(cfg, jax.random.key(2), params)
  assert adapters["q"]["lora_A"].shape == (3, 16, 2) and adapters["q"][dora.MAGNITUDE].shape == (3, 16)
  np.testing.assert_allclose(adapters["q"][dora.MAGNITUDE], jnp.linalg.norm(params["q"]["kernel"], axis=1), rtol=1e-6)
  adapters = _randomize(adapters)
  unmerged = pj.apply(cfg, model.apply)(params, adapters, x)
  assert _max_diff(unmerged, model.apply({"params": params}, x)) > 1e-2
  np.testing.assert_allclose(model.apply({"params": pj.merge(cfg, params, adapters)}, x), unmerged, atol=1e-5)


def _truncated_svd(kernel: np.ndarray, rank: int):
  u, s, vt = np.linalg.svd(kernel.astype(np.float64), full_matrices=False)
  return u[:, :rank], (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_pissa_init_matches_svd_and_hf_peft(checkpoint, t5_model, batch):
  model, params = t5_model
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("q", "v"), rank_pattern={"v": 2}, init="pissa")
  with pytest.raises(ValueError, match=r"LoraConfig.init='pissa' also replaces the base weights; call .*pissa_init"):
    pj.init(cfg, jax.random.key(0), params)
  residual, adapters = lora.pissa_init(cfg, jax.random.key(0), params)
  assert jax.tree.structure(residual) == jax.tree.structure(params)
  base = _logits(model, None, params, None, batch)
  assert _max_diff(_logits(model, cfg, residual, adapters, batch), base) < 1e-5
  assert _max_diff(_logits(model, None, residual, None, batch), base) > 1e-2

  flat, flat_residual = tree.flatten(params), tree.flatten(residual)
  for path, adapter in lora.adapter_modules(adapters).items():
    kernel = np.asarray(flat[f"{path}/kernel"])
    rank = cfg.module_rank(path)
    top, truncation = _truncated_svd(kernel, rank)
    a = np.asarray(adapter["lora_A"])
    assert a.shape == (kernel.shape[0], rank)
    np.testing.assert_allclose(top @ (top.T @ a), a, atol=1e-5)  # A's columns span the top singular vectors
    # float32 SVD against float64 numpy: agreement to a few 1e-6 of the largest singular value
    np.testing.assert_allclose(cfg.module_scaling(path) * a @ np.asarray(adapter["lora_B"]), truncation, atol=5e-5)
    np.testing.assert_allclose(flat_residual[f"{path}/kernel"], kernel - truncation, atol=5e-5)

  peft_model = _peft_model(_torch_t5(checkpoint), cfg, init_lora_weights="pissa")
  modules = dict(peft_model.named_modules())
  for path, adapter in lora.adapter_modules(adapters).items():
    layer = modules[f"base_model.model.{tree.hf_name(path)}"]
    np.testing.assert_allclose(layer.base_layer.weight.detach().numpy().T, flat_residual[f"{path}/kernel"], atol=5e-5)
    theirs = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy().T
    np.testing.assert_allclose(np.asarray(adapter["lora_A"] @ adapter["lora_B"]), theirs, atol=5e-5)


def test_pissa_fast_svd_and_gaussian_init(t5_model):
  _, params = t5_model
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("q", "v"), init="pissa_niter_4")
  residual, adapters = lora.pissa_init(cfg, jax.random.key(0), params)
  flat = tree.flatten(residual)
  for path, adapter in lora.adapter_modules(adapters).items():
    kernel = np.asarray(tree.flatten(params)[f"{path}/kernel"])
    update = 2.0 * np.asarray(adapter["lora_A"] @ adapter["lora_B"])
    np.testing.assert_allclose(np.asarray(flat[f"{path}/kernel"]) + update, kernel, atol=1e-5)
    assert np.linalg.norm(update) > 0.95 * np.linalg.norm(_truncated_svd(kernel, 4)[1])

  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("q", "v"), init="gaussian")
  adapters = lora.adapter_modules(pj.init(cfg, jax.random.key(0), params))
  a = np.concatenate([np.asarray(m["lora_A"]).ravel() for m in adapters.values()])
  assert abs(a.std() - 1 / 4) < 0.02 and abs(a.mean()) < 0.02
  assert all(float(jnp.abs(m["lora_B"]).max()) == 0 for m in adapters.values())
  with pytest.raises(ValueError, match=r"PiSSA rank 40 of '\w+/block_0/layer_0/SelfAttention/q' exceeds its "
                                       r"kernel's smaller dimension 32"):
    lora.pissa_init(pj.LoraConfig(rank=40, targets=("q",), init="pissa"), jax.random.key(0), params)


def test_dora_adapter_files_both_ways(checkpoint, t5_model, batch, tmp_path):
  from peft import PeftModel
  model, params = t5_model
  cfg = dora.DoraConfig(**DORA, rank_pattern={"v": 2}, alpha_pattern={"q": 4})
  adapters = _randomize(pj.init(cfg, jax.random.key(0), params))
  expected = _logits(model, cfg, params, adapters, batch)
  ours = str(tmp_path / "ours")
  interop.save_lora_adapter(ours, cfg, adapters)
  with open(os.path.join(ours, "adapter_config.json")) as f:
    assert json.load(f)["use_dora"] is True
  loaded_cfg, loaded = interop.load_lora_adapter(ours, params)
  assert loaded_cfg == cfg and isinstance(loaded_cfg, dora.DoraConfig)
  jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
  peft_model = PeftModel.from_pretrained(_torch_t5(checkpoint), ours).eval()
  assert _max_diff(_torch_logits(peft_model, batch), expected) < 1e-4

  theirs = str(tmp_path / "theirs")
  _copy_into_peft(_peft_model(_torch_t5(checkpoint), cfg), adapters).save_pretrained(theirs)
  their_cfg, their_adapters = interop.load_lora_adapter(theirs, params)
  assert their_cfg == _sorted_patterns(cfg)  # PEFT writes its JSON with sorted keys
  assert _tree_diff(their_adapters, adapters) == 0.0
  assert _max_diff(_logits(model, their_cfg, params, their_adapters, batch), expected) < 1e-6
