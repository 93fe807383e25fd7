"""Multi-process JAX: starting the job, feeding each process only its rows, gathering a sharded model for export.

`initialize` must run before any other JAX call.  On a TPU VM pod slice every worker runs the same command
and `jax.distributed.initialize()` finds its peers itself; elsewhere (CPU processes, GPU hosts) the
coordinator address, the number of processes and this process's id are given explicitly, either as
arguments or in the environment (PEFTJAX_COORDINATOR, PEFTJAX_NUM_PROCESSES, PEFTJAX_PROCESS_ID).
PEFTJAX_DIST_INIT=1 asks for the auto-detected form.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from peftjax import finite
from peftjax import tree as ptree

ENV_AUTO = "PEFTJAX_DIST_INIT"
ENV_COORDINATOR = "PEFTJAX_COORDINATOR"
ENV_NUM_PROCESSES = "PEFTJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "PEFTJAX_PROCESS_ID"


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, auto: bool = False,
               timeout_s: int = 300) -> bool:
  """Joins this process to a multi-process JAX job when asked to; returns whether it did.

  Explicit form: `coordinator_address` ("host:port" of process 0), `num_processes` and `process_id` (each
  falls back to its PEFTJAX_* environment variable).  On CPU the collectives go through gloo.  `auto` (or
  PEFTJAX_DIST_INIT=1) calls `jax.distributed.initialize()` with no arguments, which configures itself on
  TPU pods, SLURM and other supported clusters.  With neither, nothing happens (a single process).
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR, "")
  num_processes = num_processes or int(os.environ.get(ENV_NUM_PROCESSES, "0"))
  process_id = process_id if process_id >= 0 else int(os.environ.get(ENV_PROCESS_ID, "-1"))
  auto = auto or os.environ.get(ENV_AUTO, "") not in ("", "0")
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"distributed coordinator_address={coordinator_address!r} needs num_processes >= 1 and "
                       f"0 <= process_id < num_processes, got num_processes={num_processes}, process_id={process_id}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives; other backends ignore it
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
    return True
  if auto:
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return True
  return False


def process_rows(sharding: NamedSharding, rows: int) -> slice:
  """The contiguous rows of a `rows`-long leading axis that this process's devices hold under `sharding`."""
  indices = sharding.addressable_devices_indices_map((rows,)).values()
  starts = sorted({index[0].indices(rows)[0] for index in indices})
  stops = sorted({index[0].indices(rows)[1] for index in indices})
  start, stop = starts[0], stops[-1]
  covered = sum(b - a for a, b in zip(starts, stops))
  if covered != stop - start:
    raise ValueError(f"this process's devices hold non-contiguous rows {list(zip(starts, stops))} of the batch; "
                     "build the mesh with peftjax.sharding.make_mesh so each process owns one block of rows.")
  return slice(start, stop)


def load_local(dataset: Mapping[str, Any], indices: np.ndarray, sharding: NamedSharding) -> dict:
  """One global batch of the examples `indices` (the same on every process), reading only this process's rows.

  `dataset` maps a name to anything indexable by an integer array (numpy arrays, memory maps, datasets
  columns).  Returns global jax.Arrays of len(indices) rows sharded by `sharding`.
  """
  rows = process_rows(sharding, len(indices))
  local = {k: np.asarray(v[np.asarray(indices)[rows]]) for k, v in dataset.items()}
  return global_batch(local, sharding, len(indices))


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding, rows: int) -> dict:
  """Global arrays of `rows` rows from this process's rows (`process_rows`) of every field."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (rows, *np.shape(v)[1:])) for k, v in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of one (possibly sharded, multi-process) array as numpy, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def export_merged(save_pretrained: Callable[[Any, dict, str], None], model: Any, merged: Any, folder: str) -> None:
  """Writes a sharded (merged) model with its family's `save_pretrained`, from process 0.

  Tensors are gathered one at a time into host memory (no device ever holds more than one full tensor);
  every process takes part in the gathers, process 0 writes, and all processes wait until it has.
  Merge under jit with the parameters' shardings first (`jax.jit(pj.merge, out_shardings=...)`).
  """
  host = {}
  for path, leaf in ptree.flatten(merged).items():
    value = to_host(leaf)
    finite.check({path: value}, f"the model {folder!r}")  # on every process, so all of them stop alike
    if jax.process_index() == 0:
      host[path] = value
  if jax.process_index() == 0:
    save_pretrained(model, ptree.unflatten(host), folder)
  multihost_utils.sync_global_devices(f"peftjax export {folder}")
