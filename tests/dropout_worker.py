"""Trains tiny models with dropout on under several meshes and micro-batch counts and prints each run's losses
as JSON on the last line of stdout.

Not a test file: tests/test_dropout_rows.py starts it in a subprocess, because the device count (XLA_FLAGS)
must be set before JAX starts.  `python tests/dropout_worker.py FAMILY/METHOD ...` (8 simulated CPU devices).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from peftjax import distributed, sharding  # noqa: E402

from train import steps  # noqa: E402

import dropout_cases  # noqa: E402  (tests/ is this script's folder)

STEPS = 2
# (mesh shape, micro-batches); the first, the whole batch on one device, is the reference.
SETUPS = [((1, 1, 1), 1), ((1, 1, 1), 2), ((1, 1, 1), 4), ((8, 1, 1), 1), ((2, 2, 2), 2)]
TX = optax.adamw(1e-2)


def losses(family: str, method: str, mesh_shape, micro_batches: int, rate: float = dropout_cases.RATE) -> list:
  """The logged losses of STEPS steps on one batch."""
  task, model, params, _, adapters, forward = dropout_cases.setup(family, method, rate)
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  params_shardings = sharding.param_shardings(sharding.model_logical_axes(model), params, mesh)
  state_shardings = sharding.state_shardings(TX, adapters, sharding.adapter_shardings(adapters, params_shardings))
  state = sharding.place({"step": np.int32(0), "trainable": adapters, "opt_state": TX.init(adapters)},
                         state_shardings)
  frozen = sharding.place(params, params_shardings)
  step = sharding.make_train_step(steps.make_loss(forward, task), TX, state_shardings, params_shardings,
                                  micro_batches=micro_batches)
  rows = dropout_cases.batch(family)
  logged = []
  for _ in range(STEPS):
    batch = distributed.load_local(rows, np.arange(dropout_cases.ROWS), sharding.batch_sharding(mesh))
    state, metrics = step(state, frozen, batch)
    logged.append(float(metrics["loss"]))
  return logged


def main(cases: list[str]) -> dict:
  results = {}
  for case in cases:
    family, method = case.split("/")
    runs = {f"{mesh}x{micro}": losses(family, method, mesh, micro) for mesh, micro in SETUPS}
    runs["no dropout"] = losses(family, method, *SETUPS[0], rate=0.0)
    results[case] = runs
  return results


if __name__ == "__main__":
  print(json.dumps(main(sys.argv[1:])))
