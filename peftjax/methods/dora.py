"""DoRA (Liu et al. 2024): weight-decomposed LoRA, Hugging Face PEFT's LoraConfig(use_dora=True).

Each adapted layer gets LoRA factors A (*stack, in, r), B (*stack, r, out) and a trainable magnitude
m (*stack, out), initialised to the norm of every output unit's weights, ||W + s A B|| taken over the
input axis (B = 0 at init, so m = ||W|| and the adapted model equals the base model).  The layer computes

    y = m / ||W + s A B|| * (x W + s (x A) B) + bias

in activation space, with the norm treated as a constant (no gradient flows through it, as in the paper's
section 4.3 and PEFT).  With LoRA dropout active the base term uses the dropped-out input too, as PEFT does.
`merge` folds this into W' = m / ||W + s A B|| * (W + s A B) (bias unchanged).  A merge rescales every
output unit to norm |m|, which loses ||W + s A B||: `unmerge` needs those norms, from `weight_norms`
taken before merging.  The adapter tree lives in the "dora" collection; the magnitude leaf is named
`lora_magnitude_vector` like PEFT's tensor.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax import tree as ptree
from peftjax.methods import lora

COLLECTION = "dora"
MAGNITUDE = "lora_magnitude_vector"


@dataclasses.dataclass(frozen=True)
class DoraConfig(lora.LoraConfig):
  """DoRA settings: the fields of `LoraConfig` (rank, alpha, patterns, rsLoRA, dropout, targets).

  `init` is "default" or "gaussian" (B = 0 either way, so the magnitude starts at ||W||).
  """

  def __post_init__(self):
    super().__post_init__()
    if self.init not in ("default", "gaussian"):
      raise ValueError(f"DoraConfig.init={self.init!r} is not supported; valid: ['default', 'gaussian'].")


def _weight_norm(cfg: DoraConfig, path: str, kernel: jax.Array, adapter: dict) -> jax.Array:
  """||W + s A B|| of every output unit (*stack, out), in float32."""
  w = kernel.astype(jnp.float32) + lora.low_rank_update(cfg, path, adapter)
  return jnp.linalg.norm(w, axis=-2)


def init(cfg: DoraConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """LoRA factors as `lora.init` plus the magnitude m = ||W|| of every output unit of each target."""
  adapters = ptree.flatten(lora.init(cfg, rng, params))
  flat = ptree.flatten(params)
  for path, adapter in lora.adapter_modules(ptree.unflatten(adapters)).items():
    adapters[f"{path}/{MAGNITUDE}"] = _weight_norm(cfg, path, flat[f"{path}/kernel"], adapter)
  return ptree.unflatten(adapters)


def weight_norms(cfg: DoraConfig, params: dict, adapters: dict) -> dict[str, jax.Array]:
  """{module path: ||W + s A B|| per output unit} for the base `params`: what `unmerge` needs."""
  flat = ptree.flatten(params)
  return {path: _weight_norm(cfg, path, flat[f"{path}/kernel"], adapter)
          for path, adapter in lora.adapter_modules(adapters).items()}


@functools.partial(jax.jit, static_argnums=0)
def merge(cfg: DoraConfig, params: dict, adapters: dict) -> dict:
  """W' = m / ||W + s A B|| * (W + s A B) per output unit; the result has exactly the structure of `params`."""
  flat = ptree.flatten(params)
  for path, adapter in lora.adapter_modules(adapters).items():
    kernel = flat[f"{path}/kernel"]
    w = kernel.astype(jnp.float32) + lora.low_rank_update(cfg, path, adapter)
    scale = adapter[MAGNITUDE] / jnp.linalg.norm(w, axis=-2)
    flat[f"{path}/kernel"] = (scale[..., None, :] * w).astype(kernel.dtype)
  return ptree.unflatten(flat)


@functools.partial(jax.jit, static_argnums=0)
def unmerge(cfg: DoraConfig, merged: dict, adapters: dict, norms: dict | None = None) -> dict:
  """Inverse of `merge`: W = W' ||W + s A B|| / m - s A B, with `norms` = weight_norms(cfg, params, adapters)."""
  if norms is None:
    raise ValueError("dora.unmerge needs norms=dora.weight_norms(cfg, params, adapters) computed before merging: "
                     "a DoRA merge rescales each output unit to its magnitude, which loses ||W + s A B||.")
  flat = ptree.flatten(merged)
  for path, adapter in lora.adapter_modules(adapters).items():
    kernel = flat[f"{path}/kernel"]
    scale = norms[path] / adapter[MAGNITUDE]
    w = scale[..., None, :] * kernel.astype(jnp.float32) - lora.low_rank_update(cfg, path, adapter)
    flat[f"{path}/kernel"] = w.astype(kernel.dtype)
  return ptree.unflatten(flat)


def _interceptor(cfg: DoraConfig):
  def intercept(next_fun, args, kwargs, context):
    module = lora.adapted_layer(context, COLLECTION)
    if module is None:
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    if not module.has_variable("params", "kernel"):
      raise ValueError(f"DoRA target {path!r} has no 'kernel' parameter to take the weight norm of.")
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    kernel = module.get_variable("params", "kernel")
    adapter = {name: module.get_variable(COLLECTION, name) for name in ("lora_A", "lora_B")}
    norm = jax.lax.stop_gradient(_weight_norm(cfg, path, kernel, adapter))  # a constant, as in PEFT
    magnitude = module.get_variable(COLLECTION, MAGNITUDE)
    scale = (magnitude / norm).astype(y.dtype)
    excess = ((magnitude - norm) / norm).astype(y.dtype)  # scale - 1, exactly 0 while m = ||W + s A B||
    if lora.dropout_active(cfg, module):
      x = lora.adapter_input(cfg, module, x)
      base = x @ kernel.astype(x.dtype)
    else:
      base = y - module.get_variable("params", "bias").astype(y.dtype) if module.use_bias else y
    update = lora.low_rank_path(cfg, module, COLLECTION, x).astype(y.dtype)
    return y + excess * base.astype(y.dtype) + scale * update
  return intercept


def wrap(cfg: DoraConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with DoRA applied from `variables["dora"]` in activation space.

  Dropout on the adapter input is active when the call gets a 'dropout' rng (rngs={'dropout': key}).
  """
  def adapted(variables, *args, **kwargs):
    with nn.intercept_methods(_interceptor(cfg)):
      return apply_fn(variables, *args, **kwargs)
  return adapted
