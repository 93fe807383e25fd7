"""Pieces the model files share: the RMS norm of T5 and Llama, random initialisation and logical axes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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
