"""Mixed-adapter batches for (IA)³: K IA3 adapters stacked, each batch row scaled by its own adapter's vectors.

`stack(trees)` gives, for every module any adapter scales, ``ia3_out`` (*layers, K, out) or ``ia3_in``
(*layers, K, in), with ones where an adapter lacks the module.  `apply(model.apply)` gives fn(params, stacked,
adapter_ids, *args, **kwargs): row b is scaled by adapter ``adapter_ids[b]`` (-1: ones, the base model), on the
layer's output or, for feed-forward modules, its input, as `peftjax.methods.ia3` does.  Shapes are static, so one
compilation serves any mix.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree as ptree
from peftjax.methods import ia3

COLLECTION = "ia3_stack"


def stack(trees: Sequence[dict]) -> dict:
  """The stacked vectors of the IA3 adapter trees `trees` (ones where one lacks a module)."""
  if not trees:
    raise ValueError("stack needs at least one IA3 adapter tree.")
  flats = [ptree.flatten(t) for t in trees]
  paths = list(dict.fromkeys(p for f in flats for p in f))
  out = {}
  for path in paths:
    shapes = {f[path].shape for f in flats if path in f}
    if len(shapes) > 1:
      raise ValueError(f"the IA3 adapters of {path!r} have different shapes {sorted(shapes)}.")
    shape = shapes.pop()
    vectors = [jnp.asarray(f[path], jnp.float32) if path in f else jnp.ones(shape, jnp.float32) for f in flats]
    out[path] = jnp.stack(vectors, axis=len(shape) - 1)
  return ptree.unflatten(out)


def _rows(x: jax.Array, vectors: jax.Array, adapter_ids: jax.Array) -> jax.Array:
  """x (batch, ..., d) times vectors[adapter_ids[b]] row by row (ones for id -1)."""
  if x.shape[0] != adapter_ids.shape[0]:
    raise ValueError(f"adapter_ids has {adapter_ids.shape[0]} entries but the layer input has {x.shape[0]} rows; "
                     "give one adapter id per batch row.")
  scale = jnp.where((adapter_ids >= 0)[:, None], vectors[jnp.clip(adapter_ids, 0, vectors.shape[0] - 1)], 1.0)
  return x * scale.reshape(x.shape[0], *([1] * (x.ndim - 2)), x.shape[-1]).astype(x.dtype)


def _interceptor(adapter_ids: jax.Array):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
      return next_fun(*args, **kwargs)
    if module.has_variable(COLLECTION, ia3.INPUT):
      x = _rows(args[0] if args else kwargs["inputs"], module.get_variable(COLLECTION, ia3.INPUT), adapter_ids)
      return next_fun(x, *args[1:], **kwargs) if args else next_fun(**{**kwargs, "inputs": x})
    if module.has_variable(COLLECTION, ia3.OUTPUT):
      return _rows(next_fun(*args, **kwargs), module.get_variable(COLLECTION, ia3.OUTPUT), adapter_ids)
    return next_fun(*args, **kwargs)
  return intercept


def apply(model_apply: Callable[..., Any]) -> Callable[..., Any]:
  """fn(params, stacked, adapter_ids, *args, **kwargs): `model_apply` with row b scaled by adapter adapter_ids[b]."""
  def adapted(params, stacked, adapter_ids, *args, **kwargs):
    with nn.intercept_methods(_interceptor(jnp.asarray(adapter_ids, jnp.int32))):
      return model_apply({"params": params, COLLECTION: stacked}, *args, **kwargs)
  return adapted
