"""Orbax checkpoints: full train state (with a JSON record such as the data position) and adapters-only trees.

A train-state checkpoint is one step folder written by an Orbax `CheckpointManager` with two items:
``state`` (any pytree of arrays: trainable tree, optimizer state, step) and ``data`` (a small JSON
dict, e.g. ``{"epoch": 2, "index": 17}``).  Trees holding NaN or inf are refused (`peftjax.finite`), so a
diverged run never overwrites a good checkpoint.

Every step folder holds a ``manifest.json``: the size and SHA-256 of each file Orbax wrote and the shape and
dtype of every leaf of the state.  It is written after Orbax has finished the step's files and before Orbax
commits the folder (renames it into place), so a committed step always has one and a step killed mid-write is
never committed.  `restore` verifies it: a damaged step (a file missing, truncated or changed) is reported in
one line and set aside under ``damaged/``, and the newest intact step is restored; a step written for another
state layout (another model, task or method setting) is refused as such.  Merged models are exported with the
model family's `save_pretrained` and Hugging Face PEFT adapters with `peftjax.interop.save_lora_adapter`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from peftjax import finite

STATE, DATA = "state", "data"
MANIFEST = "manifest.json"
DAMAGED = "damaged"
# Written by Orbax after the manifest (when it commits the step), so not covered by it.
UNSEALED = ("_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST)
# Called as WRITE_HOOK(step, phase) while a step is written: "written" (Orbax's files are complete) and "sealed"
# (the manifest is written too), both before Orbax commits the step.  Tests and bench/soak.py pause or kill here.
WRITE_HOOK: Callable[[int, str], None] | None = None

all_finite = finite.all_finite


class CheckpointError(ValueError):
  """A checkpoint cannot be restored: every step is damaged, or it was written for another state layout."""


def _absolute(path: str) -> str:
  """A local path made absolute; a URL (gs://bucket/run, which Orbax writes to directly) as it is."""
  return path if "://" in path else os.path.abspath(path)


def _layout(tree: Any) -> dict[str, list]:
  """{leaf path: [shape, dtype]} of a tree of arrays or ShapeDtypeStructs."""
  return {jax.tree_util.keystr(path): [list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _digest(file: epath.Path) -> str:
  sha = hashlib.sha256()
  with file.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      sha.update(chunk)
  return sha.hexdigest()


def _files(folder: epath.Path, prefix: str = "") -> dict[str, epath.Path]:
  """{path relative to `folder`: file} of every file below `folder` but the ones Orbax writes at commit time."""
  found = {}
  for entry in sorted(folder.iterdir()):
    if entry.is_dir():
      found.update(_files(entry, f"{prefix}{entry.name}/"))
    elif f"{prefix}{entry.name}" not in UNSEALED:
      found[f"{prefix}{entry.name}"] = entry
  return found


class Manager(ocp.CheckpointManager):
  """An Orbax CheckpointManager over (state, data) steps whose every committed step holds a verified manifest."""

  def __init__(self, directory: str, max_to_keep: int | None, save_interval_steps: int):
    self.writing: tuple[int, dict] | None = None  # (step, state layout) of the save in flight; set by `save`
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
    super().__init__(_absolute(directory), options=options, item_names=(STATE, DATA))

  def _seal(self) -> None:
    """Writes the manifest of the step in flight (Orbax calls this on the primary process before committing)."""
    step, layout = self.writing
    folder = self.directory / f"{step}.orbax-checkpoint-tmp"
    folder = folder if folder.exists() else self.directory / str(step)  # gs://: written in place
    if WRITE_HOOK:
      WRITE_HOOK(step, "written")
    files = {name: {"size": file.stat().length, "sha256": _digest(file)} for name, file in _files(folder).items()}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files, "layout": layout}, indent=1))
    tmp.rename(folder / MANIFEST)
    if WRITE_HOOK:
      WRITE_HOOK(step, "sealed")


def manager(directory: str, max_to_keep: int | None = None, save_interval_steps: int = 1) -> Manager:
  """A CheckpointManager over `directory` (created if missing) that keeps the newest `max_to_keep` steps."""
  if max_to_keep is not None and max_to_keep < 1:
    raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep}.")
  return Manager(directory, max_to_keep, save_interval_steps)


def save(mngr: Manager, step: int, state: Any, data: dict | None = None, force: bool = False) -> bool:
  """Saves `state` (and the JSON dict `data`) as step `step`; returns whether a checkpoint was written.

  Saving is asynchronous: call `mngr.wait_until_finished()` before reading the files.
  """
  finite.check(state, f"checkpoint step {step} in {str(mngr.directory)!r} (the last good step is kept)")
  mngr.wait_until_finished()  # the previous save's manifest is written before this one is announced
  mngr.writing = (int(step), _layout(state))
  args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(dict(data or {}))})
  return mngr.save(int(step), args=args, force=force)


def why_damaged(mngr: Manager, step: int) -> str | None:
  """Why step `step` is damaged (its manifest missing or unreadable, a file missing, truncated or changed), or
  None when every file matches its manifest."""
  folder = mngr.directory / str(step)
  try:
    manifest = json.loads((folder / MANIFEST).read_text())
    expected = manifest["files"]
  except FileNotFoundError:
    return f"it has no {MANIFEST} (written by an older peftjax, or not by peftjax)"
  except (ValueError, KeyError, TypeError) as e:
    return f"its {MANIFEST} is unreadable ({type(e).__name__}: {e})"
  present = _files(folder)
  for name, entry in expected.items():
    if name not in present:
      return f"{name} is missing"
    size = present[name].stat().length
    if size != entry["size"]:
      return f"{name} has {size} bytes instead of {entry['size']}"
    if _digest(present[name]) != entry["sha256"]:
      return f"{name} does not match its checksum"
  return None


def _layout_difference(mngr: Manager, step: int, target: Any) -> str | None:
  """How the state layout saved in step `step`'s manifest differs from `target`'s, or None."""
  saved, wanted = json.loads((mngr.directory / str(step) / MANIFEST).read_text()).get("layout"), _layout(target)
  if saved is None:  # a manifest without a layout: nothing to compare (Orbax's restore still checks the structure)
    return None
  for key in sorted(saved.keys() | wanted.keys()):
    if saved.get(key) != wanted.get(key):
      describe = lambda entry: "absent" if entry is None else f"shape {tuple(entry[0])} {entry[1]}"  # noqa: E731
      return f"leaf {key} is {describe(saved.get(key))} there but {describe(wanted.get(key))} here"
  return None


def _set_aside(mngr: Manager, steps: list[int]) -> None:
  """Moves damaged step folders to damaged/<step>-<time> (process 0), so the run can write those steps again."""
  if steps and jax.process_index() == 0:
    (mngr.directory / DAMAGED).mkdir(parents=True, exist_ok=True)
    for step in steps:
      (mngr.directory / str(step)).rename(mngr.directory / DAMAGED / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  if steps:
    multihost_utils.sync_global_devices(f"peftjax checkpoint set aside {steps}")
    mngr.reload()


def _newest_intact(mngr: Manager, steps: list[int]) -> tuple[int, list[str]]:
  """(newest step whose files match its manifest or -1, one line per damaged step above it), on process 0."""
  lines = []
  for step in sorted(steps, reverse=True):
    why = why_damaged(mngr, step)
    if why is None:
      return step, lines
    lines.append(f"checkpoint step {step} in {str(mngr.directory)!r} is damaged: {why}")
  return -1, lines


def restore(mngr: Manager, target: Any, step: int | None = None) -> tuple[Any, dict] | None:
  """(state, data) of `step` (default: the newest intact step), shaped like `target`; None when there is none.

  `target` is a tree of arrays or jax.ShapeDtypeStruct with the saved structure (e.g. a freshly initialised
  state); its leaves give the restored shapes, dtypes and shardings (None: as saved, on one device).  Damaged
  steps newer than the restored one are reported (one line each) and moved to damaged/; CheckpointError when no
  step is intact, when `step` is damaged, or when the step was written for another state layout.
  """
  steps = list(mngr.all_steps())
  if step is not None and step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {str(mngr.directory)!r}; saved steps: {steps}.")
  if not steps:
    return None
  candidates = steps if step is None else [step]
  chosen, lines = _newest_intact(mngr, candidates) if jax.process_index() == 0 else (-1, [])
  chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
  if chosen < 0:
    if jax.process_index() == 0:
      advice = (f"no intact step is left to resume from: move {str(mngr.directory)!r} away to start again, or use "
                "a new config.workdir" if step is None else f"restore another of the steps {steps}")
      raise CheckpointError("; ".join(lines) + f"; {advice}.")
    raise CheckpointError(f"no intact checkpoint step in {str(mngr.directory)!r} (see process 0's error).")
  for line in lines:
    print(f"{line}; moving it to {DAMAGED}/ and resuming from step {chosen}.", flush=True)
  _set_aside(mngr, [s for s in candidates if s > chosen])
  difference = None if target is None else _layout_difference(mngr, chosen, target)
  if difference is not None:
    raise CheckpointError(f"checkpoint step {chosen} in {str(mngr.directory)!r} was written by another config "
                          f"(another model, task or method setting?): {difference}; use a new config.workdir.")
  args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore()})
  try:
    restored = mngr.restore(chosen, args=args)
  except Exception as e:  # noqa: BLE001 (Orbax raises many types; the files matched the manifest, so say which step)
    raise CheckpointError(f"checkpoint step {chosen} in {str(mngr.directory)!r} matches its manifest but Orbax "
                          f"cannot read it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); move "
                          f"that step folder away to resume from an older one.") from e
  return restored[STATE], dict(restored[DATA] or {})


def save_adapters(path: str, adapters: Any) -> None:
  """Writes an adapter tree (only the trainable leaves) as an Orbax checkpoint at `path`, replacing it."""
  finite.check(adapters, f"the adapter tree {path!r}")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(_absolute(path), adapters, force=True)


def load_adapters(path: str, target: Any | None = None) -> Any:
  """Reads an adapter tree written by `save_adapters` (shaped like `target` when given)."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(_absolute(path), target)
