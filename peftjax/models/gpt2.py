"""GPT-2 causal language model in Flax linen with Hugging Face parameter names.

Pre-LayerNorm blocks (``ln_1`` -> attention -> residual, ``ln_2`` -> MLP -> residual), learned
absolute positions (``wpe``), attention scores scaled by 1/sqrt(head_dim) (and by 1/(layer + 1) with
`scale_attn_by_inverse_layer_idx`), a final ``ln_f`` and an output head tied to ``wte``.

Hugging Face's GPT-2 uses `Conv1D`, whose weight is already (in, out): our `nn.Dense` kernels load and
save without a transpose, and every projection is an `nn.Dense` named like the PyTorch module
(``transformer/h_0/attn/c_attn``, ``.../attn/c_proj``, ``.../mlp/c_fc``, ``.../mlp/c_proj``), so LoRA
targets ("c_attn", ...) work as in Hugging Face PEFT.  With `scan_layers` the blocks are one
`nn.scan`ned module ``transformer/h`` whose leaves have a leading layer axis (`stack_layers` /
`unstack_layers` convert between the two layouts).

`GPT2ForSequenceClassification` puts a bias-free ``score`` Dense on each row's last token (the rightmost one that
is not config.pad_token_id, as transformers finds it, for either padding side).

Hooks for prompt methods: `inputs_embeds` replaces the token embeddings; `prefix_kv` (one (key, value)
pair per layer, each (batch, n_prefix, n_head, head_dim)) is prepended to every layer's keys and
values, always attended, and shifts the tokens' positions by n_prefix (as Hugging Face PEFT prefix
tuning does through past_key_values).
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
from peftjax.models import decoding, hf_io, layers
from peftjax.models.layers import init_params, logical_axes  # noqa: F401 (this family's)

_ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": layers.gelu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """GPT-2 hyper-parameters under their Hugging Face names (defaults: openai-community/gpt2).

  Attention scores and softmax are always float32, so `reorder_and_upcast_attn` needs no separate path.
  `id2label` holds the label names of a classification checkpoint, in label order.
  """

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  reorder_and_upcast_attn: bool = False
  tie_word_embeddings: bool = True
  bos_token_id: int | None = 50256
  eos_token_id: int | tuple[int, ...] | None = 50256
  pad_token_id: int | None = None
  id2label: tuple[str, ...] = ()

  def __post_init__(self):
    if self.activation_function not in _ACTIVATIONS:
      raise ValueError(f"GPT2Config.activation_function={self.activation_function!r} is not supported; "
                       f"valid: {sorted(_ACTIVATIONS)}.")
    if self.n_embd % self.n_head:
      raise ValueError(f"GPT2Config.n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def inner_dim(self) -> int:
    return self.n_inner if self.n_inner is not None else 4 * self.n_embd

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> GPT2Config:
    """From a Hugging Face config.json dict; unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)} - {"id2label"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in hf.items() if k in names}
    return cls(**kwargs, id2label=hf_io.id2label_from_hf(hf))

  def to_hf(self, architecture: str = "GPT2LMHeadModel") -> dict:
    """A config.json dict that transformers' `architecture` (GPT2LMHeadModel, GPT2ForSequenceClassification) accepts."""
    hf = {k: v for k, v in dataclasses.asdict(self).items() if k != "id2label"}
    if self.id2label:
      hf.update(hf_io.label_fields(self.id2label, len(self.id2label)))
    return {**hf, "model_type": "gpt2", "architectures": [architecture]}


def _normal(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _dense(features: int, axes: tuple[str, str], std: float, dtype, param_dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, dot_general=layers.dot_general(dtype), name=name,
                  kernel_init=_normal(std, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def _layer_norm(config: GPT2Config, dtype, param_dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class GPT2Attention(nn.Module):
  """Causal multi-head self-attention with a fused q|k|v projection (c_attn) and an output projection."""

  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.c_attn = _dense(3 * c.n_embd, ("embed", "joined_kv"), c.initializer_range, name="c_attn", **kw)
    self.c_proj = _dense(c.n_embd, ("joined_kv", "embed"), c.initializer_range / (2 * c.n_layer) ** 0.5,
                         name="c_proj", **kw)
    self.attn_dropout = Dropout(c.attn_pdrop)
    self.resid_dropout = Dropout(c.resid_pdrop)

  def __call__(self, x, layer_idx, mask, prefix_kv, cache, cache_index, deterministic: bool, layer=None):
    """x (batch, q, n_embd); mask (batch, 1, q, keys) is True where attending is allowed.

    With `cache` ({'key', 'value'} (batch, cache length, heads, head_dim), or every layer's with a leading axis
    and this one's index `layer`), this call's keys and values are written at `cache_index` and the queries
    attend over the whole cache.
    """
    c = self.config
    query, key, value = (t.reshape(*t.shape[:-1], c.n_head, c.head_dim) for t in jnp.split(self.c_attn(x), 3, -1))
    if cache is not None:
      key, value, cache = decoding.write_cache(cache, layer, cache_index, key, value)
    if prefix_kv is not None:
      key = jnp.concatenate([prefix_kv[0].astype(key.dtype), key], axis=1)
      value = jnp.concatenate([prefix_kv[1].astype(value.dtype), value], axis=1)
    scale = c.head_dim ** -0.5 if c.scale_attn_weights else 1.0
    if c.scale_attn_by_inverse_layer_idx:
      scale = scale / (layer_idx + 1.0)
    scores = layers.einsum("bqhd,bkhd->bhqk", query, key, self.dtype) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = self.attn_dropout(jax.nn.softmax(scores, axis=-1).astype(self.dtype), deterministic=deterministic)
    out = layers.einsum("bhqk,bkhd->bqhd", probs, value, self.dtype).astype(self.dtype)
    out = self.c_proj(out.reshape(*out.shape[:2], c.n_embd))
    return self.resid_dropout(out, deterministic=deterministic), cache


class GPT2MLP(nn.Module):
  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _ACTIVATIONS[c.activation_function](_dense(c.inner_dim, ("embed", "mlp"), c.initializer_range,
                                                   name="c_fc", **kw)(x))
    h = _dense(c.n_embd, ("mlp", "embed"), c.initializer_range / (2 * c.n_layer) ** 0.5, name="c_proj", **kw)(h)
    return Dropout(c.resid_pdrop)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
  """x + attn(ln_1(x)), then + mlp(ln_2(.)); returns (hidden, updated cache)."""

  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, layer_idx, mask, prefix_kv, cache, cache_index, deterministic: bool, layer=None):
    """`cache` holds this block's keys and values, or every block's when `layer` is this one's index."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _layer_norm(self.config, name="ln_1", **kw)(x)
    h, cache = GPT2Attention(self.config, name="attn", **kw)(h, layer_idx, mask, prefix_kv, cache, cache_index,
                                                             deterministic, layer)
    x = x + h
    h = GPT2MLP(self.config, name="mlp", **kw)(_layer_norm(self.config, name="ln_2", **kw)(x), deterministic)
    return x + h, cache


class GPT2Model(nn.Module):
  """Embeddings (wte + wpe), the blocks h_0 ... h_{n-1} (or one scanned `h`), and ln_f."""

  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    std = c.initializer_range
    self.wte = nn.Embed(c.vocab_size, c.n_embd, embedding_init=_normal(std, ("vocab", "embed")), name="wte", **kw)
    self.wpe = nn.Embed(c.n_positions, c.n_embd, embedding_init=_normal(std, ("positions", "embed")), name="wpe",
                        **kw)
    self.drop = Dropout(c.embd_pdrop)
    block = GPT2Block
    if self.remat:  # static_argnums counts self as 0: `deterministic` is argument 7
      block = nn.remat(block, static_argnums=(7,), prevent_cse=not self.scan_layers)
    if self.scan_layers:
      block = nn.scan(block, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, 0, 0, nn.broadcast, nn.broadcast), length=c.n_layer,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      self.h = block(c, name="h", **kw)
    else:
      self.h = [block(c, name=f"h_{i}", **kw) for i in range(c.n_layer)]
    self.ln_f = _layer_norm(c, name="ln_f", **kw)

  def __call__(self, embeddings, position_ids, mask, prefix_kv, cache, cache_index, deterministic: bool):
    """Final hidden states (batch, length, n_embd) and the updated cache (None without one)."""
    x = self.drop(embeddings + self.wpe(position_ids), deterministic=deterministic)
    if self.scan_layers:
      if prefix_kv is not None:
        prefix_kv = tuple(jnp.stack(t) for t in zip(*prefix_kv))
      x, cache = self.h(x, jnp.arange(self.config.n_layer), mask, prefix_kv, cache, cache_index, deterministic)
    else:
      for i, block in enumerate(self.h):  # each writes its slots of the stacked cache in place
        x, cache = block(x, i, mask, None if prefix_kv is None else prefix_kv[i], cache, cache_index,
                         deterministic, i)
    return self.ln_f(x), cache


def _attention_mask(attention_mask, query_length: int, cache_index, n_prefix: int):
  """(batch, 1, q, n_prefix + keys): prefix always, then keys at or before each query's slot that are not padding
  and are in the query's segment (`layers.same_segment`: packed rows)."""
  query_slots = cache_index + jnp.arange(query_length)
  causal = jnp.arange(attention_mask.shape[1])[None, :] <= query_slots[:, None]
  allowed = causal[None, None] & attention_mask[:, None, None, :].astype(bool)
  allowed = allowed & layers.same_segment(attention_mask, query_length, cache_index)
  if n_prefix:
    allowed = jnp.concatenate([jnp.ones((*allowed.shape[:3], n_prefix), bool), allowed], axis=-1)
  return allowed


def _hidden(head: nn.Module, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, cache, cache_index,
            deterministic):
  """`head.transformer`'s final hidden states and cache, with the default positions and masks."""
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError(f"{type(head).__name__} takes exactly one of input_ids and inputs_embeds.")
  embeddings = head.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds.astype(head.dtype)
  batch, length = embeddings.shape[:2]
  n_prefix = 0 if prefix_kv is None else prefix_kv[0][0].shape[1]
  if position_ids is None:
    position_ids = cache_index + jnp.arange(length)[None]
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length if cache is None else cache["key"].shape[2]), jnp.int32)
  mask = _attention_mask(attention_mask, length, cache_index, n_prefix)
  return head.transformer(embeddings, position_ids + n_prefix, mask, prefix_kv, cache, cache_index, deterministic)


class GPT2LMHeadModel(nn.Module):
  """GPT-2 with its language-modelling head; `__call__` returns logits (batch, length, vocab)."""

  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.transformer = GPT2Model(c, scan_layers=self.scan_layers, remat=self.remat, name="transformer", **kw)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, name="lm_head", **kw,
                              dot_general=layers.dot_general(self.dtype),
                              kernel_init=_normal(c.initializer_range, ("embed", "vocab")))

  def logits(self, hidden):
    """The output head: hidden @ wte.T (tied) or lm_head."""
    if self.config.tie_word_embeddings:
      return layers.attend(self.transformer.wte, hidden)
    return self.lm_head(hidden)

  def __call__(self, input_ids=None, attention_mask=None, position_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None):
    """Logits for a causally masked sequence.

    attention_mask (batch, length) is 1 for tokens, 0 for padding (or the segment ids 1, 2, ... of documents
    packed into a row: each attends only to its own; pass their position_ids, restarting at 0).
    position_ids default to 0, 1, ...
    (Hugging Face's forward ignores padding for positions; `generate` counts only real tokens).  With
    `prefix_kv` the positions (given or default) are shifted by n_prefix, as in Hugging Face PEFT.
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


class GPT2ForSequenceClassification(nn.Module):
  """GPT2Model (under ``transformer/``) and a bias-free Dense ``score`` on each row's last token.

  Returns logits (batch, num_labels).  The last token is the rightmost one that is not config.pad_token_id
  (`peftjax.models.layers.last_token`, as transformers), or the last position for `inputs_embeds`.
  """

  config: GPT2Config
  num_labels: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.transformer = GPT2Model(c, scan_layers=self.scan_layers, remat=self.remat, name="transformer", **kw)
    self.score = nn.Dense(self.num_labels, use_bias=False, name="score", **kw,
                          dot_general=layers.dot_general(self.dtype),
                          kernel_init=_normal(c.initializer_range, ("embed", "classes")))

  def __call__(self, input_ids=None, attention_mask=None, position_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None):
    """Logits (batch, num_labels); arguments as GPT2LMHeadModel's."""
    hidden, _ = _hidden(self, input_ids, inputs_embeds, attention_mask, position_ids, prefix_kv, None, 0,
                        deterministic)
    return self.score(layers.last_token(hidden, input_ids, self.config.pad_token_id, type(self).__name__))


# `task` of from_pretrained -> the model class.
TASKS = {"causal_lm": GPT2LMHeadModel, "sequence_classification": GPT2ForSequenceClassification}


def init_cache(config: GPT2Config, batch: int, length: int, dtype=jnp.float32) -> dict:
  """Empty key/value cache {'key', 'value'}: (n_layer, batch, length, n_head, head_dim) each."""
  shape = (config.n_layer, batch, length, config.n_head, config.head_dim)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


LAYER_LIST = r"transformer/h"  # the path of the layer list: stack_layers / unstack_layers


def stack_layers(tree: Mapping[str, Any]) -> dict:
  """Per-layer tree (transformer/h_0/..., h_1/...) -> scanned layout (transformer/h/...), with a leading layer axis."""
  return ptree.stack_layers(tree, LAYER_LIST)


def unstack_layers(tree: Mapping[str, Any]) -> dict:
  """Inverse of `stack_layers`."""
  return ptree.unstack_layers(tree, LAYER_LIST)


def _is_linear(path: str) -> bool:
  """Only the heads are PyTorch Linears (out, in); GPT-2's Conv1D weights are stored (in, out) like ours."""
  return path in ("lm_head/kernel", "score/kernel")


def from_pretrained(path_or_hub_id: str, dtype=None, scan_layers: bool = False, remat: bool = False,
                    task: str | None = None, num_labels: int | None = None,
                    rng: jax.Array | None = None) -> tuple[nn.Module, dict]:
  """(model, params) from a Hugging Face GPT-2 folder or hub id (GPT2LMHeadModel, GPT2ForSequenceClassification or
  GPT2Model weights).

  `task` None builds the class config.json's architectures names (GPT2LMHeadModel when none of ours);
  "causal_lm" or "sequence_classification" choose one.  A score head the checkpoint lacks is initialised from
  `rng` (with a warning); `num_labels` defaults to the checkpoint's id2label, else 2.  `dtype` is the compute and
  parameter dtype (float32 when None).
  """
  folder = hf_io.resolve(path_or_hub_id)
  hf = hf_io.read_config(folder)
  config = GPT2Config.from_hf(hf)
  state = hf_io.read_state_dict(folder)
  has_prefix = any(k.startswith("transformer.") for k in state)  # GPT2LMHeadModel; GPT2Model has none

  def rename(path: str) -> str:
    return hf_io.hf_key(path) if has_prefix else hf_io.hf_key(path).removeprefix("transformer.")

  dtype = jnp.dtype(dtype or jnp.float32)
  model = layers.build(layers.model_class(hf, task, TASKS), config, num_labels, dtype)
  abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
  params = hf_io.params_with_new_head(state, abstract, ("score/",), type(model).__name__, config.initializer_range,
                                      rng, rename=rename, transpose=_is_linear, dtype=dtype)
  if scan_layers or remat:
    model = model.clone(scan_layers=scan_layers, remat=remat)
  return model, stack_layers(params) if scan_layers else params


def save_pretrained(model: nn.Module, params: dict, folder: str) -> None:
  """Writes config.json + model.safetensors that transformers' class of the same name loads."""
  if model.scan_layers:
    params = unstack_layers(params)
  state = hf_io.state_dict_from_params(params, rename=hf_io.hf_key, transpose=_is_linear)
  hf_io.write_folder(folder, layers.hf_config(model, model.config.to_hf(type(model).__name__)), state)


def generate(model: GPT2LMHeadModel, params: Any, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, prefix_kv: Any = None,
             apply_fn: Callable[..., Any] | None = None) -> jax.Array:
  """New tokens (batch, max_new_tokens) after the (left-padded) prompts; after EOS a sequence emits pad.

  One jit-compiled loop over a key/value cache (`peftjax.models.decoding`: prompts padded to a power-of-two
  bucket, stops inside the loop once every row has emitted EOS), with Hugging Face generate's positions and EOS
  handling.  Temperature 0 is greedy; sampling needs `rng`.  eos_token_id / pad_token_id default to the config's
  (pad falls back to EOS, then 0); they are traced, so other ids reuse the compilation.
  `apply_fn(params, *args, method=..., **kwargs)` replaces `model.apply({"params": params}, ...)`, e.g. for LoRA:
  params=(base, adapters) and apply_fn=lambda p, *a, **kw: pj.apply(cfg, model.apply)(p[0], p[1], *a, **kw)
  (pass the same function object each call to reuse the compilation).
  """
  if temperature > 0.0 and rng is None:
    raise ValueError(f"generate: temperature={temperature} samples and needs rng=jax.random.key(...); "
                     "use temperature=0.0 for greedy decoding.")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}.")
  c = model.config
  n_prefix = 0 if prefix_kv is None else np.shape(prefix_kv[0][0])[1]
  if n_prefix + np.shape(input_ids)[1] + max_new_tokens > c.n_positions:
    raise ValueError(f"generate: prefix ({n_prefix}) + prompt ({np.shape(input_ids)[1]}) + max_new_tokens "
                     f"({max_new_tokens}) exceeds n_positions={c.n_positions}, the longest sequence the model knows.")
  eos = c.eos_token_id if eos_token_id is None else eos_token_id
  eos = () if eos is None else tuple(np.atleast_1d(eos).tolist())
  pad = pad_token_id if pad_token_id is not None else c.pad_token_id
  pad = pad if pad is not None else (eos[0] if eos else 0)
  return decoding.generate(model, init_cache, params, input_ids, attention_mask, prefix_kv, rng, eos, int(pad),
                           max_new_tokens, temperature, top_k, top_p, apply_fn)
