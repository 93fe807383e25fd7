"""LoRA (Hu et al. 2021): y = x W + s (x A) B with s = alpha / rank.

Training applies the low-rank path in activation space: an interceptor on every linen
`Dense` / `DenseGeneral` call adds `s * dropout(x) @ A @ B` for the layers that have an
adapter, so the frozen weight never receives a gradient.  Deployment folds the update into
the weights with `merge` (W' = W + s A B) and `unmerge` takes it out again.

Supported layers: `nn.Dense` and single-axis `nn.DenseGeneral`.  The adapter tree mirrors the module
paths of the base tree: the layer whose kernel is
``encoder/block_0/layer_0/SelfAttention/q/kernel`` gets ``.../q/lora_A`` of shape
(*stack, in, r) and ``.../q/lora_B`` of shape (*stack, r, out), where *stack are the
leading layer-stacking axes of a scanned model (a kernel's last two axes are (in, out)).

Per-module ranks and alphas (`rank_pattern`, `alpha_pattern`) override `rank` / `alpha` for the
modules whose name matches a key, as Hugging Face PEFT does; the scaling of each layer then uses
its own rank and alpha (rsLoRA: alpha / sqrt(rank)).  Initialisations: "default" (A uniform as
PyTorch's kaiming-uniform, B = 0), "gaussian" (A ~ N(0, (1/r)^2), B = 0) and PiSSA ("pissa",
"pissa_niter_N"), which also changes the base weights and therefore has its own entry point,
`pissa_init(cfg, rng, params) -> (residual_params, adapters)`.

Hugging Face PEFT names: `r` is `rank`, `lora_alpha` is `alpha`, `target_modules` is `targets`,
`init_lora_weights` is `init`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import dropout, tree as ptree

COLLECTION = "lora"
INITS = ("default", "gaussian", "pissa", "pissa_niter_N")

Pattern = tuple[tuple[str, Any], ...]


def _pattern(name: str, pattern: Mapping[str, Any] | Pattern, cast: Callable[[Any], Any]) -> Pattern:
  pairs = tuple((str(k), cast(v)) for k, v in (pattern.items() if isinstance(pattern, Mapping) else pattern))
  for key, value in pairs:
    try:
      re.compile(key)
    except re.error as e:
      raise ValueError(f"LoraConfig.{name} key {key!r} is not a valid regular expression ({e}).") from None
    if name == "rank_pattern" and value < 1:
      raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value}.")
  return pairs


def _lookup(pattern: Pattern, path: str, default):
  """The value of the first key matching the module, as PEFT's get_pattern_key: re.match(rf"(.*\\.)?({key})$")."""
  dotted = ptree.hf_name(path)
  for key, value in pattern:
    if re.match(rf"(.*\.)?({key})$", dotted) or re.match(rf"(.*/)?({key})$", path):
      return value
  return default


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA settings (HF PEFT: r, lora_alpha, lora_dropout, target_modules, exclude_modules, use_rslora,
  rank_pattern, alpha_pattern, init_lora_weights, layers_to_transform, layers_pattern).

  `rank_pattern` / `alpha_pattern` map a module name (a regex, or a suffix of the dotted Hugging Face name
  such as "v" or "decoder.block.1.layer.0.SelfAttention.q") to that module's rank / alpha; the first
  matching key wins.  They may be given as dicts and are stored as tuples of pairs (the config stays
  hashable).  In a layer-stacked (scanned) model a pattern applies to the stacked module as a whole.
  `init`: "default", "gaussian", "pissa" or "pissa_niter_N" (see `pissa_init`).  `layers_to_transform` (layer
  numbers, an int or a tuple) restricts a list of target names to those layers, `layers_pattern` names the
  module list that holds them (e.g. "layers"; default: the first numbered name), as in PEFT.
  """

  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  targets: str | tuple[str, ...] = ("q", "v")
  exclude: tuple[str, ...] = ()
  use_rslora: bool = False
  rank_pattern: Pattern = ()
  alpha_pattern: Pattern = ()
  init: str = "default"
  layers_to_transform: tuple[int, ...] = ()
  layers_pattern: tuple[str, ...] = ()

  def __post_init__(self):
    name = type(self).__name__
    if self.rank < 1:
      raise ValueError(f"{name}.rank must be a positive integer, got {self.rank}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout}.")
    if not (self.init in ("default", "gaussian") or re.fullmatch(r"pissa(_niter_\d+)?", self.init)):
      raise ValueError(f"{name}.init={self.init!r} is not supported; valid: {list(INITS)} (N an integer).")
    if isinstance(self.targets, list):
      object.__setattr__(self, "targets", tuple(self.targets))
    if isinstance(self.exclude, list):
      object.__setattr__(self, "exclude", tuple(self.exclude))
    for key, kind in (("layers_to_transform", int), ("layers_pattern", str)):
      value = getattr(self, key)
      object.__setattr__(self, key, (value,) if isinstance(value, kind) else tuple(value or ()))
    object.__setattr__(self, "rank_pattern", _pattern("rank_pattern", self.rank_pattern, int))
    object.__setattr__(self, "alpha_pattern", _pattern("alpha_pattern", self.alpha_pattern, float))

  def target_paths(self, params: ptree.Tree) -> list[str]:
    """The module paths of `params` these targets (exclude, layers_to_transform) select; ValueError if none."""
    return ptree.match_targets(params, self.targets, self.exclude, self.layers_to_transform, self.layers_pattern)

  def module_rank(self, path: str) -> int:
    """Rank of the module at `path` ('/'-joined module path): its `rank_pattern` entry, else `rank`."""
    return _lookup(self.rank_pattern, path, self.rank)

  def module_alpha(self, path: str) -> float:
    """Alpha of the module at `path`: its `alpha_pattern` entry, else `alpha`."""
    return _lookup(self.alpha_pattern, path, self.alpha)

  def scaling(self, rank: int, alpha: float | None = None) -> float:
    """The factor s applied to (x A) B for an adapter of the given rank (and alpha, default `self.alpha`)."""
    alpha = self.alpha if alpha is None else alpha
    return alpha / (math.sqrt(rank) if self.use_rslora else rank)

  def module_scaling(self, path: str) -> float:
    """The factor s of the module at `path`, from its own rank and alpha."""
    return self.scaling(self.module_rank(path), self.module_alpha(path))


def init(cfg: LoraConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """New adapter tree with B = 0: A ~ U(-1/sqrt(in), 1/sqrt(in)) (HF's kaiming-uniform), or N(0, 1/r^2) for "gaussian".

  PiSSA replaces the base weights as well; it is `pissa_init`.
  """
  if cfg.init.startswith("pissa"):
    raise ValueError(f"{type(cfg).__name__}.init={cfg.init!r} also replaces the base weights; call "
                     "peftjax.methods.lora.pissa_init(cfg, rng, params) -> (residual_params, adapters).")
  paths = cfg.target_paths(params)
  flat = ptree.flatten(params)
  adapters = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    *stack, d_in, d_out = flat[f"{path}/kernel"].shape
    rank = cfg.module_rank(path)
    if cfg.init == "gaussian":
      a = jax.random.normal(key, (*stack, d_in, rank), jnp.float32) / rank
    else:
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(key, (*stack, d_in, rank), jnp.float32, -bound, bound)
    adapters[f"{path}/lora_A"] = a
    adapters[f"{path}/lora_B"] = jnp.zeros((*stack, rank, d_out), jnp.float32)
  return ptree.unflatten(adapters)


def _svd_lowrank(m: jax.Array, rank: int, niter: int, rng: jax.Array):
  """Randomised top-`rank` SVD of (..., p, q) matrices (Halko et al.; torch.svd_lowrank with q = rank)."""
  mt = jnp.swapaxes(m, -1, -2)
  basis = jnp.linalg.qr(m @ jax.random.normal(rng, (*m.shape[:-2], m.shape[-1], rank), m.dtype))[0]
  for _ in range(niter):
    basis = jnp.linalg.qr(m @ jnp.linalg.qr(mt @ basis)[0])[0]
  u, s, vt = jnp.linalg.svd(jnp.swapaxes(basis, -1, -2) @ m, full_matrices=False)
  return basis @ u, s, vt


def pissa_init(cfg: LoraConfig, rng: jax.Array, params: ptree.Tree) -> tuple[dict, dict]:
  """PiSSA (Meng et al. 2024): adapters from the principal singular vectors of each target kernel.

  With kernel = U S V^T, A = U_r sqrt(S_r / s) and B = sqrt(S_r / s) V_r^T, so s A B is the best rank-r
  approximation of the kernel, and the base kernel becomes the residual kernel - s A B.  Returns
  (residual_params, adapters): the adapted model with the residual base equals the original model at
  init.  `cfg.init` "pissa" uses an exact SVD, "pissa_niter_N" a randomised one with N power iterations
  (`rng` draws its test matrix).  Keep (or save) the residual params: the adapters belong to them.
  """
  match = re.fullmatch(r"pissa(?:_niter_(\d+))?", cfg.init)
  if not match:
    raise ValueError(f"pissa_init needs {type(cfg).__name__}.init='pissa' or 'pissa_niter_N', got {cfg.init!r}.")
  niter = None if match.group(1) is None else int(match.group(1))
  paths = cfg.target_paths(params)
  flat = ptree.flatten(params)
  adapters = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    kernel = flat[f"{path}/kernel"]
    rank, scaling = cfg.module_rank(path), cfg.module_scaling(path)
    if rank > min(kernel.shape[-2:]):
      raise ValueError(f"PiSSA rank {rank} of {path!r} exceeds its kernel's smaller dimension "
                       f"{min(kernel.shape[-2:])} (kernel shape {kernel.shape}).")
    w = jnp.asarray(kernel, jnp.float32)
    if niter is None:
      u, s, vt = jnp.linalg.svd(w, full_matrices=False)
      u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
    else:
      u, s, vt = _svd_lowrank(w, rank, niter, key)
    root = jnp.sqrt(s / scaling)
    a, b = u * root[..., None, :], root[..., :, None] * vt
    adapters[f"{path}/lora_A"], adapters[f"{path}/lora_B"] = a, b
    flat[f"{path}/kernel"] = (w - scaling * (a @ b)).astype(kernel.dtype)
  return ptree.unflatten(flat), ptree.unflatten(adapters)


def adapter_modules(adapters: dict) -> dict[str, dict]:
  """{module path: {'lora_A': A, 'lora_B': B, ...}} for every adapted layer."""
  modules: dict[str, dict] = {}
  for path, leaf in ptree.flatten(adapters).items():
    module, name = path.rsplit("/", 1)
    modules.setdefault(module, {})[name] = leaf
  return modules


def low_rank_update(cfg: LoraConfig, path: str, adapter: dict) -> jax.Array:
  """s A B (*stack, in, out) in float32 for the adapter of the module at `path`."""
  a, b = adapter["lora_A"], adapter["lora_B"]
  scaling = cfg.scaling(a.shape[-1], cfg.module_alpha(path))
  return scaling * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))


def _fold(cfg: LoraConfig, params: dict, adapters: dict, sign: float) -> dict:
  flat = ptree.flatten(params)
  for path, adapter in adapter_modules(adapters).items():
    kernel = flat[f"{path}/kernel"]
    update = low_rank_update(cfg, path, adapter).astype(kernel.dtype).reshape(kernel.shape)
    flat[f"{path}/kernel"] = kernel + sign * update
  return ptree.unflatten(flat)


@functools.partial(jax.jit, static_argnums=0)
def merge(cfg: LoraConfig, params: dict, adapters: dict) -> dict:
  """W' = W + s A B for every adapted layer; the result has exactly the structure of `params`."""
  return _fold(cfg, params, adapters, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def unmerge(cfg: LoraConfig, merged: dict, adapters: dict) -> dict:
  """Inverse of `merge`: W = W' - s A B."""
  return _fold(cfg, merged, adapters, -1.0)


def adapted_layer(context, collection: str) -> nn.Module | None:
  """The Dense / DenseGeneral module of an intercepted `__call__` that has `lora_A` in `collection`, else None."""
  module = context.module
  if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral))
      or not module.has_variable(collection, "lora_A")):
    return None
  if isinstance(module, nn.DenseGeneral) and (np.ndim(module.features) > 0 or np.ndim(module.axis) > 0):
    raise ValueError(f"LoRA target {'/'.join(module.path)!r} is a DenseGeneral with several input or output "
                     "axes; LoRA supports Dense and single-axis DenseGeneral layers.")
  return module


def dropout_active(cfg: LoraConfig, module: nn.Module) -> bool:
  """Whether the adapter input gets dropout in this call (dropout > 0 and a 'dropout' rng was given)."""
  return cfg.dropout > 0.0 and module.has_rng("dropout")


def adapter_input(cfg: LoraConfig, module: nn.Module, x: jax.Array) -> jax.Array:
  """`x` with LoRA dropout applied when `dropout_active`."""
  if not dropout_active(cfg, module):
    return x
  return dropout.drop(x, cfg.dropout, module.make_rng("dropout"))


def low_rank_path(cfg: LoraConfig, module: nn.Module, collection: str, x: jax.Array) -> jax.Array:
  """s (x A) B for the adapter of `module` in `collection` (no dropout applied here)."""
  a = module.get_variable(collection, "lora_A")
  b = module.get_variable(collection, "lora_B")
  scaling = cfg.scaling(a.shape[-1], cfg.module_alpha("/".join(module.path)))
  return scaling * ((x @ a.astype(x.dtype)) @ b.astype(x.dtype))


def _interceptor(cfg: LoraConfig, collection: str):
  def intercept(next_fun, args, kwargs, context):
    module = adapted_layer(context, collection)
    if module is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = adapter_input(cfg, module, args[0] if args else kwargs["inputs"])
    return y + low_rank_path(cfg, module, collection, x).astype(y.dtype)
  return intercept


def wrap(cfg: LoraConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with LoRA added from `variables["lora"]` in activation space.

  Dropout on the LoRA input is active when the call gets a 'dropout' rng (rngs={'dropout': key}).
  """
  def adapted(variables, *args, **kwargs):
    with nn.intercept_methods(_interceptor(cfg, COLLECTION)):
      return apply_fn(variables, *args, **kwargs)
  return adapted
