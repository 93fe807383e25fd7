"""Gemma 2 and Gemma 3 (text) causal language models in Flax linen with Hugging Face names.

One module covers both through config switches, as transformers' Gemma2 / Gemma3ForCausalLM compute them:
token embeddings scaled by sqrt(hidden_size) (cast to the compute dtype), RMS norms as x / rms(x) * (1 + w) in
float32, a pre- and a post-norm around both attention and MLP, the GeGLU MLP down_proj(gelu_tanh(gate_proj x) *
up_proj x), attention scores scaled by query_pre_attn_scalar ** -0.5, Gemma 2's attention-logit soft-capping
(cap * tanh(s / cap); transformers' Gemma 3 ignores the setting), final-logit soft-capping, Gemma 3's RMS
q_norm / k_norm over each head before the rotary embedding, and sliding-window layers ("sliding_attention" in
`layer_types`) interleaved with global ones.  Gemma 3's sliding layers rotate with `rope_local_base_freq`, its
global ones with `rope_theta` and the optional `rope_scaling` (any type of `peftjax.models.rope`, e.g. "linear");
Gemma 2 uses one RoPE for all layers.

The structure, public API and conventions are llama.py's: the same parameter paths (``model/layers_0/self_attn/
q_proj/kernel``; the four norms ``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
``post_feedforward_layernorm``), `scan_layers` / `remat`, logical axes, `prefix_kv` / `inputs_embeds` hooks
(inputs_embeds are used as given, unscaled, as in transformers), the key/value cache of
`peftjax.models.decoding`, a ...ForSequenceClassification class (a bias-free ``score`` on each row's last
token, no soft-capping), and GGUF files through `peftjax.models.gguf` (architectures "gemma2", "gemma3").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.dropout import Dropout
from peftjax.models import decoding, gguf, hf_io, layers, llama, rope
from peftjax.models.layers import init_params, logical_axes  # noqa: F401 (this family's)

ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
CLASSIFIERS = {"gemma2": "Gemma2ForSequenceClassification", "gemma3_text": "Gemma3TextForSequenceClassification"}
LAYER_TYPES = llama.LAYER_TYPES
# The layer pattern transformers derives when config.json has no layer_types: every n-th layer is global.
_DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Gemma 2 / Gemma 3 text hyper-parameters under their Hugging Face names (defaults: Gemma 3 270M).

  `rope_theta` is the global layers' base, `rope_local_base_freq` the sliding layers' (Gemma 3; Gemma 2 uses
  rope_theta for all).  `rope_scaling` (e.g. {"rope_type": "linear", "factor": 8.0}; stored as sorted pairs) applies to
  Gemma 3's global layers, or to every Gemma 2 layer.  `layer_types` defaults to transformers' pattern
  (`sliding_window_pattern`: every 2nd layer global in Gemma 2, every 6th in Gemma 3).
  """

  model_type: str = "gemma3_text"
  vocab_size: int = 262144
  hidden_size: int = 640
  intermediate_size: int = 2048
  num_hidden_layers: int = 18
  num_attention_heads: int = 4
  num_key_value_heads: int = 1
  head_dim: int = 256
  hidden_activation: str = "gelu_pytorch_tanh"
  max_position_embeddings: int = 32768
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  rope_local_base_freq: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  attention_bias: bool = False
  attention_dropout: float = 0.0
  query_pre_attn_scalar: float = 256
  sliding_window: int | None = 512
  sliding_window_pattern: int | None = None
  layer_types: tuple[str, ...] | None = None
  final_logit_softcapping: float | None = None
  attn_logit_softcapping: float | None = None
  tie_word_embeddings: bool = True
  initializer_range: float = 0.02
  bos_token_id: int | None = 2
  eos_token_id: int | tuple[int, ...] | None = 1
  pad_token_id: int | None = 0
  id2label: tuple[str, ...] = ()

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    if self.model_type not in ARCHITECTURES:
      raise ValueError(f"GemmaConfig.model_type={self.model_type!r} is not supported; valid: {sorted(ARCHITECTURES)}.")
    if self.hidden_activation not in _ACTIVATIONS:
      raise ValueError(f"GemmaConfig.hidden_activation={self.hidden_activation!r} is not supported; valid: "
                       f"{list(_ACTIVATIONS)}.")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"GemmaConfig.num_attention_heads={self.num_attention_heads} must be a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}.")
    if isinstance(self.eos_token_id, list):
      set_("eos_token_id", tuple(self.eos_token_id))
    set_("rope_scaling", rope.parse_scaling(self.rope_scaling, self.max_position_embeddings, self.head_dim,
                                            "GemmaConfig.rope_scaling"))
    if self.model_type == "gemma2":
      set_("rope_local_base_freq", self.rope_theta)
    if self.layer_types is None:
      pattern = self.sliding_window_pattern or _DEFAULT_PATTERN[self.model_type]
      set_("layer_types", tuple(LAYER_TYPES[bool((i + 1) % pattern)] for i in range(self.num_hidden_layers)))
    set_("layer_types", tuple(self.layer_types))
    set_("sliding_window_pattern", None)  # only derives layer_types
    if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
      raise ValueError(f"GemmaConfig.layer_types={self.layer_types!r} must list one of {LAYER_TYPES} for each of "
                       f"the {self.num_hidden_layers} layers.")

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it is a "sliding_attention" layer (its window and, in Gemma 3, its local RoPE)."""
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it attends through the sliding window (`llama.attention_masks`)."""
    return tuple(local and self.sliding_window is not None for local in self.local_layers)

  @property
  def attention_softcap(self) -> float | None:
    """The attention-logit cap transformers applies: Gemma 2's attn_logit_softcapping (Gemma 3 passes none)."""
    return self.attn_logit_softcapping if self.model_type == "gemma2" else None

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> GemmaConfig:
    """From a Hugging Face config.json dict (transformers 5's rope_parameters, or the older rope_theta /
    rope_local_base_freq / rope_scaling keys)."""
    if hf.get("model_type") == "gemma3":
      raise ValueError("config.json model_type='gemma3' is the multimodal Gemma 3 (vision tower and "
                       "model.language_model.* weights); load a text-only checkpoint (model_type 'gemma3_text', "
                       "e.g. gemma-3-270m or gemma-3-1b) or its GGUF file.")
    if hf.get("use_bidirectional_attention"):
      raise ValueError("config.json use_bidirectional_attention=true (an embedding model) is not supported; valid: "
                       "false (causal attention).")
    names = {f.name for f in dataclasses.fields(cls)} - {"id2label"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in hf.items() if k in names}
    rope = dict(hf.get("rope_parameters") or {})
    if "full_attention" in rope or "sliding_attention" in rope:  # Gemma 3: one dict per layer type
      local = dict(rope.get("sliding_attention") or {})
      if local.get("rope_type", "default") != "default":
        raise ValueError(f"config.json rope_parameters.sliding_attention rope_type={local['rope_type']!r} is not "
                         "supported; valid: 'default'.")
      kwargs["rope_local_base_freq"] = local.get("rope_theta", cls.rope_local_base_freq)
      rope = dict(rope.get("full_attention") or {})
    if rope:
      kwargs["rope_theta"] = rope.pop("rope_theta", hf.get("rope_theta", cls.rope_theta))
      kwargs["rope_scaling"] = rope
    return cls(**kwargs, id2label=hf_io.id2label_from_hf(hf))

  def to_hf(self, task: str = "causal_lm") -> dict:
    """A config.json dict that transformers' Gemma2 / Gemma3 text class for `task` (TASKS) accepts."""
    skip = {"rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern", "id2label"}
    hf = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
    if self.id2label:
      hf.update(hf_io.label_fields(self.id2label, len(self.id2label)))
    global_rope = {"rope_type": "default", **dict(self.rope_scaling or {}), "rope_theta": self.rope_theta}
    if self.model_type == "gemma3_text":
      global_rope = {"full_attention": global_rope,
                     "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq}}
    architecture = (ARCHITECTURES if task == "causal_lm" else CLASSIFIERS)[self.model_type]
    hf.update(model_type=self.model_type, architectures=[architecture], rope_parameters=global_rope,
              layer_types=list(self.layer_types))
    return hf


def is_gemma(params: Mapping[str, Any]) -> bool:
  """Whether a parameter tree is a Gemma model's (its layers have the pre_feedforward_layernorm no other family
  has)."""
  model = params.get("model", {})
  layer = model.get("layers", model.get("layers_0", {}))
  return "pre_feedforward_layernorm" in layer


def rope_inv_freq(config: GemmaConfig, local: bool, position_ids: jax.Array) -> tuple[jax.Array, float]:
  """(inv_freq (head_dim // 2,), attention scaling) of the sliding (`local`) or the global layers for one call;
  `rope_scaling` applies to Gemma 3's global layers and to every Gemma 2 layer (`peftjax.models.rope`)."""
  theta = config.rope_local_base_freq if local else config.rope_theta
  scaling = config.rope_scaling if config.model_type == "gemma2" or not local else None
  return rope.call_inv_freq(position_ids, config.head_dim, theta, scaling, config.max_position_embeddings)


def _normal(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _dense(features: int, axes: tuple[str, str], config: GemmaConfig, use_bias: bool, dtype, param_dtype,
           name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  dot_general=layers.dot_general(dtype),
                  kernel_init=_normal(config.initializer_range, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class GemmaRMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * (1 + scale), all in float32, then cast (transformers' Gemma RMSNorm; the
  scale starts at 0)."""

  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap), or x when cap is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


class GemmaAttention(nn.Module):
  """Grouped-query self-attention: (Gemma 3) q/k RMS norms, rotary positions, scores scaled by
  query_pre_attn_scalar ** -0.5 and (Gemma 2) soft-capped; query head h reads key/value head h // group."""

  config: GemmaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(config=c, use_bias=c.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    self.q_proj = _dense(c.num_attention_heads * c.head_dim, ("embed", "joined_kv"), name="q_proj", **kw)
    self.k_proj = _dense(c.num_key_value_heads * c.head_dim, ("embed", "joined_kv"), name="k_proj", **kw)
    self.v_proj = _dense(c.num_key_value_heads * c.head_dim, ("embed", "joined_kv"), name="v_proj", **kw)
    self.o_proj = _dense(c.hidden_size, ("joined_kv", "embed"), name="o_proj", **kw)
    if c.model_type == "gemma3_text":
      norm = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      self.q_norm = GemmaRMSNorm(c.rms_norm_eps, name="q_norm", **norm)
      self.k_norm = GemmaRMSNorm(c.rms_norm_eps, name="k_norm", **norm)
    self.dropout = Dropout(c.attention_dropout)

  def __call__(self, x, cos, sin, mask, prefix_kv, cache, cache_index, deterministic: bool, layer=None):
    """x (batch, q, hidden); mask (batch, 1, q, keys) True where attending is allowed; `cache` and `layer` as
    llama's."""
    c = self.config
    batch, length = x.shape[:2]
    query = self.q_proj(x).reshape(batch, length, c.num_attention_heads, c.head_dim)
    key = self.k_proj(x).reshape(batch, length, c.num_key_value_heads, c.head_dim)
    value = self.v_proj(x).reshape(batch, length, c.num_key_value_heads, c.head_dim)
    if c.model_type == "gemma3_text":
      query, key = self.q_norm(query), self.k_norm(key)
    query, key = llama.apply_rotary(query, cos, sin), llama.apply_rotary(key, cos, sin)
    if cache is not None:
      key, value, cache = decoding.write_cache(cache, layer, cache_index, key, value)
    if prefix_kv is not None:
      key = jnp.concatenate([prefix_kv[0].astype(key.dtype), key], axis=1)
      value = jnp.concatenate([prefix_kv[1].astype(value.dtype), value], axis=1)
    group = c.num_attention_heads // c.num_key_value_heads
    query = query.reshape(batch, length, c.num_key_value_heads, group, c.head_dim)
    scores = layers.einsum("bqkgd,bskd->bkgqs", query, key, self.dtype) * c.query_pre_attn_scalar ** -0.5
    scores = jnp.where(mask[:, :, None], softcap(scores, c.attention_softcap), jnp.finfo(jnp.float32).min)
    probs = self.dropout(jax.nn.softmax(scores, axis=-1).astype(self.dtype), deterministic=deterministic)
    out = layers.einsum("bkgqs,bskd->bqkgd", probs, value, self.dtype).astype(self.dtype)
    return self.o_proj(out.reshape(batch, length, -1)), cache


class GemmaMLP(nn.Module):
  """GeGLU: down_proj(gelu(gate_proj x) * up_proj x)."""

  config: GemmaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(config=c, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = _dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = _dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
    return _dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(llama._ACTIVATIONS[c.hidden_activation](gate)
                                                                          * up)


class GemmaDecoderLayer(nn.Module):
  """x + post_attention_layernorm(self_attn(input_layernorm(x))), then
  + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(.))); returns (hidden, cache)."""

  config: GemmaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rope, masks, local, prefix_kv, cache, cache_index, deterministic: bool, layer=None):
    """`rope` is (global cos, sin, local cos, sin), `masks` (full, windowed or None); `local` (a bool, traced
    under scan) picks the sliding layer's."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    full, windowed = masks
    mask = full if windowed is None else jnp.where(local, windowed, full)
    cos, sin = jnp.where(local, rope[2], rope[0]), jnp.where(local, rope[3], rope[1])
    norm = functools.partial(GemmaRMSNorm, c.rms_norm_eps, **kw)
    h, cache = GemmaAttention(c, name="self_attn", **kw)(norm(name="input_layernorm")(x), cos, sin, mask, prefix_kv,
                                                         cache, cache_index, deterministic, layer)
    x = x + norm(name="post_attention_layernorm")(h)
    h = GemmaMLP(c, name="mlp", **kw)(norm(name="pre_feedforward_layernorm")(x))
    return x + norm(name="post_feedforward_layernorm")(h), cache


class GemmaModel(nn.Module):
  """embed_tokens (scaled by sqrt(hidden_size)), the layers layers_0 ... (or one scanned `layers`), the final
  norm."""

  config: GemmaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens", **kw,
                                 embedding_init=_normal(c.initializer_range, ("vocab", "embed")))
    layer = GemmaDecoderLayer
    if self.remat:  # static_argnums counts self as 0: `deterministic` is argument 8
      layer = nn.remat(layer, static_argnums=(8,), prevent_cse=not self.scan_layers)
    if self.scan_layers:
      layer = nn.scan(layer, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0, 0, 0, nn.broadcast, nn.broadcast),
                      length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = layer(c, name="layers", **kw)
    else:
      self.layers = [layer(c, name=f"layers_{i}", **kw) for i in range(c.num_hidden_layers)]
    self.norm = GemmaRMSNorm(c.rms_norm_eps, name="norm", **kw)

  def embed(self, input_ids):
    """Token embeddings times sqrt(hidden_size), the factor rounded to the compute dtype as in transformers."""
    return self.embed_tokens(input_ids) * jnp.asarray(self.config.hidden_size ** 0.5, self.dtype)

  def __call__(self, embeddings, position_ids, masks, prefix_kv, cache, cache_index, deterministic: bool):
    """Final hidden states (batch, length, hidden) and the updated cache (None without one)."""
    c = self.config
    rope = (*llama.rotary(position_ids, *rope_inv_freq(c, False, position_ids)),
            *llama.rotary(position_ids, *rope_inv_freq(c, True, position_ids)))
    local = c.local_layers
    x = embeddings
    if self.scan_layers:
      if prefix_kv is not None:
        prefix_kv = tuple(jnp.stack(t) for t in zip(*prefix_kv))
      x, cache = self.layers(x, rope, masks, jnp.asarray(local), prefix_kv, cache, cache_index, deterministic)
    else:
      for i, layer in enumerate(self.layers):  # each writes its slots of the stacked cache in place
        x, cache = layer(x, rope, masks, local[i], None if prefix_kv is None else prefix_kv[i], cache, cache_index,
                         deterministic, i)
    return self.norm(x), cache


def _hidden(head: nn.Module, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, cache, cache_index,
            deterministic):
  """`head.model`'s final hidden states and cache, with the default positions and masks (as llama's)."""
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError(f"{type(head).__name__} takes exactly one of input_ids and inputs_embeds.")
  embeddings = head.model.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(head.dtype)
  batch, length = embeddings.shape[:2]
  n_prefix = 0 if prefix_kv is None else prefix_kv[0][0].shape[1]
  if position_ids is None:
    position_ids = cache_index + jnp.arange(length)[None]
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length if cache is None else cache["key"].shape[2]), jnp.int32)
  masks = llama.attention_masks(head.config, attention_mask, length, cache_index, n_prefix)
  return head.model(embeddings, position_ids + n_prefix, masks, prefix_kv, cache, cache_index, deterministic)


class GemmaForCausalLM(nn.Module):
  """A Gemma 2 / 3 model with its (tied) head and final soft-capping; `__call__` returns logits (batch, length,
  vocab)."""

  config: GemmaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.model = GemmaModel(c, scan_layers=self.scan_layers, remat=self.remat, name="model", **kw)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, name="lm_head", **kw,
                              dot_general=layers.dot_general(self.dtype),
                              kernel_init=_normal(c.initializer_range, ("embed", "vocab")))

  def logits(self, hidden):
    """The output head (hidden @ embed_tokens.T when tied, else lm_head), soft-capped by final_logit_softcapping."""
    logits = layers.attend(self.model.embed_tokens, hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
    return softcap(logits, self.config.final_logit_softcapping)

  def __call__(self, input_ids=None, attention_mask=None, position_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None):
    """Logits for a causally masked sequence; arguments as `llama.LlamaForCausalLM.__call__`'s."""
    hidden, _ = _hidden(self, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, None, 0,
                        deterministic)
    return self.logits(hidden)

  def decode(self, input_ids, attention_mask, position_ids, cache, cache_index, prefix_kv=None, inputs_embeds=None):
    """Logits (batch, vocab) of the last of `input_ids` written at cache slots cache_index..., and the new cache
    (as `llama.LlamaForCausalLM.decode`)."""
    hidden, cache = _hidden(self, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, cache,
                            cache_index, True)
    return self.logits(hidden[:, -1]), cache


class GemmaForSequenceClassification(nn.Module):
  """GemmaModel (under ``model/``) and a bias-free Dense ``score`` on each row's last token (transformers'
  Gemma2ForSequenceClassification / Gemma3TextForSequenceClassification); returns logits (batch, num_labels)."""

  config: GemmaConfig
  num_labels: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.model = GemmaModel(c, scan_layers=self.scan_layers, remat=self.remat, name="model", **kw)
    self.score = nn.Dense(self.num_labels, use_bias=False, name="score", **kw,
                          dot_general=layers.dot_general(self.dtype),
                          kernel_init=_normal(c.initializer_range, ("embed", "classes")))

  def __call__(self, input_ids=None, attention_mask=None, position_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None):
    """Logits (batch, num_labels); arguments as GemmaForCausalLM's."""
    hidden, _ = _hidden(self, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, None, 0,
                        deterministic)
    return self.score(layers.last_token(hidden, input_ids, self.config.pad_token_id, type(self).__name__))


# `task` of from_pretrained -> the model class.
TASKS = {"causal_lm": GemmaForCausalLM, "sequence_classification": GemmaForSequenceClassification}
init_cache = llama.init_cache  # (layers, batch, length, num_key_value_heads, head_dim) keys and values
LAYER_LIST = llama.LAYER_LIST
stack_layers = llama.stack_layers
unstack_layers = llama.unstack_layers


def from_pretrained(path_or_hub_id: str, dtype=None, scan_layers: bool = False, remat: bool = False,
                    task: str | None = None, num_labels: int | None = None,
                    rng: jax.Array | None = None) -> tuple[nn.Module, dict]:
  """(model, params) from a Hugging Face Gemma 2 / Gemma 3 text folder or hub id, or a GGUF file (arguments as
  `llama.from_pretrained`'s)."""
  gguf_path = gguf.find(path_or_hub_id)
  if gguf_path is not None:
    hf_config, state = gguf.read(gguf_path)
  else:
    folder = hf_io.resolve(path_or_hub_id)
    hf_config, state = hf_io.read_config(folder), hf_io.read_state_dict(folder)
  config = GemmaConfig.from_hf(hf_config)
  dtype = jnp.dtype(dtype or jnp.float32)
  model = layers.build(layers.model_class(hf_config, task, TASKS), config, num_labels, dtype)
  abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
  params = hf_io.params_with_new_head(state, abstract, ("score/",), type(model).__name__, config.initializer_range,
                                      rng, dtype=dtype)
  if scan_layers or remat:
    model = model.clone(scan_layers=scan_layers, remat=remat)
  return model, stack_layers(params) if scan_layers else params


def save_pretrained(model: nn.Module, params: dict, folder: str) -> None:
  """Writes config.json + model.safetensors that transformers' Gemma2 / Gemma3 text class of the model's task
  loads."""
  if model.scan_layers:
    params = unstack_layers(params)
  task = next(task for task, cls in TASKS.items() if isinstance(model, cls))
  hf_io.write_folder(folder, layers.hf_config(model, model.config.to_hf(task)), hf_io.state_dict_from_params(params))


def generate(model: GemmaForCausalLM, params: Any, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, prefix_kv: Any = None,
             apply_fn: Callable[..., Any] | None = None) -> jax.Array:
  """New tokens (batch, max_new_tokens) after the (left-padded) prompts; arguments and behaviour as
  `llama.generate`'s (one jit-compiled cached loop, `peftjax.models.decoding`)."""
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
