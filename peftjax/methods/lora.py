"""LoRA (Hu et al. 2021): y = x W + s (x A) B with s = alpha / rank.

Training applies the low-rank path in activation space: an interceptor on every linen
`Dense` / `DenseGeneral` call adds `s * dropout(x) @ A @ B` for the layers that have an
adapter, so the frozen weight never receives a gradient.  Deployment folds the update into
the weights with `merge` (W' = W + s A B) and `unmerge` takes it out again.

Supported layers: `nn.Dense` and single-axis `nn.DenseGeneral`.  The adapter tree mirrors the module paths of the base tree: the layer whose kernel is
``encoder/block_0/layer_0/SelfAttention/q/kernel`` gets ``.../q/lora_A`` of shape
(*stack, in, r) and ``.../q/lora_B`` of shape (*stack, r, out), where *stack are the
leading layer-stacking axes of a scanned model (a kernel's last two axes are (in, out)).
Hugging Face PEFT names: `r` is `rank`, `lora_alpha` is `alpha`, `target_modules` is `targets`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree as ptree

COLLECTION = "lora"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA settings (HF PEFT: r, lora_alpha, lora_dropout, target_modules, exclude_modules, use_rslora)."""

  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  targets: str | tuple[str, ...] = ("q", "v")
  exclude: tuple[str, ...] = ()
  use_rslora: bool = False

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}.")
    if isinstance(self.targets, list):
      object.__setattr__(self, "targets", tuple(self.targets))
    if isinstance(self.exclude, list):
      object.__setattr__(self, "exclude", tuple(self.exclude))

  def scaling(self, rank: int) -> float:
    """The factor s applied to (x A) B for an adapter of the given rank."""
    return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)


def init(cfg: LoraConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """New adapter tree: A ~ U(-1/sqrt(in), 1/sqrt(in)) (HF's kaiming-uniform), B = 0."""
  paths = ptree.match_targets(params, cfg.targets, cfg.exclude)
  flat = ptree.flatten(params)
  adapters = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    kernel = flat[f"{path}/kernel"]
    *stack, d_in, d_out = kernel.shape
    bound = 1.0 / math.sqrt(d_in)
    adapters[f"{path}/lora_A"] = jax.random.uniform(key, (*stack, d_in, cfg.rank), jnp.float32, -bound, bound)
    adapters[f"{path}/lora_B"] = jnp.zeros((*stack, cfg.rank, d_out), jnp.float32)
  return ptree.unflatten(adapters)


def adapter_modules(adapters: dict) -> dict[str, dict]:
  """{module path: {'lora_A': A, 'lora_B': B}} for every adapted layer."""
  modules: dict[str, dict] = {}
  for path, leaf in ptree.flatten(adapters).items():
    module, name = path.rsplit("/", 1)
    modules.setdefault(module, {})[name] = leaf
  return modules


def _low_rank_update(cfg: LoraConfig, adapter: dict, dtype) -> jax.Array:
  a, b = adapter["lora_A"], adapter["lora_B"]
  return (cfg.scaling(a.shape[-1]) * jnp.einsum("...ir,...ro->...io", a, b)).astype(dtype)


def _fold(cfg: LoraConfig, params: dict, adapters: dict, sign: float) -> dict:
  flat = ptree.flatten(params)
  for path, adapter in adapter_modules(adapters).items():
    kernel = flat[f"{path}/kernel"]
    flat[f"{path}/kernel"] = kernel + sign * _low_rank_update(cfg, adapter, kernel.dtype).reshape(kernel.shape)
  return ptree.unflatten(flat)


@functools.partial(jax.jit, static_argnums=0)
def merge(cfg: LoraConfig, params: dict, adapters: dict) -> dict:
  """W' = W + s A B for every adapted layer; the result has exactly the structure of `params`."""
  return _fold(cfg, params, adapters, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def unmerge(cfg: LoraConfig, merged: dict, adapters: dict) -> dict:
  """Inverse of `merge`: W = W' - s A B."""
  return _fold(cfg, merged, adapters, -1.0)


def _interceptor(cfg: LoraConfig, collection: str):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral))
        or not module.has_variable(collection, "lora_A")):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    a = module.get_variable(collection, "lora_A")
    b = module.get_variable(collection, "lora_B")
    if isinstance(module, nn.DenseGeneral) and (np.ndim(module.features) > 0 or np.ndim(module.axis) > 0):
      raise ValueError(f"LoRA target {'/'.join(module.path)!r} is a DenseGeneral with several input or output "
                       "axes; LoRA supports Dense and single-axis DenseGeneral layers.")
    if cfg.dropout > 0.0 and module.has_rng("dropout"):
      keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - cfg.dropout), 0.0).astype(x.dtype)
    update = (x @ a.astype(x.dtype)) @ b.astype(x.dtype)
    return y + (cfg.scaling(a.shape[-1]) * update).astype(y.dtype)
  return intercept


def wrap(cfg: LoraConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with LoRA added from `variables["lora"]` in activation space.

  Dropout on the LoRA input is active when the call gets a 'dropout' rng (rngs={'dropout': key}).
  """
  def adapted(variables, *args, **kwargs):
    with nn.intercept_methods(_interceptor(cfg, COLLECTION)):
      return apply_fn(variables, *args, **kwargs)
  return adapted
