"""Mixed-adapter batches of DoRA (and LoRA) adapters on one base, in one compiled call, and hotswap.

`stack(cfgs, trees, params, max_rank=None)` stacks K adapters, each a `DoraConfig` or a plain `LoraConfig` one
(a DoRA-free slot), as `peftjax.stacked_lora` does (``lora_A``, ``lora_B``, ``scaling``, ranks zero-padded to R),
plus per module ``lora_magnitude_vector`` m and ``weight_norm`` ||W + s A B|| (*layers, K, out).  The norms are
taken once, here, from the base `params` without forming any adapter's full weight: per output unit o,

    ||W_o + s (A B)_o||^2 = ||W_o||^2 + 2 s sum_r (A^T W)_ro B_ro + s^2 (B^T (A^T A) B)_oo,

which costs K (R, in) x (in, out) products instead of K (in, out) weights.  A LoRA slot, and a module an adapter
lacks, hold m = norm = 1.

`apply(model.apply)` gives fn(params, stacked, adapter_ids, *args, **kwargs): row b runs with adapter
``adapter_ids[b]`` (-1: the base model).  Every adapted Dense computes, as `peftjax.methods.dora` does,

    y + (m / n - 1) (y - bias) + (m / n) s (x A) B

with m, n, s, A, B those of the row's adapter, so a LoRA slot (m / n = 1) gives LoRA's output.  The shapes are
static: any mix, and any adapter later `put` into a slot, reuse one compilation.  `generate_fn` serves generation.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import stacked_lora
from peftjax import tree as ptree
from peftjax.methods import dora, lora

COLLECTION = "dora_stack"
BASE = stacked_lora.BASE
NORM = "weight_norm"


def _check(cfg: Any, i: int) -> None:
  if not isinstance(cfg, lora.LoraConfig):
    raise ValueError(f"adapter {i} has a {type(cfg).__name__}; stacked_dora stacks DoraConfig and LoraConfig "
                     "adapters.")


def column_norms(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array) -> jax.Array:
  """||W + s_k A_k B_k|| over the input axis (*layers, K, out), float32, for kernel W (*layers, in, out) and
  stacked a (*layers, K, in, R), b (*layers, K, R, out), scaling (*layers, K); no (in, out) update is formed."""
  w = kernel.astype(jnp.float32)
  s = scaling[..., None]
  cross = jnp.einsum("...kir,...io,...kro->...ko", a, w, b, precision="highest")  # sum_i W_io (A B)_io
  gram = jnp.einsum("...kir,...kis->...krs", a, a, precision="highest")
  quad = jnp.einsum("...krs,...kro,...kso->...ko", gram, b, b, precision="highest")  # sum_i (A B)_io^2
  squared = jnp.sum(w * w, axis=-2)[..., None, :] + 2.0 * s * cross + s * s * quad
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def _slot_leaves(stacked_flat: dict, kernels: dict, path: str, slot: int, cfg: Any, module: dict | None):
  """(magnitude, norm) of one slot at `path`: the adapter's m and its column norms for a DoRA adapter holding
  the module, else ones."""
  a = stacked_flat[f"{path}/lora_A"]
  axis = a.ndim - 3
  ones = jnp.ones(stacked_flat[f"{path}/lora_B"].shape[:axis] + stacked_flat[f"{path}/lora_B"].shape[-1:])
  if module is None or not isinstance(cfg, dora.DoraConfig):
    return ones, ones
  if f"{path}/kernel" not in kernels:
    raise ValueError(f"DoRA target {path!r} has no 'kernel' parameter in params to take the weight norm of.")
  take = lambda x: jax.lax.index_in_dim(x, slot, axis, keepdims=True)
  norm = column_norms(kernels[f"{path}/kernel"], take(a), take(stacked_flat[f"{path}/lora_B"]),
                      take(stacked_flat[f"{path}/scaling"]))
  return jnp.asarray(module[dora.MAGNITUDE], jnp.float32), jnp.squeeze(norm, axis)


def stack(cfgs: Sequence[Any], trees: Sequence[dict], params: dict, max_rank: int | None = None) -> dict:
  """The stacked tree of K DoRA or LoRA adapters (cfgs[k], trees[k]) on the base `params`; see the module
  docstring."""
  for i, cfg in enumerate(cfgs):
    _check(cfg, i)
  flat = ptree.flatten(stacked_lora.stack_factors(cfgs, trees, max_rank))
  kernels = ptree.flatten(params)
  modules = [lora.adapter_modules(t) for t in trees]
  for path in {p.rsplit("/", 1)[0] for p in flat}:
    axis = flat[f"{path}/lora_A"].ndim - 3
    leaves = [_slot_leaves(flat, kernels, path, k, c, m.get(path)) for k, (c, m) in enumerate(zip(cfgs, modules))]
    flat[f"{path}/{dora.MAGNITUDE}"] = jnp.stack([m for m, _ in leaves], axis)
    flat[f"{path}/{NORM}"] = jnp.stack([n for _, n in leaves], axis)
  return ptree.unflatten(flat)


def put(stacked: dict, slot: int, cfg: Any, tree: dict, params: dict) -> dict:
  """`stacked` with slot `slot` holding the DoRA or LoRA adapter (cfg, tree) on the base `params`: the same
  shapes, so compiled calls are reused (the rank and module rules of `stacked_lora.put`)."""
  _check(cfg, slot)
  flat = ptree.flatten(stacked_lora.put_factors(stacked, slot, cfg, tree))
  kernels = ptree.flatten(params)
  modules = lora.adapter_modules(tree)
  for path in {p.rsplit("/", 1)[0] for p in flat}:
    axis = flat[f"{path}/lora_A"].ndim - 3
    magnitude, norm = _slot_leaves(flat, kernels, path, slot, cfg, modules.get(path))
    index = (slice(None),) * axis + (slot,)
    flat[f"{path}/{dora.MAGNITUDE}"] = flat[f"{path}/{dora.MAGNITUDE}"].at[index].set(magnitude)
    flat[f"{path}/{NORM}"] = flat[f"{path}/{NORM}"].at[index].set(norm)
  return ptree.unflatten(flat)


def _rows(values: jax.Array, adapter_ids: jax.Array, fill: float, ndim: int) -> jax.Array:
  """values[adapter_ids[b]] (batch, out) with `fill` for id -1, shaped to broadcast over (batch, ..., out)."""
  picked = jnp.where((adapter_ids >= 0)[:, None], values[jnp.clip(adapter_ids, 0, values.shape[0] - 1)], fill)
  return picked.reshape(picked.shape[0], *([1] * (ndim - 2)), picked.shape[-1])


def _interceptor(adapter_ids: jax.Array):
  def intercept(next_fun, args, kwargs, context):
    module = lora.adapted_layer(context, COLLECTION)
    if module is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    a, b, scaling, magnitude, norm = (module.get_variable(COLLECTION, k)
                                      for k in ("lora_A", "lora_B", "scaling", dora.MAGNITUDE, NORM))
    update = stacked_lora.rows_low_rank(x, a, b, scaling, adapter_ids).astype(y.dtype)
    scale = _rows(magnitude / norm, adapter_ids, 1.0, y.ndim).astype(y.dtype)
    excess = _rows((magnitude - norm) / norm, adapter_ids, 0.0, y.ndim).astype(y.dtype)  # exactly 0 off DoRA
    base = y - module.get_variable("params", "bias").astype(y.dtype) if module.use_bias else y
    return y + excess * base + scale * update
  return intercept


def apply(model_apply: Callable[..., Any]) -> Callable[..., Any]:
  """fn(params, stacked, adapter_ids, *args, **kwargs): `model_apply` with row b adapted by adapter
  adapter_ids[b] of `stacked` (-1: the base model)."""
  def adapted(params, stacked, adapter_ids, *args, **kwargs):
    with nn.intercept_methods(_interceptor(jnp.asarray(adapter_ids, jnp.int32))):
      return model_apply({"params": params, COLLECTION: stacked}, *args, **kwargs)
  return adapted


def generate_fn(model_apply: Callable[..., Any]) -> Callable[..., Any]:
  """The `apply_fn` for the models' `generate` with params=(base params, stacked, adapter_ids); build it once and
  pass the same object on every call so that generation compiles once."""
  mixed = apply(model_apply)
  return lambda p, *args, **kwargs: mixed(p[0], p[1], p[2], *args, **kwargs)
