"""LoRA core: target matching, identity at init, merge/unmerge, gradients and optimizer state, interop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax import interop, tree

from tiny_models import ScannedModel, TinyModel  # tests/ is on sys.path under pytest


@pytest.fixture(scope="module")
def setup():
  model = TinyModel()
  x = jax.random.normal(jax.random.key(0), (2, 7, 6))
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, x


def random_adapters(adapters, seed=3, scale=0.2):
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def test_target_matching(setup):
  _, params, _ = setup
  assert tree.match_targets(params, ("q", "v")) == [f"block_{i}/{n}" for i in range(3) for n in ("q", "v")]
  assert tree.match_targets(params, ("block.1.q",)) == tree.match_targets(params, ("block_1/q",)) == ["block_1/q"]
  all_linear = tree.match_targets(params, "all-linear")
  assert "lm_head" not in all_linear and len(all_linear) == 1 + 3 * 5
  assert tree.match_targets(params, r"block_[02]/(q|wo)") == ["block_0/q", "block_0/wo", "block_2/q", "block_2/wo"]
  assert tree.match_targets(params, r"block\.1\.w.") == ["block_1/wi", "block_1/wo"]  # HF dotted regex
  assert tree.match_targets(params, ("q", "v"), exclude=("block.0.v",))[:2] == ["block_0/q", "block_1/q"]
  with pytest.raises(ValueError, match=r"targets=\('query',\) match no linear module; valid module names are .*'q'"):
    pj.init(pj.LoraConfig(targets=("query",)), jax.random.key(0), params)


def test_hf_names_keep_module_names_that_end_in_digits():
  """List entries become '.N'; T5's gated wi_0 / wi_1 and GPT-2's ln_1 / ln_2 stay names, as in PyTorch."""
  assert tree.hf_name("encoder/block_3/layer_1/DenseReluDense/wi_0") == "encoder.block.3.layer.1.DenseReluDense.wi_0"
  assert tree.hf_name("transformer/h_11/ln_2") == "transformer.h.11.ln_2"
  params = {"block_0": {"wi_0": {"kernel": np.ones((2, 3))}, "wi_1": {"kernel": np.ones((2, 3))}}}
  assert tree.match_targets(params, r"block\.0\.wi_1") == ["block_0/wi_1"]


def test_identity_at_init_and_shapes(setup):
  model, params, x = setup
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("q", "v", "wo"))
  adapters = pj.init(cfg, jax.random.key(2), params)
  assert adapters["block_0"]["q"]["lora_A"].shape == (16, 4)
  assert adapters["block_0"]["wo"]["lora_B"].shape == (4, 16)
  assert float(jnp.abs(adapters["block_0"]["q"]["lora_A"]).max()) <= 1 / 4  # U(-1/sqrt(in), 1/sqrt(in))
  base = model.apply({"params": params}, x)
  np.testing.assert_array_equal(pj.apply(cfg, model.apply)(params, adapters, x), base)


def test_merge_equals_activation_space_and_unmerge_restores(setup):
  model, params, x = setup
  for cfg in (pj.LoraConfig(rank=4, alpha=8, targets="all-linear"), pj.LoraConfig(rank=4, alpha=8, use_rslora=True)):
    adapters = random_adapters(pj.init(cfg, jax.random.key(2), params))
    unmerged = pj.apply(cfg, model.apply)(params, adapters, x)
    merged = pj.merge(cfg, params, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    np.testing.assert_allclose(model.apply({"params": merged}, x), unmerged, atol=1e-5)
    assert float(jnp.abs(unmerged - model.apply({"params": params}, x)).max()) > 1e-2  # the adapters matter
    restored = pj.unmerge(cfg, merged, adapters)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), restored, params))) < 1e-6


def test_rslora_scaling():
  assert pj.LoraConfig(rank=16, alpha=32).scaling(16) == 2.0
  assert pj.LoraConfig(rank=16, alpha=32, use_rslora=True).scaling(16) == 8.0


def test_gradients_and_optimizer_state_only_for_adapters(setup):
  model, params, x = setup
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("q", "v"))
  adapters = random_adapters(pj.init(cfg, jax.random.key(2), params))
  loss = lambda a, p: jnp.mean(pj.apply(cfg, model.apply)(p, a, x) ** 2)  # noqa: E731
  grads = jax.grad(loss)(adapters, params)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  # The frozen tree is not differentiated: the jaxpr of grad has no cotangent output for it.
  assert len(jax.make_jaxpr(jax.grad(loss))(adapters, params).out_avals) == len(jax.tree.leaves(adapters))
  opt_state = optax.adamw(1e-3).init(adapters)
  moments = [l for l in jax.tree.leaves(opt_state) if np.ndim(l) > 0]
  assert len(moments) == 2 * len(jax.tree.leaves(adapters)) == 2 * 12
  assert tree.nbytes(moments) == 2 * tree.nbytes(adapters) == 2 * 6 * (16 * 4 + 4 * 16) * 4


def test_optax_freeze_mask_keeps_no_state_for_frozen_leaves(setup):
  _, params, _ = setup
  cfg = pj.LoraConfig(rank=4, targets=("q",))
  full = {"base": params, "lora": pj.init(cfg, jax.random.key(0), params)}
  trainable = jax.tree.map(lambda _: False, full["base"]), jax.tree.map(lambda _: True, full["lora"])
  mask = {"base": trainable[0], "lora": trainable[1]}
  tx = pj.optax_freeze(optax.adam(0.1), mask)
  state = tx.init(full)
  moments = [l for l in jax.tree.leaves(state) if np.ndim(l) > 0]
  assert tree.nbytes(moments) == 2 * tree.nbytes(full["lora"])
  grads = jax.tree.map(jnp.ones_like, full)
  updates, _ = tx.update(grads, state, full)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["base"]))
  assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates["lora"]))
  # A bare optax.masked passes frozen gradients through unchanged: it freezes nothing.
  masked_updates, _ = optax.masked(optax.adam(0.1), mask).update(grads, optax.masked(optax.adam(0.1), mask).init(full))
  assert float(jnp.abs(masked_updates["base"]["embed"]["kernel"]).max()) == 1.0


def test_split_combine_and_counts(setup):
  _, params, _ = setup
  bias_mask = tree.mask(params, lambda path, _: path.endswith("/bias"))
  biases, rest = tree.split(params, bias_mask)
  assert tree.count(biases) + tree.count(rest) == tree.count(params)
  assert all(p.endswith("/bias") for p in tree.flatten(biases))
  assert jax.tree.structure(tree.combine(biases, rest)) == jax.tree.structure(params)
  line = pj.print_trainable_parameters(biases, rest)
  n_bias = tree.count(biases)
  assert line == f"trainable params: {n_bias:,d} || all params: {tree.count(params):,d} || " \
                 f"trainable%: {100 * n_bias / tree.count(params):.4f}"


def test_dropout_on_lora_input(setup):
  model, params, x = setup
  cfg = pj.LoraConfig(rank=4, dropout=0.5, targets=("q", "v"))
  adapters = random_adapters(pj.init(cfg, jax.random.key(2), params))
  fn = pj.apply(cfg, model.apply)
  eval_out = fn(params, adapters, x)
  no_dropout = pj.apply(pj.LoraConfig(rank=4, targets=("q", "v")), model.apply)(params, adapters, x)
  np.testing.assert_array_equal(eval_out, no_dropout)  # no 'dropout' rng: deterministic
  a = fn(params, adapters, x, rngs={"dropout": jax.random.key(5)})
  b = fn(params, adapters, x, rngs={"dropout": jax.random.key(6)})
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_scanned_layers_stack_adapters_and_merge():
  model = ScannedModel()
  x = jax.random.normal(jax.random.key(0), (2, 7, 6))
  params = model.init(jax.random.key(1), x)["params"]
  cfg = pj.LoraConfig(rank=2, alpha=4, targets=("q", "wi"))
  adapters = random_adapters(pj.init(cfg, jax.random.key(2), params))
  assert adapters["layers"]["q"]["lora_A"].shape == (3, 16, 2)
  unmerged = pj.apply(cfg, model.apply)(params, adapters, x)
  np.testing.assert_allclose(model.apply({"params": pj.merge(cfg, params, adapters)}, x), unmerged, atol=1e-5)


def test_adapter_folder_round_trip(setup, tmp_path):
  model, params, x = setup
  cfg = pj.LoraConfig(rank=4, alpha=16, targets=("q", "wo"))
  adapters = random_adapters(pj.init(cfg, jax.random.key(2), params))
  interop.save_lora_adapter(str(tmp_path / "adapter"), cfg, adapters, base_model_name_or_path="tiny")
  loaded_cfg, loaded = interop.load_lora_adapter(str(tmp_path / "adapter"), params)
  assert (loaded_cfg.rank, loaded_cfg.alpha, loaded_cfg.targets) == (4, 16.0, ("q", "wo"))
  np.testing.assert_array_equal(pj.apply(loaded_cfg, model.apply)(params, loaded, x),
                                pj.apply(cfg, model.apply)(params, adapters, x))
  wrong = jax.tree.map(lambda p: p, params)
  wrong["block_1"]["q"]["kernel"] = jnp.zeros((16, 8))
  with pytest.raises(ValueError, match=r"block\.1\.q\.lora_B\.weight' has shape \(16, 4\) but this model needs \(8, 4\)"):
    interop.load_lora_adapter(str(tmp_path / "adapter"), wrong)
