"""modules_to_save, and methods composed through a list of configs (LoRA + BitFit, BitFit + (IA)³)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj
from peftjax import tree
from peftjax.methods import bitfit, ia3, modules_to_save

from tiny_models import Block, max_diff as _max_diff, perturbed  # tests/ is on sys.path under pytest


class Classifier(nn.Module):
  """Token embedding, two blocks, mean pooling and a 3-way classifier."""

  width: int = 16

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(30, self.width, name="embed")(ids)
    for i in range(2):
      x = Block(self.width, general_wo=False, name=f"block_{i}")(x)
    return nn.Dense(3, name="classifier")(x.mean(axis=1))


@pytest.fixture(scope="module")
def setup():
  model = Classifier()
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 30, (4, 7)))
  params = model.init(jax.random.key(1), ids)["params"]
  return model, params, ids


def test_modules_to_save_matching(setup):
  _, params, _ = setup
  def leaves(modules):
    return sorted(tree.flatten(pj.init(modules_to_save.ModulesToSaveConfig(modules), jax.random.key(0), params)))
  assert leaves(("classifier",)) == ["classifier/bias", "classifier/kernel"]
  assert leaves(["embed"]) == ["embed/embedding"]  # any module holding leaves, not only linear layers
  assert leaves(("block.1.norm",)) == leaves(("block_1/norm",)) == ["block_1/norm/bias", "block_1/norm/scale"]
  assert len(leaves(("block_1",))) == 2 + 2 * 4 + 1  # a whole block: norm, q kernel, v/o/wi/wo kernels and biases
  assert leaves(r"block\.\d\.wo") == ["block_0/wo/bias", "block_0/wo/kernel", "block_1/wo/bias", "block_1/wo/kernel"]
  with pytest.raises(ValueError, match=r"ModulesToSaveConfig.modules=\('score',\) match no module; valid module names "
                                       r"are \['block_0', 'block_1', 'classifier', 'embed', 'norm', 'o', 'q', 'v', "
                                       r"'wi', 'wo'\]"):
    pj.init(modules_to_save.ModulesToSaveConfig(("score",)), jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"ModulesToSaveConfig.modules is empty"):
    modules_to_save.ModulesToSaveConfig(())


def test_modules_to_save_trains_copies_and_merges(setup):
  model, params, ids = setup
  cfg = modules_to_save.ModulesToSaveConfig(("classifier", "embed"))
  saved = pj.init(cfg, jax.random.key(0), params)
  apply = pj.apply(cfg, model.apply)
  base = model.apply({"params": params}, ids)
  np.testing.assert_array_equal(apply(params, saved, ids), base)
  loss = lambda a, p: jnp.mean(apply(p, a, ids) ** 2)  # noqa: E731
  grads = jax.grad(loss)(saved, params)
  assert jax.tree.structure(grads) == jax.tree.structure(saved)
  assert len(jax.make_jaxpr(jax.grad(loss))(saved, params).out_avals) == 3
  saved = perturbed(saved)
  unmerged = apply(params, saved, ids)
  assert _max_diff(unmerged, base) > 1e-2
  merged = pj.merge(cfg, params, saved)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(model.apply({"params": merged}, ids), unmerged, atol=1e-5)
  with pytest.raises(ValueError, match="ModulesToSaveConfig cannot be unmerged"):
    pj.unmerge(cfg, merged, saved)
  wrong = {"classifier": {"kernel": jnp.zeros((8, 3))}}
  with pytest.raises(ValueError, match=r"adapter leaf 'classifier/kernel' of shape \(8, 3\) does not fit this model "
                                       r"\(its parameter: \(16, 3\)\)"):
    apply(params, wrong, ids)


def test_lora_plus_bitfit_trains_both_and_merges(setup):
  model, params, ids = setup
  cfgs = [pj.LoraConfig(rank=2, alpha=4, targets=("q", "v")), bitfit.BitFitConfig(modules_to_save=("classifier",))]
  lora_tree, bias_tree = pj.init(cfgs, jax.random.key(0), params)
  assert sorted(tree.flatten(lora_tree))[:2] == ["block_0/q/lora_A", "block_0/q/lora_B"]
  assert all(p.endswith("/bias") or p.startswith("classifier/") for p in tree.flatten(bias_tree))
  apply = pj.apply(cfgs, model.apply)
  base = model.apply({"params": params}, ids)
  np.testing.assert_array_equal(apply(params, (lora_tree, bias_tree), ids), base)

  adapters = (perturbed(lora_tree, seed=4), perturbed(bias_tree, seed=5))
  loss = lambda a, p: jnp.mean(apply(p, a, ids) ** 2)  # noqa: E731
  grads = jax.grad(loss)(adapters, params)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  n_trainable = len(jax.tree.leaves(adapters))
  assert len(jax.make_jaxpr(jax.grad(loss))(adapters, params).out_avals) == n_trainable  # nothing frozen
  assert tree.count(adapters) == 2 * 2 * (16 * 2 + 2 * 16) + 2 * (16 + 16 + 16 + 32 + 16) + (16 * 3 + 3)

  unmerged = apply(params, adapters, ids)
  assert _max_diff(unmerged, base) > 1e-2
  merged = pj.merge(cfgs, params, adapters)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(model.apply({"params": merged}, ids), unmerged, atol=1e-5)


def test_bitfit_then_ia3_merge(setup):
  """BitFit writes the biases, then (IA)³ scales the output-scaled ones: merged equals activation space."""
  model, params, ids = setup
  cfgs = [bitfit.BitFitConfig(), ia3.IA3Config(targets=("v", "wo"), feedforward=("wo",))]
  adapters = tuple(perturbed(t, seed=i) for i, t in enumerate(pj.init(cfgs, jax.random.key(0), params)))
  unmerged = pj.apply(cfgs, model.apply)(params, adapters, ids)
  assert _max_diff(unmerged, model.apply({"params": params}, ids)) > 1e-2
  np.testing.assert_allclose(model.apply({"params": pj.merge(cfgs, params, adapters)}, ids), unmerged, atol=1e-5)
