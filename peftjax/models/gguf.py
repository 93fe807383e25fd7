"""Llama-family checkpoints from GGUF files (llama.cpp's format): config, dequantised tensors, tokenizer.

`read(path)` gives a Hugging Face config.json-style dict and {Hugging Face tensor name: float32 array},
which `peftjax.models.llama.from_pretrained` turns into (model, params); `load_tokenizer(path)` builds
the transformers tokenizer stored in the file.  Architectures: "llama" (llama.cpp also stores Mistral
and SmolLM as llama; their sliding window, if any, is not recorded and so not applied), "qwen2", "qwen3" (with
its per-head q/k norms, `attn_q_norm` / `attn_k_norm`), and "gemma2" / "gemma3" (text only), which
`peftjax.models.gemma.from_pretrained` loads: their RMS norm weights are stored as w + 1 (`read` subtracts 1),
their Q/K rows are not permuted, and what llama.cpp hard-codes rather than records (the layer pattern, Gemma 3's
local RoPE base 10000, query_pre_attn_scalar) takes llama.cpp's values.

Mixture-of-experts files: a "llama" file with `llama.expert_count` is Mixtral and a "qwen3moe" file is Qwen3-MoE
(q/k norms as qwen3, experts `expert_feed_forward_length` wide, top-k renormalised as llama.cpp always does).  The
router blk.N.ffn_gate_inp becomes mlp.gate and the stacked experts blk.N.ffn_gate_exps / ffn_up_exps (experts,
intermediate, hidden) and ffn_down_exps (experts, hidden, intermediate) become the in-memory
mlp.experts.gate_up_proj (gate rows, then up rows) and mlp.experts.down_proj that `peftjax.models.moe` holds.
Qwen3-MoE layers stored with a dense ffn_gate / ffn_up / ffn_down are its mlp_only_layers.

Quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantised with gguf-py to float32, so the
weights equal the quantised model's, not the original bf16 ones; `read_blocks` gives the Q4_0 / Q4_1 / Q8_0
linear layers' raw blocks instead, for a quantised frozen base (`peftjax.quant.keep_gguf_blocks`).  llama.cpp permutes the rows of Q
and K in "llama" files for its interleaved RoPE; `read` undoes that for the rotate-half layout.
Llama 3.1+ files keep the "llama3" RoPE scaling as per-frequency factors (`rope_freqs.weight`);
`read` recovers Hugging Face's rope_scaling dict from them and checks that it reproduces every factor.
"""

from __future__ import annotations

import functools
import math
import os
import re
import types

import numpy as np

MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "gemma2": "gemma2",
               "gemma3": "gemma3_text"}  # a "llama" file with experts is "mixtral"
_PERMUTED_QK = ("llama", "mixtral")  # model types whose Q/K rows llama.cpp permutes
_GEMMA = ("gemma2", "gemma3")  # norms stored as w + 1; llama.cpp's 27B models scale queries by hidden / heads
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's four norms per layer and q/k norms (llama's ffn_norm is Gemma's pre_feedforward_layernorm).
_GEMMA_LAYER_TENSORS = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_QK_NORM_TENSORS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# The router and the stacked experts; `read` joins gate and up into gate_up_proj (`_stack_gate_up`).
_EXPERT_TENSORS = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
                   "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj"}
# Tensors only some architectures have: {architecture: {llama.cpp name: Hugging Face module}}.
_ARCH_LAYER_TENSORS = {"llama": _EXPERT_TENSORS, "qwen3": _QK_NORM_TENSORS,
                       "qwen3moe": {**_QK_NORM_TENSORS, **_EXPERT_TENSORS},
                       "gemma2": _GEMMA_LAYER_TENSORS, "gemma3": _GEMMA_LAYER_TENSORS}
_ROUTER = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight")
_ROPE_FREQS = "rope_freqs.weight"


def find(path: str) -> str | None:
  """The GGUF file `path` names: the .gguf file itself, or the one .gguf in a folder without config.json."""
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise ValueError(f"{path!r} is a file but not a .gguf; pass a .gguf file or a Hugging Face checkpoint folder.")
    return path
  if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
    return None
  files = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
  if len(files) > 1:
    raise ValueError(f"{path!r} holds several GGUF files {files}; pass the path of the one to load.")
  return os.path.join(path, files[0]) if files else None


def hf_name(gguf_name: str, arch: str = "llama") -> str:
  """llama.cpp tensor name of an `arch` file (its general.architecture) -> Hugging Face name:
  'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
  layer_tensors = {**_LAYER_TENSORS, **_ARCH_LAYER_TENSORS.get(arch, {})}
  layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
  if layer and layer.group(2) in layer_tensors:
    return f"model.layers.{layer.group(1)}.{layer_tensors[layer.group(2)]}.{layer.group(3)}"
  top = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
  if top and top.group(1) in _GLOBAL_TENSORS:
    return f"{_GLOBAL_TENSORS[top.group(1)]}.{top.group(2)}"
  family = "Gemma" if arch in _GEMMA else "Llama-family"
  raise ValueError(f"GGUF tensor {gguf_name!r} has no {family} counterpart; known names: "
                   f"{sorted(_GLOBAL_TENSORS)} and blk.N.{{{', '.join(sorted(layer_tensors))}}}.")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half halves) per head."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(rope_scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
  """The per-frequency factors llama.cpp's converter writes as rope_freqs for a "llama3" rope_scaling."""
  inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * math.pi / inv_freq
  factor, low, high = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
  old_context = rope_scaling["original_max_position_embeddings"]
  smooth = (old_context / wavelen - low) / (high - low)
  factors = np.where(wavelen < old_context / high, 1.0, 1.0 / ((1 - smooth) / factor + smooth))
  return np.where(wavelen > old_context / low, factor, factors)


def llama3_rope_scaling(rope_factors: np.ndarray, rope_theta: float, head_dim: int) -> dict:
  """Hugging Face's "llama3" rope_scaling from llama.cpp's rope_freqs.

  Factors are 1 for short wavelengths, `factor` for long ones and 1 / ((1 - s) / factor + s) between,
  with s = (old_context / wavelen - low) / (high - low).  With low_freq_factor = 1 (every Llama 3
  release) s is linear in 1 / wavelen, which fixes high_freq_factor and original_max_position_embeddings.
  """
  factors = np.asarray(rope_factors, np.float64)
  factor = float(factors.max())
  smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
  blended = (smooth > 1e-4) & (smooth < 1 - 1e-4)
  if blended.sum() < 2:
    raise ValueError(f"GGUF {_ROPE_FREQS} has {int(blended.sum())} blended frequencies; at least 2 are needed to "
                     "recover the llama3 rope_scaling.")
  inv_wavelen = 1.0 / rope_theta ** (np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
  slope, intercept = np.polyfit(inv_wavelen[blended], smooth[blended], 1)
  high = 1.0 - 1.0 / intercept
  scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
             "high_freq_factor": round(float(high), 4),
             "original_max_position_embeddings": int(round(slope * (high - 1.0)))}
  if not np.allclose(llama_cpp_rope_factors(scaling, rope_theta, head_dim), factors, rtol=1e-4):
    raise ValueError(f"GGUF {_ROPE_FREQS} does not follow llama3 RoPE scaling (closest fit: {scaling}).")
  return scaling


def _reader(path: str):
  """gguf-py's (memory-mapped) reader of `path`; parsing the header takes seconds, so the last one is kept for
  the config check, the weights and the tokenizer of one run."""
  from gguf import GGUFReader
  stat = os.stat(path)
  return _cached_reader(os.path.abspath(path), stat.st_mtime_ns, stat.st_size, GGUFReader)


@functools.lru_cache(maxsize=1)
def _cached_reader(path: str, mtime_ns: int, size: int, make):
  del mtime_ns, size  # part of the cache key: a rewritten file is read again
  return make(path)


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def config_from_metadata(reader, tensors: dict[str, np.ndarray]) -> dict:
  """A Hugging Face config.json dict from the GGUF metadata (and the tensors, for shapes and rope_freqs)."""
  arch = _field(reader, "general.architecture")
  if arch not in MODEL_TYPES:
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported; valid: {sorted(MODEL_TYPES)}.")

  def meta(key, default=None):
    return _field(reader, f"{arch}.{key}", default)

  hidden, heads = meta("embedding_length"), meta("attention.head_count")
  head_dim = meta("attention.key_length", meta("rope.dimension_count") if arch == "llama" else None) or hidden // heads
  config = {
      "model_type": "mixtral" if arch == "llama" and meta("expert_count") else MODEL_TYPES[arch],
      "vocab_size": meta("vocab_size", tensors["model.embed_tokens.weight"].shape[0]),
      "hidden_size": hidden,
      "intermediate_size": meta("feed_forward_length"),
      "num_hidden_layers": meta("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": meta("attention.head_count_kv", heads),
      "head_dim": head_dim,
      "max_position_embeddings": meta("context_length", 2048),
      "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", 1e-6),
      "rope_theta": meta("rope.freq_base", 10000.0),
      "tie_word_embeddings": "lm_head.weight" not in tensors,
      "attention_bias": arch in ("llama", "qwen3", "qwen3moe") and "model.layers.0.self_attn.q_proj.bias" in tensors,
      "mlp_bias": arch == "llama" and "model.layers.0.mlp.gate_proj.bias" in tensors,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
  }
  if arch in _GEMMA:
    config.update(_gemma_config(meta, arch, config))
  if config["model_type"] in ("mixtral", "qwen3_moe"):
    config.update(_moe_config(meta, arch, config, tensors))
  scaling_type = meta("rope.scaling.type", "none")
  if scaling_type == "linear":
    config["rope_scaling"] = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
  elif scaling_type != "none":
    raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling_type!r} is not supported; valid: 'none', 'linear' "
                     f"(and llama3 scaling through {_ROPE_FREQS}).")
  if _ROPE_FREQS in tensors:
    config["rope_scaling"] = llama3_rope_scaling(tensors[_ROPE_FREQS], config["rope_theta"], head_dim)
  return config


def _moe_config(meta, arch: str, config: dict, tensors) -> dict:
  """Mixtral's / Qwen3-MoE's expert keys: the expert count and top-k from the metadata, Qwen3-MoE's expert width
  (`expert_feed_forward_length`), top-k renormalisation (llama.cpp always renormalises Qwen3-MoE's unless the file
  says `expert_weights_norm` false) and its dense layers (those without a router tensor)."""
  experts = meta("expert_count")
  if not experts:
    raise ValueError(f"GGUF {arch}.expert_count is missing or 0; a {arch!r} file needs its number of experts.")
  out = {"num_local_experts": experts, "num_experts_per_tok": meta("expert_used_count", 2)}
  if arch == "qwen3moe":
    routed = {int(_ROUTER.fullmatch(name).group(1)) for name in tensors if _ROUTER.fullmatch(name)}
    out.update(moe_intermediate_size=meta("expert_feed_forward_length", config["intermediate_size"]),
               norm_topk_prob=bool(meta("expert_weights_norm", True)),
               mlp_only_layers=[i for i in range(config["num_hidden_layers"]) if i not in routed])
    if config["intermediate_size"] is None:  # only the dense layers use it
      config["intermediate_size"] = out["moe_intermediate_size"]
  return out


def _stack_gate_up(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`tensors` with each layer's stacked expert gate and up weights (experts, intermediate, hidden) joined into
  mlp.experts.gate_up_proj (experts, 2 * intermediate, hidden) and down_proj named as `peftjax.models.moe` holds it."""
  out = {}
  for name, value in tensors.items():
    prefix, _, leaf = name.rpartition(".mlp.experts.")
    if not prefix:
      out[name] = value
    elif leaf == "down_proj.weight":
      out[f"{prefix}.mlp.experts.down_proj"] = value
    elif leaf == "gate_proj.weight":
      up = tensors.get(f"{prefix}.mlp.experts.up_proj.weight")
      if up is None or up.shape != value.shape:
        layer = prefix.rsplit(".", 1)[1]
        raise ValueError(f"GGUF tensor 'blk.{layer}.ffn_gate_exps.weight' {value.shape} needs a "
                         f"'blk.{layer}.ffn_up_exps.weight' of the same shape; the file has "
                         f"{'none' if up is None else up.shape}.")
      out[f"{prefix}.mlp.experts.gate_up_proj"] = np.concatenate([value, up], axis=1)
    elif f"{prefix}.mlp.experts.gate_proj.weight" not in tensors:
      layer = prefix.rsplit(".", 1)[1]
      raise ValueError(f"GGUF tensor 'blk.{layer}.ffn_up_exps.weight' has no 'blk.{layer}.ffn_gate_exps.weight' "
                       "beside it; a mixture-of-experts layer needs both.")
  return out


def _gemma_config(meta, arch: str, config: dict) -> dict:
  """Gemma's config keys: the sliding window, soft-caps, local RoPE base and layer pattern the file records (newer
  converters write the last two; else llama.cpp's built-in ones apply), and llama.cpp's query_pre_attn_scalar
  (head_dim, or hidden / heads for the 27B models)."""
  big = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
  out = {"sliding_window": meta("attention.sliding_window"),
         "attn_logit_softcapping": meta("attn_logit_softcapping"),
         "final_logit_softcapping": meta("final_logit_softcapping"),
         "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"]}
  if meta("rope.freq_base_swa") is not None:
    out["rope_local_base_freq"] = meta("rope.freq_base_swa")
  pattern = meta("attention.sliding_window_pattern")
  if isinstance(pattern, list):  # per layer: True for a sliding-window layer
    out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
  elif pattern is not None:
    out["sliding_window_pattern"] = pattern
  return out


def read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(Hugging Face config dict, {Hugging Face tensor name: float32 array in PyTorch layout}) of a GGUF file."""
  from gguf.quants import dequantize
  reader = _reader(path)
  arch = _field(reader, "general.architecture")
  raw = {}
  for tensor in reader.tensors:
    shape = [int(n) for n in reversed(tensor.shape)]
    value = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
    name = tensor.name if tensor.name == _ROPE_FREQS else hf_name(tensor.name, arch)
    raw[name] = value - 1.0 if arch in _GEMMA and name.endswith("norm.weight") else value  # stored as w + 1
  config = config_from_metadata(reader, raw)
  raw.pop(_ROPE_FREQS, None)
  raw = _stack_gate_up(raw)
  if config["model_type"] in _PERMUTED_QK:
    for key in list(raw):
      if ".self_attn.q_proj." in key:
        raw[key] = unpermute(raw[key], config["num_attention_heads"])
      elif ".self_attn.k_proj." in key:
        raw[key] = unpermute(raw[key], config["num_key_value_heads"])
  return config, raw


KEPT_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # the types `read_blocks` keeps (peftjax.quant.GGUF_KINDS)


def read_blocks(path: str) -> dict[str, tuple[str, np.ndarray]]:
  """{Hugging Face name: (type name, raw blocks (out, in / 32, bytes per block) uint8)} of the file's linear-layer
  weights (blk.N.attn_* / ffn_*, 2-D) stored as Q4_0, Q4_1 or Q8_0, the bytes as in the file (memory-mapped).

  The blocks run along each row, the input dimension, so llama.cpp's Q/K row permutation moves whole rows of
  blocks and is undone as in `read`: the blocks dequantise to exactly `read`'s weights.
  """
  from gguf import GGML_QUANT_SIZES
  reader = _reader(path)
  config = read_config(path)
  blocks = {}
  for tensor in reader.tensors:
    if (tensor.tensor_type.name not in KEPT_BLOCK_TYPES or not tensor.name.startswith("blk.")
        or len(tensor.shape) != 2):
      continue
    name = hf_name(tensor.name, _field(reader, "general.architecture"))
    rows = tensor.data.reshape(int(tensor.shape[1]), -1, GGML_QUANT_SIZES[tensor.tensor_type][1])
    if config["model_type"] in _PERMUTED_QK and ".self_attn.q_proj." in name:
      rows = unpermute(rows, config["num_attention_heads"])
    elif config["model_type"] in _PERMUTED_QK and ".self_attn.k_proj." in name:
      rows = unpermute(rows, config["num_key_value_heads"])
    blocks[name] = (tensor.tensor_type.name, rows)
  return blocks


def _metadata(reader) -> dict:
  """{key: value} of the file's general.* and tokenizer.* metadata (gguf-py's reader; no torch)."""
  return {key: field.contents() for key, field in reader.fields.items()
          if key.startswith(("general.", "tokenizer."))}


def read_config(path: str) -> dict:
  """The Hugging Face config dict of a GGUF file from its metadata and tensor shapes alone (no weights are read,
  beyond the small rope_freqs table)."""
  from gguf.quants import dequantize
  reader = _reader(path)
  arch = _field(reader, "general.architecture")
  tensors = {}
  for tensor in reader.tensors:
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if tensor.name == _ROPE_FREQS:
      tensors[_ROPE_FREQS] = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
    else:
      tensors[hf_name(tensor.name, arch)] = types.SimpleNamespace(shape=shape)  # only its shape is looked at
  return config_from_metadata(reader, tensors)


def load_tokenizer(path: str):
  """The transformers tokenizer stored in a GGUF file (or in the one .gguf of a folder).

  The metadata is read with gguf-py and handed to transformers' GGUF tokenizer converter, so no torch is
  needed (transformers' own GGUF reader imports it).
  """
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
  file = find(path)
  if file is None:
    raise FileNotFoundError(f"{path!r} is neither a .gguf file nor a folder holding one.")
  metadata = _metadata(_reader(file))
  grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                     if f"tokenizer.{key}" in metadata}
             for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()}
  tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tokenizer.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary by default
    tokenizer_config.setdefault("add_bos_token", True)
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                    ("pad_token", "padding_token_id")):
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
  backend, extra = mapping.convert_gguf_tokenizer(metadata["general.architecture"], tokenizer)
  # name_or_path is set afterwards: transformers' Mistral-regex check for vocabularies over 100k tokens (Gemma's)
  # would look the path up as a hub id offline and fail
  fast = PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=None, **tokenizer_config, **extra)
  fast.name_or_path = file
  return fast
