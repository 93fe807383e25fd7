"""GPT-2 against transformers' PyTorch GPT-2: logits, greedy generation, checkpoints, LoRA vs HF peft, prefix hooks."""

from __future__ import annotations

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import peftjax as pj
from peftjax import models
from peftjax.models import gpt2, hf_io

from compare import assert_same_tokens  # tests/ is on sys.path under pytest

VOCAB = 101
TINY = dict(vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
VARIANTS = {"gpt2": dict(),  # gelu_new, n_inner 4 * n_embd, head tied to wte
            "untied": dict(n_inner=48, activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
                           tie_word_embeddings=False)}


def _torch_model(variant: str):
  """Random transformers model (seed 0) with uneven layer norms and non-zero biases."""
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config(**TINY, **VARIANTS[variant]))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if ".ln_" in name and name.endswith("weight"):
        param.uniform_(0.5, 2.0)
      elif name.endswith("bias"):
        param.normal_(0.0, 0.1)
      elif ".c_" in name:
        param.mul_(10.0)  # 0.02-std weights barely change the residual stream
  return model.eval()


def _load_torch(folder: str):
  from transformers import GPT2LMHeadModel
  return GPT2LMHeadModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{variant: folder written by transformers' save_pretrained}."""
  folders = {}
  for variant in VARIANTS:
    folders[variant] = str(tmp_path_factory.mktemp(variant))
    _torch_model(variant).save_pretrained(folders[variant])
  return folders


@pytest.fixture(scope="module")
def right_padded():
  """Token lengths 9, 6, 3, padded on the right (pad id 0)."""
  return _padded(left=False)


@pytest.fixture(scope="module")
def left_padded():
  """Token lengths 9, 6, 3, padded on the left (pad id 0), as for generation."""
  return _padded(left=True)


def _padded(left: bool):
  rng = np.random.default_rng(0)
  input_ids = np.zeros((3, 9), np.int64)
  attention_mask = np.zeros((3, 9), np.int64)
  for i, n in enumerate([9, 6, 3]):
    span = slice(9 - n, 9) if left else slice(0, n)
    input_ids[i, span] = rng.integers(3, VOCAB, n)
    attention_mask[i, span] = 1
  return dict(input_ids=input_ids, attention_mask=attention_mask)


def _torch_logits(model, batch, **kwargs) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in batch.items()}, **kwargs).logits.numpy()


@functools.cache
def _jit_apply(model):
  """model.apply, compiled once per model (eager applies of scanned layers recompile on every call)."""
  return jax.jit(model.apply, static_argnames=("deterministic",))


def _logits(model, params, batch, **kwargs) -> np.ndarray:
  return np.asarray(_jit_apply(model)({"params": params}, batch["input_ids"], batch["attention_mask"], **kwargs))


def _max_diff(a, b, where=None) -> float:
  diff = np.abs(np.asarray(a) - np.asarray(b))
  return float(np.max(diff if where is None else diff[np.asarray(where, bool)]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, right_padded, left_padded, variant):
  torch_model = _load_torch(checkpoints[variant])
  assert (torch_model.lm_head.weight is torch_model.transformer.wte.weight) == (variant == "gpt2")
  model, params = gpt2.from_pretrained(checkpoints[variant])
  assert ("lm_head" in params) == (variant == "untied")
  for batch in (right_padded, left_padded):  # HF's forward uses positions 0, 1, ... whatever the padding
    expected = _torch_logits(torch_model, batch)
    assert _max_diff(_logits(model, params, batch), expected, batch["attention_mask"]) < 1e-4
  # explicit position_ids as generate computes them for left padding
  position_ids = np.maximum(np.cumsum(left_padded["attention_mask"], -1) - 1, 0)
  expected = _torch_logits(torch_model, left_padded, position_ids=torch.tensor(position_ids))
  ours = _logits(model, params, left_padded, position_ids=position_ids)
  assert _max_diff(ours, expected, left_padded["attention_mask"]) < 1e-4
  # dispatch through the family table gives the same model
  model2, params2 = models.from_pretrained(checkpoints[variant])
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_gpt2model_style_checkpoint(checkpoints, right_padded, tmp_path):
  """Hub files like openai-community/gpt2 store GPT2Model names (no 'transformer.' prefix)."""
  folder = str(tmp_path / "bare")
  shutil.copytree(checkpoints["gpt2"], folder)
  state = {k.removeprefix("transformer."): v for k, v in hf_io.read_state_dict(folder).items()}
  state["h.0.attn.bias"] = np.tril(np.ones((1, 1, 48, 48), np.float32))  # old causal-mask buffer: ignored
  save_file(state, os.path.join(folder, hf_io.SAFE_WEIGHTS), metadata={"format": "pt"})
  model, params = gpt2.from_pretrained(folder)
  _, expected = gpt2.from_pretrained(checkpoints["gpt2"])
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def _torch_generate(model, batch, pad_token_id, **kwargs) -> np.ndarray:
  with torch.no_grad():
    out = model.generate(torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                         max_new_tokens=16, do_sample=False, pad_token_id=pad_token_id, **kwargs).numpy()
  out = out[:, batch["input_ids"].shape[1]:]
  return np.pad(out, ((0, 0), (0, 16 - out.shape[1])), constant_values=pad_token_id)  # HF stops once all hit EOS


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(checkpoints, left_padded, variant):
  torch_model = _load_torch(checkpoints[variant])
  model, params = gpt2.from_pretrained(checkpoints[variant])
  no_eos = dict(eos_token_id=VOCAB - 1 if variant == "gpt2" else 0)  # an id the model never emits
  ours = np.asarray(gpt2.generate(model, params, left_padded["input_ids"], left_padded["attention_mask"],
                                  max_new_tokens=16, pad_token_id=0, **no_eos))
  assert ours.shape == (3, 16) and len(np.unique(ours)) > 4  # not a trivial repetition
  assert_same_tokens(ours, _torch_generate(torch_model, left_padded, 0, **no_eos), "ours vs transformers generate")
  # unpadded single prompt: the left padding did not change the first row
  alone = gpt2.generate(model, params, left_padded["input_ids"][:1], max_new_tokens=16, pad_token_id=0, **no_eos)
  np.testing.assert_array_equal(np.asarray(alone), ours[:1])

  # Stopping: make a token the model emits mid-sequence the EOS; afterwards only pad, like HF.
  step = next(i for i in range(2, 16) if ours[0, i] not in ours[0, :i])
  eos = int(ours[0, step])
  stopped = np.asarray(gpt2.generate(model, params, left_padded["input_ids"], left_padded["attention_mask"],
                                     max_new_tokens=16, eos_token_id=eos, pad_token_id=0))
  assert_same_tokens(stopped, _torch_generate(torch_model, left_padded, 0, eos_token_id=eos),
                     "ours vs transformers generate")
  np.testing.assert_array_equal(stopped[0, :step + 1], ours[0, :step + 1])
  assert (stopped[0, step + 1:] == 0).all()


def test_sampling(checkpoints, left_padded):
  model, params = gpt2.from_pretrained(checkpoints["gpt2"])
  run = lambda **kw: np.asarray(gpt2.generate(model, params, left_padded["input_ids"],  # noqa: E731
                                              left_padded["attention_mask"], max_new_tokens=8, **kw))
  greedy = run()
  with pytest.raises(ValueError, match="needs rng"):
    run(temperature=1.0)
  with pytest.raises(ValueError, match="exceeds n_positions=48"):
    gpt2.generate(model, params, left_padded["input_ids"], max_new_tokens=40)
  np.testing.assert_array_equal(run(temperature=1.0, top_k=1, rng=jax.random.key(0)), greedy)
  np.testing.assert_array_equal(run(temperature=1.0, top_p=1e-6, rng=jax.random.key(0)), greedy)
  first = run(temperature=2.0, rng=jax.random.key(3))
  np.testing.assert_array_equal(first, run(temperature=2.0, rng=jax.random.key(3)))
  assert not np.array_equal(first, greedy) and not np.array_equal(first, run(temperature=2.0, rng=jax.random.key(4)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_loads_in_transformers(checkpoints, right_padded, variant, tmp_path):
  from transformers import GPT2LMHeadModel
  model, params = gpt2.from_pretrained(checkpoints[variant])
  folder = str(tmp_path / "ours")
  gpt2.save_pretrained(model, params, folder)
  torch_model, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert (torch_model.lm_head.weight is torch_model.transformer.wte.weight) == (variant == "gpt2")
  expected = _torch_logits(torch_model.eval(), right_padded)
  assert _max_diff(_logits(model, params, right_padded), expected, right_padded["attention_mask"]) < 1e-4
  model2, params2 = gpt2.from_pretrained(folder)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_checkpoint_errors(checkpoints, tmp_path):
  state = hf_io.read_state_dict(checkpoints["gpt2"])
  key = "transformer.h.1.attn.c_attn.weight"
  state[key] = np.zeros((96, 32), np.float32)  # PyTorch-Linear layout instead of Conv1D's (in, out)
  del state["transformer.ln_f.weight"]
  folder = tmp_path / "bad"
  os.makedirs(folder)
  shutil.copy(os.path.join(checkpoints["gpt2"], "config.json"), folder)
  save_file(state, str(folder / hf_io.SAFE_WEIGHTS))
  with pytest.raises(ValueError) as error:
    gpt2.from_pretrained(str(folder))
  message = str(error.value)
  assert f"{key}: checkpoint (96, 32) vs model (32, 96)" in message
  assert "transformer.ln_f.weight" in message
  with pytest.raises(ValueError, match="activation_function='swiglu'.*valid"):
    gpt2.GPT2Config(activation_function="swiglu")


def test_lora_matches_hf_peft(checkpoints, right_padded):
  from peft import LoraConfig, get_peft_model
  torch_model = get_peft_model(_load_torch(checkpoints["gpt2"]),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
  torch.manual_seed(1)
  adapters = {}
  with torch.no_grad():
    for i, block in enumerate(torch_model.base_model.model.transformer.h):
      a, b = block.attn.c_attn.lora_A["default"].weight, block.attn.c_attn.lora_B["default"].weight
      b.normal_(0.0, 0.5)  # B starts at zero; make the update visible
      adapters[f"transformer/h_{i}/attn/c_attn/lora_A"] = jnp.asarray(a.numpy().T)  # (r, in) -> (in, r)
      adapters[f"transformer/h_{i}/attn/c_attn/lora_B"] = jnp.asarray(b.numpy().T)  # (out, r) -> (r, out)
  adapters = pj.tree.unflatten(adapters)
  model, params = gpt2.from_pretrained(checkpoints["gpt2"])
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("c_attn",))
  assert jax.tree.map(jnp.shape, pj.init(cfg, jax.random.key(0), params)) == jax.tree.map(jnp.shape, adapters)

  ids, mask = right_padded["input_ids"], right_padded["attention_mask"]
  lora_logits = np.asarray(jax.jit(pj.apply(cfg, model.apply))(params, adapters, ids, mask))
  expected = _torch_logits(torch_model, right_padded)
  assert _max_diff(lora_logits, expected, mask) < 1e-4
  assert _max_diff(lora_logits, _logits(model, params, right_padded), mask) > 1e-2  # the adapter matters
  merged = pj.merge(cfg, params, adapters)
  assert _max_diff(_logits(model, merged, right_padded), lora_logits) < 1e-5

  # generation through the adapter equals generation with the merged weights
  apply_fn = lambda p, *a, **kw: pj.apply(cfg, model.apply)(p[0], p[1], *a, **kw)  # noqa: E731
  adapted = gpt2.generate(model, (params, adapters), ids, mask, max_new_tokens=6, apply_fn=apply_fn)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(gpt2.generate(model, merged, ids, mask, 6)))

  # scanned layers: stacked adapters on stacked params give the same logits
  scanned, stacked = gpt2.from_pretrained(checkpoints["gpt2"], scan_layers=True)
  assert jax.tree.map(jnp.shape, pj.init(cfg, jax.random.key(0), stacked)) == \
      jax.tree.map(jnp.shape, gpt2.stack_layers(adapters))
  scanned_logits = jax.jit(pj.apply(cfg, scanned.apply))(stacked, gpt2.stack_layers(adapters), ids, mask)
  assert _max_diff(scanned_logits, lora_logits) < 1e-5


def test_scan_and_remat_match_the_layer_loop(checkpoints, right_padded, left_padded):
  model, params = gpt2.from_pretrained(checkpoints["untied"])  # layer-dependent scaling inside the scan

  def logits_and_grads(m, p):  # one compilation per model: logits, and the gradient of their sum of squares
    def loss(p):
      logits = m.apply({"params": p}, right_padded["input_ids"], right_padded["attention_mask"])
      return jnp.sum(logits ** 2), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    return logits, grads

  expected, expected_grads = logits_and_grads(model, params)
  for scan_layers, remat in [(True, False), (False, True), (True, True)]:
    other = model.clone(scan_layers=scan_layers, remat=remat)
    other_params = gpt2.stack_layers(params) if scan_layers else params
    abstract = jax.eval_shape(functools.partial(gpt2.init_params, other), jax.random.key(0))
    assert jax.tree.map(jnp.shape, other_params) == jax.tree.map(jnp.shape, abstract)
    logits, grads = logits_and_grads(other, other_params)
    assert _max_diff(logits, expected) < 1e-5
    grads = gpt2.unstack_layers(grads) if scan_layers else grads
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected_grads)

  scanned = model.clone(scan_layers=True)
  run = lambda m, p: np.asarray(gpt2.generate(m, p, left_padded["input_ids"],  # noqa: E731
                                              left_padded["attention_mask"], max_new_tokens=5))
  np.testing.assert_array_equal(run(scanned, gpt2.stack_layers(params)), run(model, params))
  axes = gpt2.logical_axes(scanned)
  assert axes["transformer"]["h"]["attn"]["c_attn"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed",
                                                                                             "joined_kv")
  assert axes["transformer"]["wte"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_dropout_is_active_only_when_not_deterministic(checkpoints, right_padded):
  for scan_layers in (False, True):
    model, params = gpt2.from_pretrained(checkpoints["gpt2"], scan_layers=scan_layers)
    ids, mask = right_padded["input_ids"], right_padded["attention_mask"]
    train = lambda seed: _jit_apply(model)({"params": params}, ids, mask, deterministic=False,  # noqa: E731
                                           rngs={"dropout": jax.random.key(seed)})
    assert _max_diff(train(0), train(0)) == 0.0 and _max_diff(train(0), train(1)) > 1e-3
    assert _max_diff(train(0), _logits(model, params, right_padded)) > 1e-3


def _prefix(seed: int, batch: int, n_prefix: int = 5):
  """Per-layer (key, value) (batch, n_prefix, heads, head_dim) as numpy."""
  rng = np.random.default_rng(seed)
  shape = (batch, n_prefix, TINY["n_head"], TINY["n_embd"] // TINY["n_head"])
  return [tuple(rng.normal(size=shape).astype(np.float32) for _ in range(2)) for _ in range(TINY["n_layer"])]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefix_kv_matches_transformers_past_key_values(checkpoints, right_padded, variant):
  from transformers import DynamicCache
  torch_model = _load_torch(checkpoints[variant])
  model, params = gpt2.from_pretrained(checkpoints[variant])
  prefix_kv = _prefix(0, 3)
  cache = DynamicCache(config=torch_model.config)
  for i, (key, value) in enumerate(prefix_kv):  # HF layout (batch, heads, n_prefix, head_dim)
    cache.update(torch.tensor(key.transpose(0, 2, 1, 3)), torch.tensor(value.transpose(0, 2, 1, 3)), i)
  mask = right_padded["attention_mask"]
  with torch.no_grad():
    expected = torch_model(torch.tensor(right_padded["input_ids"]), past_key_values=cache,
                           attention_mask=torch.tensor(np.concatenate([np.ones((3, 5), np.int64), mask], 1))).logits
  ours = _logits(model, params, right_padded, prefix_kv=prefix_kv)
  assert _max_diff(ours, expected.numpy(), mask) < 1e-4
  assert _max_diff(ours, _logits(model, params, right_padded), mask) > 1e-2
  scanned, stacked = gpt2.from_pretrained(checkpoints[variant], scan_layers=True)
  assert _max_diff(_logits(scanned, stacked, right_padded, prefix_kv=prefix_kv), ours) < 1e-5


def test_generate_with_prefix_kv_and_inputs_embeds(checkpoints, right_padded):
  """Cached generation with a prefix equals recomputing the whole sequence each step; embeddings == ids."""
  model, params = gpt2.from_pretrained(checkpoints["gpt2"])
  ids = right_padded["input_ids"][:, :3]  # all three rows have 3 tokens
  prefix_kv = _prefix(1, 3)
  tokens = np.asarray(gpt2.generate(model, params, ids, max_new_tokens=6, prefix_kv=prefix_kv, eos_token_id=0))
  sequence = np.zeros((3, 9), ids.dtype)  # causal: the zeros after position t do not change its logits
  sequence[:, :3] = ids
  for t in range(3, 9):
    logits = _jit_apply(model)({"params": params}, sequence, prefix_kv=prefix_kv)
    sequence[:, t] = np.argmax(logits[:, t - 1], -1)
  np.testing.assert_array_equal(tokens, sequence[:, 3:])
  assert not np.array_equal(tokens, np.asarray(gpt2.generate(model, params, ids, max_new_tokens=6, eos_token_id=0)))

  embeds = params["transformer"]["wte"]["embedding"][right_padded["input_ids"]]
  from_embeds = _jit_apply(model)({"params": params}, attention_mask=right_padded["attention_mask"],
                                  inputs_embeds=embeds)
  assert _max_diff(from_embeds, _logits(model, params, right_padded)) < 1e-6
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    model.apply({"params": params}, right_padded["input_ids"], inputs_embeds=embeds)


def test_config_round_trip():
  config = gpt2.GPT2Config(**TINY, **VARIANTS["untied"])
  hf = config.to_hf()
  assert hf["model_type"] == "gpt2" and hf["architectures"] == ["GPT2LMHeadModel"]
  assert gpt2.GPT2Config.from_hf({**hf, "unknown_key": 1}) == config
  from transformers import GPT2Config
  torch_config = GPT2Config(**hf)
  assert (torch_config.hidden_size, torch_config.num_hidden_layers, torch_config.n_inner) == (32, 2, 48)
  assert gpt2.GPT2Config.from_hf({**hf, "eos_token_id": [2, 3]}).eos_token_id == (2, 3)
