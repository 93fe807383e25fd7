"""modules_to_save (Hugging Face PEFT): named base modules trained in full, e.g. a new task head.

The adapter tree is a sparse float32 copy of the named modules' leaves (``classifier/kernel``,
``classifier/bias``, ...).  `wrap` runs the model with those leaves of `variables["params"]` replaced
by the copies (cast to the base leaf's dtype), so only the copies receive gradients; `merge` writes
them into the base tree.  A module is any node of the parameter tree that holds leaves (a Dense, an
embedding, a norm, or a whole block), named as `targets` are: a list of names (a module whose
dotted Hugging Face name equals an entry or ends with '.' + entry, or '/'-joined paths) or a regex
that fully matches the module's path or dotted name.

Hugging Face PEFT saves these modules' full weights in the adapter file under their own names
(``base_model.model.classifier.weight``) and counts them, in `print_trainable_parameters`, both as
trainable copies and as part of the frozen base.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree as ptree

COLLECTION = "modules_to_save"
# The method replaces leaves of the base params before the model runs, so in a composition it acts innermost:
# merge it before the activation-space methods (and unmerge it after them).
REPLACES_PARAMS = True


@dataclasses.dataclass(frozen=True)
class ModulesToSaveConfig:
  """Modules trained in full (HF PEFT `modules_to_save`): names or a regex, e.g. ("classifier",) or ("lm_head",)."""

  modules: str | tuple[str, ...]

  def __post_init__(self):
    if isinstance(self.modules, list):
      object.__setattr__(self, "modules", tuple(self.modules))
    if not self.modules:
      raise ValueError("ModulesToSaveConfig.modules is empty; name at least one module, e.g. ('classifier',).")


def _name_matches(path: str, names: str | Sequence[str]) -> bool:
  dotted = ptree.hf_name(path)
  if isinstance(names, str):
    pattern = re.compile(names)
    return bool(pattern.fullmatch(path) or pattern.fullmatch(dotted))
  return any(dotted == n or dotted.endswith("." + n) or path == n or path.endswith("/" + n) for n in names)


def module_leaves(params: ptree.Tree, names: str | Sequence[str], owner: str) -> list[str]:
  """Paths of every leaf inside a module matched by `names` (`owner` names the config key in errors)."""
  leaves = list(ptree.flatten(params))
  modules = sorted({"/".join(p.split("/")[:i]) for p in leaves for i in range(1, p.count("/") + 1)})
  found = [m for m in modules if _name_matches(m, names)]
  if not found:
    valid = sorted({m.split("/")[-1] for m in modules})
    raise ValueError(f"{owner}={names!r} match no module; valid module names are {valid}, a dotted suffix such "
                     "as 'attention.output.dense', or a regex.")
  return [p for p in leaves if any(p.startswith(m + "/") for m in found)]


def copy_leaves(params: ptree.Tree, paths: Sequence[str]) -> dict:
  """Sparse tree holding float32 copies of the leaves at `paths`."""
  flat = ptree.flatten(params)
  return ptree.unflatten({p: jnp.array(flat[p], jnp.float32) for p in paths})


def override(params: ptree.Tree, leaves: ptree.Tree, owner: str) -> dict:
  """`params` with the leaves present in the sparse tree `leaves` replaced (cast to the base leaf's dtype)."""
  flat = ptree.flatten(params)
  for path, value in ptree.flatten(leaves).items():
    if path not in flat or np.shape(flat[path]) != np.shape(value):
      expected = np.shape(flat[path]) if path in flat else "no such parameter"
      raise ValueError(f"{owner} adapter leaf {path!r} of shape {np.shape(value)} does not fit this model "
                       f"(its parameter: {expected}).")
    flat[path] = jnp.asarray(value).astype(flat[path].dtype)
  return ptree.unflatten(flat)


def override_wrapper(collection: str, owner: str, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` run with the leaves of `variables[collection]` replacing those of `variables["params"]`."""
  def adapted(variables, *args, **kwargs):
    rest = {k: v for k, v in variables.items() if k != collection}
    rest["params"] = override(variables["params"], variables[collection], owner)
    return apply_fn(rest, *args, **kwargs)
  return adapted


def init(cfg: ModulesToSaveConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """Trainable copies of every leaf of the named modules."""
  del rng  # the copies start at the base values
  return copy_leaves(params, module_leaves(params, cfg.modules, "ModulesToSaveConfig.modules"))


def wrap(cfg: ModulesToSaveConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with the named modules taken from `variables["modules_to_save"]`."""
  del cfg
  return override_wrapper(COLLECTION, "ModulesToSaveConfig", apply_fn)


@functools.partial(jax.jit, static_argnums=0)
def merge(cfg: ModulesToSaveConfig, params: dict, adapters: dict) -> dict:
  """`params` with the trained modules written in; same structure and dtypes as `params`."""
  del cfg
  return override(params, adapters, "ModulesToSaveConfig")


def unmerge(cfg: ModulesToSaveConfig, merged: dict, adapters: dict) -> dict:
  """Not possible: merging overwrote the modules' base values, which only the unmerged base tree still holds."""
  raise ValueError(f"{type(cfg).__name__} cannot be unmerged: merge replaced the modules' base values; "
                   "keep the base params you merged into instead.")
