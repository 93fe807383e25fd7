"""Many LoRA adapters stacked on one base: mixed-adapter batches in one compiled call, and hotswap.

`stack(cfgs, trees, max_rank=None)` turns K LoRA adapters into one stacked tree: for every module any of them
adapts, ``lora_A`` (*layers, K, in, R), ``lora_B`` (*layers, K, R, out) and ``scaling`` (*layers, K), with every
rank zero-padded to R (the largest, or the declared `max_rank`) and zeros (scaling 0) where an adapter lacks the
module.  Zero-padded rank columns add exactly nothing, so the stacked shapes are static: one compilation serves
any mix of adapters and any adapter later `put` into a slot.

`apply(model.apply)` gives fn(params, stacked, adapter_ids, *args, **kwargs): row b of the batch runs with
adapter ``adapter_ids[b]`` (an index into the stack; -1 runs the base model).  An interceptor on every adapted
Dense adds the gathered, batched low-rank product ``s[id] (x A[id]) B[id]`` to the shared base matmul, so every
row shares the base weights.  The same function serves generation (``apply_fn`` of the models' `generate`, with
params=(base, stacked, adapter_ids)).

Hotswap: keep the compiled forward and `put(stacked, slot, cfg, tree)` another adapter (rank <= R, the same
modules or a subset) into a slot; the shapes do not change, so nothing recompiles.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree as ptree
from peftjax.methods import dora, lora

COLLECTION = "lora_stack"
BASE = -1  # the adapter id of rows that run the base model


def _check_lora(cfg: Any, i: int) -> None:
  if not isinstance(cfg, lora.LoraConfig) or isinstance(cfg, dora.DoraConfig):
    raise ValueError(f"adapter {i} has a {type(cfg).__name__}; stacked_lora stacks LoraConfig adapters "
                     "(peftjax.stacked_dora stacks DoRA and LoRA adapters together).")


def _padded(x: jax.Array, axis: int, size: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(jnp.asarray(x, jnp.float32), pad)


def stack(cfgs: Sequence[lora.LoraConfig], trees: Sequence[dict], max_rank: int | None = None) -> dict:
  """The stacked tree of K LoRA adapters (cfgs[k], trees[k]), ranks zero-padded to `max_rank` (default: the
  largest); see the module docstring."""
  for i, cfg in enumerate(cfgs):
    _check_lora(cfg, i)
  return stack_factors(cfgs, trees, max_rank)


def stack_factors(cfgs: Sequence[lora.LoraConfig], trees: Sequence[dict], max_rank: int | None = None) -> dict:
  """`stack` for any LoRA-family configs (a DoRA adapter's A and B too), without the LoraConfig check."""
  if not cfgs or len(cfgs) != len(trees):
    raise ValueError(f"stack needs one config per adapter tree; got {len(cfgs)} configs and {len(trees)} trees.")
  modules = [lora.adapter_modules(t) for t in trees]
  paths = list(dict.fromkeys(p for m in modules for p in m))
  largest = max(m[p]["lora_A"].shape[-1] for m in modules for p in m)
  rank = largest if max_rank is None else max_rank
  if rank < largest:
    raise ValueError(f"max_rank={max_rank} is smaller than the largest adapter rank, {largest}.")
  flat = {}
  for path in paths:
    shapes = {(m[path]["lora_A"].shape[:-1], m[path]["lora_B"].shape[-1]) for m in modules if path in m}
    if len(shapes) > 1:
      raise ValueError(f"the adapters of {path!r} have different layer or feature shapes {sorted(shapes)}.")
    (*layers, d_in), d_out = shapes.pop()
    a, b, s = [], [], []
    for cfg, m in zip(cfgs, modules):
      if path in m:
        a.append(_padded(m[path]["lora_A"], -1, rank))
        b.append(_padded(m[path]["lora_B"], -2, rank))
        s.append(cfg.scaling(m[path]["lora_A"].shape[-1], cfg.module_alpha(path)))
      else:
        a.append(jnp.zeros((*layers, d_in, rank), jnp.float32))
        b.append(jnp.zeros((*layers, rank, d_out), jnp.float32))
        s.append(0.0)
    axis = len(layers)
    flat[f"{path}/lora_A"] = jnp.stack(a, axis)
    flat[f"{path}/lora_B"] = jnp.stack(b, axis)
    flat[f"{path}/scaling"] = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (*layers, len(s)))
  return ptree.unflatten(flat)


def put(stacked: dict, slot: int, cfg: lora.LoraConfig, tree: dict) -> dict:
  """`stacked` with slot `slot` holding the adapter (cfg, tree): same shapes, so compiled calls are reused.

  The adapter's rank must fit the stack's R, and it may adapt the stack's modules or a subset (the others
  get zeros in that slot); a module outside the stack is a ValueError (it would need another compilation).
  """
  _check_lora(cfg, slot)
  return put_factors(stacked, slot, cfg, tree)


def put_factors(stacked: dict, slot: int, cfg: lora.LoraConfig, tree: dict) -> dict:
  """`put` for any LoRA-family config (a DoRA adapter's A and B), without the LoraConfig check; leaves of
  `stacked` other than lora_A, lora_B and scaling are kept as they are."""
  modules = lora.adapter_modules(tree)
  flat = ptree.flatten(stacked)
  known = {p.rsplit("/", 1)[0] for p in flat if p.endswith("/lora_A")}
  extra = sorted(set(modules) - known)
  if extra:
    raise ValueError(f"the adapter adapts {extra}, which the stack does not hold; stacked modules: {sorted(known)}.")
  out = dict(flat)
  for path in known:
    a_all, b_all = flat[f"{path}/lora_A"], flat[f"{path}/lora_B"]
    axis = a_all.ndim - 3
    if not -a_all.shape[axis] <= slot < a_all.shape[axis]:
      raise ValueError(f"slot {slot} is out of range; the stack holds {a_all.shape[axis]} adapters.")
    rank = a_all.shape[-1]
    if path in modules:
      a, b = modules[path]["lora_A"], modules[path]["lora_B"]
      if a.shape[-1] > rank:
        raise ValueError(f"the adapter's rank {a.shape[-1]} at {path!r} exceeds the stack's rank {rank}; stack with "
                         f"max_rank >= {a.shape[-1]}.")
      a, b, s = _padded(a, -1, rank), _padded(b, -2, rank), cfg.scaling(a.shape[-1], cfg.module_alpha(path))
    else:
      a, b, s = 0.0, 0.0, 0.0
    index = (slice(None),) * axis + (slot,)
    out[f"{path}/lora_A"] = a_all.at[index].set(a)
    out[f"{path}/lora_B"] = b_all.at[index].set(b)
    out[f"{path}/scaling"] = flat[f"{path}/scaling"].at[index].set(s)
  return ptree.unflatten(out)


def rows_low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array, adapter_ids: jax.Array) -> jax.Array:
  """Row b of `x` (batch, ..., in) times scaling[id] A[id] B[id], id = adapter_ids[b] (0 for id -1), in x's dtype."""
  if x.shape[0] != adapter_ids.shape[0]:
    raise ValueError(f"adapter_ids has {adapter_ids.shape[0]} entries but the layer input has {x.shape[0]} rows; "
                     "give one adapter id per batch row.")
  index = jnp.clip(adapter_ids, 0, a.shape[0] - 1)
  scale = jnp.where(adapter_ids >= 0, scaling[index], 0.0).astype(x.dtype)
  rows = x.reshape(x.shape[0], -1, x.shape[-1])
  u = jnp.einsum("bti,bir->btr", rows, a[index].astype(x.dtype))
  y = jnp.einsum("btr,bro->bto", u * scale[:, None, None], b[index].astype(x.dtype))
  return y.reshape(*x.shape[:-1], b.shape[-1])


def groups_low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array) -> jax.Array:
  """`x` (batch, ..., in) whose rows are K equal contiguous groups, group k times scaling[k] A[k] B[k]: one
  (group tokens, in) x (in, R) matmul per adapter, with no gather (and no scatter in the backward pass)."""
  k = a.shape[0]
  groups = x.reshape(k, -1, x.shape[-1])
  u = jnp.einsum("kti,kir->ktr", groups, a.astype(x.dtype)) * scaling.astype(x.dtype)[:, None, None]
  return jnp.einsum("ktr,kro->kto", u, b.astype(x.dtype)).reshape(*x.shape[:-1], b.shape[-1])


def _interceptor(adapter_ids: jax.Array | None):
  def intercept(next_fun, args, kwargs, context):
    module = lora.adapted_layer(context, COLLECTION)
    if module is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    a, b, scaling = (module.get_variable(COLLECTION, k) for k in ("lora_A", "lora_B", "scaling"))
    if adapter_ids is None:
      return y + groups_low_rank(x, a, b, scaling).astype(y.dtype)
    return y + rows_low_rank(x, a, b, scaling, adapter_ids).astype(y.dtype)
  return intercept


def apply(model_apply: Callable[..., Any]) -> Callable[..., Any]:
  """fn(params, stacked, adapter_ids, *args, **kwargs): `model_apply` with row b adapted by adapter
  adapter_ids[b] of `stacked` (-1: the base model)."""
  def adapted(params, stacked, adapter_ids, *args, **kwargs):
    ids = jnp.asarray(adapter_ids, jnp.int32)
    with nn.intercept_methods(_interceptor(ids)):
      return model_apply({"params": params, COLLECTION: stacked}, *args, **kwargs)
  return adapted


def apply_grouped(model_apply: Callable[..., Any]) -> Callable[..., Any]:
  """fn(params, stacked, *args, **kwargs) for a batch of K equal contiguous row groups, group k adapted by
  adapter k (a sweep's tiled batch): the same result as `apply` with ids repeat(arange(K), rows / K), computed
  as one batched matmul per layer."""
  def adapted(params, stacked, *args, **kwargs):
    with nn.intercept_methods(_interceptor(None)):
      return model_apply({"params": params, COLLECTION: stacked}, *args, **kwargs)
  return adapted


def generate_fn(model_apply: Callable[..., Any]) -> Callable[..., Any]:
  """The `apply_fn` for the models' `generate` with params=(base params, stacked, adapter_ids); build it once and
  pass the same object on every call so that generation compiles once."""
  mixed = apply(model_apply)
  return lambda p, *args, **kwargs: mixed(p[0], p[1], p[2], *args, **kwargs)
