"""LoRA on stacked expert weights, as Hugging Face PEFT's `target_parameters` (its ParamWrapper) adapts them.

A mixture-of-experts block (`peftjax.models.moe.Experts`) holds each projection as one (experts, out, in) weight
(``gate_up_proj``, ``down_proj``).  Each expert e gets its own rank-r pair: ``<name>_lora_A`` (*stack, experts, in,
r) and ``<name>_lora_B`` (*stack, experts, r, out), under the experts module's path, so expert e computes
x W_e^T + s (x A_e) B_e with s = alpha / rank.  Training adds that path in activation space (an interceptor on
`Experts.project`); `merge` folds W_e += s (A_e B_e)^T.  Initialisation is PEFT's: A uniform in
±1/sqrt(in), B = 0.  PEFT stores the pair of a 3-D parameter as lora_A (r * experts, in) (expert-major rows) and
lora_B (out, r * experts) (rank-major columns); `from_peft` / `to_peft` convert one pair.  Dropout is refused, as
PEFT does.  Compose with `LoraConfig` (a list of configs) to adapt the attention as well.
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
from peftjax.models import moe

COLLECTION = "lora_experts"


@dataclasses.dataclass(frozen=True)
class ExpertLoraConfig:
  """`targets`: the stacked expert weights to adapt (PEFT's target_parameters, by their last name)."""

  rank: int = 8
  alpha: float = 8.0
  targets: tuple[str, ...] = ("gate_up_proj", "down_proj")

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.rank < 1:
      raise ValueError(f"ExpertLoraConfig.rank must be a positive integer, got {self.rank}.")
    unknown = sorted(set(self.targets) - {"gate_up_proj", "down_proj"})
    if unknown or not self.targets:
      raise ValueError(f"ExpertLoraConfig.targets={self.targets!r}: valid are 'gate_up_proj' and 'down_proj'.")

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank


def target_paths(cfg: ExpertLoraConfig, params: ptree.Tree) -> list[str]:
  """The paths ('.../mlp/experts/gate_up_proj') of the stacked weights `cfg` adapts; one error when none."""
  paths = [p for p in ptree.flatten(params) if p.rsplit("/", 1)[-1] in cfg.targets and "/experts/" in f"/{p}"]
  if not paths:
    raise ValueError(f"ExpertLoraConfig.targets={cfg.targets!r} match no stacked expert weight; the model has no "
                     "mixture-of-experts layers (Mixtral, Qwen3-MoE).")
  return paths


def init(cfg: ExpertLoraConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """New adapter tree: per expert A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
  flat = ptree.flatten(params)
  paths = target_paths(cfg, params)
  adapters = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    *stack, experts, d_out, d_in = flat[path].shape
    bound = 1.0 / math.sqrt(d_in)
    adapters[f"{path}_lora_A"] = jax.random.uniform(key, (*stack, experts, d_in, cfg.rank), jnp.float32, -bound, bound)
    adapters[f"{path}_lora_B"] = jnp.zeros((*stack, experts, cfg.rank, d_out), jnp.float32)
  return ptree.unflatten(adapters)


def _interceptor(cfg: ExpertLoraConfig):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    y = next_fun(*args, **kwargs)
    if context.method_name != "project" or not isinstance(module, moe.Experts):
      return y
    x, name, per_expert = args
    if not module.has_variable(COLLECTION, f"{name}_lora_A"):
      return y
    a = module.get_variable(COLLECTION, f"{name}_lora_A").astype(x.dtype)
    b = module.get_variable(COLLECTION, f"{name}_lora_B").astype(x.dtype)
    u = jnp.einsum("...ei,eir->...er" if per_expert else "...i,eir->...er", x, a)
    return y + (cfg.scaling * jnp.einsum("...er,ero->...eo", u, b)).astype(y.dtype)
  return intercept


def wrap(cfg: ExpertLoraConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with the experts' LoRA from `variables["lora_experts"]`."""
  def adapted(variables, *args, **kwargs):
    with nn.intercept_methods(_interceptor(cfg)):
      return apply_fn(variables, *args, **kwargs)
  return adapted


def _fold(cfg: ExpertLoraConfig, params: dict, adapters: dict, sign: float) -> dict:
  flat, pairs = ptree.flatten(params), ptree.flatten(adapters)
  for path in [p[:-len("_lora_A")] for p in pairs if p.endswith("_lora_A")]:
    a, b = pairs[f"{path}_lora_A"], pairs[f"{path}_lora_B"]
    delta = cfg.scaling * jnp.einsum("...eir,...ero->...eoi", a.astype(jnp.float32), b.astype(jnp.float32))
    flat[path] = flat[path] + sign * delta.astype(flat[path].dtype)
  return ptree.unflatten(flat)


@functools.partial(jax.jit, static_argnums=0)
def merge(cfg: ExpertLoraConfig, params: dict, adapters: dict) -> dict:
  """W_e' = W_e + s (A_e B_e)^T for every adapted expert weight; the structure of `params`."""
  return _fold(cfg, params, adapters, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def unmerge(cfg: ExpertLoraConfig, merged: dict, adapters: dict) -> dict:
  """Inverse of `merge`."""
  return _fold(cfg, merged, adapters, -1.0)


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's lora_A.weight (r * experts, in) and lora_B.weight (out, r * experts) of a 3-D parameter -> our
  (experts, in, r) and (experts, r, out)."""
  a = np.asarray(lora_a).reshape(experts, -1, lora_a.shape[-1]).transpose(0, 2, 1)
  b = np.asarray(lora_b).reshape(lora_b.shape[0], -1, experts).transpose(2, 1, 0)
  return a, b


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of `from_peft`."""
  a, b = np.asarray(a), np.asarray(b)
  return a.transpose(0, 2, 1).reshape(-1, a.shape[1]), b.transpose(2, 1, 0).reshape(b.shape[2], -1)
