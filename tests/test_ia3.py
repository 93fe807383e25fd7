"""(IA)³: config checks, identity at init, merge/unmerge, gradients, scanned layers, T5 against HF peft."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import peftjax as pj
from peftjax import tree
from peftjax.methods import ia3, modules_to_save
from peftjax.models import gpt2, t5

import tiny_models  # tests/ is on sys.path under pytest


@pytest.fixture(scope="module")
def setup():
  model = tiny_models.TinyModel(attention="k")
  x = jax.random.normal(jax.random.key(0), (2, 7, 6))
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, x


def random_vectors(adapters, seed=3):
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.uniform(k, l.shape, minval=0.5, maxval=1.5)
                                      for k, l in zip(keys, leaves)])


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_config_errors(setup):
  _, params, _ = setup
  with pytest.raises(ValueError, match=r"IA3Config.feedforward entries \['wo'\] are not in targets=\('k', 'v'\)"):
    ia3.IA3Config(targets=("k", "v"), feedforward=("wo",))
  with pytest.raises(ValueError, match=r"IA3Config.targets=\('key',\) match no linear module; valid module names "
                                       r"are \['embed', 'k', 'lm_head', 'o', 'v', 'wi', 'wo'\]"):
    pj.init(ia3.IA3Config(targets=("key",), feedforward=()), jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"IA3Config.feedforward='.\*wi' selects 'block.0.wi', which is not a target"):
    pj.init(ia3.IA3Config(targets=r".*(k|v)", feedforward=r".*wi"), jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"IA3Config.feedforward='.\*fc2' matches no target module; valid target "
                                       r"modules are \['block.0.k'"):
    pj.init(ia3.IA3Config(targets=r".*(k|v)", feedforward=r".*fc2"), jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"for_model has no defaults for model_type='opt'; valid: \['bert'"):
    ia3.IA3Config.for_model("opt")
  assert ia3.IA3Config.for_model("t5") == ia3.IA3Config()
  assert ia3.IA3Config.for_model("bert").feedforward == ("output.dense",)


def test_identity_at_init_and_shapes(setup):
  model, params, x = setup
  cfg = ia3.IA3Config(targets=("k", "v", "wo"), feedforward=("wo",))
  adapters = pj.init(cfg, jax.random.key(2), params)
  leaves = ("k/ia3_out", "v/ia3_out", "wo/ia3_in")
  assert set(tree.flatten(adapters)) == {f"block_{i}/{leaf}" for i in range(3) for leaf in leaves}
  assert adapters["block_0"]["k"]["ia3_out"].shape == (16,)
  assert adapters["block_0"]["wo"]["ia3_in"].shape == (32,)  # the feed-forward input (d_ff), not its output
  assert all(bool(jnp.all(l == 1.0)) for l in jax.tree.leaves(adapters))
  np.testing.assert_array_equal(pj.apply(cfg, model.apply)(params, adapters, x), model.apply({"params": params}, x))


def test_activation_space_is_the_definition(setup):
  """Output targets scale (x W + b); feed-forward targets scale x before W (b untouched)."""
  model, params, x = setup
  cfg = ia3.IA3Config(targets=("v", "wo"), feedforward=("wo",))
  adapters = random_vectors(pj.init(cfg, jax.random.key(2), params))
  scaled = jax.tree.map(lambda p: p, params)
  for i in range(3):
    block, vecs = scaled[f"block_{i}"], adapters[f"block_{i}"]
    out = vecs["v"]["ia3_out"]
    block["v"] = {"kernel": block["v"]["kernel"] * out, "bias": block["v"]["bias"] * out}
    block["wo"] = {"kernel": vecs["wo"]["ia3_in"][:, None] * block["wo"]["kernel"], "bias": block["wo"]["bias"]}
  np.testing.assert_allclose(pj.apply(cfg, model.apply)(params, adapters, x), model.apply({"params": scaled}, x),
                             atol=1e-5)


def test_merge_equals_activation_space_and_unmerge_restores(setup):
  model, params, x = setup
  for cfg in (ia3.IA3Config(targets=("k", "v", "wo"), feedforward=("wo",)),
              ia3.IA3Config(targets="all-linear", feedforward=r".*(wo|o)")):
    adapters = random_vectors(pj.init(cfg, jax.random.key(2), params))
    unmerged = pj.apply(cfg, model.apply)(params, adapters, x)
    merged = pj.merge(cfg, params, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert _max_diff(unmerged, model.apply({"params": params}, x)) > 1e-2  # the vectors matter
    np.testing.assert_allclose(model.apply({"params": merged}, x), unmerged, atol=1e-5)
    np.testing.assert_array_equal(merged["block_0"]["wo"]["bias"], params["block_0"]["wo"]["bias"])
    restored = pj.unmerge(cfg, merged, adapters)
    assert max(jax.tree.leaves(jax.tree.map(_max_diff, restored, params))) < 1e-6


def test_gradients_only_for_vectors(setup):
  model, params, x = setup
  cfg = ia3.IA3Config()
  adapters = random_vectors(pj.init(cfg, jax.random.key(2), params))
  loss = lambda a, p: jnp.mean(pj.apply(cfg, model.apply)(p, a, x) ** 2)  # noqa: E731
  grads = jax.grad(loss)(adapters, params)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  assert len(jax.make_jaxpr(jax.grad(loss))(adapters, params).out_avals) == len(jax.tree.leaves(adapters)) == 9
  assert tree.count(adapters) == 3 * (16 + 16 + 32)


def test_scanned_layers_stack_vectors_and_merge():
  model = tiny_models.ScannedModel(attention="k", collection="ia3")
  x = jax.random.normal(jax.random.key(0), (2, 7, 6))
  params = model.init(jax.random.key(1), x)["params"]
  cfg = ia3.IA3Config(targets=("v", "wo"), feedforward=("wo",))
  adapters = random_vectors(pj.init(cfg, jax.random.key(2), params))
  assert adapters["layers"]["v"]["ia3_out"].shape == (3, 16)
  assert adapters["layers"]["wo"]["ia3_in"].shape == (3, 32)
  unmerged = pj.apply(cfg, model.apply)(params, adapters, x)
  assert _max_diff(unmerged, model.apply({"params": params}, x)) > 1e-2
  np.testing.assert_allclose(model.apply({"params": pj.merge(cfg, params, adapters)}, x), unmerged, atol=1e-5)


# --- T5 against Hugging Face peft ------------------------------------------------------------------------

TINY_T5 = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
T5_VARIANTS = {"v1.0": dict(feed_forward_proj="relu"),
               "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def _t5_batch():
  rng = np.random.default_rng(0)
  input_ids = rng.integers(2, 100, (2, 6))
  attention_mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
  decoder_input_ids = np.concatenate([np.zeros((2, 1), np.int64), rng.integers(2, 100, (2, 4))], axis=1)
  return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)


def _peft_ia3(torch_model, cfg: ia3.IA3Config):
  import peft
  return peft.get_peft_model(torch_model, peft.IA3Config(target_modules=list(cfg.targets),
                                                         feedforward_modules=list(cfg.feedforward)))


def test_t5_small_parameter_count_matches_hf_peft():
  from transformers import T5Config, T5ForConditionalGeneration
  model = t5.T5ForConditionalGeneration(t5.T5Config.t5_small())
  params = jax.eval_shape(lambda: t5.init_params(model, jax.random.key(0)))
  cfg = ia3.IA3Config.for_model("t5")
  adapters = jax.eval_shape(lambda: pj.init(cfg, jax.random.key(1), params))
  with torch.device("meta"):
    peft_model = _peft_ia3(T5ForConditionalGeneration(T5Config()), cfg)
  hf_trainable, _ = peft_model.get_nb_trainable_parameters()
  assert tree.count(adapters) == hf_trainable == 12 * 2 * 512 + 6 * 2 * 512 + 12 * 2048


@pytest.mark.parametrize("variant", list(T5_VARIANTS))
def test_t5_matches_hf_peft_ia3(variant, tmp_path):
  from transformers import T5Config, T5ForConditionalGeneration
  torch.manual_seed(0)
  torch_model = T5ForConditionalGeneration(T5Config(**TINY_T5, **T5_VARIANTS[variant])).eval()
  torch_model.save_pretrained(str(tmp_path))
  model, params = pj.models.from_pretrained(str(tmp_path))
  cfg = ia3.IA3Config.for_model("t5")
  adapters = pj.init(cfg, jax.random.key(0), params)
  batch = _t5_batch()
  adapted = jax.jit(lambda p, a: pj.apply(cfg, model.apply)(p, a, **batch))
  base = jax.jit(lambda p: model.apply({"params": p}, **batch))(params)
  np.testing.assert_array_equal(adapted(params, adapters), base)

  peft_model = _peft_ia3(torch_model, cfg).eval()
  vectors = {name: p for name, p in peft_model.named_parameters() if ".ia3_l." in name}
  assert tree.count(adapters) == peft_model.get_nb_trainable_parameters()[0] == sum(v.numel() for v in vectors.values())
  by_hf_name = {tree.hf_name(path.rsplit("/", 1)[0]): path for path in tree.flatten(adapters)}
  assert len(by_hf_name) == len(vectors) == 2 * 2 + 2 * 4 + 2 * 2  # k, v of 6 attentions; wo of 4 blocks
  rng = np.random.default_rng(1)
  flat = {}
  with torch.no_grad():
    for name, param in vectors.items():
      path = by_hf_name[name[len("base_model.model."):name.index(".ia3_l.")]]
      value = rng.uniform(0.5, 1.5, param.shape).astype(np.float32)
      param.copy_(torch.tensor(value))
      assert param.shape == ((1, value.size) if path.endswith("/ia3_in") else (value.size, 1))
      flat[path] = jnp.asarray(value.reshape(-1))
  adapters = tree.unflatten(flat)
  with torch.no_grad():
    expected = peft_model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  unmerged = adapted(params, adapters)
  assert _max_diff(unmerged, base) > 1e-2
  assert _max_diff(unmerged, expected) < 1e-4
  merged = pj.merge(cfg, params, adapters)
  scale = max(1.0, float(jnp.abs(unmerged).max()))  # v1.1's untied head gives logits ~10: compare relative to that
  assert _max_diff(model.apply({"params": merged}, **batch), unmerged) < 1e-5 * scale
  assert max(jax.tree.leaves(jax.tree.map(_max_diff, pj.unmerge(cfg, merged, adapters), params))) < 1e-6


# --- GPT-2 (Conv1D in PyTorch, Dense here) against Hugging Face peft, with modules_to_save ---------------

def test_gpt2_matches_hf_peft_ia3_with_modules_to_save(tmp_path):
  import peft
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.manual_seed(0)
  torch_model = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                           bos_token_id=1, eos_token_id=2)).eval()
  with torch.no_grad():
    for name, param in torch_model.named_parameters():
      if ".c_" in name and name.endswith("weight"):
        param.mul_(10.0)  # 0.02-std weights barely change the residual stream
  torch_model.save_pretrained(str(tmp_path))
  model, params = pj.models.from_pretrained(str(tmp_path))
  cfgs = [ia3.IA3Config.for_model("gpt2"), modules_to_save.ModulesToSaveConfig(("ln_f",))]
  vectors, saved = pj.init(cfgs, jax.random.key(0), params)
  assert {p.rsplit("/", 1)[-1] for p in tree.flatten(vectors)} == {"ia3_out", "ia3_in"}
  assert vectors["transformer"]["h_0"]["mlp"]["c_proj"]["ia3_in"].shape == (128,)
  assert "c_proj" not in vectors["transformer"]["h_0"]["attn"]  # "mlp.c_proj" is not the attention's c_proj

  peft_model = peft.get_peft_model(torch_model, peft.IA3Config(
      target_modules=list(cfgs[0].targets), feedforward_modules=list(cfgs[0].feedforward), modules_to_save=["ln_f"],
      fan_in_fan_out=True))
  hf_trainable, hf_all = peft_model.get_nb_trainable_parameters()
  assert tree.count((vectors, saved)) == hf_trainable == 2 * (96 + 128) + 2 * 32
  # HF counts the modules_to_save copy as trainable and its original as frozen: so does ours.
  assert tree.count((vectors, saved)) + tree.count(params) == hf_all
  rng = np.random.default_rng(1)
  flat_vectors, flat_saved = {}, {}
  by_hf_name = {tree.hf_name(p.rsplit("/", 1)[0]): p for p in tree.flatten(vectors)}
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if not param.requires_grad:
        continue
      value = rng.uniform(0.5, 1.5, param.shape).astype(np.float32)
      param.copy_(torch.tensor(value))
      if ".ia3_l." in name:
        flat_vectors[by_hf_name[name[len("base_model.model."):name.index(".ia3_l.")]]] = value.reshape(-1)
      else:  # base_model.model.transformer.ln_f.modules_to_save.default.{weight,bias}
        flat_saved["transformer/ln_f/" + {"weight": "scale", "bias": "bias"}[name.rsplit(".", 1)[-1]]] = value
  assert len(flat_vectors) == 4 and len(flat_saved) == 2
  adapters = (tree.unflatten(flat_vectors), tree.unflatten(flat_saved))
  ids = np.random.default_rng(2).integers(0, 101, (2, 8))
  with torch.no_grad():
    expected = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
  unmerged = pj.apply(cfgs, model.apply)(params, adapters, ids)
  assert _max_diff(unmerged, model.apply({"params": params}, ids)) > 1e-2
  assert _max_diff(unmerged, expected) < 1e-4
  np.testing.assert_allclose(model.apply({"params": pj.merge(cfgs, params, adapters)}, ids), unmerged, atol=1e-5)

  # The same adapters stacked for the layer-scanned model.
  scanned, scanned_params = gpt2.from_pretrained(str(tmp_path), scan_layers=True)
  stacked = (gpt2.stack_layers(adapters[0]), adapters[1])
  assert stacked[0]["transformer"]["h"]["attn"]["c_attn"]["ia3_out"].shape == (2, 96)
  assert _max_diff(pj.apply(cfgs, scanned.apply)(scanned_params, stacked, ids), unmerged) < 1e-5
