"""T5 encoder-decoder (v1.0, v1.1 and Flan-T5) in Flax linen with Hugging Face parameter names.

v1.0 uses a ReLU feed-forward block (``DenseReluDense/{wi,wo}``), ties the output head to the
shared embedding and scales the decoder output by d_model**-0.5 before it; v1.1 / Flan-T5 use a
gated tanh-GELU block (``DenseReluDense/{wi_0,wi_1,wo}``) and an untied ``lm_head`` with no scaling.
Attention has no query scaling and adds a learned relative-position bias that only block 0 of
each stack owns (bidirectional buckets in the encoder, causal ones in the decoder); the other
blocks reuse it.  Layer norms are RMS norms (no mean, no bias, variance in float32).

Parameter paths mirror the PyTorch module names, e.g.
``encoder/block_0/layer_0/SelfAttention/q/kernel`` is ``encoder.block.0.layer.0.SelfAttention.q.weight``
and every projection is a bias-free `nn.Dense`, so LoRA targets ("q", "v", "wi_0", ...) work as in
Hugging Face PEFT.

Hooks for prompt methods: `inputs_embeds` replaces the encoder's token embeddings; `encoder_prefix_kv` /
`decoder_prefix_kv` (one (key, value) pair per block of that stack, each (batch or 1, n_prefix, num_heads,
d_kv)) are prepended to every self-attention's keys and values and always attended.  As in transformers'
T5 given past_key_values, the prefix occupies positions 0..n_prefix-1 and the tokens follow it, so the
relative position bias sees queries at n_prefix + i over keys 0..n_prefix + length - 1.  Hugging Face PEFT
prefix tuning gives T5 decoder prefixes only (its encoder never receives past_key_values).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.dropout import Dropout
from peftjax.models import hf_io, layers, sampling

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": layers.gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 hyper-parameters under their Hugging Face names (defaults: t5-small).

  `tie_word_embeddings`: the output head is the shared embedding (no `lm_head` parameter).
  `scale_decoder_outputs`: multiply the decoder output by d_model**-0.5 before the head; None
  means the same as `tie_word_embeddings` (T5 v1.0 both, v1.1 neither).
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool | None = None
  pad_token_id: int = 0
  eos_token_id: int | tuple[int, ...] = 1
  decoder_start_token_id: int = 0

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
    *prefix, activation = self.feed_forward_proj.split("-")
    if activation not in _ACTIVATIONS or prefix not in ([], ["gated"]):
      raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; valid: "
                       f"{sorted(_ACTIVATIONS)} or 'gated-' followed by one of them.")

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    """Activation name; Hugging Face maps "gated-gelu" to the tanh approximation gelu_new."""
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> T5Config:
    """From a Hugging Face config.json dict; unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in hf.items() if k in names})

  def to_hf(self) -> dict:
    """A config.json dict that transformers' T5ForConditionalGeneration accepts."""
    return {**dataclasses.asdict(self), "model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
            "is_encoder_decoder": True}

  @classmethod
  def t5_small(cls) -> T5Config:
    """google-t5/t5-small (v1.0)."""
    return cls()

  @classmethod
  def flan_t5_small(cls) -> T5Config:
    """google/flan-t5-small (v1.1 shapes: gated-gelu, untied head)."""
    return cls(d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def _dense(features: int, axes: tuple[str, str], std: float, dtype, param_dtype, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                  dot_general=layers.dot_general(dtype),
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes))


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bucket of each (key - query) distance: exact for small distances, log-spaced up to max_distance."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact)
  large = log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  large = max_exact + large.astype(distance.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
  """Multi-head attention without query scaling; optionally owns the relative position bias table."""

  config: T5Config
  has_relative_attention_bias: bool = False
  bidirectional: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, inner = self.config, self.config.num_heads * self.config.d_kv
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.q = _dense(inner, ("embed", "joined_kv"), (c.d_model * c.d_kv) ** -0.5, name="q", **kw)
    self.k = _dense(inner, ("embed", "joined_kv"), c.d_model ** -0.5, name="k", **kw)
    self.v = _dense(inner, ("embed", "joined_kv"), c.d_model ** -0.5, name="v", **kw)
    self.o = _dense(c.d_model, ("joined_kv", "embed"), inner ** -0.5, name="o", **kw)
    if self.has_relative_attention_bias:
      init = nn.with_logical_partitioning(nn.initializers.normal(c.d_model ** -0.5), ("relpos_buckets", "heads"))
      self.relative_attention_bias = nn.Embed(c.relative_attention_num_buckets, c.num_heads, embedding_init=init,
                                              name="relative_attention_bias", **kw)
    self.dropout = Dropout(c.dropout_rate)

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)

  def key_value(self, x):
    """Projected keys and values (batch, length, heads, d_kv) of the attended-to sequence."""
    return self._heads(self.k(x)), self._heads(self.v(x))

  def position_bias(self, query_positions, key_length: int):
    """Bias (1, heads, queries, keys) for queries at `query_positions` over keys 0..key_length-1."""
    c = self.config
    relative = jnp.arange(key_length)[None, :] - query_positions[:, None]
    buckets = relative_position_bucket(relative, self.bidirectional, c.relative_attention_num_buckets,
                                       c.relative_attention_max_distance)
    return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

  def __call__(self, x, key_value, mask, position_bias, deterministic: bool):
    """Attends from x (batch, q, d_model) to (keys, values); mask (batch|1, 1, q|1, k) is True where allowed."""
    keys, values = key_value
    scores = layers.einsum("bqhd,bkhd->bhqk", self._heads(self.q(x)), keys, self.dtype)
    if position_bias is not None:
      scores = scores + position_bias.astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = self.dropout(jax.nn.softmax(scores, axis=-1).astype(self.dtype), deterministic=deterministic)
    out = layers.einsum("bhqk,bkhd->bqhd", probs, values, self.dtype).astype(self.dtype)
    return self.o(out.reshape(*out.shape[:2], -1))


class T5LayerSelfAttention(nn.Module):
  config: T5Config
  has_relative_attention_bias: bool = False
  is_decoder: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.SelfAttention = T5Attention(self.config, self.has_relative_attention_bias, not self.is_decoder, **kw)
    self.layer_norm = layers.RMSNorm(self.config.layer_norm_epsilon, **kw)
    self.dropout = Dropout(self.config.dropout_rate)

  def __call__(self, x, mask, position_bias, deterministic: bool, cache=None, position=None, prefix_kv=None):
    """With `cache` ({'k', 'v'} of the whole decoder length), writes this step's keys/values at `position`;
    `prefix_kv` (keys, values) go in front of the keys and values (after the cache update)."""
    h = self.layer_norm(x)
    keys, values = self.SelfAttention.key_value(h)
    if cache is not None:
      start = (0, position, 0, 0)
      keys = jax.lax.dynamic_update_slice(cache["k"], keys.astype(cache["k"].dtype), start)
      values = jax.lax.dynamic_update_slice(cache["v"], values.astype(cache["v"].dtype), start)
      cache = {"k": keys, "v": values}
    if prefix_kv is not None:
      batch = keys.shape[0]
      keys, values = (jnp.concatenate([jnp.broadcast_to(p, (batch, *p.shape[1:])).astype(t.dtype), t], axis=1)
                      for p, t in zip(prefix_kv, (keys, values)))
    out = self.SelfAttention(h, (keys, values), mask, position_bias, deterministic)
    return x + self.dropout(out, deterministic=deterministic), cache


class T5LayerCrossAttention(nn.Module):
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.EncDecAttention = T5Attention(self.config, **kw)
    self.layer_norm = layers.RMSNorm(self.config.layer_norm_epsilon, **kw)
    self.dropout = Dropout(self.config.dropout_rate)

  def __call__(self, x, key_value, mask, deterministic: bool):
    out = self.EncDecAttention(self.layer_norm(x), key_value, mask, None, deterministic)
    return x + self.dropout(out, deterministic=deterministic)


class T5DenseReluDense(nn.Module):
  """Feed-forward block: wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x)."""

  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = _ACTIVATIONS[c.activation]
    if c.is_gated:
      h = act(_dense(c.d_ff, ("embed", "mlp"), c.d_model ** -0.5, name="wi_0", **kw)(x))
      h = h * _dense(c.d_ff, ("embed", "mlp"), c.d_model ** -0.5, name="wi_1", **kw)(x)
    else:
      h = act(_dense(c.d_ff, ("embed", "mlp"), c.d_model ** -0.5, name="wi", **kw)(x))
    h = Dropout(c.dropout_rate)(h, deterministic=deterministic)
    return _dense(c.d_model, ("mlp", "embed"), c.d_ff ** -0.5, name="wo", **kw)(h)


class T5LayerFF(nn.Module):
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.RMSNorm(self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
    h = T5DenseReluDense(self.config, name="DenseReluDense", **kw)(h, deterministic)
    return x + Dropout(self.config.dropout_rate)(h, deterministic=deterministic)


class T5Block(nn.Module):
  """layer_0 self-attention, (decoder) layer_1 cross-attention, then the feed-forward layer."""

  config: T5Config
  is_decoder: bool = False
  has_relative_attention_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sublayers = [T5LayerSelfAttention(self.config, self.has_relative_attention_bias, self.is_decoder, **kw)]
    if self.is_decoder:
      sublayers.append(T5LayerCrossAttention(self.config, **kw))
    self.layer = sublayers + [T5LayerFF(self.config, **kw)]

  def __call__(self, x, mask, position_bias, deterministic: bool, cross_key_value=None, cross_mask=None,
               cache=None, position=None, prefix_kv=None):
    x, cache = self.layer[0](x, mask, position_bias, deterministic, cache, position, prefix_kv)
    if self.is_decoder:
      x = self.layer[1](x, cross_key_value, cross_mask, deterministic)
    return self.layer[-1](x, deterministic), cache


class T5Stack(nn.Module):
  """The encoder or decoder: blocks over input embeddings, then the final RMS norm.

  remat: recompute each block's activations in the backward pass instead of keeping them.
  """

  config: T5Config
  is_decoder: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    depth = c.num_decoder_layers if self.is_decoder else c.num_layers
    block = nn.remat(T5Block, static_argnums=(4,)) if self.remat else T5Block  # self is 0: `deterministic` is 4
    self.block = [block(c, self.is_decoder, i == 0, **kw) for i in range(depth)]
    self.final_layer_norm = layers.RMSNorm(c.layer_norm_epsilon, **kw)
    self.dropout = Dropout(c.dropout_rate)

  def cross_key_values(self, encoder_hidden_states):
    """Per decoder block, the cross-attention keys and values of the encoder output."""
    return [block.layer[1].EncDecAttention.key_value(encoder_hidden_states) for block in self.block]

  def __call__(self, embeddings, mask, deterministic: bool, cross_key_values=None, cross_mask=None,
               cache=None, position=0, prefix_kv=None):
    """Hidden states (and the updated self-attention cache) for `embeddings` at positions position, position+1, ...

    `prefix_kv`: per block (keys, values), each (batch or 1, n_prefix, heads, d_kv), attended before the
    tokens, which then sit at positions n_prefix + position, ... for the relative position bias.
    """
    length = embeddings.shape[1]
    key_length = cache[0]["k"].shape[1] if cache is not None else length
    n_prefix = 0
    if prefix_kv is not None:
      if len(prefix_kv) != len(self.block):
        stack = "decoder" if self.is_decoder else "encoder"
        raise ValueError(f"{stack} prefix_kv has {len(prefix_kv)} (key, value) pairs; the {stack} has "
                         f"{len(self.block)} blocks, one pair per block.")
      n_prefix = prefix_kv[0][0].shape[1]
      mask = jnp.concatenate([jnp.ones((*mask.shape[:3], n_prefix), bool), mask], axis=-1)
    bias = self.block[0].layer[0].SelfAttention.position_bias(n_prefix + position + jnp.arange(length),
                                                              n_prefix + key_length)
    x = self.dropout(embeddings, deterministic=deterministic)
    new_cache = []
    for i, block in enumerate(self.block):
      x, layer_cache = block(x, mask, bias, deterministic, cross_key_values[i] if self.is_decoder else None,
                             cross_mask, cache[i] if cache is not None else None, position,
                             None if prefix_kv is None else prefix_kv[i])
      new_cache.append(layer_cache)
    x = self.dropout(self.final_layer_norm(x), deterministic=deterministic)
    return x, (new_cache if cache is not None else None)


def _padding_mask(attention_mask):
  return attention_mask[:, None, None, :].astype(bool)


class T5ForConditionalGeneration(nn.Module):
  """T5 with its language-modelling head; `__call__` returns logits (batch, decoder length, vocab).

  remat: per-block rematerialisation in both stacks (same outputs and gradients, less activation memory).
  """

  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.shared = nn.Embed(c.vocab_size, c.d_model, name="shared", **kw,
                           embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")))
    self.encoder = T5Stack(c, is_decoder=False, remat=self.remat, **kw)
    self.decoder = T5Stack(c, is_decoder=True, remat=self.remat, **kw)
    if not c.tie_word_embeddings:
      self.lm_head = _dense(c.vocab_size, ("embed", "vocab"), c.d_model ** -0.5, name="lm_head", **kw)

  def encode(self, input_ids=None, attention_mask=None, deterministic: bool = True, inputs_embeds=None,
             prefix_kv=None):
    """Encoder output (batch, length, d_model) of input_ids or inputs_embeds (batch, length, d_model).

    attention_mask is 1 for real tokens, 0 for padding (all ones when None); prefix_kv: the encoder's.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("T5ForConditionalGeneration takes exactly one of input_ids and inputs_embeds.")
    embeddings = self.shared(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    if attention_mask is None:
      attention_mask = jnp.ones(embeddings.shape[:2], jnp.int32)
    hidden, _ = self.encoder(embeddings, _padding_mask(attention_mask), deterministic, prefix_kv=prefix_kv)
    return hidden

  def logits(self, decoder_hidden_states):
    """The output head on decoder hidden states (scaled by d_model**-0.5 first when the config says so)."""
    if self.config.scale_decoder_outputs:
      decoder_hidden_states = decoder_hidden_states * self.config.d_model ** -0.5
    if self.config.tie_word_embeddings:
      return layers.attend(self.shared, decoder_hidden_states)
    return self.lm_head(decoder_hidden_states)

  def decode(self, decoder_input_ids, encoder_hidden_states, attention_mask, decoder_attention_mask=None,
             deterministic: bool = True, prefix_kv=None):
    """Logits for a whole (causally masked) decoder sequence given the encoder output and its mask.

    prefix_kv: the decoder's (per block (keys, values)); attention_mask None means no encoder padding.
    """
    length = decoder_input_ids.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if decoder_attention_mask is not None:
      mask = mask & _padding_mask(decoder_attention_mask)
    if attention_mask is None:
      attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
    hidden, _ = self.decoder(self.shared(decoder_input_ids), mask, deterministic,
                             self.decoder.cross_key_values(encoder_hidden_states), _padding_mask(attention_mask),
                             prefix_kv=prefix_kv)
    return self.logits(hidden)

  def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
               deterministic: bool = True, inputs_embeds=None, encoder_prefix_kv=None, decoder_prefix_kv=None):
    """Decoder logits; the encoder reads input_ids or inputs_embeds (see `encode`, `decode` and the hooks above)."""
    encoder_hidden_states = self.encode(input_ids, attention_mask, deterministic, inputs_embeds, encoder_prefix_kv)
    return self.decode(decoder_input_ids, encoder_hidden_states, attention_mask, decoder_attention_mask,
                       deterministic, decoder_prefix_kv)

  def init_cache(self, encoder_hidden_states, max_length: int) -> dict:
    """Decoding cache: encoder keys/values per block ('cross') and empty self-attention keys/values ('self')."""
    c = self.config
    shape = (encoder_hidden_states.shape[0], max_length, c.num_heads, c.d_kv)
    empty = [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
             for _ in range(c.num_decoder_layers)]
    return {"cross": self.decoder.cross_key_values(encoder_hidden_states), "self": empty}

  def decode_step(self, token_ids, position, cache, attention_mask, prefix_kv=None):
    """Logits (batch, vocab) for token_ids (batch, 1) at decoder `position`, and the updated cache.

    prefix_kv: the decoder's, passed at every step (the cache holds only the tokens).
    """
    max_length = cache["self"][0]["k"].shape[1]
    mask = (jnp.arange(max_length) <= position)[None, None, None, :]
    hidden, self_cache = self.decoder(self.shared(token_ids), mask, True, cache["cross"],
                                      _padding_mask(attention_mask), cache["self"], position, prefix_kv)
    return self.logits(hidden)[:, -1], {"cross": cache["cross"], "self": self_cache}


def _dummy_inputs():
  ids = jnp.ones((1, 1), jnp.int32)
  return ids, ids, ids


def init_params(model: T5ForConditionalGeneration, rng: jax.Array) -> dict:
  """Randomly initialised parameters (unboxed) of `model`."""
  return layers.init_params(model, rng, *_dummy_inputs())


def logical_axes(model: T5ForConditionalGeneration) -> dict:
  """Tree of logical-axis PartitionSpecs with the structure of the parameters."""
  return layers.logical_axes(model, *_dummy_inputs())


def shift_right(labels: jax.Array, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> jax.Array:
  """Decoder inputs from labels: start token first, labels shifted right, ignored (-100) positions as pad."""
  start = jnp.full_like(labels[:, :1], decoder_start_token_id)
  shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


def from_pretrained(path_or_hub_id: str, dtype=None) -> tuple[T5ForConditionalGeneration, dict]:
  """(model, params) from a Hugging Face T5 folder or hub id; `dtype` is the compute and parameter dtype (float32).

  The head is untied when the checkpoint holds an `lm_head.weight` that differs from `shared.weight`
  (as transformers decides); the output scaling follows `scale_decoder_outputs`, or else `tie_word_embeddings`.
  """
  folder = hf_io.resolve(path_or_hub_id)
  config = T5Config.from_hf(hf_io.read_config(folder))
  state = hf_io.read_state_dict(folder)
  untied = "lm_head.weight" in state and not (
      "shared.weight" in state and np.array_equal(state["lm_head.weight"], state["shared.weight"]))
  config = dataclasses.replace(config, tie_word_embeddings=not untied)
  dtype = dtype or jnp.float32
  model = T5ForConditionalGeneration(config, dtype=dtype, param_dtype=dtype)
  abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
  return model, hf_io.params_from_state_dict(state, abstract, rename=hf_io.hf_key, dtype=dtype)


def save_pretrained(model: T5ForConditionalGeneration, params: dict, folder: str) -> None:
  """Writes config.json + model.safetensors that transformers' T5ForConditionalGeneration loads."""
  hf_io.write_folder(folder, model.config.to_hf(), hf_io.state_dict_from_params(params, rename=hf_io.hf_key))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "apply_fn"))
def _generate(model, params, input_ids, attention_mask, eos, rng, encoder_prefix_kv, decoder_prefix_kv, max_new_tokens,
              temperature, top_k, top_p, apply_fn):
  c = model.config
  call = apply_fn or (lambda p, *args, **kwargs: model.apply({"params": p}, *args, **kwargs))
  encoder_kwargs = {} if encoder_prefix_kv is None else {"prefix_kv": encoder_prefix_kv}
  decoder_kwargs = {} if decoder_prefix_kv is None else {"prefix_kv": decoder_prefix_kv}
  encoder_hidden_states = call(params, input_ids, attention_mask, method="encode", **encoder_kwargs)
  cache = call(params, encoder_hidden_states, max_new_tokens, method="init_cache")

  def step(carry, position):
    token, cache, finished, rng = carry
    logits, cache = call(params, token[:, None], position, cache, attention_mask, method="decode_step",
                         **decoder_kwargs)
    key = None
    if rng is not None:
      rng, key = jax.random.split(rng)
    token = sampling.next_token(logits, key, temperature, top_k, top_p)
    token = jnp.where(finished, c.pad_token_id, token)
    return (token, cache, finished | jnp.isin(token, eos), rng), token

  start = jnp.full((input_ids.shape[0],), c.decoder_start_token_id, input_ids.dtype)
  finished = jnp.zeros((input_ids.shape[0],), bool)
  _, tokens = jax.lax.scan(step, (start, cache, finished, rng), jnp.arange(max_new_tokens))
  return tokens.T


def generate(model: T5ForConditionalGeneration, params: Any, input_ids: jax.Array,
             attention_mask: jax.Array | None = None, max_new_tokens: int = 16, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, rng: jax.Array | None = None,
             apply_fn: Callable[..., Any] | None = None,
             eos_token_id: int | tuple[int, ...] | None = None, encoder_prefix_kv: Any = None,
             decoder_prefix_kv: Any = None) -> jax.Array:
  """Generated ids (batch, max_new_tokens), without the start token; after EOS a sequence emits pad.

  A jit-compiled loop with a decoder key/value cache (encoder keys/values computed once).  Temperature 0 is
  greedy; sampling needs `rng`.  `apply_fn(params, *args, method=..., **kwargs)` replaces
  `model.apply({"params": params}, ...)`, e.g. for LoRA: params=(base, adapters) and
  apply_fn=lambda p, *a, **kw: pj.apply(cfg, model.apply)(p[0], p[1], *a, **kw) (pass the same function
  object each call to reuse the compilation).  `eos_token_id` overrides the config's EOS id(s).
  `encoder_prefix_kv` / `decoder_prefix_kv` are the prefix hooks of `encode` and `decode_step`.
  """
  if temperature > 0.0 and rng is None:
    raise ValueError(f"generate: temperature={temperature} samples and needs rng=jax.random.key(...); "
                     "use temperature=0.0 for greedy decoding.")
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  eos = jnp.asarray(model.config.eos_token_id if eos_token_id is None else eos_token_id)
  return _generate(model, params, jnp.asarray(input_ids), jnp.asarray(attention_mask), eos, rng, encoder_prefix_kv,
                   decoder_prefix_kv, max_new_tokens, float(temperature), int(top_k), float(top_p), apply_fn)
