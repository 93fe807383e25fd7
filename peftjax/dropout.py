"""Dropout whose masks depend on the step's key and each example's global row, not on how the batch is split.

A train step that splits its batch into micro-batches, or over a device mesh, would otherwise draw other masks
than the whole batch does.  Inside `with rows(row_ids):` (the train step sets it: `row_ids` holds each row's
index in the global batch), every mask over a batch-leading array is drawn row by row from
fold_in(key, row id): the whole batch, any micro-batching and any mesh give the same masks, and rows and
steps (the step's key) still differ.  Outside such a block masks are drawn over the whole array.
The models, LoRA (with DoRA and AdaLoRA) and the bottleneck adapters draw their masks here.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ROWS = contextvars.ContextVar("peftjax_dropout_rows", default=None)


@contextlib.contextmanager
def rows(row_ids: jax.Array | None) -> Iterator[None]:
  """Masks traced inside this block are drawn per row: row i of a batch-leading array from fold_in(key, row_ids[i])."""
  token = _ROWS.set(row_ids)
  try:
    yield
  finally:
    _ROWS.reset(token)


def keep_mask(key: jax.Array, keep: float, shape: tuple[int, ...]) -> jax.Array:
  """Bernoulli(keep) mask of `shape` (leading axis: the batch rows), per row inside a `rows` block.

  Each row (the whole array outside a `rows` block) takes two 32-bit seeds from threefry; its elements' bits are a
  counter hash of those seeds (murmur3's 32-bit finaliser, twice).  That is several times cheaper on a CPU than
  threefry's draw per element, which had made dropout a quarter of the main job's step.
  """
  row_ids = _ROWS.get()
  if row_ids is None:
    seeds, rows_shape = jax.random.bits(key, (1, 2), jnp.uint32), (1, math.prod(shape))
  elif not shape or shape[0] != row_ids.shape[0]:
    raise ValueError(f"a per-row dropout mask of shape {shape} must lead with the batch's {row_ids.shape[0]} rows.")
  else:
    seeds = jax.vmap(lambda row: jax.random.bits(jax.random.fold_in(key, row), (2,), jnp.uint32))(row_ids)
    rows_shape = (shape[0], math.prod(shape[1:]))
  counter = jax.lax.broadcasted_iota(jnp.uint32, rows_shape, 1)
  hashed = _fmix32(_fmix32(counter * np.uint32(0x9E3779B9) + seeds[:, :1]) ^ seeds[:, 1:])
  return (hashed < np.uint32(min(round(keep * 2**32), 2**32 - 1))).reshape(shape)


def _fmix32(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on every input bit."""
  x = (x ^ (x >> 16)) * np.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def drop(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout of the batch-leading `x` at `rate` (kept values scaled by 1 / (1 - rate))."""
  if rate == 0.0:
    return x
  if rate == 1.0:
    return jnp.zeros_like(x)
  keep = keep_mask(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Dropout(nn.Dropout):
  """flax's nn.Dropout (same fields and calls) with its mask from `keep_mask`: per row inside a `rows` block."""

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None, rng: jax.Array | None = None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return inputs
    if self.broadcast_dims:
      raise ValueError("peftjax.dropout.Dropout draws masks per row and does not take broadcast_dims.")
    return drop(inputs, self.rate, self.make_rng(self.rng_collection) if rng is None else rng)
