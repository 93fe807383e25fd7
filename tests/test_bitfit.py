"""BitFit: only biases (and an optional head) train; identity at init, merge, errors; GPT-2 against PyTorch counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import peftjax as pj
from peftjax import tree
from peftjax.methods import bitfit
from peftjax.models import gpt2, hf_io, t5

from tiny_models import TinyModel, max_diff as _max_diff, perturbed  # tests/ is on sys.path under pytest


@pytest.fixture(scope="module")
def setup():
  model = TinyModel(depth=2, attention="k", general_wo=False, head_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 7, 6))
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, x


def test_trains_only_biases(setup):
  model, params, x = setup
  cfg = bitfit.BitFitConfig()
  adapters = pj.init(cfg, jax.random.key(0), params)
  bias_paths = [p for p in tree.flatten(params) if p.endswith("/bias")]
  assert sorted(tree.flatten(adapters)) == sorted(bias_paths)
  # embed + per block: norm, v, o, wi (2x), wo
  assert tree.count(adapters) == 16 + 2 * (16 + 16 + 16 + 32 + 16)
  np.testing.assert_array_equal(pj.apply(cfg, model.apply)(params, adapters, x), model.apply({"params": params}, x))

  loss = lambda a, p: jnp.mean(pj.apply(cfg, model.apply)(p, a, x) ** 2)  # noqa: E731
  grads = jax.grad(loss)(adapters, params)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  assert len(jax.make_jaxpr(jax.grad(loss))(adapters, params).out_avals) == len(bias_paths)


def test_merge_writes_biases_back(setup):
  model, params, x = setup
  cfg = bitfit.BitFitConfig()
  adapters = perturbed(pj.init(cfg, jax.random.key(0), params))
  unmerged = pj.apply(cfg, model.apply)(params, adapters, x)
  assert _max_diff(unmerged, model.apply({"params": params}, x)) > 1e-2
  merged = pj.merge(cfg, params, adapters)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(model.apply({"params": merged}, x), unmerged, atol=1e-5)
  np.testing.assert_array_equal(merged["block_1"]["wi"]["kernel"], params["block_1"]["wi"]["kernel"])
  np.testing.assert_array_equal(merged["block_1"]["wi"]["bias"], adapters["block_1"]["wi"]["bias"])
  with pytest.raises(ValueError, match="BitFitConfig cannot be unmerged: merge replaced the base biases"):
    pj.unmerge(cfg, merged, adapters)


def test_selected_biases_and_head(setup):
  model, params, x = setup
  cfg = bitfit.BitFitConfig(targets=("v", "norm"), modules_to_save=("lm_head",))
  adapters = pj.init(cfg, jax.random.key(0), params)
  assert sorted(tree.flatten(adapters)) == ["block_0/norm/bias", "block_0/v/bias", "block_1/norm/bias",
                                            "block_1/v/bias", "lm_head/kernel"]
  assert tree.count(adapters) == 4 * 16 + 16 * 5
  np.testing.assert_array_equal(pj.apply(cfg, model.apply)(params, adapters, x), model.apply({"params": params}, x))
  grads = jax.grad(lambda a: jnp.mean(pj.apply(cfg, model.apply)(params, a, x) ** 2))(adapters)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)


def test_errors(setup):
  _, params, _ = setup
  with pytest.raises(ValueError, match=r"BitFitConfig.targets=\('k',\) match no module; valid module names are "
                                       r"\['block_0', 'block_1', 'embed', 'norm', 'o', 'v', 'wi', 'wo'\]"):
    pj.init(bitfit.BitFitConfig(targets=("k",)), jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"BitFitConfig.modules_to_save=\('classifier',\) match no module"):
    pj.init(bitfit.BitFitConfig(modules_to_save=("classifier",)), jax.random.key(0), params)
  model = t5.T5ForConditionalGeneration(t5.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                    num_heads=4))
  t5_params = jax.eval_shape(lambda: t5.init_params(model, jax.random.key(0)))
  with pytest.raises(ValueError, match=r"^BitFit cannot train this model: it has no bias parameters \(no leaf named "
                                       r"'bias'\); use a method that adds parameters instead, such as LoraConfig or "
                                       r"IA3Config\.$"):
    pj.init(bitfit.BitFitConfig(), jax.random.key(0), t5_params)


def test_gpt2_bias_count_gradients_and_merge(tmp_path):
  """On transformers' GPT-2 (saved, then loaded by peftjax), BitFit trains exactly PyTorch's bias scalars."""
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.manual_seed(0)
  torch_model = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
  torch_model.save_pretrained(str(tmp_path))
  model, params = pj.models.from_pretrained(str(tmp_path))
  torch_biases = {n: p.numel() for n, p in torch_model.named_parameters() if n.endswith(".bias")}
  assert len(torch_biases) == 2 * 6 + 1  # ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp c_proj per layer; ln_f

  cfg = bitfit.BitFitConfig()
  adapters = pj.init(cfg, jax.random.key(0), params)
  assert tree.count(adapters) == sum(torch_biases.values())
  assert sorted(hf_io.hf_key(p) for p in tree.flatten(adapters)) == sorted(torch_biases)
  with_head = pj.init(bitfit.BitFitConfig(modules_to_save=("lm_head",)), jax.random.key(0), params)
  assert tree.count(with_head) == sum(torch_biases.values()) + torch_model.lm_head.weight.numel()

  ids = np.random.default_rng(0).integers(0, 101, (2, 8))
  apply = pj.apply(cfg, model.apply)
  np.testing.assert_array_equal(apply(params, adapters, ids), model.apply({"params": params}, ids))
  grads = jax.grad(lambda a, p: jnp.mean(apply(p, a, ids) ** 2))(adapters, params)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  adapters = perturbed(adapters, scale=0.1)
  unmerged = apply(params, adapters, ids)
  assert _max_diff(unmerged, model.apply({"params": params}, ids)) > 1e-3
  np.testing.assert_allclose(model.apply({"params": pj.merge(cfg, params, adapters)}, ids), unmerged, atol=1e-5)


def test_gpt2_scanned_layers_stack_biases():
  model = gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_layer=3, n_head=2),
                               scan_layers=True)
  params = gpt2.init_params(model, jax.random.key(0))
  adapters = pj.init(bitfit.BitFitConfig(targets=("c_attn",)), jax.random.key(0), params)
  assert list(tree.flatten(adapters)) == ["transformer/h/attn/c_attn/bias"]
  assert adapters["transformer"]["h"]["attn"]["c_attn"]["bias"].shape == (3, 48)
  ids = np.arange(12).reshape(2, 6)
  adapters = perturbed(adapters)
  apply = pj.apply(bitfit.BitFitConfig(targets=("c_attn",)), model.apply)
  assert _max_diff(apply(params, adapters, ids), model.apply({"params": params}, ids)) > 1e-3
