"""BERT encoders in Flax linen with Hugging Face parameter names (RoBERTa reuses them: models/roberta.py).

Post-LayerNorm blocks: x = LN(x + attention(x)), then x = LN(x + output(act(intermediate(x)))); learned
absolute positions and token types are added to the word embeddings, followed by a LayerNorm.  Parameter
paths mirror the PyTorch module names, e.g. ``encoder/layer_0/attention/self/query/kernel`` is
``encoder.layer.0.attention.self.query.weight``; every projection is an `nn.Dense` named like the PyTorch
module, so LoRA targets ("query", "value", "attention.output.dense", ...) work as in Hugging Face PEFT.
Task models hold the encoder under ``bert/`` (``roberta/``) next to their ``classifier``, as transformers
does; loading strips or adds that prefix as needed.  With `scan_layers` the layers are one `nn.scan`ned
module ``encoder/layer`` whose leaves have a leading layer axis (`stack_layers` / `unstack_layers`).

Hooks for prompt methods: `inputs_embeds` replaces the word embeddings (positions and token types are
still added); `prefix_kv` (one (key, value) pair per layer, each (batch, n_prefix, heads, head_dim)) is
prepended to every layer's keys and values and always attended, and shifts the tokens' positions by
n_prefix, as Hugging Face PEFT prefix tuning (past_key_values) does.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, ClassVar, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree as ptree
from peftjax.dropout import Dropout
from peftjax.models import hf_io, layers
from peftjax.models.layers import init_params, logical_axes  # noqa: F401 (this family's)

_ACTIVATIONS = {
    "gelu": layers.gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}
# `task` of from_pretrained -> the suffix of the model class name (BertModel, BertForSequenceClassification, ...).
TASKS = {"base": "Model", "sequence_classification": "ForSequenceClassification",
         "token_classification": "ForTokenClassification"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters under their Hugging Face names (defaults: google-bert/bert-base-uncased).

  `id2label` holds the label names of a classification checkpoint, in label order.  Only absolute
  position embeddings and encoders (no `is_decoder` / cross-attention) exist here, as in transformers 5.
  """

  model_type: ClassVar[str] = "bert"
  base_model_prefix: ClassVar[str] = "bert"
  # RoBERTa: positions count the non-padding tokens, starting at pad_token_id + 1.
  positions_skip_padding: ClassVar[bool] = False

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int | None = 0
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  classifier_dropout: float | None = None
  position_embedding_type: str = "absolute"
  id2label: tuple[str, ...] = ()

  def __post_init__(self):
    name = type(self).__name__
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"{name}.hidden_act={self.hidden_act!r} is not supported; valid: {sorted(_ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"{name}.hidden_size={self.hidden_size} must be divisible by "
                       f"num_attention_heads={self.num_attention_heads}.")
    if self.position_embedding_type != "absolute":
      raise ValueError(f"{name}.position_embedding_type={self.position_embedding_type!r} is not supported; "
                       "valid: 'absolute'.")
    if self.positions_skip_padding and self.pad_token_id is None:
      raise ValueError(f"{name}.pad_token_id is None; its positions start at pad_token_id + 1, so set it.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def classifier_dropout_rate(self) -> float:
    return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> BertConfig:
    """From a Hugging Face config.json dict; unknown keys are ignored."""
    for key in ("is_decoder", "add_cross_attention"):
      if hf.get(key):
        raise ValueError(f"config.json {key}=True is not supported; {cls.__name__} describes encoders only.")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in hf.items() if k in names and k != "id2label"}
    return cls(**kwargs, id2label=hf_io.id2label_from_hf(hf))

  def to_hf(self, architecture: str | None = None) -> dict:
    """A config.json dict transformers accepts; `architecture` defaults to the base model (BertModel)."""
    hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "id2label"}
    if self.id2label:
      hf.update(hf_io.label_fields(self.id2label, len(self.id2label)))
    architecture = architecture or type(self).__name__.removesuffix("Config") + "Model"
    return {**hf, "model_type": self.model_type, "architectures": [architecture]}


class EncoderOutput(NamedTuple):
  """The base model's outputs: last_hidden_state (batch, length, hidden), pooler_output (batch, hidden) or None."""

  last_hidden_state: jax.Array
  pooler_output: jax.Array | None


def dense_layer(features: int, axes: tuple[str, str], config: BertConfig, dtype, param_dtype, name: str) -> nn.Dense:
  """nn.Dense with transformers' init (normal(initializer_range) kernel, zero bias) and logical axes (in, out)."""
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name, dot_general=layers.dot_general(dtype),
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def _layer_norm(config: BertConfig, dtype, param_dtype) -> nn.LayerNorm:
  return nn.LayerNorm(config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name="LayerNorm",
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def _embed(num: int, axes: tuple[str, str], config: BertConfig, dtype, param_dtype, name: str) -> nn.Embed:
  return nn.Embed(num, config.hidden_size, dtype=dtype, param_dtype=param_dtype, name=name,
                  embedding_init=nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes))


class BertEmbeddings(nn.Module):
  """LayerNorm(word + token type + position embeddings), then dropout."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.word_embeddings = _embed(c.vocab_size, ("vocab", "embed"), c, name="word_embeddings", **kw)
    self.position_embeddings = _embed(c.max_position_embeddings, ("positions", "embed"), c,
                                      name="position_embeddings", **kw)
    self.token_type_embeddings = _embed(c.type_vocab_size, ("token_types", "embed"), c,
                                        name="token_type_embeddings", **kw)
    self.LayerNorm = _layer_norm(c, **kw)
    self.dropout = Dropout(c.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds, deterministic: bool):
    embeddings = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    embeddings = embeddings + self.token_type_embeddings(token_type_ids)
    embeddings = embeddings + self.position_embeddings(position_ids)
    return self.dropout(self.LayerNorm(embeddings), deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head attention with query/key/value projections; keys may be preceded by prefix keys/values."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, prefix_kv, deterministic: bool):
    """x (batch, length, hidden); mask (batch, 1, 1, n_prefix + length) is True where attending is allowed."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def heads(name: str):
      out = dense_layer(c.hidden_size, ("embed", "joined_kv"), c, name=name, **kw)(x)
      return out.reshape(*out.shape[:-1], c.num_attention_heads, c.head_dim)

    query, key, value = heads("query"), heads("key"), heads("value")
    if prefix_kv is not None:
      key = jnp.concatenate([prefix_kv[0].astype(key.dtype), key], axis=1)
      value = jnp.concatenate([prefix_kv[1].astype(value.dtype), value], axis=1)
    scores = layers.einsum("bqhd,bkhd->bhqk", query, key, self.dtype) * c.head_dim ** -0.5
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    probs = Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    out = layers.einsum("bhqk,bkhd->bqhd", probs, value, self.dtype).astype(self.dtype)
    return out.reshape(*out.shape[:2], c.hidden_size)


class BertSelfOutput(nn.Module):
  """LayerNorm(residual + dropout(dense(attention output)))."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, residual, deterministic: bool):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense_layer(c.hidden_size, ("joined_kv", "embed"), c, name="dense", **kw)(h)
    h = Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
    return _layer_norm(c, **kw)(h + residual)


class BertAttention(nn.Module):
  """Self-attention (``self``), then its output block (``output``)."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, prefix_kv, deterministic: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = BertSelfAttention(self.config, name="self", **kw)(x, mask, prefix_kv, deterministic)
    return BertSelfOutput(self.config, name="output", **kw)(h, x, deterministic)


class BertOutput(nn.Module):
  """LayerNorm(residual + dropout(dense(intermediate activations)))."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, residual, deterministic: bool):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense_layer(c.hidden_size, ("mlp", "embed"), c, name="dense", **kw)(h)
    h = Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
    return _layer_norm(c, **kw)(h + residual)


class BertIntermediate(nn.Module):
  """act(dense(x)): the first feed-forward projection, ``intermediate/dense``."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = dense_layer(c.intermediate_size, ("embed", "mlp"), c, self.dtype, self.param_dtype, name="dense")(x)
    return _ACTIVATIONS[c.hidden_act](h)


class BertLayer(nn.Module):
  """attention, then the feed-forward block (intermediate, output)."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, prefix_kv, deterministic: bool):
    """Returns (hidden, None): the (carry, output) pair nn.scan expects."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = BertAttention(c, name="attention", **kw)(x, mask, prefix_kv, deterministic)
    h = BertIntermediate(c, name="intermediate", **kw)(x)
    return BertOutput(c, name="output", **kw)(h, x, deterministic), None


class BertEncoder(nn.Module):
  """The layers layer_0 ... layer_{n-1}, or one scanned `layer` with stacked leaves."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layer = BertLayer
    if self.remat:  # static_argnums counts self as 0: `deterministic` is argument 4
      layer = nn.remat(layer, static_argnums=(4,), prevent_cse=not self.scan_layers)
    if self.scan_layers:
      layer = nn.scan(layer, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, 0, nn.broadcast), length=c.num_hidden_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      self.layer = layer(c, name="layer", **kw)
    else:
      self.layer = [layer(c, name=f"layer_{i}", **kw) for i in range(c.num_hidden_layers)]

  def __call__(self, x, mask, prefix_kv, deterministic: bool):
    if self.scan_layers:
      if prefix_kv is not None:
        prefix_kv = tuple(jnp.stack(t) for t in zip(*prefix_kv))
      return self.layer(x, mask, prefix_kv, deterministic)[0]
    for i, layer in enumerate(self.layer):
      x, _ = layer(x, mask, None if prefix_kv is None else prefix_kv[i], deterministic)
    return x


class BertPooler(nn.Module):
  """tanh(dense(hidden state of the first token))."""

  config: BertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = dense_layer(c.hidden_size, ("embed", "mlp"), c, self.dtype, self.param_dtype, name="dense")
    return jnp.tanh(dense(x[:, 0]))


def default_position_ids(config: BertConfig, input_ids, length: int, n_prefix: int = 0) -> jax.Array:
  """Hugging Face's positions: n_prefix, n_prefix + 1, ... (BERT); for RoBERTa pad_token_id + the count of
  non-padding tokens so far (+ n_prefix), padding at pad_token_id, or, from inputs_embeds (no ids to find
  padding in), pad_token_id + 1, + 2, ... without the prefix shift, as transformers does."""
  if not config.positions_skip_padding:
    return n_prefix + jnp.arange(length)[None]
  if input_ids is None:
    return config.pad_token_id + 1 + jnp.arange(length)[None]
  real = (input_ids != config.pad_token_id).astype(jnp.int32)
  return (jnp.cumsum(real, axis=1) + n_prefix) * real + config.pad_token_id


class BertModel(nn.Module):
  """The encoder: embeddings, layers and (with `add_pooling_layer`) the pooler; returns an `EncoderOutput`."""

  config: BertConfig
  add_pooling_layer: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embeddings = BertEmbeddings(self.config, name="embeddings", **kw)
    self.encoder = BertEncoder(self.config, scan_layers=self.scan_layers, remat=self.remat, name="encoder", **kw)
    if self.add_pooling_layer:
      self.pooler = BertPooler(self.config, name="pooler", **kw)

  def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None, position_ids=None) -> EncoderOutput:
    """Encodes input_ids (batch, length) or inputs_embeds (batch, length, hidden).

    attention_mask (batch, length) is 1 for tokens, 0 for padding; token_type_ids default to 0;
    position_ids default to `default_position_ids`.  prefix_kv: per layer (key, value), each
    (batch or 1, n_prefix, heads, head_dim).
    """
    c = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError(f"{type(self).__name__} takes exactly one of input_ids and inputs_embeds.")
    batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
    n_prefix = 0
    if prefix_kv is not None:
      if len(prefix_kv) != c.num_hidden_layers:
        raise ValueError(f"prefix_kv has {len(prefix_kv)} (key, value) pairs; the model has "
                         f"num_hidden_layers={c.num_hidden_layers}, one pair per layer.")
      n_prefix = prefix_kv[0][0].shape[1]
      prefix_kv = [tuple(jnp.broadcast_to(t, (batch, *t.shape[1:])) for t in kv) for kv in prefix_kv]
    if position_ids is None:
      last = n_prefix + length if not c.positions_skip_padding else (
          c.pad_token_id + 1 + length + (n_prefix if input_ids is not None else 0))
      if last > c.max_position_embeddings:
        raise ValueError(f"{n_prefix} prefix + {length} tokens need position {last - 1}, beyond "
                         f"max_position_embeddings={c.max_position_embeddings}; shorten the inputs.")
      position_ids = default_position_ids(c, input_ids, length, n_prefix)
    if token_type_ids is None:
      token_type_ids = jnp.zeros((batch, length), jnp.int32)
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.int32)
    mask = attention_mask[:, None, None, :].astype(bool)
    if n_prefix:
      mask = jnp.concatenate([jnp.ones((batch, 1, 1, n_prefix), bool), mask], axis=-1)
    hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, deterministic)
    hidden = self.encoder(hidden, mask, prefix_kv, deterministic)
    return EncoderOutput(hidden, self.pooler(hidden) if self.add_pooling_layer else None)


def base_model(head: nn.Module, add_pooling_layer: bool) -> BertModel:
  """The encoder of a task model (inside its compact method), named like transformers' (`bert`, `roberta`)."""
  return BertModel(head.config, add_pooling_layer, dtype=head.dtype, param_dtype=head.param_dtype,
                   scan_layers=head.scan_layers, remat=head.remat, name=head.config.base_model_prefix)


def classifier(head: nn.Module, x, deterministic: bool, name: str = "classifier"):
  """dropout (classifier_dropout, else hidden_dropout_prob), then a Dense to num_labels."""
  c = head.config
  x = Dropout(c.classifier_dropout_rate)(x, deterministic=deterministic)
  return dense_layer(head.num_labels, ("embed", "classes"), c, name=name, dtype=head.dtype,
                param_dtype=head.param_dtype)(x)


class BertForSequenceClassification(nn.Module):
  """BertModel (under ``bert/``), dropout and a Dense ``classifier`` on the pooled output.

  Returns logits (batch, num_labels).
  """

  config: BertConfig
  num_labels: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None, position_ids=None):
    outputs = base_model(self, add_pooling_layer=True)(input_ids, attention_mask, token_type_ids, deterministic,
                                                        inputs_embeds, prefix_kv, position_ids)
    return classifier(self, outputs.pooler_output, deterministic)


class BertForTokenClassification(nn.Module):
  """BertModel without pooler, dropout and a Dense ``classifier`` per token: logits (batch, length, num_labels)."""

  config: BertConfig
  num_labels: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None, position_ids=None):
    outputs = base_model(self, add_pooling_layer=False)(input_ids, attention_mask, token_type_ids, deterministic,
                                                         inputs_embeds, prefix_kv, position_ids)
    return classifier(self, outputs.last_hidden_state, deterministic)


ARCHITECTURES = {cls.__name__: cls for cls in (BertModel, BertForSequenceClassification, BertForTokenClassification)}


LAYER_LIST = r"(?:.+/)?encoder/layer"  # the path of the layer list: stack_layers / unstack_layers


def stack_layers(tree: Mapping[str, Any]) -> dict:
  """Per-layer tree (.../encoder/layer_0/..., layer_1/...) -> scanned layout (.../encoder/layer/..., a leading
  layer axis)."""
  return ptree.stack_layers(tree, LAYER_LIST)


def unstack_layers(tree: Mapping[str, Any]) -> dict:
  """Inverse of `stack_layers`."""
  return ptree.unstack_layers(tree, LAYER_LIST)


def _legacy_renamed(key: str) -> str:
  """Old checkpoints name LayerNorm parameters gamma / beta (transformers renames them on load too)."""
  return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def _architecture(config_cls: type, hf: Mapping[str, Any], task: str | None, architectures: Mapping[str, type]):
  family = config_cls.__name__.removesuffix("Config")
  if task is None:
    known = [a for a in hf.get("architectures") or () if a in architectures]
    return architectures[known[0] if known else family + "Model"]
  if task not in TASKS:
    raise ValueError(f"task={task!r} is not supported; valid: None (config.json architectures), {sorted(TASKS)}.")
  return architectures[family + TASKS[task]]


def load(path_or_hub_id: str, config_cls: type, architectures: Mapping[str, type], dtype=None,
         task: str | None = None, num_labels: int | None = None, scan_layers: bool = False, remat: bool = False,
         rng: jax.Array | None = None) -> tuple[nn.Module, dict]:
  """`from_pretrained` for a family: its config class and {class name: model class}."""
  folder = hf_io.resolve(path_or_hub_id)
  hf = hf_io.read_config(folder)
  if hf.get("model_type") != config_cls.model_type:
    raise ValueError(f"{folder!r} holds a model_type={hf.get('model_type')!r} checkpoint; this loader reads "
                     f"model_type={config_cls.model_type!r} (peftjax.models.from_pretrained picks the family).")
  config = config_cls.from_hf(hf)
  state = {_legacy_renamed(k): v for k, v in hf_io.read_state_dict(folder).items()}
  cls = _architecture(config_cls, hf, task, architectures)
  dtype = jnp.dtype(dtype or jnp.float32)
  kw = dict(dtype=dtype, param_dtype=dtype)
  base = config.base_model_prefix
  if issubclass(cls, BertModel):
    has_pooler = "pooler.dense.weight" in state or f"{base}.pooler.dense.weight" in state
    model = cls(config, add_pooling_layer=has_pooler, **kw)
  else:
    num_labels = num_labels or len(config.id2label) or 2
    if len(config.id2label) != num_labels:
      config = dataclasses.replace(config, id2label=())
    model = cls(config, num_labels=num_labels, **kw)
  checkpoint_prefixed = any(k.startswith(base + ".") for k in state)
  model_prefixed = not issubclass(cls, BertModel)

  def rename(path: str) -> str:
    key = hf_io.hf_key(path)
    if model_prefixed and not checkpoint_prefixed:
      return key.removeprefix(base + ".")
    if checkpoint_prefixed and not model_prefixed:
      return f"{base}.{key}"
    return key

  abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
  # a task head the checkpoint lacks gets transformers' init
  params = hf_io.params_with_new_head(state, abstract, ("classifier/", f"{base}/pooler/"), type(model).__name__,
                                      config.initializer_range, rng, rename=rename, dtype=dtype)
  if scan_layers or remat:
    model = model.clone(scan_layers=scan_layers, remat=remat)
  return model, stack_layers(params) if scan_layers else params


def from_pretrained(path_or_hub_id: str, dtype=None, task: str | None = None, num_labels: int | None = None,
                    scan_layers: bool = False, remat: bool = False,
                    rng: jax.Array | None = None) -> tuple[nn.Module, dict]:
  """(model, params) from a Hugging Face BERT folder or hub id.

  `task` None builds the class named in config.json `architectures` (BertModel when it names none of
  ours, e.g. BertForMaskedLM); "base", "sequence_classification" or "token_classification" choose one.
  Checkpoints with or without the ``bert.`` prefix load into both; a bare model gets a pooler only if
  the checkpoint has one; a task head the checkpoint lacks is initialised from `rng` (with a warning).
  `num_labels` defaults to the checkpoint's id2label (else 2); `dtype` is the compute and parameter
  dtype (float32 when None).
  """
  return load(path_or_hub_id, BertConfig, ARCHITECTURES, dtype, task, num_labels, scan_layers, remat, rng)


def save_pretrained(model: nn.Module, params: dict, folder: str) -> None:
  """Writes config.json (architectures = the model's class, id2label for a head) + model.safetensors."""
  if model.scan_layers:
    params = unstack_layers(params)
  config = model.config
  if not isinstance(model, BertModel):
    labels = config.id2label if len(config.id2label) == model.num_labels else tuple(
        f"LABEL_{i}" for i in range(model.num_labels))
    config = dataclasses.replace(config, id2label=labels)
  hf_io.write_folder(folder, config.to_hf(type(model).__name__), hf_io.state_dict_from_params(params))
