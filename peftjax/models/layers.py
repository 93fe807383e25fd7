"""Pieces the model files share: the RMS norm of T5 and Llama, float32-accumulating matmuls for low-precision
compute, random initialisation and logical axes, and the decoder families' task classes (causal LM, sequence
classifier)."""

from __future__ import annotations

import dataclasses
import functools
import string
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.models import hf_io


def accumulating_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`jax.lax.dot_general` that accumulates in float32 and returns lhs's dtype: bf16 operands use the hardware's
  bf16 x bf16 -> fp32 matmul units (AMX, avx512_bf16, GPU tensor cores, TPU MXU) without losing precision in the
  sums.  Its gradients are such matmuls too (see `_accumulate_bwd`)."""
  del preferred_element_type
  if kwargs:
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32,
                              **kwargs)
    return out.astype(lhs.dtype)
  return _accumulate(lhs, rhs, _hashable(dimension_numbers), precision)


def _hashable(dimension_numbers):
  return tuple(tuple(tuple(axes) for axes in pair) for pair in dimension_numbers)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _accumulate(lhs, rhs, dimension_numbers, precision):
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)


def _accumulate_fwd(lhs, rhs, dimension_numbers, precision):
  return _accumulate(lhs, rhs, dimension_numbers, precision), (lhs, rhs)


def _einsum_specs(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
  """The einsum subscripts (lhs, rhs, out) of a dot_general: out is batch, lhs free, rhs free axes, in order."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  letters = iter(string.ascii_letters)
  lhs, rhs = [""] * lhs_ndim, [""] * rhs_ndim
  for a, b in [*zip(lhs_batch, rhs_batch), *zip(lhs_contract, rhs_contract)]:
    lhs[a] = rhs[b] = next(letters)
  for axes in (lhs, rhs):
    for i, letter in enumerate(axes):
      axes[i] = letter or next(letters)
  free = lambda axes, used: [x for i, x in enumerate(axes) if i not in used]  # noqa: E731
  out = ([lhs[a] for a in lhs_batch] + free(lhs, {*lhs_batch, *lhs_contract})
         + free(rhs, {*rhs_batch, *rhs_contract}))
  return "".join(lhs), "".join(rhs), "".join(out)


def _transposed_product(a_spec: str, b_spec: str, target: str, a, b, precision, dtype):
  """einsum(a, b -> target) accumulated in float32, returned in `dtype`: computed in dot_general's own output
  order (shared, a's free, b's free axes), then transposed (XLA:CPU has no bf16 x bf16 -> f32 dot for some
  output orders)."""
  natural = "".join(x for x in a_spec if x in b_spec and x in target) + "".join(
      x for x in a_spec if x not in b_spec) + "".join(x for x in b_spec if x not in a_spec)
  out = jnp.einsum(f"{a_spec},{b_spec}->{natural}", a, b, precision=precision, preferred_element_type=jnp.float32)
  return jnp.transpose(out, [natural.index(x) for x in target]).astype(dtype)


def _accumulate_bwd(dimension_numbers, precision, residuals, g):
  """Both transposes as matmuls of the output cotangent in lhs's dtype, accumulated in float32: JAX's own rule
  for the float32 output above would multiply a float32 cotangent by a float32 copy of the frozen kernel (an fp32
  matmul plus a convert of every kernel, each step, in every bf16 backward pass; bench/RESULTS.md)."""
  lhs, rhs = residuals
  lhs_spec, rhs_spec, out_spec = _einsum_specs(dimension_numbers, lhs.ndim, rhs.ndim)
  return (_transposed_product(out_spec, rhs_spec, lhs_spec, g, rhs, precision, lhs.dtype),
          _transposed_product(lhs_spec, out_spec, rhs_spec, lhs, g, precision, rhs.dtype))


_accumulate.defvjp(_accumulate_fwd, _accumulate_bwd)


def dot_general(dtype) -> Callable[..., jax.Array]:
  """The `dot_general` of an nn.Dense computing in `dtype`: `accumulating_dot_general` below float32, else the
  plain one."""
  return jax.lax.dot_general if jnp.dtype(dtype).itemsize >= 4 else accumulating_dot_general


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """jnp.einsum of `a` and `b` cast to `dtype`, accumulated and returned in float32 (cast it back where the model
  continues in `dtype`)."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def attend(embed: nn.Embed, query: jax.Array) -> jax.Array:
  """`embed.attend(query)` (query @ table.T, a tied output head) as one 2-D dot contracting both operands' last
  axes, accumulated in float32 when `embed` computes below float32.  Flax's attend multiplies by a transposed
  table: in a decoding step XLA:CPU fuses that transpose and the final norm into a loop-emitted dot at half the
  speed of a plain one, and in bf16 it multiplies bf16 x bf16 -> bf16, which XLA:CPU runs as a float32 matmul
  after converting the whole (vocab, hidden) table every step (bench/RESULTS.md)."""
  rows, table = query.reshape(-1, query.shape[-1]).astype(embed.dtype), embed.embedding.astype(embed.dtype)
  logits = dot_general(embed.dtype)(rows, table, (((1,), (1,)), ((), ())))
  return logits.reshape(*query.shape[:-1], table.shape[0])


def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU as PyTorch computes it, x/2 (1 + erf(x/sqrt 2)): the same values as jax.nn.gelu(approximate=False)
  to 1e-6, whose erfc XLA:CPU evaluates about 3x slower than this erf (bench/RESULTS.md)."""
  return 0.5 * x * (1 + jax.lax.erf(x * 0.7071067811865476))


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (T5's layer norm, Llama's RMSNorm)."""

  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


def _inputs(inputs: tuple) -> tuple:
  return inputs or (jnp.ones((1, 1), jnp.int32),)


def init_params(model: nn.Module, rng: jax.Array, *inputs: jax.Array) -> dict:
  """Randomly initialised parameters (unboxed) of `model`, traced with `inputs` (default: one token id)."""
  return nn.unbox(model.init(rng, *_inputs(inputs))["params"])


def logical_axes(model: nn.Module, *inputs: jax.Array) -> dict:
  """Tree of logical-axis PartitionSpecs with the structure of the parameters (`inputs` as in `init_params`)."""
  return nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), *_inputs(inputs))["params"])


def same_segment(attention_mask: jax.Array, query_length: int, cache_index) -> jax.Array:
  """(batch, 1, q, keys): True where key and query share a segment, or the query is padding.

  attention_mask may carry segment ids (1, 2, ... for the documents packed into a row, 0 for padding), so a
  packed document attends only to its own tokens; a 0/1 mask makes this all True for its real tokens.  The queries
  sit at slots cache_index ... cache_index + query_length - 1 of the mask.
  """
  query = jax.lax.dynamic_slice_in_dim(attention_mask, cache_index, query_length, axis=1)
  return ((query[:, :, None] == attention_mask[:, None, :]) | (query[:, :, None] == 0))[:, None]


def last_token(hidden: jax.Array, input_ids: jax.Array | None, pad_token_id: int | None, owner: str) -> jax.Array:
  """(batch, hidden) at each row's last token, as transformers' decoder classifiers find it.

  That is the rightmost position whose id is not `pad_token_id` (so left and right padding both work; a row of
  padding only reads position 0), or the last position when `pad_token_id` is None or the inputs are embeddings
  (`input_ids` None, e.g. under prompt tuning).  Like transformers, a batch of several rows needs a pad id.
  """
  batch, length = hidden.shape[:2]
  if pad_token_id is None and batch != 1:
    raise ValueError(f"{owner} reads each row's last token, which needs config.pad_token_id in a batch of {batch} "
                     "rows; set it to the tokenizer's pad token id.")
  if pad_token_id is None or input_ids is None:
    return hidden[:, -1]
  last = jnp.argmax(jnp.arange(length) * (input_ids != pad_token_id), axis=-1)
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def model_class(hf: Mapping[str, Any], task: str | None, tasks: Mapping[str, type]) -> type:
  """`tasks[task]` (a family's {task: model class}), or for task None the classifier when config.json's
  architectures name a ...ForSequenceClassification class, else the causal LM."""
  if task is None:
    classifier = any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ())
    task = "sequence_classification" if classifier else "causal_lm"
  if task not in tasks:
    raise ValueError(f"task={task!r} is not supported; valid: None (config.json architectures), {sorted(tasks)}.")
  return tasks[task]


def build(cls: type, config: Any, num_labels: int | None, dtype) -> nn.Module:
  """`cls(config)` in `dtype`; a classifier gets `num_labels` (default: the config's id2label, else 2) and keeps
  the config's label names only when they are as many."""
  kw = dict(dtype=dtype, param_dtype=dtype)
  if "num_labels" not in cls.__dataclass_fields__:
    return cls(config, **kw)
  num_labels = num_labels or len(config.id2label) or 2
  if len(config.id2label) != num_labels:
    config = dataclasses.replace(config, id2label=())
  return cls(config, num_labels=num_labels, **kw)


def hf_config(model: nn.Module, hf: dict) -> dict:
  """config.json dict `hf` of `model`, with a classifier's id2label / label2id for its num_labels classes."""
  if hasattr(model, "num_labels"):
    hf = {**hf, **hf_io.label_fields(model.config.id2label, model.num_labels)}
  return hf
