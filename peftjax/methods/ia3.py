"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations, initialised to ones.

A target layer y = x W + b gets one vector l.  For ordinary targets (keys, values) it scales the
layer's output, y' = (x W + b) * l with l of shape (out,); for feed-forward targets (the second
projection of a feed-forward block: T5 `wo`, BERT `output.dense`, GPT-2 `mlp.c_proj`, Llama
`down_proj`) it scales the layer's input, y' = (x * l) W + b with l of shape (in,), which rescales the
feed-forward block's intermediate activation.  Training applies the vectors in activation space (an
interceptor on linen `Dense` / single-axis `DenseGeneral` calls); `merge` folds them into the weights
(output scaling multiplies the kernel's columns and the bias, input scaling the kernel's rows) and
`unmerge` divides them out.

The adapter tree mirrors the module paths: ``.../k/ia3_out`` (*stack, out) or ``.../wo/ia3_in``
(*stack, in), where *stack are the kernel's leading layer-stacking axes (a scanned model must list the
"ia3" collection in its `nn.scan` variable_axes).  Hugging Face PEFT stores both as ``<module>.ia3_l``,
of shape (out, 1) or (1, in).  HF names: `target_modules` is `targets`, `feedforward_modules` is
`feedforward`, `exclude_modules` is `exclude`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree as ptree

COLLECTION = "ia3"
OUTPUT = "ia3_out"
INPUT = "ia3_in"

# Hugging Face PEFT's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING for our model families.
DEFAULTS = {
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
}


@dataclasses.dataclass(frozen=True)
class IA3Config:
  """(IA)³ settings (HF PEFT IA3Config: target_modules, feedforward_modules, exclude_modules).

  `targets` selects linear layers as LoRA's targets do (names, "all-linear" or a regex); `feedforward`
  (names or a regex) marks the targets whose input is scaled instead of their output and must be a
  subset of `targets`.  The defaults are T5's; `IA3Config.for_model(model_type)` gives Hugging Face's
  defaults for other families.
  """

  targets: str | tuple[str, ...] = ("k", "v", "wo")
  feedforward: str | tuple[str, ...] = ("wo",)
  exclude: tuple[str, ...] = ()

  def __post_init__(self):
    for name in ("targets", "feedforward", "exclude"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if isinstance(self.targets, tuple) and isinstance(self.feedforward, tuple):
      outside = [f for f in self.feedforward if f not in self.targets]
      if outside:
        raise ValueError(f"IA3Config.feedforward entries {outside} are not in targets={self.targets}; "
                         "feedforward must be a subset of targets.")

  @classmethod
  def for_model(cls, model_type: str, **overrides) -> IA3Config:
    """Hugging Face PEFT's default targets and feedforward modules for a config.json `model_type`."""
    if model_type not in DEFAULTS:
      raise ValueError(f"IA3Config.for_model has no defaults for model_type={model_type!r}; valid: "
                       f"{sorted(DEFAULTS)} (or pass targets= and feedforward= yourself).")
    targets, feedforward = DEFAULTS[model_type]
    return cls(**{"targets": targets, "feedforward": feedforward, **overrides})


def target_paths(cfg: IA3Config, params: ptree.Tree) -> tuple[list[str], set[str]]:
  """(module paths of the targets, the subset of them that are feed-forward), checked against `params`."""
  try:
    paths = ptree.match_targets(params, cfg.targets, cfg.exclude)
  except ValueError as e:
    raise ValueError(f"IA3Config.{e}") from None
  if not cfg.feedforward:
    return paths, set()
  try:
    feedforward = set(ptree.match_targets(params, cfg.feedforward, cfg.exclude))
  except ValueError:
    raise ValueError(f"IA3Config.feedforward={cfg.feedforward!r} matches no target module; valid target "
                     f"modules are {sorted({ptree.hf_name(p) for p in paths})}.") from None
  outside = sorted(feedforward - set(paths))
  if outside:
    raise ValueError(f"IA3Config.feedforward={cfg.feedforward!r} selects {ptree.hf_name(outside[0])!r}, which is "
                     f"not a target of targets={cfg.targets!r}; feedforward must be a subset of targets.")
  return paths, feedforward


def init(cfg: IA3Config, rng: jax.Array, params: ptree.Tree) -> dict:
  """New adapter tree of ones: `ia3_in` (*stack, in) for feed-forward targets, `ia3_out` (*stack, out) otherwise."""
  del rng  # (IA)³ vectors start at one
  paths, feedforward = target_paths(cfg, params)
  flat = ptree.flatten(params)
  adapters = {}
  for path in paths:
    *stack, d_in, d_out = np.shape(flat[f"{path}/kernel"])
    if path in feedforward:
      adapters[f"{path}/{INPUT}"] = jnp.ones((*stack, d_in), jnp.float32)
    else:
      adapters[f"{path}/{OUTPUT}"] = jnp.ones((*stack, d_out), jnp.float32)
  return ptree.unflatten(adapters)


def _fold(params: dict, adapters: dict, invert: bool) -> dict:
  flat = ptree.flatten(params)
  for path, vector in ptree.flatten(adapters).items():
    module, kind = path.rsplit("/", 1)
    scale = jnp.asarray(vector, jnp.float32)
    scale = 1.0 / scale if invert else scale
    kernel = flat[f"{module}/kernel"]
    if kind == INPUT:
      flat[f"{module}/kernel"] = (kernel * scale[..., :, None]).astype(kernel.dtype)
    else:
      flat[f"{module}/kernel"] = (kernel * scale[..., None, :]).astype(kernel.dtype)
      if f"{module}/bias" in flat:
        bias = flat[f"{module}/bias"]
        flat[f"{module}/bias"] = (bias * scale).astype(bias.dtype)
  return ptree.unflatten(flat)


@functools.partial(jax.jit, static_argnums=0)
def merge(cfg: IA3Config, params: dict, adapters: dict) -> dict:
  """Folds the vectors into the weights (kernel columns and bias, or kernel rows); same structure as `params`."""
  del cfg
  return _fold(params, adapters, invert=False)


@functools.partial(jax.jit, static_argnums=0)
def unmerge(cfg: IA3Config, merged: dict, adapters: dict) -> dict:
  """Inverse of `merge`: divides the vectors out again."""
  del cfg
  return _fold(merged, adapters, invert=True)


def _check_single_axis(module: nn.Module) -> None:
  if isinstance(module, nn.DenseGeneral) and (np.ndim(module.features) > 0 or np.ndim(module.axis) > 0):
    raise ValueError(f"IA3 target {'/'.join(module.path)!r} is a DenseGeneral with several input or output "
                     "axes; (IA)³ supports Dense and single-axis DenseGeneral layers.")


def _intercept(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return next_fun(*args, **kwargs)
  if module.has_variable(COLLECTION, INPUT):
    _check_single_axis(module)
    x = args[0] if args else kwargs["inputs"]
    x = (x * module.get_variable(COLLECTION, INPUT)).astype(x.dtype)
    if args:
      return next_fun(x, *args[1:], **kwargs)
    return next_fun(*args, **{**kwargs, "inputs": x})
  if module.has_variable(COLLECTION, OUTPUT):
    _check_single_axis(module)
    y = next_fun(*args, **kwargs)
    return (y * module.get_variable(COLLECTION, OUTPUT)).astype(y.dtype)
  return next_fun(*args, **kwargs)


def wrap(cfg: IA3Config, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with the vectors of `variables["ia3"]` applied in activation space."""
  del cfg  # the adapter leaves say where each vector applies

  def adapted(variables, *args, **kwargs):
    with nn.intercept_methods(_intercept):
      return apply_fn(variables, *args, **kwargs)
  return adapted
