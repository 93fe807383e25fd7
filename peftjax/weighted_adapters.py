"""Weighted combination of LoRA adapters into a new one, as Hugging Face PEFT's `add_weighted_adapter`.

`add_weighted_adapter(cfgs, trees, weights, combination_type, ...) -> (LoraConfig, tree)` computes, per adapted
module, what PEFT computes (peft.utils.merge_utils and LoraModel.add_weighted_adapter):

- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": the A factors and the B factors are merged
  separately, adapter i's A weighted by sign(w_i s_i) sqrt(|w_i s_i|) and its B by sqrt(|w_i s_i|) (s_i its
  scaling); all adapters need one rank.
- "cat": A_i scaled by w_i s_i, concatenated along the rank axis (new rank: the sum of the ranks).
- "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd": the deltas s_i A_i B_i merged,
  then truncated to `svd_rank` (default: the largest rank) by an SVD; B = U S, A = V^T.

Pruning keeps the `density` fraction of entries: "magnitude" keeps the largest |values| (ties, magnitude_prune),
"random" (DARE) keeps each entry with probability `density` and rescales by 1 / density.  TIES then elects
the majority sign per entry (`majority_sign_method` "total": the sign of the sum; "frequency": the more frequent
sign) and averages the weighted entries that agree with it.  DARE's random masks come from `rng`, or are given
as `masks` ({(module path, adapter index, kind): keep mask}, kind "lora_A" / "lora_B" in our (in, r) / (r, out)
layout, or "delta" (in, out) for the *_svd variants) to reproduce another run's draws.

The new config is PEFT's: the first config with r = lora_alpha = the new rank, no rank/alpha patterns, and the
union of the target modules.  Modules some adapters lack take only the adapters that have them.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from peftjax import tree as ptree
from peftjax.methods import dora, lora

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*FACTOR_TYPES, "cat", *SVD_TYPES)
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune", *SVD_TYPES[1:])
SIGN_METHODS = ("total", "frequency")


def _magnitude_prune(x: jax.Array, density: float) -> jax.Array:
  """x with all but its int(density * size) largest |entries| set to zero (per matrix of a stacked x)."""
  flat = x.reshape(*x.shape[:-2], -1)
  k = int(density * flat.shape[-1])
  if k == 0:
    return jnp.zeros_like(x)
  threshold = jax.lax.top_k(jnp.abs(flat), k)[0][..., -1:]
  return jnp.where(jnp.abs(flat) >= threshold, flat, 0.0).reshape(x.shape)


def _prune(tensors: list[jax.Array], density: float | None, method: str, keep: list[jax.Array] | None) -> list:
  if density >= 1:
    return tensors
  if method == "magnitude":
    return [_magnitude_prune(t, density) for t in tensors]
  return [t * k / density for t, k in zip(tensors, keep)]


def _majority_sign_mask(stacked: jax.Array, method: str) -> jax.Array:
  sign = jnp.sign(stacked)
  magnitude = stacked.sum(0) if method == "total" else sign.sum(0)
  return sign == jnp.where(magnitude >= 0, 1.0, -1.0)


def _merge(kind: str, tensors: list[jax.Array], weights: jax.Array, density: float | None, sign_method: str,
           keep: list[jax.Array] | None) -> jax.Array:
  """PEFT's merge_utils function for `kind` ("linear" / "svd" is task arithmetic) on same-shaped tensors."""
  kind = kind.removesuffix("_svd")
  if kind in ("ties", "magnitude_prune"):
    tensors = _prune(tensors, density, "magnitude", None)
  elif kind in ("dare_linear", "dare_ties"):
    tensors = _prune(tensors, density, "random", keep)
  stacked = jnp.stack(tensors)
  weighted = stacked * weights.reshape(-1, *([1] * (stacked.ndim - 1)))
  if kind in ("ties", "dare_ties"):
    mask = _majority_sign_mask(stacked, sign_method)
    return (weighted * mask).sum(0) / jnp.maximum(mask.sum(0), 1.0)
  return weighted.sum(0)


def _keep(masks, rng, path: str, indices: list[int], kind: str, shapes: list[tuple], density: float, salt: int):
  """The DARE keep masks of the adapters `indices` at `path`: from `masks`, else Bernoulli(density) from `rng`."""
  if masks is not None:
    missing = [i for i in indices if (path, i, kind) not in masks]
    if missing:
      raise ValueError(f"masks has no entry {(path, missing[0], kind)!r}; DARE needs one keep mask per adapter, "
                       "module and factor.")
    return [jnp.asarray(masks[(path, i, kind)], jnp.float32) for i in indices]
  if rng is None:
    raise ValueError("the DARE combinations draw random masks: pass rng=jax.random.key(SEED) (or masks=...).")
  keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, zlib.crc32(path.encode())), salt), len(indices))
  return [jax.random.bernoulli(k, density, s).astype(jnp.float32) for k, s in zip(keys, shapes)]


def _new_targets(cfgs: Sequence[lora.LoraConfig]):
  kinds = {isinstance(c.targets, str) for c in cfgs}
  if len(kinds) > 1:
    raise ValueError("the adapters' targets mix a regex string and lists of names; PEFT cannot combine those.")
  if kinds == {True}:
    return "|".join(f"({c.targets})" for c in cfgs)
  return tuple(sorted(set().union(*(c.targets for c in cfgs))))


def _max_rank(cfg: lora.LoraConfig) -> int:
  return max(cfg.rank, *(r for _, r in cfg.rank_pattern)) if cfg.rank_pattern else cfg.rank


def _check(cfgs, trees, weights, combination_type, density, majority_sign_method) -> None:
  if combination_type not in COMBINATION_TYPES:
    raise ValueError(f"combination_type={combination_type!r} is not valid; valid: {list(COMBINATION_TYPES)}.")
  if not cfgs or len(cfgs) != len(trees) or len(cfgs) != len(weights):
    raise ValueError(f"add_weighted_adapter needs one config, tree and weight per adapter; got {len(cfgs)} configs, "
                     f"{len(trees)} trees and {len(weights)} weights.")
  for i, c in enumerate(cfgs):
    if not isinstance(c, lora.LoraConfig) or isinstance(c, dora.DoraConfig):
      raise ValueError(f"adapter {i} has a {type(c).__name__}; add_weighted_adapter combines LoraConfig adapters.")
  if combination_type in NEEDS_DENSITY and len(cfgs) > 1 and (density is None or not 0 <= density <= 1):
    raise ValueError(f"combination_type={combination_type!r} needs density in [0, 1], got {density!r}.")
  if majority_sign_method not in SIGN_METHODS:
    raise ValueError(f"majority_sign_method={majority_sign_method!r} is not valid; valid: {list(SIGN_METHODS)}.")
  if combination_type in FACTOR_TYPES and len(cfgs) > 1 and len({_max_rank(c) for c in cfgs}) != 1:
    raise ValueError(f"combination_type={combination_type!r} needs adapters of one rank; got ranks "
                     f"{[_max_rank(c) for c in cfgs]} (use 'cat' or an *_svd type).")


def add_weighted_adapter(cfgs: Sequence[lora.LoraConfig], trees: Sequence[dict], weights: Sequence[float],
                         combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                         majority_sign_method: str = "total", rng: jax.Array | None = None,
                         masks: Mapping[tuple[str, int, str], Any] | None = None) -> tuple[lora.LoraConfig, dict]:
  """(config, adapter tree) of the weighted combination of the LoRA adapters (cfgs[i], trees[i]); see the module."""
  cfgs, trees, weights = list(cfgs), list(trees), [float(w) for w in weights]
  _check(cfgs, trees, weights, combination_type, density, majority_sign_method)
  if len(cfgs) == 1:
    combination_type = "linear"
  ranks = [_max_rank(c) for c in cfgs]
  new_rank = {"cat": sum(ranks)}.get(combination_type, ranks[0] if combination_type in FACTOR_TYPES else
                                     (svd_rank or max(ranks)))
  modules = [lora.adapter_modules(t) for t in trees]
  paths = list(dict.fromkeys(p for m in modules for p in m))
  out = {}
  for path in paths:
    have = [i for i, m in enumerate(modules) if path in m]
    scalings = [cfgs[i].scaling(modules[i][path]["lora_A"].shape[-1], cfgs[i].module_alpha(path)) for i in have]
    scaled = [weights[i] * s for i, s in zip(have, scalings)]
    a_list = [jnp.asarray(modules[i][path]["lora_A"], jnp.float32) for i in have]
    b_list = [jnp.asarray(modules[i][path]["lora_B"], jnp.float32) for i in have]
    if combination_type == "cat":
      a = jnp.concatenate([a * w for a, w in zip(a_list, scaled)], axis=-1)
      b = jnp.concatenate(b_list, axis=-2)
    elif combination_type in FACTOR_TYPES:
      w = jnp.asarray(scaled)
      w_b = jnp.sqrt(jnp.abs(w))
      w_a = jnp.where(w >= 0, 1.0, -1.0) * w_b
      dare = combination_type.startswith("dare")
      keep_a = _keep(masks, rng, path, have, "lora_A", [x.shape for x in a_list], density, 0) if dare else None
      keep_b = _keep(masks, rng, path, have, "lora_B", [x.shape for x in b_list], density, 1) if dare else None
      a = _merge(combination_type, a_list, w_a, density, majority_sign_method, keep_a)
      b = _merge(combination_type, b_list, w_b, density, majority_sign_method, keep_b)
    else:
      deltas = [(x @ y) * s for x, y, s in zip(a_list, b_list, scalings)]
      dare = combination_type.startswith("dare")
      keep = _keep(masks, rng, path, have, "delta", [d.shape for d in deltas], density, 2) if dare else None
      delta = _merge(combination_type, deltas, jnp.asarray([weights[i] for i in have]), density,
                     majority_sign_method, keep)
      a, b = _svd_factors(delta, new_rank)
    pad = new_rank - a.shape[-1]
    out[f"{path}/lora_A"] = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    out[f"{path}/lora_B"] = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
  cfg = dataclasses.replace(cfgs[0], rank=new_rank, alpha=float(new_rank), targets=_new_targets(cfgs),
                            rank_pattern=(), alpha_pattern=())
  return cfg, ptree.unflatten(out)


def _svd_factors(delta: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """(A, B) with A B the best rank-`rank` approximation of `delta` (*stack, in, out): PEFT's B = U S, A = V^T
  of the (out, in) PyTorch delta, in our layout."""
  u, s, vt = jnp.linalg.svd(jnp.swapaxes(delta, -1, -2), full_matrices=False)
  u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
  return jnp.swapaxes(vt, -1, -2), jnp.swapaxes(u * s[..., None, :], -1, -2)
