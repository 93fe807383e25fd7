"""BitFit (Ben Zaken et al. 2022): train only the bias terms, optionally plus a task head.

The adapter tree is a sparse float32 copy of the trained leaves: every parameter named ``bias``
(attention, feed-forward and LayerNorm biases), or only those of the modules `targets` names, plus
every leaf of the `modules_to_save` modules (e.g. a new classifier).  `wrap` runs the model with those
leaves replaced by the copies, so gradients reach only them; `merge` writes them into the base tree.
Models without biases (T5, Llama without `attention_bias`) raise an error: use LoRA or (IA)³ there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from peftjax import tree as ptree
from peftjax.methods import modules_to_save as mts

COLLECTION = "bitfit"
# The method replaces leaves of the base params before the model runs, so in a composition it acts innermost:
# merge it before the activation-space methods (and unmerge it after them).
REPLACES_PARAMS = True


@dataclasses.dataclass(frozen=True)
class BitFitConfig:
  """BitFit settings.

  `targets`: None trains every bias; otherwise module names or a regex (matched as in
  `ModulesToSaveConfig`, e.g. ("query", "intermediate.dense")) whose biases train.
  `modules_to_save`: modules trained in full alongside the biases, e.g. ("classifier",).
  """

  targets: str | tuple[str, ...] | None = None
  modules_to_save: tuple[str, ...] = ()

  def __post_init__(self):
    for name in ("targets", "modules_to_save"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))


def trainable_paths(cfg: BitFitConfig, params: ptree.Tree) -> list[str]:
  """Leaf paths BitFit trains: the selected biases, then the `modules_to_save` leaves."""
  biases = [p for p in ptree.flatten(params) if p.rsplit("/", 1)[-1] == "bias"]
  if not biases:
    raise ValueError("BitFit cannot train this model: it has no bias parameters (no leaf named 'bias'); "
                     "use a method that adds parameters instead, such as LoraConfig or IA3Config.")
  if cfg.targets is not None:
    only_biases = ptree.unflatten({p: 0 for p in biases})
    chosen = set(mts.module_leaves(only_biases, cfg.targets, "BitFitConfig.targets"))
    biases = [p for p in biases if p in chosen]
  extra = mts.module_leaves(params, cfg.modules_to_save, "BitFitConfig.modules_to_save") if cfg.modules_to_save else []
  return biases + [p for p in extra if p not in biases]


def init(cfg: BitFitConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """Trainable float32 copies of the biases (and `modules_to_save` leaves) of `params`."""
  del rng  # the copies start at the base values
  return mts.copy_leaves(params, trainable_paths(cfg, params))


def wrap(cfg: BitFitConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with the trained leaves taken from `variables["bitfit"]`."""
  del cfg
  return mts.override_wrapper(COLLECTION, "BitFitConfig", apply_fn)


@functools.partial(jax.jit, static_argnums=0)
def merge(cfg: BitFitConfig, params: dict, adapters: dict) -> dict:
  """`params` with the trained biases (and modules) written in; same structure and dtypes as `params`."""
  del cfg
  return mts.override(params, adapters, "BitFitConfig")


def unmerge(cfg: BitFitConfig, merged: dict, adapters: dict) -> dict:
  """Not possible: merging overwrote the base biases, which only the unmerged base tree still holds."""
  raise ValueError(f"{type(cfg).__name__} cannot be unmerged: merge replaced the base biases; keep the base "
                   "params you merged into instead.")
