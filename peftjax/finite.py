"""The one finiteness guard that every writer calls: train-state checkpoints, adapter trees and folders, merged models.

A tree holding NaN or inf is refused before a single byte is written, so a diverged run never replaces a good
file.  Leaves may be numpy arrays (host copies about to be written) or jax.Arrays, sharded over several
processes too (those are counted on device, where they are).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(ValueError):
  """A tree about to be written holds NaN or inf values."""


def _name(path) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path)


@jax.jit
def _device_count(x: jax.Array) -> jax.Array:
  return jnp.sum(~jnp.isfinite(x))


def nonfinite_counts(tree: Any) -> dict[str, int]:
  """{leaf path: number of NaN / inf values} for the floating-point leaves of `tree` that hold any."""
  named = [(_name(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
           if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  # Each device count is read before the next is dispatched: on CPU processes joined by gloo, several reductions in
  # flight at once can pair their collectives differently on each process and wait forever.
  counts = {name: int(_device_count(leaf) if isinstance(leaf, jax.Array) else np.sum(~np.isfinite(np.asarray(leaf))))
            for name, leaf in named}
  return {name: count for name, count in counts.items() if count}


def all_finite(tree: Any) -> bool:
  """True when every floating-point leaf of `tree` is free of NaN and inf."""
  return not nonfinite_counts(tree)


def check(tree: Any, what: str) -> None:
  """Raises NonFiniteError, naming `what` (e.g. "the merged model /run/merged") and the first bad leaf, when any
  floating-point leaf of `tree` holds NaN or inf."""
  counts = nonfinite_counts(tree)
  if counts:
    first = next(iter(counts))
    raise NonFiniteError(f"refusing to write {what}: {sum(counts.values())} values in {len(counts)} tensor(s) are NaN "
                         f"or inf (first: {first!r}, {counts[first]} values); nothing was written, files already "
                         "there are kept.")
