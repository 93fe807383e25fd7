"""Method-agnostic entry points: each call dispatches to the module that defines the config's class.

A method module defines a frozen Config dataclass, the name of the variable COLLECTION its adapter
tree travels in, `init(cfg, rng, params)`, `wrap(cfg, apply_fn)` (returns an apply function with
`model.apply`'s signature that reads the adapters from `variables[COLLECTION]`), and, where the
method folds into the weights, `merge(cfg, params, adapters)` / `unmerge(cfg, merged, adapters)`.
A list of configs composes methods: each owns its own adapter tree (a tuple, in the same order).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import jax


def method_module(cfg: Any):
  """The module implementing `cfg`'s method (the module its Config class is defined in)."""
  return sys.modules[type(cfg).__module__]


def _configs(cfg: Any | Sequence[Any]) -> list[Any]:
  cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg]
  if not cfgs:
    raise ValueError("the list of method configs is empty; pass at least one config.")
  collections = [method_module(c).COLLECTION for c in cfgs]
  if len(set(collections)) != len(collections):
    names = [type(c).__name__ for c in cfgs]
    raise ValueError(f"configs {names} use one adapter collection twice ({collections}); combine different methods.")
  return cfgs


def init(cfg: Any | Sequence[Any], rng: jax.Array, params: dict) -> Any:
  """New adapter tree for `params` (a tuple of trees for a list of configs)."""
  if isinstance(cfg, (list, tuple)):
    cfgs = _configs(cfg)
    return tuple(init(c, k, params) for c, k in zip(cfgs, jax.random.split(rng, len(cfgs))))
  return method_module(cfg).init(cfg, rng, params)


def apply(cfg: Any | Sequence[Any], apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps `model.apply` into fn(params, adapters, *args, **kwargs) that runs the adapted model."""
  cfgs = _configs(cfg)
  wrapped = apply_fn
  for c in reversed(cfgs):
    wrapped = method_module(c).wrap(c, wrapped)

  def adapted(params, adapters, *args, **kwargs):
    trees = adapters if isinstance(cfg, (list, tuple)) else (adapters,)
    variables = {"params": params, **{method_module(c).COLLECTION: t for c, t in zip(cfgs, trees)}}
    return wrapped(variables, *args, **kwargs)
  return adapted


def _fold(cfg: Any | Sequence[Any], params: dict, adapters: Any, name: str) -> dict:
  cfgs = _configs(cfg)
  trees = adapters if isinstance(cfg, (list, tuple)) else (adapters,)
  pairs = list(zip(cfgs, trees))
  for c, tree in (pairs if name == "merge" else reversed(pairs)):
    fold = getattr(method_module(c), name, None)
    if fold is None:
      raise ValueError(f"{type(c).__name__} cannot be {name}d into the weights; keep it as an adapter.")
    params = fold(c, params, tree)
  return params


def merge(cfg: Any | Sequence[Any], params: dict, adapters: Any) -> dict:
  """Folds the adapters into the weights: a tree with exactly the structure of `params`."""
  return _fold(cfg, params, adapters, "merge")


def unmerge(cfg: Any | Sequence[Any], merged: dict, adapters: Any) -> dict:
  """Inverse of `merge`."""
  return _fold(cfg, merged, adapters, "unmerge")
