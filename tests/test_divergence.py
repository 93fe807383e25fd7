"""Diverging runs: the step skips non-finite parameters too, config.on_nonfinite / max_consecutive_skips stop the run,
and no writer (checkpoint, adapter tree or folder, merged model) ever writes a NaN or inf."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from peftjax import checkpoint, distributed, finite, interop, sharding
from peftjax.models import hf_io

import test_train  # tests/ is on sys.path under pytest
import train
from train import divergence


def _linear_step(learning_rate: float):
  """A sharded SGD step on loss = sum(x @ w): its gradient is finite whatever w is."""
  mesh = sharding.make_mesh((1, -1, 1))
  tx = optax.sgd(learning_rate)
  trainable = {"w": jnp.ones((4, 2), jnp.float32)}
  shardings = sharding.state_shardings(tx, trainable, {"w": sharding.replicated(mesh)})
  loss = lambda trainable, frozen, batch, rng: (jnp.sum(batch["x"] @ trainable["w"]), jnp.float32(1))  # noqa: E731
  step = sharding.make_train_step(loss, tx, shardings, {}, donate=False)
  state = sharding.place({"step": np.int32(0), "trainable": trainable, "opt_state": tx.init(trainable)}, shardings)
  return step, state, {"x": jnp.full((2, 4), 10.0)}


def test_an_update_to_infinite_parameters_is_skipped():
  step, state, batch = _linear_step(1e38)  # gradient 20 per weight: w - 2e39 overflows float32
  after, metrics = step(state, {}, batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(metrics["skipped"]) == 1 and int(metrics["nonfinite"]) == 4
  assert sharding.nonfinite_names(int(metrics["nonfinite"])) == ["updated parameters or optimizer state"]
  np.testing.assert_array_equal(after["trainable"]["w"], np.ones((4, 2)))
  assert int(after["step"]) == 1
  # Control: a learning rate that stays finite applies the update.
  step, state, batch = _linear_step(1e-3)
  after, metrics = step(state, {}, batch)
  assert int(metrics["nonfinite"]) == 0
  np.testing.assert_allclose(after["trainable"]["w"], np.full((4, 2), 1 - 0.02), rtol=1e-6)


def _metrics(flags: int) -> dict:
  return {"nonfinite": np.int32(flags)}


def _guard(**settings) -> divergence.Guard:
  return divergence.Guard(ml_collections.ConfigDict({**settings, "optimizer": {"learning_rate": 0.5}}))


def test_skip_counts_and_stops_after_max_consecutive_skips():
  guard = _guard(on_nonfinite="skip", max_consecutive_skips=3)
  assert guard.observe(1, _metrics(3)) == "step 1 skipped: non-finite loss, gradients (1 in a row, 1 in all)"
  assert guard.observe(2, _metrics(0)) is None  # an applied step resets the count
  guard.observe(3, _metrics(1))
  guard.observe(4, _metrics(2))
  with pytest.raises(divergence.Diverged, match=r"steps 3-5: 3 steps in a row were skipped \(last: non-finite updated "
                     r"parameters or optimizer state\), config\.max_consecutive_skips=3; .*learning_rate \(now 0\.5\)"):
    guard.observe(5, _metrics(4))
  assert guard.total == 4
  never = _guard(on_nonfinite="skip", max_consecutive_skips=0)
  for step in range(100):
    never.observe(step, _metrics(1))


def test_stop_ends_at_the_first_non_finite_step():
  guard = _guard(on_nonfinite="stop", max_consecutive_skips=20)
  assert guard.observe(1, _metrics(0)) is None
  with pytest.raises(divergence.Diverged, match=r"^step 2: non-finite loss, gradients and config\.on_nonfinite='stop'"):
    guard.observe(2, _metrics(3))


@pytest.mark.parametrize("key, value, message", [
    ("on_nonfinite", "ignore", r"config\.on_nonfinite='ignore' is not a known policy; valid: \['skip', 'stop'\]"),
    ("max_consecutive_skips", -1, r"config\.max_consecutive_skips=-1 must be 0 \(never stop\) or a positive integer"),
])
def test_bad_nonfinite_settings_are_refused_before_any_compute(tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message):
    train.main(test_train.tiny_config(tmp_path / "run", **{key: value}))
  assert not os.path.exists(tmp_path / "run")


def test_every_writer_refuses_non_finite_values(tmp_path):
  good = {"w": np.ones((2, 3), np.float32)}
  bad = {"w": np.array([[1.0, np.inf, 2.0], [np.nan, 0.0, 1.0]], np.float32), "ids": np.array([1, 2])}
  assert finite.nonfinite_counts(bad) == {"w": 2} and finite.all_finite(good)
  assert finite.nonfinite_counts({"a": {"b": jnp.array([jnp.nan, 1.0])}}) == {"a/b": 1}

  # A Hugging Face model folder (every family's save_pretrained) and a PEFT adapter folder: the good files stay.
  hf_io.write_folder(str(tmp_path / "model"), {"model_type": "t5"}, good)
  with pytest.raises(finite.NonFiniteError, match=r"refusing to write the model '.*model/model\.safetensors': "
                     r"2 values in 1 tensor\(s\) are NaN or inf \(first: 'w', 2 values\)"):
    hf_io.write_folder(str(tmp_path / "model"), {"model_type": "t5"}, bad)
  np.testing.assert_array_equal(hf_io.read_state_dict(str(tmp_path / "model"))["w"], good["w"])
  interop.write_folder(str(tmp_path / "adapter"), {"peft_type": "LORA"}, good)
  with pytest.raises(finite.NonFiniteError, match=r"the adapter '.*adapter/adapter_model\.safetensors'"):
    interop.write_folder(str(tmp_path / "adapter"), {"peft_type": "LORA"}, bad)
  assert sorted(os.listdir(tmp_path)) == ["adapter", "model"]  # no temporary folder left behind

  # A merged model gathered for export, an Orbax adapter tree and a train-state checkpoint.
  written = []
  with pytest.raises(finite.NonFiniteError, match=r"the model '.*merged'"):
    distributed.export_merged(lambda *args: written.append(args), None, {"lm_head": {"kernel": jnp.array(bad["w"])}},
                              str(tmp_path / "merged"))
  assert written == []
  with pytest.raises(finite.NonFiniteError, match="the adapter tree"):
    checkpoint.save_adapters(str(tmp_path / "tree"), {"w": jnp.array(bad["w"])})
  manager = checkpoint.manager(str(tmp_path / "checkpoints"))
  with pytest.raises(finite.NonFiniteError, match=r"checkpoint step 7 .* \(the last good step is kept\)"):
    checkpoint.save(manager, 7, {"w": jax.numpy.array(bad["w"])})
  manager.close()
  assert not os.path.exists(tmp_path / "merged") and not os.path.exists(tmp_path / "tree")
  assert os.listdir(tmp_path / "checkpoints") in ([], ["_ROOT_METADATA"])


@pytest.mark.slow
def test_a_diverging_run_stops_and_writes_nothing_non_finite(tmp_path):
  # learning_rate 1e30: the first updates are finite but huge, then every loss is NaN (issue 13's run).
  config = test_train.tiny_config(tmp_path, max_consecutive_skips=3, **{"optimizer.learning_rate": 1e30})
  with pytest.raises(divergence.Diverged, match=r"steps \d+-\d+: 3 steps in a row were skipped .*non-finite loss"):
    train.main(config)
  assert not os.path.exists(tmp_path / "merged") and not os.path.exists(tmp_path / "adapter")
  manager = checkpoint.manager(str(tmp_path / "checkpoints"))
  assert manager.all_steps()
  for step in manager.all_steps():
    state, _ = checkpoint.restore(manager, None, step)
    assert checkpoint.all_finite(state) and int(state["step"]) == step
  manager.close()
