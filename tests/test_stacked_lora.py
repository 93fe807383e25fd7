"""Mixed-adapter batches and hotswap (`peftjax.stacked_lora`) on BERT, T5, GPT-2 and Llama (random tiny models):
each row of a mixed batch equals the same row run with its own adapter through `pj.apply` within 1e-5 (or the
base model for id -1), in forward and in greedy generation; any mix, and any adapter put into a slot, reuses the
one compilation (counted as traces of the jitted function and as jax's compilation cache entries).  (IA)³
adapters mix the same way (`peftjax.stacked_ia3`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import peftjax as pj
from peftjax import stacked_ia3, stacked_lora
from peftjax.models import llama, t5
from test_prompts import _batch, checkpoints  # noqa: F401 (a fixture)
from tiny_models import ScannedModel, perturbed

TARGETS = {"bert_seq": ("query", "value", "dense"), "t5": ("q", "v", "wo"), "gpt2": ("c_attn", "c_fc"),
           "llama": ("q_proj", "v_proj", "down_proj")}
GENERATE = {"t5": t5.generate, "llama": llama.generate}


def _adapters(kind: str, params):
  """Three LoRA adapters with other ranks, alphas and targets (the second on one target only), random factors."""
  targets = TARGETS[kind]
  cfgs = [pj.LoraConfig(rank=2, alpha=4, targets=targets), pj.LoraConfig(rank=4, alpha=3, targets=targets[:1]),
          pj.LoraConfig(rank=3, alpha=6, targets=targets[1:], use_rslora=True)]
  return cfgs, [perturbed(pj.init(c, jax.random.key(i), params), seed=i, scale=0.4) for i, c in enumerate(cfgs)]


@pytest.mark.parametrize("kind", list(TARGETS))
def test_mixed_batch_equals_each_row_with_its_own_adapter(checkpoints, kind):
  model, params = pj.models.from_pretrained(checkpoints(kind))
  cfgs, trees = _adapters(kind, params)
  stacked = stacked_lora.stack(cfgs, trees)
  batch = _batch(kind)  # 3 rows of lengths 9, 6, 3
  traces = []

  @jax.jit
  def mixed(params, stacked, ids, batch):
    traces.append(1)
    return stacked_lora.apply(model.apply)(params, stacked, ids, **batch)
  alone = [np.asarray(jax.jit(pj.apply(c, model.apply))(params, t, **batch)) for c, t in zip(cfgs, trees)]
  base = np.asarray(jax.jit(model.apply)({"params": params}, **batch))
  assert min(np.max(np.abs(a - base)) for a in alone) > 1e-2
  for ids in ([2, 0, 1], [stacked_lora.BASE, 2, 0]):
    got = np.asarray(mixed(params, stacked, np.asarray(ids), batch))
    for row, i in enumerate(ids):
      np.testing.assert_allclose(got[row], (base if i == stacked_lora.BASE else alone[i])[row], atol=1e-5)
  assert len(traces) == 1 and mixed._cache_size() == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_mixed_batch_generation_equals_each_row_alone(checkpoints, kind):
  """Greedy tokens of a mixed batch (adapter 1, the base, adapter 0) equal each row's with its own adapter
  (GPT-2's cached generate is Llama's loop; BERT does not generate)."""
  model, params = pj.models.from_pretrained(checkpoints(kind))
  cfgs, trees = _adapters(kind, params)
  generate, kwargs = GENERATE[kind], dict(max_new_tokens=4)
  batch = _batch(kind)
  inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
  ids = np.asarray([1, stacked_lora.BASE, 0])
  got = np.asarray(generate(model, (params, stacked_lora.stack(cfgs[:2], trees[:2]), ids), **inputs, **kwargs,
                            apply_fn=stacked_lora.generate_fn(model.apply)))
  for row, i in enumerate(ids):
    if i == stacked_lora.BASE:
      expected = generate(model, params, **inputs, **kwargs)
    else:
      cfg, tree = cfgs[i], trees[i]
      expected = generate(model, (params, tree), **inputs, **kwargs,
                          apply_fn=lambda p, *a, cfg=cfg, **kw: pj.apply(cfg, model.apply)(p[0], p[1], *a, **kw))
    np.testing.assert_array_equal(got[row], np.asarray(expected)[row])


def test_hotswap_reuses_the_compiled_forward(checkpoints):
  kind = "llama"
  model, params = pj.models.from_pretrained(checkpoints(kind))
  cfgs, trees = _adapters(kind, params)
  declared = pj.LoraConfig(rank=8, targets=TARGETS[kind])  # the modules and the largest rank to expect
  slot = stacked_lora.stack([declared], [pj.init(declared, jax.random.key(9), params)])
  batch = _batch(kind)
  traces = []

  @jax.jit
  def forward(params, stacked, batch):
    traces.append(1)
    return stacked_lora.apply(model.apply)(params, stacked, np.zeros(3, np.int32), **batch)
  for cfg, tree in zip(cfgs, trees):  # ranks 2, 4, 3; the second and third adapt a subset of the modules
    slot = stacked_lora.put(slot, 0, cfg, tree)
    expected = jax.jit(pj.apply(cfg, model.apply))(params, tree, **batch)
    np.testing.assert_allclose(forward(params, slot, batch), expected, atol=1e-5)
  assert len(traces) == 1 and forward._cache_size() == 1

  wide = pj.LoraConfig(rank=9, targets=TARGETS[kind])
  with pytest.raises(ValueError, match="rank 9 .* exceeds the stack's rank 8; stack with max_rank >= 9"):
    stacked_lora.put(slot, 0, wide, pj.init(wide, jax.random.key(0), params))
  other = pj.LoraConfig(rank=2, targets=("k_proj",))
  with pytest.raises(ValueError, match="which the stack does not hold"):
    stacked_lora.put(slot, 0, other, pj.init(other, jax.random.key(0), params))
  with pytest.raises(ValueError, match="adapter_ids has 2 entries but the layer input has 3 rows"):
    stacked_lora.apply(model.apply)(params, slot, np.zeros(2, np.int32), **batch)


def test_scanned_layers_stack_along_the_layer_axis():
  """A layer-scanned model's stacked leaves are (layers, K, ...) and each row still equals its own adapter's run;
  `apply_grouped` equals `apply` on K contiguous row groups."""
  model = ScannedModel(collection=stacked_lora.COLLECTION)
  x = np.random.default_rng(0).normal(size=(3, 4, 16)).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  cfgs = [pj.LoraConfig(rank=2, targets=("q", "v")), pj.LoraConfig(rank=3, alpha=5, targets=("wi",))]
  trees = [perturbed(pj.init(c, jax.random.key(i), params), seed=i) for i, c in enumerate(cfgs)]
  stacked = stacked_lora.stack(cfgs, trees)
  assert stacked["layers"]["wi"]["lora_A"].shape == (3, 2, 16, 3) and stacked["layers"]["q"]["scaling"].shape == (3, 2)
  ids = np.asarray([1, stacked_lora.BASE, 0])
  got = np.asarray(stacked_lora.apply(model.apply)(params, stacked, ids, x))
  plain = ScannedModel(collection="lora")
  for row, i in enumerate(ids):
    expected = plain.apply({"params": params}, x) if i == stacked_lora.BASE else pj.apply(cfgs[i], plain.apply)(
        params, trees[i], x)
    np.testing.assert_allclose(got[row], np.asarray(expected)[row], atol=1e-5)
  # apply_grouped (a sweep's K contiguous row groups) equals apply with the grouped ids
  grouped = np.asarray(stacked_lora.apply_grouped(model.apply)(params, stacked, np.concatenate([x, x])))
  np.testing.assert_allclose(grouped, np.asarray(stacked_lora.apply(model.apply)(
      params, stacked, np.asarray([0, 0, 0, 1, 1, 1]), np.concatenate([x, x]))), atol=1e-6)


def test_mixed_batch_of_ia3_adapters(checkpoints):
  """(IA)³ in a mixed batch (`peftjax.stacked_ia3`): output and feed-forward input scaling, row by row."""
  model, params = pj.models.from_pretrained(checkpoints("bert_seq"))
  cfgs = [pj.IA3Config.for_model("bert"), pj.IA3Config(targets=("key",), feedforward=())]
  trees = [perturbed(pj.init(c, jax.random.key(i), params), seed=i, scale=0.4) for i, c in enumerate(cfgs)]
  batch = _batch("bert_seq")
  ids = np.asarray([1, -1, 0])
  got = np.asarray(jax.jit(stacked_ia3.apply(model.apply))(params, stacked_ia3.stack(trees), ids, **batch))
  for row, i in enumerate(ids):
    expected = (model.apply({"params": params}, **batch) if i < 0 else
                jax.jit(pj.apply(cfgs[i], model.apply))(params, trees[i], **batch))
    np.testing.assert_allclose(got[row], np.asarray(expected)[row], atol=1e-5)
  assert np.max(np.abs(got[0] - np.asarray(model.apply({"params": params}, **batch))[0])) > 1e-2
