"""Ctrl-C (SIGINT) and SIGTERM (what a preemptible TPU VM gets before it is taken away) end a run cleanly.

While `Signals` is active the first SIGINT or SIGTERM only sets a flag; the loop finishes the step it is in,
`save_and_exit` writes a checkpoint of that step and the run exits (status 128 + the signal number) with one line
saying where the checkpoint is and that the same command resumes.  A second Ctrl-C interrupts at once.  In a
multi-process job every process learns of a signal any of them got at the same step, so they save together.
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from peftjax import checkpoint

CAUGHT = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
  """The run saved a checkpoint and stopped on SIGINT or SIGTERM; the exit status is 128 + the signal number."""


class Signals:
  """Context manager that catches SIGINT and SIGTERM (in the main thread) until it exits; `received()` says
  which one arrived (0: none), on every process of the job."""

  def __init__(self):
    self.signum, self._previous = 0, {}

  def _handle(self, signum, frame):
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # pressed twice: stop now
    self.signum = self.signum or signum

  def __enter__(self) -> "Signals":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in CAUGHT}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def received(self) -> int:
    """The signal number caught by this process or, in a multi-process job, by any process (0: none)."""
    if jax.process_count() == 1:
      return self.signum
    return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))


def save_and_exit(manager: checkpoint.Manager, step: int, state, position: dict, signum: int) -> None:
  """Checkpoints `state` as step `step` (unless that step is already saved), waits for it, raises Interrupted.

  The caller closes `manager` (train.loop: `contextlib.closing`)."""
  if manager.latest_step() != step:
    checkpoint.save(manager, step, state, position, force=True)
  manager.wait_until_finished()
  if jax.process_index() == 0:
    print(f"{signal.Signals(signum).name} at step {step}: saved {manager.directory}/{step}; run the same command "
          "to resume from it.", file=sys.stderr, flush=True)
  raise Interrupted(128 + signum)
