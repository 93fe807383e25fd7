"""Orbax checkpoints: full train state (with a JSON record such as the data position) and adapters-only trees.

A train-state checkpoint is one step folder written by an Orbax `CheckpointManager` with two items:
``state`` (any pytree of arrays: trainable tree, optimizer state, step) and ``data`` (a small JSON
dict, e.g. ``{"epoch": 2, "index": 17}``).  Trees holding NaN or inf are refused, so a diverged run
never overwrites a good checkpoint.  Merged models are exported with the model family's
`save_pretrained` and Hugging Face PEFT adapters with `peftjax.interop.save_lora_adapter`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"


def _absolute(path: str) -> str:
  """A local path made absolute; a URL (gs://bucket/run, which Orbax writes to directly) as it is."""
  return path if "://" in path else os.path.abspath(path)


def all_finite(tree: Any) -> bool:
  """True when every floating-point leaf of `tree` is free of NaN and inf."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return all(bool(jnp.isfinite(x).all()) for x in leaves)  # on device: also for arrays sharded over processes


def _check_finite(tree: Any, what: str) -> None:
  if not all_finite(tree):
    raise ValueError(f"refusing to write a {what} that holds NaN or inf values; the last good checkpoint is kept.")


def manager(directory: str, max_to_keep: int | None = None, save_interval_steps: int = 1) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created if missing) that keeps the newest `max_to_keep` steps."""
  if max_to_keep is not None and max_to_keep < 1:
    raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep}.")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True)
  return ocp.CheckpointManager(_absolute(directory), options=options, item_names=(STATE, DATA))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data: dict | None = None, force: bool = False) -> bool:
  """Saves `state` (and the JSON dict `data`) as step `step`; returns whether a checkpoint was written.

  Saving is asynchronous: call `mngr.wait_until_finished()` before reading the files.
  """
  _check_finite(state, "train state")
  args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(dict(data or {}))})
  return mngr.save(int(step), args=args, force=force)


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> tuple[Any, dict] | None:
  """(state, data) of `step` (default: the latest), shaped like `target`; None when there is no checkpoint.

  `target` is a tree of arrays or jax.ShapeDtypeStruct with the saved structure (e.g. a freshly
  initialised state); its leaves give the restored shapes, dtypes and shardings.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  if step not in mngr.all_steps():
    raise ValueError(f"no checkpoint for step {step} in {str(mngr.directory)!r}; "
                     f"saved steps: {list(mngr.all_steps())}.")
  args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore()})
  restored = mngr.restore(step, args=args)
  return restored[STATE], dict(restored[DATA] or {})


def save_adapters(path: str, adapters: Any) -> None:
  """Writes an adapter tree (only the trainable leaves) as an Orbax checkpoint at `path`, replacing it."""
  _check_finite(adapters, "adapter tree")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(_absolute(path), adapters, force=True)


def load_adapters(path: str, target: Any | None = None) -> Any:
  """Reads an adapter tree written by `save_adapters` (shaped like `target` when given)."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(_absolute(path), target)
