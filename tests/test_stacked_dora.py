"""Mixed batches of DoRA and LoRA adapters (`peftjax.stacked_dora`) on BERT, T5 and Llama (random tiny models):
each row of a batch mixing three DoRA adapters of other ranks and targets, a LoRA adapter and the base equals the
row run alone with its own adapter through `pj.apply` within 1e-5, in forward and in greedy generation; the
stacked column norms equal `dora.weight_norms`; any mix and any adapter `put` into a slot reuse one compilation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import peftjax as pj
from peftjax import stacked_dora, stacked_lora
from peftjax import tree as ptree
from peftjax.methods import dora
from peftjax.models import llama, t5
from test_prompts import _batch, checkpoints  # noqa: F401 (a fixture)
from tiny_models import ScannedModel, perturbed

TARGETS = {"bert_seq": ("query", "value", "dense"), "t5": ("q", "v", "wo"), "llama": ("q_proj", "v_proj", "down_proj")}
GENERATE = {"t5": t5.generate, "llama": llama.generate}


def _adapters(targets, params):
  """Three DoRA adapters (ranks 2, 4, 3; the second on one target, the third rsLoRA on the others) and a rank-5
  LoRA adapter, every leaf (magnitudes included) perturbed so that each differs from the base."""
  cfgs = [pj.DoraConfig(rank=2, alpha=4, targets=targets), pj.DoraConfig(rank=4, alpha=3, targets=targets[:1]),
          pj.DoraConfig(rank=3, alpha=6, targets=targets[1:], use_rslora=True),
          pj.LoraConfig(rank=5, alpha=5, targets=targets[1:])]
  return cfgs, [perturbed(pj.init(c, jax.random.key(i), params), seed=i, scale=0.4) for i, c in enumerate(cfgs)]


def _alone(cfg, tree, model_apply, params, batch):
  return np.asarray(jax.jit(pj.apply(cfg, model_apply))(params, tree, **batch))


@pytest.mark.parametrize("kind", ["bert_seq", "llama"])  # T5 is covered by the generation test
def test_mixed_dora_batch_equals_each_row_with_its_own_adapter(checkpoints, kind):
  model, params = pj.models.from_pretrained(checkpoints(kind))
  cfgs, trees = _adapters(TARGETS[kind], params)
  stacked = stacked_dora.stack(cfgs, trees, params)
  for k in range(3):  # the norms taken without forming A B equal DoRA's ||W + s A B||
    expected = dora.weight_norms(cfgs[k], params, trees[k])
    flat = ptree.flatten(stacked)
    for path, norm in expected.items():
      np.testing.assert_allclose(flat[f"{path}/{stacked_dora.NORM}"][k], norm, rtol=1e-5)
  batch = {k: np.concatenate([v, v[:2]]) for k, v in _batch(kind).items()}  # 5 rows of lengths 9, 6, 3, 9, 6
  traces = []

  @jax.jit
  def mixed(params, stacked, ids, batch):
    traces.append(1)
    return stacked_dora.apply(model.apply)(params, stacked, ids, **batch)
  alone = [_alone(c, t, model.apply, params, batch) for c, t in zip(cfgs, trees)]
  base = np.asarray(jax.jit(model.apply)({"params": params}, **batch))
  assert min(np.max(np.abs(a - base)) for a in alone) > 1e-2
  for ids in ([2, 0, stacked_dora.BASE, 3, 1], [3, 1, 0, 2, stacked_dora.BASE]):
    got = np.asarray(mixed(params, stacked, np.asarray(ids), batch))
    for row, i in enumerate(ids):
      np.testing.assert_allclose(got[row], (base if i == stacked_dora.BASE else alone[i])[row], atol=1e-5)
  assert len(traces) == 1 and mixed._cache_size() == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(GENERATE))
def test_mixed_dora_generation_equals_each_row_alone(checkpoints, kind):
  """Greedy tokens of rows with DoRA adapter 2, the LoRA adapter, DoRA adapter 0, the base and DoRA adapter 1
  equal each row's own generation."""
  model, params = pj.models.from_pretrained(checkpoints(kind))
  cfgs, trees = _adapters(TARGETS[kind], params)
  generate, kwargs = GENERATE[kind], dict(max_new_tokens=4)
  batch = {k: np.concatenate([v, v[:2]]) for k, v in _batch(kind).items()}
  inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
  ids = np.asarray([2, 3, 0, stacked_dora.BASE, 1])
  got = np.asarray(generate(model, (params, stacked_dora.stack(cfgs, trees, params), ids), **inputs, **kwargs,
                            apply_fn=stacked_dora.generate_fn(model.apply)))
  for row, i in enumerate(ids):
    if i == stacked_dora.BASE:
      expected = generate(model, params, **inputs, **kwargs)
    else:
      cfg, tree = cfgs[i], trees[i]
      expected = generate(model, (params, tree), **inputs, **kwargs,
                          apply_fn=lambda p, *a, cfg=cfg, **kw: pj.apply(cfg, model.apply)(p[0], p[1], *a, **kw))
    np.testing.assert_array_equal(got[row], np.asarray(expected)[row])


def test_dora_hotswap_reuses_the_compiled_forward(checkpoints):
  kind = "llama"
  model, params = pj.models.from_pretrained(checkpoints(kind))
  cfgs, trees = _adapters(TARGETS[kind], params)
  declared = pj.DoraConfig(rank=8, targets=TARGETS[kind])  # the modules and the largest rank to expect
  slots = stacked_dora.stack([declared, cfgs[0]], [pj.init(declared, jax.random.key(9), params), trees[0]], params)
  batch = _batch(kind)
  ids = np.asarray([0, 1, stacked_dora.BASE])
  traces = []

  @jax.jit
  def forward(params, stacked, batch):
    traces.append(1)
    return stacked_dora.apply(model.apply)(params, stacked, ids, **batch)
  kept = _alone(cfgs[0], trees[0], model.apply, params, batch)
  for cfg, tree in zip(cfgs[1:], trees[1:]):  # DoRA ranks 4 and 3 on a subset of the modules, then a LoRA adapter
    slots = stacked_dora.put(slots, 0, cfg, tree, params)
    got = np.asarray(forward(params, slots, batch))
    np.testing.assert_allclose(got[0], _alone(cfg, tree, model.apply, params, batch)[0], atol=1e-5)
    np.testing.assert_allclose(got[1], kept[1], atol=1e-5)  # the other slot is untouched
  assert len(traces) == 1 and forward._cache_size() == 1

  wide = pj.DoraConfig(rank=9, targets=TARGETS[kind])
  with pytest.raises(ValueError, match="rank 9 .* exceeds the stack's rank 8; stack with max_rank >= 9"):
    stacked_dora.put(slots, 0, wide, pj.init(wide, jax.random.key(0), params), params)
  with pytest.raises(ValueError, match="adapter 0 has a IA3Config; stacked_dora stacks DoraConfig and LoraConfig"):
    stacked_dora.stack([pj.IA3Config.for_model("llama")], [{}], params)
  with pytest.raises(ValueError, match="stacked_lora stacks LoraConfig adapters .peftjax.stacked_dora stacks DoRA"):
    stacked_lora.stack([declared], [pj.init(declared, jax.random.key(0), params)])


def test_scanned_layers_stack_dora_along_the_layer_axis():
  """A layer-scanned model: norms and magnitudes are (layers, K, out) and each row equals its own DoRA run."""
  model = ScannedModel(collection=stacked_dora.COLLECTION)
  x = np.random.default_rng(0).normal(size=(3, 4, 16)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  cfgs = [pj.DoraConfig(rank=2, targets=("q", "v")), pj.DoraConfig(rank=3, alpha=5, targets=("wi", "wo"))]
  trees = [perturbed(pj.init(c, jax.random.key(i), params), seed=i) for i, c in enumerate(cfgs)]
  stacked = stacked_dora.stack(cfgs, trees, params)
  assert stacked["layers"]["wi"][stacked_dora.NORM].shape == (3, 2, 32)
  ids = np.asarray([1, stacked_dora.BASE, 0])
  got = np.asarray(stacked_dora.apply(model.apply)(params, stacked, ids, x))
  plain = ScannedModel(collection=dora.COLLECTION)
  for row, i in enumerate(ids):
    expected = plain.apply({"params": params}, x) if i == stacked_dora.BASE else pj.apply(cfgs[i], plain.apply)(
        params, trees[i], x)
    np.testing.assert_allclose(got[row], np.asarray(expected)[row], atol=1e-5)
