"""Damaged checkpoints: each damage is detected by the manifest, reported in one line and costs only that step;
a kill during the write leaves the previous step in use; another config's checkpoint is named as such."""

from __future__ import annotations

import json
import re
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _state(value: float) -> dict:
  return {"step": jnp.int32(value), "trainable": {"w": jnp.full((64, 32), value, jnp.float32),
                                                  "b": jnp.arange(32, dtype=jnp.float32) * value}}


def _write(directory, steps=(1, 2)) -> None:
  manager = checkpoint.manager(str(directory), max_to_keep=3)
  for step in steps:
    checkpoint.save(manager, step, _state(step), {"epoch": 0, "index": step})
  manager.close()


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest file holding the state's array bytes (Orbax's OCDBT data files live in .../d/)."""
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  file = _data_file(step_dir)
  file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_32_bytes(step_dir):
  file = _data_file(step_dir)
  raw = bytearray(file.read_bytes())
  for i in range(len(raw) - 40, len(raw) - 8):
    raw[i] ^= 0x01
  file.write_bytes(bytes(raw))


DAMAGES = {
    "truncated state file": (_truncate, "has .* bytes instead of"),
    "data/metadata deleted": (lambda d: (d / "data" / "metadata").unlink(), "data/metadata is missing"),
    "state/_METADATA deleted": (lambda d: (d / "state" / "_METADATA").unlink(), "state/_METADATA is missing"),
    "32 flipped bytes": (_flip_32_bytes, "does not match its checksum"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_step_is_reported_set_aside_and_the_previous_one_restored(tmp_path, capsys, damage):
  _write(tmp_path)
  apply_damage, reason = DAMAGES[damage]
  apply_damage(tmp_path / "2")
  manager = checkpoint.manager(str(tmp_path))
  state, data = checkpoint.restore(manager, _state(0.0))
  line = capsys.readouterr().out.strip()
  assert len(line.splitlines()) == 1
  assert f"checkpoint step 2 in {str(tmp_path)!r} is damaged: " in line and "resuming from step 1" in line
  assert re.search(reason, line), line
  assert data == {"epoch": 0, "index": 1} and int(state["step"]) == 1
  np.testing.assert_array_equal(state["trainable"]["w"], np.full((64, 32), 1.0, np.float32))
  # The damaged step is kept for inspection but out of the way: the run can write step 2 again.
  assert manager.all_steps() == [1] and [p.name.split("-")[0] for p in (tmp_path / "damaged").iterdir()] == ["2"]
  checkpoint.save(manager, 2, _state(2.0), {"epoch": 0, "index": 2})
  manager.wait_until_finished()
  assert checkpoint.why_damaged(manager, 2) is None
  manager.close()


def test_no_intact_step_refuses_with_one_line_per_step(tmp_path):
  _write(tmp_path)
  (tmp_path / "2" / "data" / "metadata").unlink()
  _flip_32_bytes(tmp_path / "1")
  manager = checkpoint.manager(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError, match=r"step 2 .* is damaged: data/metadata is missing; checkpoint "
                     r"step 1 .* is damaged: .* does not match its checksum; no intact step is left to resume from"):
    checkpoint.restore(manager, _state(0.0))
  assert manager.all_steps() == [1, 2]  # nothing moved when nothing can be restored
  manager.close()


def test_another_configs_checkpoint_is_not_called_damaged(tmp_path):
  _write(tmp_path)
  manager = checkpoint.manager(str(tmp_path))
  other = {**_state(0.0), "trainable": {"w": jnp.zeros((64, 16)), "b": jnp.zeros(32)}}
  with pytest.raises(checkpoint.CheckpointError, match=r"step 2 .* was written by another config .*: leaf "
                     r"\['trainable'\]\['w'\] is shape \(64, 32\) float32 there but shape \(64, 16\) float32 here"):
    checkpoint.restore(manager, other)
  assert manager.all_steps() == [1, 2]
  manager.close()


def test_manifest_lists_every_file_of_the_step(tmp_path):
  _write(tmp_path, steps=(1,))
  manifest = json.loads((tmp_path / "1" / "manifest.json").read_text())
  on_disk = {str(p.relative_to(tmp_path / "1")) for p in (tmp_path / "1").rglob("*") if p.is_file()}
  assert set(manifest["files"]) == on_disk - set(checkpoint.UNSEALED)
  assert {"state/_METADATA", "data/metadata"} <= set(manifest["files"])
  assert manifest["layout"]["['trainable']['w']"] == [[64, 32], "float32"]


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp, numpy as np
    from peftjax import checkpoint
    directory, phase = sys.argv[1], sys.argv[2]
    def pause(step, at):  # the test's parent kill -9s this process while it is stopped here
      if step == 2 and at == phase:
        os.kill(os.getpid(), signal.SIGSTOP)
    checkpoint.WRITE_HOOK = pause
    manager = checkpoint.manager(directory)
    for step in (1, 2):
      checkpoint.save(manager, step, {"step": jnp.int32(step), "w": jnp.full((64, 32), float(step))})
    manager.wait_until_finished()
""")


@pytest.mark.parametrize("phase", ["written", "sealed"])
def test_a_kill_during_the_checkpoint_write_keeps_the_previous_step(tmp_path, capsys, phase):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), phase], env=env, cwd=ROOT)
  _, status = os.waitpid(writer.pid, os.WUNTRACED)  # returns when the hook has stopped it inside the write
  assert os.WIFSTOPPED(status), f"the writer ended ({status}) instead of stopping at {phase!r}"
  os.kill(writer.pid, signal.SIGKILL)
  writer.wait()
  assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("_")) == ["1", "2.orbax-checkpoint-tmp"]
  manager = checkpoint.manager(str(tmp_path))
  state, _ = checkpoint.restore(manager, {"step": jnp.int32(0), "w": jnp.zeros((64, 32))})
  assert capsys.readouterr().out == ""  # a step killed before its commit is not a damaged step: it never existed
  assert int(state["step"]) == 1 and float(state["w"][0, 0]) == 1.0
  checkpoint.save(manager, 2, {"step": jnp.int32(2), "w": jnp.full((64, 32), 2.0)})
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2] and checkpoint.why_damaged(manager, 2) is None
  manager.close()
