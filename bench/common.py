"""Helpers shared by the benchmarks: timing, and one AdamW training step in JAX and in PyTorch."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import optax

LEARNING_RATE = 1e-4


def median_times(step: Callable[[], Any], repeats: int, warmup: int = 2) -> tuple[float, float]:
  """Median (wall, process CPU) seconds of `repeats` calls of `step` after `warmup` untimed calls.

  CPU time counts every thread of the process; on a shared machine it moves less with the load than wall time.
  """
  for _ in range(warmup):
    step()
  walls, cpus = [], []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return statistics.median(walls), statistics.median(cpus)


def median_seconds(step: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
  """Median wall time of `repeats` calls of `step` after `warmup` untimed calls."""
  return median_times(step, repeats, warmup)[0]


def interleaved_times(steps: dict[str, Callable[[], Any]], repeats: int, rounds: int = 3
                      ) -> dict[str, tuple[float, float]]:
  """Per step, the medians over `rounds` of its median (wall, CPU) seconds; the steps take turns so machine noise
  hits them alike."""
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      times[name].append(median_times(step, repeats))
  return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}


def interleaved_medians(steps: dict[str, Callable[[], Any]], repeats: int, rounds: int = 3) -> dict[str, float]:
  """Per step, the median over `rounds` of its median wall seconds (see `interleaved_times`)."""
  return {name: wall for name, (wall, _) in interleaved_times(steps, repeats, rounds).items()}


def jax_adamw_step(loss: Callable[..., Any], trainable: Any, *frozen: Any):
  """(run, lowered): `run()` takes one jit-compiled AdamW step on `trainable`, differentiating
  loss(trainable, *frozen) in its first argument only, and waits for it; `lowered` is the step lowered
  for XLA (its `.compile().cost_analysis()` counts the FLOPs)."""
  tx = optax.adamw(LEARNING_RATE)

  @jax.jit
  def step(trainable, opt_state, *frozen):
    grads = jax.grad(loss)(trainable, *frozen)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  state = [trainable, tx.init(trainable)]

  def run():
    state[:] = step(*state, *frozen)
    jax.block_until_ready(state)
  return run, step.lower(*state, *frozen)


def torch_adamw_step(model, inputs: dict, autocast: bool = False):
  """(run, device): `run()` takes one AdamW step of model(**inputs).loss over the parameters that require
  gradients, in training mode with dropout off (as the JAX steps, deterministic=True), on cuda when available;
  `autocast` runs the forward under torch.autocast(bfloat16), as a PyTorch user turns on bf16."""
  import torch

  model.train()
  for module in model.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(device)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
  inputs = {k: torch.as_tensor(v, device=device) for k, v in inputs.items()}

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      loss = model(**inputs).loss
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
  return run, device
