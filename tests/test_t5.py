"""T5 v1.0 / v1.1 against transformers' PyTorch T5: logits, greedy generation, checkpoints, LoRA vs HF peft."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import peftjax as pj
from peftjax import models, tree
from peftjax.methods import lora
from peftjax.models import hf_io, t5

from compare import assert_same_tokens  # tests/ is on sys.path under pytest

VOCAB = 100
TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
VARIANTS = {"v1.0": dict(feed_forward_proj="relu"),
            "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def _torch_model(variant: str, layer_scale: float = 1.0):
  """Random transformers model (seed 0) with uneven norm weights and the other weights but `shared` scaled."""
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, **VARIANTS[variant]))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.uniform_(0.5, 2.0)
      elif name != "shared.weight":
        param.mul_(layer_scale)
  if variant == "v1.1":  # transformers 5 ties the head even for v1.1; give it its own weights
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, TINY["d_model"]) * TINY["d_model"] ** -0.5)
  return model.eval()


def _load_torch(folder: str):
  return transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{variant: folder written by transformers' save_pretrained}."""
  folders = {}
  for variant in VARIANTS:
    folder = str(tmp_path_factory.mktemp(variant.replace(".", "_")))
    _torch_model(variant).save_pretrained(folder)
    folders[variant] = folder
  return folders


@pytest.fixture(scope="module")
def batch():
  """Right-padded encoder inputs of lengths 9, 6, 3 and decoder inputs of lengths 7, 5, 2."""
  rng = np.random.default_rng(0)
  input_ids = np.zeros((3, 9), np.int64)
  attention_mask = np.zeros((3, 9), np.int64)
  labels = np.full((3, 7), -100, np.int64)
  for i, (n_in, n_out) in enumerate([(9, 7), (6, 5), (3, 2)]):
    input_ids[i, :n_in] = np.append(rng.integers(2, VOCAB, n_in - 1), 1)
    attention_mask[i, :n_in] = 1
    labels[i, :n_out] = rng.integers(2, VOCAB, n_out)
  decoder_input_ids = np.asarray(t5.shift_right(jnp.asarray(labels)))
  decoder_attention_mask = (np.arange(7)[None] < np.array([[7], [5], [2]])).astype(np.int64)
  return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
              decoder_attention_mask=decoder_attention_mask)


def _torch_logits(model, batch) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


def _args(batch) -> tuple:
  return batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"]


def _jax_logits(model, params, batch) -> np.ndarray:
  return np.asarray(model.apply({"params": params}, *_args(batch)))


def _torch_generate(model, batch, **kwargs) -> np.ndarray:
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(batch["input_ids"]),
                         attention_mask=torch.tensor(batch["attention_mask"]),
                         max_new_tokens=16, do_sample=False, **kwargs).numpy()[:, 1:]
  return np.pad(out, ((0, 0), (0, 16 - out.shape[1])), constant_values=0)  # HF stops early once all hit EOS


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, batch, variant):
  torch_model = _load_torch(checkpoints[variant])
  assert (torch_model.lm_head.weight is torch_model.shared.weight) == (variant == "v1.0")
  model, params = t5.from_pretrained(checkpoints[variant])
  assert model.config.tie_word_embeddings == model.config.scale_decoder_outputs == (variant == "v1.0")
  assert ("lm_head" in params) == (variant == "v1.1")
  expected = _torch_logits(torch_model, batch)
  assert _max_diff(_jax_logits(model, params, batch), expected) < 1e-4
  # dispatch through the family table gives the same model
  model2, params2 = models.from_pretrained(checkpoints[variant])
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_hub_style_checkpoints(checkpoints, batch, tmp_path):
  """Older hub files: flan-t5 says tie_word_embeddings=false; t5 v1.0 may store a copy of shared as lm_head."""
  for variant in VARIANTS:
    folder = str(tmp_path / variant)
    shutil.copytree(checkpoints[variant], folder)
    config = hf_io.read_config(folder)
    del config["scale_decoder_outputs"]
    if variant == "v1.1":
      config["tie_word_embeddings"] = False
    else:
      del config["tie_word_embeddings"]
      state = hf_io.read_state_dict(folder)
      state["lm_head.weight"] = state["shared.weight"].copy()
      save_file(state, os.path.join(folder, hf_io.SAFE_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(config, f)
    model, params = t5.from_pretrained(folder)
    assert ("lm_head" in params) == (variant == "v1.1")
    assert model.config.scale_decoder_outputs == (variant == "v1.0")
    expected = _torch_logits(_load_torch(checkpoints[variant]), batch)
    assert _max_diff(_jax_logits(model, params, batch), expected) < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(batch, variant, tmp_path):
  # Stronger layers for v1.0: with the default init its tied head makes greedy decoding repeat one token.
  _torch_model(variant, layer_scale=3.0 if variant == "v1.0" else 1.0).save_pretrained(str(tmp_path))
  torch_model = _load_torch(str(tmp_path))
  model, params = t5.from_pretrained(str(tmp_path))
  ours = np.asarray(t5.generate(model, params, batch["input_ids"], batch["attention_mask"], max_new_tokens=16))
  assert ours.shape == (3, 16)
  assert_same_tokens(ours, _torch_generate(torch_model, batch), "ours vs transformers generate")
  assert ours[0, 0] != 1 and len(np.unique(ours)) > 3  # not a trivial all-EOS output

  # Stopping: make a token the model emits mid-sequence the EOS; afterwards only pad, like HF.
  step = next(i for i in range(2, 16) if ours[0, i] not in ours[0, :i])
  eos = int(ours[0, step])
  stopped = np.asarray(t5.generate(model, params, batch["input_ids"], batch["attention_mask"], max_new_tokens=16,
                                   eos_token_id=eos))
  assert_same_tokens(stopped, _torch_generate(torch_model, batch, eos_token_id=eos), "ours vs transformers generate")
  np.testing.assert_array_equal(stopped[0, :step + 1], ours[0, :step + 1])
  assert (stopped[0, step + 1:] == 0).all()


def test_sampling_needs_rng_and_is_reproducible(checkpoints, batch):
  model, params = t5.from_pretrained(checkpoints["v1.1"])
  with pytest.raises(ValueError, match="needs rng"):
    t5.generate(model, params, batch["input_ids"], batch["attention_mask"], temperature=1.0)
  sample = lambda seed: np.asarray(t5.generate(model, params, batch["input_ids"], batch["attention_mask"],  # noqa: E731
                                                temperature=1.0, top_k=20, rng=jax.random.key(seed)))
  first = sample(0)
  np.testing.assert_array_equal(first, sample(0))
  assert first.shape == (3, 16) and not np.array_equal(first, sample(1))


def test_sharded_checkpoint(checkpoints, tmp_path):
  folder = str(tmp_path / "sharded")
  _torch_model("v1.1").save_pretrained(folder, max_shard_size="20KB")
  assert os.path.exists(os.path.join(folder, hf_io.SAFE_INDEX)) and len(hf_io.safetensors_files(folder)) > 1
  _, sharded = t5.from_pretrained(folder)
  _, single = t5.from_pretrained(checkpoints["v1.1"])
  assert jax.tree.structure(sharded) == jax.tree.structure(single)
  jax.tree.map(np.testing.assert_array_equal, sharded, single)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_loads_in_transformers(checkpoints, batch, variant, tmp_path):
  model, params = t5.from_pretrained(checkpoints[variant])
  folder = str(tmp_path / "ours")
  t5.save_pretrained(model, params, folder)
  torch_model, info = transformers.T5ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert (torch_model.lm_head.weight is torch_model.shared.weight) == (variant == "v1.0")
  assert _max_diff(_torch_logits(torch_model.eval(), batch), _jax_logits(model, params, batch)) < 1e-4
  model2, params2 = t5.from_pretrained(folder)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_checkpoint_errors(checkpoints, tmp_path):
  state = hf_io.read_state_dict(checkpoints["v1.0"])
  key = "encoder.block.1.layer.1.DenseReluDense.wi.weight"
  state[key] = np.zeros((48, 32), np.float32)
  os.makedirs(tmp_path / "bad_shape")
  shutil.copy(os.path.join(checkpoints["v1.0"], "config.json"), tmp_path / "bad_shape")
  save_file(state, str(tmp_path / "bad_shape" / hf_io.SAFE_WEIGHTS))
  with pytest.raises(ValueError, match=rf"{key}: checkpoint \(48, 32\) vs model \(32, 64\)"):
    t5.from_pretrained(str(tmp_path / "bad_shape"))

  state = hf_io.read_state_dict(checkpoints["v1.0"])
  del state["decoder.final_layer_norm.weight"]
  os.makedirs(tmp_path / "missing")
  shutil.copy(os.path.join(checkpoints["v1.0"], "config.json"), tmp_path / "missing")
  save_file(state, str(tmp_path / "missing" / hf_io.SAFE_WEIGHTS))
  with pytest.raises(ValueError, match=r"missing tensors \['decoder.final_layer_norm.weight'\]"):
    t5.from_pretrained(str(tmp_path / "missing"))

  with pytest.raises(ValueError, match="feed_forward_proj='gated-swish' is not supported; valid: "):
    t5.T5Config(feed_forward_proj="gated-swish")


def test_config_round_trip_and_shift_right():
  config = t5.T5Config(**TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  hf_config = transformers.T5Config(**config.to_hf())
  assert hf_config.is_gated_act and hf_config.dense_act_fn == "gelu_new" and not hf_config.scale_decoder_outputs
  assert t5.T5Config.from_hf(hf_config.to_dict()).scale_decoder_outputs is False
  assert t5.T5Config.from_hf({**config.to_hf(), "unknown_key": 3}) == config

  labels = np.array([[5, 6, 7, 1], [8, 1, -100, -100]])
  expected = transformers.T5ForConditionalGeneration(hf_config)._shift_right(torch.tensor(labels)).numpy()
  np.testing.assert_array_equal(t5.shift_right(jnp.asarray(labels), 0, 0), expected)


def test_dropout_and_logical_axes(checkpoints, batch):
  model, params = t5.from_pretrained(checkpoints["v1.1"])
  train = lambda seed: model.apply({"params": params}, *_args(batch), deterministic=False,  # noqa: E731
                                   rngs={"dropout": jax.random.key(seed, impl="rbg")})  # rbg: compiles faster
  first = train(0)
  assert np.isfinite(first).all() and _max_diff(first, train(1)) > 1e-3
  np.testing.assert_array_equal(first, train(0))
  axes = t5.logical_axes(model)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == \
      jax.tree.structure(params)
  flat = tree.flatten(axes)
  assert flat["shared/embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert flat["decoder/block_1/layer_1/EncDecAttention/o/kernel"] == jax.sharding.PartitionSpec("joined_kv", "embed")
  assert flat["encoder/block_0/layer_1/DenseReluDense/wi_0/kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert all(len(spec) == np.ndim(p) for spec, p in zip(flat.values(), tree.flatten(params).values()))


def test_remat_matches_plain_blocks(checkpoints, batch):
  model, params = t5.from_pretrained(checkpoints["v1.1"])
  remat_model = model.clone(remat=True)

  def loss(m, p):
    return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, *_args(batch))) ** 2)

  plain_loss, plain_grads = jax.value_and_grad(functools.partial(loss, model))(params)
  remat_loss, remat_grads = jax.value_and_grad(functools.partial(loss, remat_model))(params)
  assert jax.tree.structure(t5.init_params(remat_model, jax.random.key(0))) == jax.tree.structure(params)
  assert "remat" in str(jax.make_jaxpr(jax.grad(functools.partial(loss, remat_model)))(params))
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for g, h in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(g, h, atol=1e-6)


def test_t5_small_lora_parameter_count():
  model = t5.T5ForConditionalGeneration(t5.T5Config.t5_small())
  params = jax.eval_shape(lambda: t5.init_params(model, jax.random.key(0)))
  cfg = pj.LoraConfig(rank=8, alpha=16, targets=("q", "v"))
  adapters = jax.eval_shape(lambda: pj.init(cfg, jax.random.key(1), params))
  line = tree.print_trainable_parameters(adapters, params)
  assert line == "trainable params: 294,912 || all params: 60,801,536 || trainable%: 0.4850"


def _random_adapters(adapters, seed=3, scale=0.1):
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_matches_hf_peft(checkpoints, batch, variant):
  model, params = t5.from_pretrained(checkpoints[variant])
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("q", "v"))
  adapters = pj.init(cfg, jax.random.key(0), params)
  lora_apply = pj.apply(cfg, model.apply)
  base = _jax_logits(model, params, batch)
  np.testing.assert_array_equal(lora_apply(params, adapters, *_args(batch)), base)

  adapters = _random_adapters(adapters)
  lora_modules = lora.adapter_modules(adapters)
  assert len(lora_modules) == 2 * (2 + 2 + 2)  # q and v of 2 encoder self-, 2 decoder self- and 2 cross-attentions
  unmerged = np.asarray(lora_apply(params, adapters, *_args(batch)))
  merged_params = pj.merge(cfg, params, adapters)
  assert _max_diff(unmerged, base) > 1e-2
  assert _max_diff(_jax_logits(model, merged_params, batch), unmerged) < 1e-5
  restored = pj.unmerge(cfg, merged_params, adapters)
  assert max(jax.tree.leaves(jax.tree.map(_max_diff, restored, params))) < 1e-6

  peft_model = peft.get_peft_model(_load_torch(checkpoints[variant]),
                                   peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
  torch_modules = dict(peft_model.named_modules())
  assert len([m for m in torch_modules if m.endswith(".lora_A.default")]) == len(lora_modules)
  with torch.no_grad():
    for path, adapter in lora_modules.items():
      layer = torch_modules[f"base_model.model.{tree.hf_name(path)}"]
      layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(adapter["lora_A"]).T))
      layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(adapter["lora_B"]).T))
  peft_model.eval()
  assert _max_diff(_torch_logits(peft_model, batch), unmerged) < 1e-4

  # Generation with merged weights, with the LoRA-wrapped apply, and with HF peft agree token for token.
  merged_tokens = np.asarray(t5.generate(model, merged_params, batch["input_ids"], batch["attention_mask"]))
  lora_tokens = t5.generate(model, (params, adapters), batch["input_ids"], batch["attention_mask"],
                            apply_fn=lambda p, *a, **kw: lora_apply(p[0], p[1], *a, **kw))
  np.testing.assert_array_equal(lora_tokens, merged_tokens)
  assert_same_tokens(merged_tokens, _torch_generate(peft_model, batch), "ours vs transformers generate")
