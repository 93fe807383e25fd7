"""Llama-family causal language models (Llama 2/3, Mistral, Qwen2, Qwen3, and the mixture-of-experts Mixtral and
Qwen3-MoE) in Flax linen with Hugging Face names.

One module covers the family through config switches: grouped-query attention (`num_key_value_heads`),
`head_dim` independent of hidden_size / heads, rotary embeddings in the rotate-half layout (every `rope_scaling`
type of `peftjax.models.rope`: default, linear, llama3, dynamic, yarn, longrope, proportional), biases on q/k/v
(Qwen2) or on every projection (`attention_bias`), Qwen3's RMS norms of each query / key head (`q_norm`, `k_norm`,
over head_dim, before RoPE), Mistral's / Qwen2's / Qwen3's sliding-window attention, and a tied or untied output
head.
RMS norms compute their statistics in float32; the MLP is down_proj(silu(gate_proj x) * up_proj x), or in
Mixtral's and Qwen3-MoE's sparse layers `peftjax.models.moe.SparseMoeBlock` (``mlp/gate`` router, stacked
``mlp/experts/gate_up_proj`` and ``down_proj``; Qwen3-MoE picks those layers by `decoder_sparse_step` and
`mlp_only_layers`).

Parameter paths mirror the PyTorch module names (``model/layers_0/self_attn/q_proj/kernel`` is
``model.layers.0.self_attn.q_proj.weight``) and every projection is an `nn.Dense`, so LoRA targets
("q_proj", "v_proj", ...) work as in Hugging Face PEFT.  With `scan_layers` the layers are one
`nn.scan`ned module ``model/layers`` whose leaves have a leading layer axis (`stack_layers` /
`unstack_layers` convert between the two layouts).

Sliding windows follow transformers: a query in cache slot i sees the keys in slots j with
i - window < j <= i (slots count padding, as Hugging Face's cache does).

Hooks for prompt methods: `inputs_embeds` replaces the token embeddings; `prefix_kv` (one (key, value)
pair per layer, each (batch, n_prefix, num_key_value_heads, head_dim), keys already rotated as in
Hugging Face's past_key_values) is prepended to every layer's keys and values, attended as cache slots in front of
the tokens (so sliding-window layers drop it for queries a window past it), and the tokens' rotary positions start
at n_prefix, as Hugging Face PEFT prefix tuning does through past_key_values.

`LlamaForSequenceClassification` (transformers' Llama / Mistral / Qwen2 / Qwen3ForSequenceClassification) puts a
bias-free ``score`` Dense on each row's last token (the rightmost one that is not config.pad_token_id, as
transformers finds it, for either padding side).

GGUF files (llama.cpp) load through `from_pretrained` as well; see `peftjax.models.gguf`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree as ptree
from peftjax.dropout import Dropout
from peftjax.models import decoding, gguf, hf_io, layers, moe, rope
from peftjax.models.layers import init_params, logical_axes  # noqa: F401 (this family's)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# The model types whose sliding window is on only with use_sliding_window, those whose layers then choose
# sliding or full attention one by one (layer_types, max_window_layers), and those whose query / key heads are
# RMS-normalised.
USE_SLIDING_WINDOW = ("qwen2", "qwen3", "qwen3_moe")
PER_LAYER_WINDOW = ("qwen2", "qwen3")
QK_NORM = ("qwen3", "qwen3_moe")
MOE = ("mixtral", "qwen3_moe")
ROPE_TYPES = rope.ROPE_TYPES
LAYER_TYPES = ("full_attention", "sliding_attention")
# `task` -> the suffix of transformers' class name (LlamaForCausalLM, MistralForSequenceClassification, ...).
TASK_SUFFIXES = {"causal_lm": "ForCausalLM", "sequence_classification": "ForSequenceClassification"}
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": layers.gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama-family hyper-parameters under their Hugging Face names (defaults: Llama-2-7b).

  `model_type` is "llama", "mistral", "qwen2", "qwen3", "mixtral" or "qwen3_moe".  Qwen2 always has biases on
  q/k/v (not on o); Llama's and Qwen3's `attention_bias` puts biases on all four projections.  Qwen3 and
  Qwen3-MoE normalise each query and key head (`qk_norm`).  The MoE types route each token to
  `num_experts_per_tok` of `num_local_experts` experts (Qwen3-MoE's `num_experts`) of width
  `moe_intermediate_size` (Mixtral: intermediate_size); Qwen3-MoE's dense layers (`moe_layers` False) keep
  `intermediate_size`.  `rope_scaling` is Hugging Face's
  dict ({"rope_type": "llama3", "factor": 8.0, ...}); it is stored as sorted (key, value) pairs so the
  config stays hashable.  `sliding_window` applies to every Mistral / Mixtral / Qwen3-MoE layer (Qwen3-MoE's only
  with `use_sliding_window`), and to the Qwen2 / Qwen3 layers
  that `layer_types` marks "sliding_attention" (derived from `use_sliding_window` / `max_window_layers`
  when not given, as transformers does); for the other types `layer_types` is always derived.  `id2label`
  holds the label names of a classification checkpoint, in label order.
  """

  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  attention_bias: bool = False
  mlp_bias: bool = False
  attention_dropout: float = 0.0
  sliding_window: int | None = None
  use_sliding_window: bool = False
  max_window_layers: int = 28
  layer_types: tuple[str, ...] | None = None
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  num_local_experts: int = 0
  num_experts_per_tok: int = 2
  moe_intermediate_size: int | None = None
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  id2label: tuple[str, ...] = ()

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    if self.model_type not in ARCHITECTURES:
      raise ValueError(f"LlamaConfig.model_type={self.model_type!r} is not supported; valid: {sorted(ARCHITECTURES)}.")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"LlamaConfig.hidden_act={self.hidden_act!r} is not supported; valid: {sorted(_ACTIVATIONS)}.")
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"LlamaConfig.num_attention_heads={self.num_attention_heads} must be a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}.")
    if isinstance(self.eos_token_id, list):
      set_("eos_token_id", tuple(self.eos_token_id))
    set_("rope_scaling", rope.parse_scaling(self.rope_scaling, self.max_position_embeddings, self.head_dim,
                                            "LlamaConfig.rope_scaling"))
    if self.model_type == "llama" and self.sliding_window is not None:
      raise ValueError(f"LlamaConfig.sliding_window={self.sliding_window} is a Mistral / Qwen2 setting; "
                       "use model_type 'mistral' or 'qwen2', or sliding_window=None.")
    per_layer = self.model_type in PER_LAYER_WINDOW
    if self.model_type in USE_SLIDING_WINDOW and not self.use_sliding_window:
      set_("sliding_window", None)  # as transformers' Qwen2Config / Qwen3Config / Qwen3MoeConfig
    if self.layer_types is None or not per_layer:  # only Qwen2 / Qwen3 choose per layer
      sliding = [self.sliding_window is not None and (not per_layer or i >= self.max_window_layers)
                 for i in range(self.num_hidden_layers)]
      set_("layer_types", tuple(LAYER_TYPES[s] for s in sliding))
    set_("layer_types", tuple(self.layer_types))
    if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
      raise ValueError(f"LlamaConfig.layer_types={self.layer_types!r} must list one of {LAYER_TYPES} for each of "
                       f"the {self.num_hidden_layers} layers.")
    set_("mlp_only_layers", tuple(self.mlp_only_layers))
    if self.moe_intermediate_size is None:
      set_("moe_intermediate_size", self.intermediate_size)
    if self.model_type == "mixtral" and self.moe_intermediate_size != self.intermediate_size:
      raise ValueError(f"LlamaConfig.moe_intermediate_size={self.moe_intermediate_size} must equal intermediate_size="
                       f"{self.intermediate_size} for Mixtral, whose experts have the MLP's width.")
    if (self.model_type in MOE) != (self.num_local_experts > 0):
      raise ValueError(f"LlamaConfig.num_local_experts={self.num_local_experts} does not fit model_type "
                       f"{self.model_type!r}: the mixture-of-experts types {MOE} need at least 1 expert, the others 0.")
    if self.decoder_sparse_step < 1:
      raise ValueError(f"LlamaConfig.decoder_sparse_step={self.decoder_sparse_step} must be at least 1 (every "
                       "decoder_sparse_step-th layer is sparse).")
    if self.model_type in MOE and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
      raise ValueError(f"LlamaConfig.num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                       f"num_local_experts={self.num_local_experts}.")

  @property
  def qkv_bias(self) -> bool:
    return self.attention_bias or self.model_type == "qwen2"

  @property
  def o_bias(self) -> bool:
    return self.attention_bias and self.model_type != "qwen2"

  @property
  def normalize_top_k(self) -> bool:
    """Whether the top-k routing probabilities are renormalised to sum to 1 (always in Mixtral)."""
    return self.model_type == "mixtral" or self.norm_topk_prob

  @property
  def moe_layers(self) -> tuple[bool, ...]:
    """Per layer, whether its MLP is the sparse mixture of experts (as transformers' Qwen3MoeDecoderLayer picks)."""
    return tuple(self.model_type in MOE and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                 for i in range(self.num_hidden_layers))

  @property
  def qk_norm(self) -> bool:
    """Whether each query / key head is RMS-normalised over head_dim before RoPE (Qwen3)."""
    return self.model_type in QK_NORM

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it attends through the sliding window."""
    return tuple(t == "sliding_attention" and self.sliding_window is not None for t in self.layer_types)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> LlamaConfig:
    """From a Hugging Face config.json dict (rope_theta/rope_scaling or transformers 5's rope_parameters)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"id2label"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in hf.items() if k in names}
    if "num_experts" in hf and hf.get("model_type") in MOE:  # Qwen3-MoE's name
      kwargs.setdefault("num_local_experts", hf["num_experts"])
    kwargs["rope_theta"], kwargs["rope_scaling"] = rope.from_hf(hf, cls.rope_theta)
    return cls(**kwargs, id2label=hf_io.id2label_from_hf(hf))

  def to_hf(self, task: str = "causal_lm") -> dict:
    """A config.json dict that transformers' class of this model_type for `task` (TASKS) accepts."""
    skip = {"attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
            "id2label", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
            "decoder_sparse_step", "mlp_only_layers"}
    hf = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
    if self.id2label:
      hf.update(hf_io.label_fields(self.id2label, len(self.id2label)))
    architecture = ARCHITECTURES[self.model_type].replace("ForCausalLM", TASK_SUFFIXES[task])
    hf.update(model_type=self.model_type, architectures=[architecture],
              rope_scaling=dict(self.rope_scaling) if self.rope_scaling else None)
    if self.model_type == "llama":
      hf.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
    elif self.model_type in ("mistral", "mixtral"):
      hf.update(sliding_window=self.sliding_window)
    elif self.model_type == "qwen3_moe":
      hf.update(use_sliding_window=self.use_sliding_window, sliding_window=self.sliding_window)
    else:
      hf.update(use_sliding_window=self.use_sliding_window, sliding_window=self.sliding_window,
                max_window_layers=self.max_window_layers, layer_types=list(self.layer_types))
    if self.model_type in ("qwen3", "qwen3_moe"):
      hf.update(attention_bias=self.attention_bias)
    if self.model_type == "mixtral":
      hf.update(num_local_experts=self.num_local_experts, num_experts_per_tok=self.num_experts_per_tok)
    elif self.model_type == "qwen3_moe":
      hf.update(num_experts=self.num_local_experts, num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers))
    return hf


def rope_inv_freq(config: LlamaConfig, position_ids: jax.Array) -> tuple[jax.Array, float]:
  """(inv_freq (head_dim // 2,), attention_scaling) of a call over `position_ids`, with the config's rope_scaling
  (`peftjax.models.rope.call_inv_freq`: dynamic / longrope depend on the call's longest position)."""
  return rope.call_inv_freq(position_ids, config.head_dim, config.rope_theta, config.rope_scaling,
                            config.max_position_embeddings)


def rotary(position_ids: jax.Array, inv_freq, attention_scaling: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """cos, sin (batch, length, head_dim) in float32 for the rotate-half layout, each times attention_scaling
  (YaRN's / LongRoPE's attention factor, as transformers)."""
  freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * attention_scaling, jnp.sin(emb) * attention_scaling


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (batch, length, heads, head_dim) rotated: x cos + rotate_half(x) sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
  return x * cos + rotated * sin


def _normal(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _dense(features: int, axes: tuple[str, str], config: LlamaConfig, use_bias: bool, dtype, param_dtype,
           name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  dot_general=layers.dot_general(dtype),
                  kernel_init=_normal(config.initializer_range, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with rotary positions; query head h reads key/value head h // group."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype)
    self.q_proj = _dense(c.num_attention_heads * c.head_dim, ("embed", "joined_kv"), use_bias=c.qkv_bias,
                         name="q_proj", **kw)
    self.k_proj = _dense(c.num_key_value_heads * c.head_dim, ("embed", "joined_kv"), use_bias=c.qkv_bias,
                         name="k_proj", **kw)
    self.v_proj = _dense(c.num_key_value_heads * c.head_dim, ("embed", "joined_kv"), use_bias=c.qkv_bias,
                         name="v_proj", **kw)
    self.o_proj = _dense(c.hidden_size, ("joined_kv", "embed"), use_bias=c.o_bias, name="o_proj", **kw)
    if c.qk_norm:
      norm = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      self.q_norm = layers.RMSNorm(c.rms_norm_eps, name="q_norm", **norm)
      self.k_norm = layers.RMSNorm(c.rms_norm_eps, name="k_norm", **norm)
    self.dropout = Dropout(c.attention_dropout)

  def __call__(self, x, cos, sin, mask, prefix_kv, cache, cache_index, deterministic: bool, layer=None):
    """x (batch, q, hidden); mask (batch, 1, q, keys) is True where attending is allowed.

    With `cache` ({'key', 'value'} (batch, cache length, kv heads, head_dim), or every layer's with a leading
    axis and this one's index `layer`), this call's rotated keys and values are written at `cache_index` and the
    queries attend over the whole cache.
    """
    c = self.config
    batch, length = x.shape[:2]
    query = self.q_proj(x).reshape(batch, length, c.num_attention_heads, c.head_dim)
    key = self.k_proj(x).reshape(batch, length, c.num_key_value_heads, c.head_dim)
    if c.qk_norm:
      query, key = self.q_norm(query), self.k_norm(key)
    query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    value = self.v_proj(x).reshape(batch, length, c.num_key_value_heads, c.head_dim)
    if cache is not None:
      key, value, cache = decoding.write_cache(cache, layer, cache_index, key, value)
    if prefix_kv is not None:
      key = jnp.concatenate([prefix_kv[0].astype(key.dtype), key], axis=1)
      value = jnp.concatenate([prefix_kv[1].astype(value.dtype), value], axis=1)
    group = c.num_attention_heads // c.num_key_value_heads
    query = query.reshape(batch, length, c.num_key_value_heads, group, c.head_dim)
    scores = layers.einsum("bqkgd,bskd->bkgqs", query, key, self.dtype)
    scores = jnp.where(mask[:, :, None], scores * c.head_dim ** -0.5, jnp.finfo(jnp.float32).min)
    probs = self.dropout(jax.nn.softmax(scores, axis=-1).astype(self.dtype), deterministic=deterministic)
    out = layers.einsum("bkgqs,bskd->bqkgd", probs, value, self.dtype).astype(self.dtype)
    return self.o_proj(out.reshape(batch, length, -1)), cache


class LlamaMLP(nn.Module):
  """down_proj(act(gate_proj x) * up_proj x)."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(config=c, use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = _dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = _dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
    return _dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(_ACTIVATIONS[c.hidden_act](gate) * up)


class LlamaDecoderLayer(nn.Module):
  """x + self_attn(input_layernorm(x)), then + mlp(post_attention_layernorm(.)); returns (hidden, cache).

  With `sparse` the mlp is the mixture of experts (`moe.SparseMoeBlock`).
  """

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  sparse: bool = False

  @nn.compact
  def __call__(self, x, rope, masks, sliding, prefix_kv, cache, cache_index, deterministic: bool, layer=None):
    """`masks` is (full, windowed or None); `sliding` (a bool, traced under scan) picks the windowed one; `cache`
    holds this layer's keys and values, or every layer's when `layer` is this one's index."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    full, windowed = masks
    mask = full if windowed is None else jnp.where(sliding, windowed, full)
    h = layers.RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
    h, cache = LlamaAttention(c, name="self_attn", **kw)(h, *rope, mask, prefix_kv, cache, cache_index,
                                                         deterministic, layer)
    x = x + h
    mlp = (moe.SparseMoeBlock(c, _ACTIVATIONS[c.hidden_act], name="mlp", **kw) if self.sparse
           else LlamaMLP(c, name="mlp", **kw))
    h = mlp(layers.RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x))
    return x + h, cache


def check_scannable(config: LlamaConfig) -> None:
  """Raises ValueError unless the layers are all alike (all dense or all mixture of experts), as nn.scan needs."""
  if len(set(config.moe_layers)) > 1:
    raise ValueError(f"scan_layers needs layers of one kind, but config.moe_layers is {config.moe_layers} "
                     "(Qwen3-MoE's decoder_sparse_step / mlp_only_layers); use scan_layers=False.")


class LlamaModel(nn.Module):
  """embed_tokens, the layers layers_0 ... layers_{n-1} (or one scanned `layers`), and the final norm."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens", **kw,
                                 embedding_init=_normal(c.initializer_range, ("vocab", "embed")))
    layer = LlamaDecoderLayer
    if self.remat:  # static_argnums counts self as 0: `deterministic` is argument 8
      layer = nn.remat(layer, static_argnums=(8,), prevent_cse=not self.scan_layers)
    sparse = c.moe_layers
    if self.scan_layers:
      check_scannable(c)
      layer = nn.scan(layer, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0, 0, 0, nn.broadcast, nn.broadcast),
                      length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = layer(c, name="layers", sparse=sparse[0], **kw)
    else:
      self.layers = [layer(c, name=f"layers_{i}", sparse=sparse[i], **kw) for i in range(c.num_hidden_layers)]
    self.norm = layers.RMSNorm(c.rms_norm_eps, name="norm", **kw)

  def __call__(self, embeddings, position_ids, masks, prefix_kv, cache, cache_index, deterministic: bool):
    """Final hidden states (batch, length, hidden) and the updated cache (None without one)."""
    rope = rotary(position_ids, *rope_inv_freq(self.config, position_ids))
    sliding = self.config.sliding_layers
    x = embeddings
    if self.scan_layers:
      if prefix_kv is not None:
        prefix_kv = tuple(jnp.stack(t) for t in zip(*prefix_kv))
      x, cache = self.layers(x, rope, masks, jnp.asarray(sliding), prefix_kv, cache, cache_index, deterministic)
    else:
      for i, layer in enumerate(self.layers):  # each writes its slots of the stacked cache in place
        x, cache = layer(x, rope, masks, sliding[i], None if prefix_kv is None else prefix_kv[i], cache,
                         cache_index, deterministic, i)
    return self.norm(x), cache


def attention_masks(config: LlamaConfig, attention_mask, query_length: int, cache_index, n_prefix: int):
  """(full, windowed or None), each (batch, 1, q, n_prefix + keys) and True where attending is allowed.

  Keys are allowed at or before each query's slot when not padding and in the query's segment
  (`layers.same_segment`: packed rows); windowed masks also drop keys `sliding_window` or more slots back.  The
  prefix (prefix tuning's keys, slots 0..n_prefix-1 in front of the tokens) is always allowed in the full mask; in
  the windowed one a prefix slot stays visible only to queries fewer than `sliding_window` slots after it, as
  transformers' sliding window treats keys that PEFT puts in a past_key_values cache.  Slots count padding, as
  transformers' cache positions do, so left padding between the prefix and a row's tokens moves the prefix out of
  that row's window sooner.
  """
  query_slots = cache_index + jnp.arange(query_length)[:, None]
  key_slots = jnp.arange(attention_mask.shape[1])[None, :]
  padding = attention_mask[:, None, None, :].astype(bool)
  full = (key_slots <= query_slots)[None, None] & padding & layers.same_segment(attention_mask, query_length,
                                                                               cache_index)
  windowed = None
  if any(config.sliding_layers):
    windowed = full & (key_slots > query_slots - config.sliding_window)[None, None]
  if n_prefix:
    prefix = jnp.ones((*full.shape[:3], n_prefix), bool)
    full = jnp.concatenate([prefix, full], axis=-1)
    if windowed is not None:
      in_window = n_prefix + query_slots - jnp.arange(n_prefix)[None, :] < config.sliding_window
      windowed = jnp.concatenate([prefix & in_window, windowed], axis=-1)
  return full, windowed


def _hidden(head: nn.Module, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, cache, cache_index,
            deterministic):
  """`head.model`'s final hidden states and cache, with the default positions and masks."""
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError(f"{type(head).__name__} takes exactly one of input_ids and inputs_embeds.")
  embeddings = head.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(head.dtype)
  batch, length = embeddings.shape[:2]
  n_prefix = 0 if prefix_kv is None else prefix_kv[0][0].shape[1]
  if position_ids is None:
    position_ids = cache_index + jnp.arange(length)[None]
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length if cache is None else cache["key"].shape[2]), jnp.int32)
  masks = attention_masks(head.config, attention_mask, length, cache_index, n_prefix)
  return head.model(embeddings, position_ids + n_prefix, masks, prefix_kv, cache, cache_index, deterministic)


class LlamaForCausalLM(nn.Module):
  """A Llama-family model with its language-modelling head; `__call__` returns logits (batch, length, vocab)."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.model = LlamaModel(c, scan_layers=self.scan_layers, remat=self.remat, name="model", **kw)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, name="lm_head", **kw,
                              dot_general=layers.dot_general(self.dtype),
                              kernel_init=_normal(c.initializer_range, ("embed", "vocab")))

  def logits(self, hidden):
    """The output head: hidden @ embed_tokens.T (tied) or lm_head."""
    if self.config.tie_word_embeddings:
      return layers.attend(self.model.embed_tokens, hidden)
    return self.lm_head(hidden)

  def __call__(self, input_ids=None, attention_mask=None, position_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None):
    """Logits for a causally masked sequence.

    attention_mask (batch, length) is 1 for tokens, 0 for padding (or the segment ids 1, 2, ... of documents
    packed into a row: each attends only to its own; pass their position_ids, restarting at 0).
    position_ids default to 0, 1, ...
    (as Hugging Face's forward; `generate` counts only real tokens).  With `prefix_kv` the positions
    (given or default) are shifted by n_prefix, as in Hugging Face PEFT.
    """
    hidden, _ = _hidden(self, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, None, 0,
                        deterministic)
    return self.logits(hidden)

  def decode(self, input_ids, attention_mask, position_ids, cache, cache_index, prefix_kv=None, inputs_embeds=None):
    """Logits (batch, vocab) of the last of `input_ids` written at cache slots cache_index..., and the new cache.

    attention_mask (batch, cache length) marks the cache slots that hold tokens (not padding).  With
    input_ids None, `inputs_embeds` (batch, length, hidden) are the inputs.
    """
    hidden, cache = _hidden(self, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, cache,
                            cache_index, True)
    return self.logits(hidden[:, -1]), cache


class LlamaForSequenceClassification(nn.Module):
  """LlamaModel (under ``model/``) and a bias-free Dense ``score`` on each row's last token.

  Returns logits (batch, num_labels).  The last token is the rightmost one that is not config.pad_token_id
  (`peftjax.models.layers.last_token`, as transformers), or the last position for `inputs_embeds`.
  """

  config: LlamaConfig
  num_labels: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.model = LlamaModel(c, scan_layers=self.scan_layers, remat=self.remat, name="model", **kw)
    self.score = nn.Dense(self.num_labels, use_bias=False, name="score", **kw,
                          dot_general=layers.dot_general(self.dtype),
                          kernel_init=_normal(c.initializer_range, ("embed", "classes")))

  def __call__(self, input_ids=None, attention_mask=None, position_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None):
    """Logits (batch, num_labels); arguments as LlamaForCausalLM's."""
    hidden, _ = _hidden(self, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, None, 0,
                        deterministic)
    return self.score(layers.last_token(hidden, input_ids, self.config.pad_token_id, type(self).__name__))


# `task` of from_pretrained -> the model class.
TASKS = {"causal_lm": LlamaForCausalLM, "sequence_classification": LlamaForSequenceClassification}


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  """Empty key/value cache {'key', 'value'}: (layers, batch, length, num_key_value_heads, head_dim) each."""
  shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


LAYER_LIST = r"model/layers"  # the path of the layer list: stack_layers / unstack_layers


def stack_layers(tree: Mapping[str, Any]) -> dict:
  """Per-layer tree (model/layers_0/..., layers_1/...) -> scanned layout (model/layers/..., a leading layer axis)."""
  return ptree.stack_layers(tree, LAYER_LIST)


def unstack_layers(tree: Mapping[str, Any]) -> dict:
  """Inverse of `stack_layers`."""
  return ptree.unstack_layers(tree, LAYER_LIST)


def from_pretrained(path_or_hub_id: str, dtype=None, scan_layers: bool = False, remat: bool = False,
                    task: str | None = None, num_labels: int | None = None,
                    rng: jax.Array | None = None) -> tuple[nn.Module, dict]:
  """(model, params) from a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE folder or hub id,
  or a GGUF file.

  A folder holds config.json + model.safetensors (or sharded safetensors with an index); a `.gguf` file,
  or a folder holding exactly one and no config.json, is read with `peftjax.models.gguf` (dequantised).
  `task` None builds the class config.json's architectures names (the causal LM when none of ours);
  "causal_lm" or "sequence_classification" choose one.  A score head the checkpoint lacks is initialised
  from `rng` (with a warning); `num_labels` defaults to the checkpoint's id2label, else 2.  `dtype` is the
  compute and parameter dtype (float32 when None).  The head is tied exactly when the config says
  `tie_word_embeddings`, as in transformers.
  """
  gguf_path = gguf.find(path_or_hub_id)
  if gguf_path is not None:
    hf_config, state = gguf.read(gguf_path)
  else:
    folder = hf_io.resolve(path_or_hub_id)
    hf_config, state = hf_io.read_config(folder), moe.fuse_experts(hf_io.read_state_dict(folder))
  config = LlamaConfig.from_hf(hf_config)
  dtype = jnp.dtype(dtype or jnp.float32)
  model = layers.build(layers.model_class(hf_config, task, TASKS), config, num_labels, dtype)
  abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
  params = hf_io.params_with_new_head(state, abstract, ("score/",), type(model).__name__, config.initializer_range,
                                      rng, dtype=dtype)
  if scan_layers or remat:
    model = model.clone(scan_layers=scan_layers, remat=remat)
  if scan_layers:
    check_scannable(config)
  return model, stack_layers(params) if scan_layers else params


def save_pretrained(model: nn.Module, params: dict, folder: str) -> None:
  """Writes config.json + model.safetensors that transformers' class of the model's model_type and task loads
  (MoE experts one tensor per expert, as transformers writes them)."""
  if model.scan_layers:
    params = unstack_layers(params)
  task = next(task for task, cls in TASKS.items() if isinstance(model, cls))
  state = hf_io.state_dict_from_params(params)
  if model.config.model_type in moe.FILE_NAMES:
    state = moe.split_experts(state, model.config.model_type)
  hf_io.write_folder(folder, layers.hf_config(model, model.config.to_hf(task)), state)


def generate(model: LlamaForCausalLM, params: Any, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, prefix_kv: Any = None,
             apply_fn: Callable[..., Any] | None = None) -> jax.Array:
  """New tokens (batch, max_new_tokens) after the (left-padded) prompts; after EOS a sequence emits pad.

  One jit-compiled loop over a key/value cache (`peftjax.models.decoding`: prompts padded to a power-of-two
  bucket, stops inside the loop once every row has emitted EOS), with Hugging Face generate's positions and EOS
  handling.  Temperature 0 is greedy; sampling needs `rng`.  eos_token_id / pad_token_id default to the config's
  (pad falls back to EOS, then 0); they are traced, so other ids reuse the compilation.
  `apply_fn(params, *args, method=..., **kwargs)` replaces `model.apply({"params": params}, ...)`, e.g.
  for LoRA: params=(base, adapters) and apply_fn=lambda p, *a, **kw: pj.apply(cfg, model.apply)(p[0], p[1],
  *a, **kw) (pass the same function object each call to reuse the compilation).
  """
  if temperature > 0.0 and rng is None:
    raise ValueError(f"generate: temperature={temperature} samples and needs rng=jax.random.key(...); "
                     "use temperature=0.0 for greedy decoding.")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}.")
  c = model.config
  eos = c.eos_token_id if eos_token_id is None else eos_token_id
  eos = [] if eos is None else np.atleast_1d(eos).tolist()
  pad = pad_token_id if pad_token_id is not None else c.pad_token_id
  pad = pad if pad is not None else (eos[0] if eos else 0)
  return decoding.generate(model, init_cache, params, input_ids, attention_mask, prefix_kv, rng, tuple(eos), int(pad),
                           max_new_tokens, temperature, top_k, top_p, apply_fn)
