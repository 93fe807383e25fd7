"""LoRA on stacked expert weights, as Hugging Face PEFT's `target_parameters` (its ParamWrapper) adapts them.

A mixture-of-experts block (`peftjax.models.moe.Experts`) holds each projection as one (experts, out, in) weight
(``gate_up_proj``, ``down_proj``).  Each expert e gets its own rank-r pair: ``<name>_lora_A`` (*stack, experts, in,
r) and ``<name>_lora_B`` (*stack, experts, r, out), under the experts module's path, so expert e computes
x W_e^T + s (x A_e) B_e with s = alpha / rank.  Training adds that path in activation space (an interceptor on
`Experts.project`); `merge` folds W_e += s (A_e B_e)^T.  Initialisation is PEFT's: A uniform in
±1/sqrt(in), B = 0.  PEFT stores the pair of a 3-D parameter as lora_A (r * experts, in) (expert-major rows) and
lora_B (out, r * experts) (rank-major columns); `from_peft` / `to_peft` convert one pair.  There is no dropout
(PEFT refuses it on expert weights).  Compose with `LoraConfig` (a list of configs) to adapt the attention as well; `save_peft_adapter` /
`load_peft_adapter` write and read such a list as one Hugging Face PEFT folder (``target_parameters``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import tempfile
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import adapter_schema, interop, tree as ptree
from peftjax.methods import lora
from peftjax.models import moe

COLLECTION = "lora_experts"
WEIGHTS = ("gate_up_proj", "down_proj")  # in the order transformers 5.23's experts modules define them


@dataclasses.dataclass(frozen=True)
class ExpertLoraConfig:
  """`targets`: the stacked expert weights to adapt (PEFT's target_parameters, by their last name)."""

  rank: int = 8
  alpha: float = 8.0
  targets: tuple[str, ...] = ("gate_up_proj", "down_proj")

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"ExpertLoraConfig.rank must be a positive integer, got {self.rank}.")
    if not self.targets or not set(self.targets) <= set(WEIGHTS):
      raise ValueError(f"ExpertLoraConfig.targets={self.targets!r}: valid are 'gate_up_proj' and 'down_proj'.")
    object.__setattr__(self, "targets", tuple(t for t in WEIGHTS if t in self.targets))  # the experts' order

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


# PEFT's key of a stacked weight's factor: one ParamWrapper per target parameter, nested in the order PEFT meets
# the experts module's parameters (the first innermost, under as many ``base_layer``s as wrappers follow it).
# `peft_files` nests in `targets` order (transformers 5.23 defines gate_up_proj first); `load_peft_adapter` tells
# the weights apart by their factors' shapes, whatever the nesting.
_PEFT_KEY = re.compile(r"(?P<module>.+\.experts)(?P<nest>(?:\.base_layer)*)\.lora_(?P<kind>[AB])\.weight")


def peft_files(cfg: ExpertLoraConfig, adapters: dict) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json entries, tensors) of these adapters in a PEFT LoRA folder (unscanned trees)."""
  flat = ptree.flatten(adapters)
  tensors = {}
  for path in [p.removesuffix("_lora_A") for p in flat if p.endswith("_lora_A")]:
    module, name = path.rsplit("/", 1)
    nest = ".base_layer" * (len(cfg.targets) - 1 - cfg.targets.index(name))
    key = f"{interop.PREFIX}{ptree.hf_name(module)}{nest}"
    tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = to_peft(flat[f"{path}_lora_A"],
                                                                               flat[f"{path}_lora_B"])
  return {"target_parameters": [f"experts.{t}" for t in cfg.targets]}, tensors


def save_peft_adapter(folder: str, cfgs: Sequence[Any], adapters: Sequence[Any],
                      base_model_name_or_path: str | None = None, task_type: str | None = None) -> None:
  """Writes [LoraConfig, ExpertLoraConfig] (optionally with a ModulesToSaveConfig) and their adapter trees as one
  PEFT LoRA folder: target_modules from the LoraConfig, target_parameters from the ExpertLoraConfig.  PEFT has one
  r and lora_alpha for both, and no dropout on expert weights, so the two configs must agree."""
  interop.write_folder(folder, *adapter_files(cfgs, adapters, base_model_name_or_path, task_type))


def adapter_files(cfgs: Sequence[Any], adapters: Sequence[Any], base_model_name_or_path: str | None = None,
                  task_type: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json entries, tensors) of the folder `save_peft_adapter` writes."""
  experts = [i for i, c in enumerate(cfgs) if isinstance(c, ExpertLoraConfig)]
  lora_cfgs = [c for c in cfgs if type(c) is lora.LoraConfig]
  if len(experts) != 1 or len(lora_cfgs) != 1:
    raise ValueError(f"save_peft_adapter takes one LoraConfig and one ExpertLoraConfig (and optionally a "
                     f"ModulesToSaveConfig); got {[type(c).__name__ for c in cfgs]}.")
  cfg, attention = cfgs[experts[0]], lora_cfgs[0]
  if (attention.rank, attention.alpha, attention.dropout, attention.use_rslora) != (cfg.rank, cfg.alpha, 0.0, False):
    raise ValueError(f"PEFT keeps one r / lora_alpha for target_modules and target_parameters and no dropout: "
                     f"LoraConfig rank={attention.rank}, alpha={attention.alpha}, dropout={attention.dropout}, "
                     f"use_rslora={attention.use_rslora} must be ExpertLoraConfig's rank={cfg.rank}, alpha={cfg.alpha}, "
                     "0.0 and False.")
  rest = [i for i in range(len(cfgs)) if i != experts[0]]
  config, tensors = interop.adapter_files([cfgs[i] for i in rest], tuple(adapters[i] for i in rest),
                                          base_model_name_or_path, task_type)
  more_config, more = peft_files(cfg, adapters[experts[0]])
  return {**config, **more_config}, {**tensors, **more}


def load_peft_adapter(folder: str, params: dict) -> tuple[list, tuple]:
  """Reads a PEFT LoRA folder with target_parameters for the base tree `params`: ([the configs
  `interop.load_adapter` gives, ..., ExpertLoraConfig], (their adapter trees, ..., the experts' tree))."""
  config, tensors = adapter_schema.read_folder(folder)
  targets = tuple(t.rsplit(".", 1)[-1] for t in config.get("target_parameters") or ())
  if not targets:
    raise interop.AdapterFormatError(f"{folder!r}: adapter_config.json has no target_parameters; read it with "
                                     "peftjax.interop.load_adapter.")
  try:
    cfg = ExpertLoraConfig(rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)), targets=targets)
  except ValueError as e:
    raise interop.AdapterFormatError(f"{folder!r}: {e}") from None
  flat = ptree.flatten(params)
  modules = {ptree.hf_name(p.rsplit("/", 1)[0]): p.rsplit("/", 1)[0] for p in target_paths(cfg, params)}
  experts, rest = {}, {}
  for key, tensor in tensors.items():
    match = _PEFT_KEY.fullmatch(key.removeprefix(interop.PREFIX))
    if match is None:
      rest[key] = tensor
      continue
    module = match.group("module")
    if module not in modules:
      raise interop.AdapterFormatError(f"{folder!r}: tensor {key!r} names no stacked expert weight of this model.")
    experts.setdefault((modules[module], match.group("nest")), {})[match.group("kind")] = tensor
  adapters = {}
  for (module, _), pair in experts.items():
    if set(pair) != {"A", "B"}:
      raise interop.AdapterFormatError(f"{folder!r}: {module} has lora_{set('AB') - set(pair)} missing.")
    # (experts, out, in) of gate_up_proj is (E, 2I, H), of down_proj (E, H, I): B's out and A's in tell them apart
    fits = [n for n in targets if flat[f"{module}/{n}"].shape[-2:] == (pair["B"].shape[0], pair["A"].shape[-1])]
    if len(fits) != 1:
      raise interop.AdapterFormatError(f"{folder!r}: the factors {pair['A'].shape}, {pair['B'].shape} of {module} fit "
                                       f"none of target_parameters {list(targets)}.")
    name = fits[0]
    shape = flat[f"{module}/{name}"].shape
    a, b = from_peft(pair["A"], pair["B"], shape[-3])
    if a.shape != (shape[-3], shape[-1], cfg.rank) or b.shape != (shape[-3], cfg.rank, shape[-2]):
      raise interop.AdapterFormatError(f"{folder!r}: the factors of {module}/{name} have shapes {pair['A'].shape} "
                                       f"and {pair['B'].shape}, not those of rank {cfg.rank} for its {shape} weight.")
    adapters[f"{module}/{name}_lora_A"], adapters[f"{module}/{name}_lora_B"] = jnp.asarray(a), jnp.asarray(b)
  if len(adapters) != 2 * len(modules) * len(targets):
    raise interop.AdapterFormatError(f"{folder!r}: {len(adapters) // 2} expert weights have factors; this model has "
                                     f"{len(modules) * len(targets)} for target_parameters {list(targets)}.")
  with tempfile.TemporaryDirectory() as tmp:  # the rest is an ordinary LoRA folder
    others = os.path.join(tmp, "adapter")
    interop.write_folder(others, {k: v for k, v in config.items() if k != "target_parameters"}, rest)
    loaded_cfg, loaded = interop.load_adapter(others, params)
  if isinstance(loaded_cfg, list):
    return [*loaded_cfg, cfg], (*loaded, ptree.unflatten(adapters))
  return [loaded_cfg, cfg], (loaded, ptree.unflatten(adapters))
