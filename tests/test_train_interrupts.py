"""A run stopped by SIGTERM / Ctrl-C saves the step it is at; a damaged step costs only itself on resume."""

from __future__ import annotations

import os
import re
import signal

import jax
import numpy as np
import pytest

from peftjax import checkpoint

import test_train  # tests/ is on sys.path under pytest
import train
from train import divergence, preemption


def _signal_at(monkeypatch, step: int, signum: int) -> None:
  """Sends `signum` to this process while the loop is in step `step` (the handler runs in the main thread)."""
  observe = divergence.Guard.observe

  def observe_and_signal(self, current, metrics):
    if current == step:
      os.kill(os.getpid(), signum)
    return observe(self, current, metrics)
  monkeypatch.setattr(divergence.Guard, "observe", observe_and_signal)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_a_damaged_step_costs_only_itself(tmp_path, capsys, monkeypatch):
  straight = train.main(test_train.tiny_config(tmp_path / "straight"))  # 12 steps, checkpoint_every=3
  run = tmp_path / "run"

  handler = signal.getsignal(signal.SIGTERM)
  _signal_at(monkeypatch, 5, signal.SIGTERM)
  with pytest.raises(preemption.Interrupted) as stopped:
    train.main(test_train.tiny_config(run))
  assert stopped.value.code == 128 + signal.SIGTERM
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"SIGTERM at step 5: saved {run}/checkpoints/5; run the same command to resume from it.")
  assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone
  manager = checkpoint.manager(str(run / "checkpoints"))
  assert manager.all_steps() == [3, 5]
  manager.close()
  monkeypatch.undo()

  # Damage the step saved on SIGTERM: the rerun says so in one line and resumes from step 3.
  data_files = [p for p in (run / "checkpoints" / "5" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  raw = bytearray(data_files[0].read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data_files[0].write_bytes(bytes(raw))
  resumed = train.main(test_train.tiny_config(run))
  out = capsys.readouterr().out
  assert re.search(rf"checkpoint step 5 in '{run}/checkpoints' is damaged: state/.* does not match its checksum; "
                   r"moving it to damaged/ and resuming from step 3\.", out), out
  assert resumed["start_step"] == 3 and resumed["final_step"] == 12
  for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(straight["state"])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_ctrl_c_twice_interrupts_at_once():
  handler = signal.getsignal(signal.SIGINT)
  with preemption.Signals() as signals:
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.received() == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is handler
