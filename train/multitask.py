"""Multi-task: K LoRA adapters trained at once on K datasets, each batch row tagged with its task.

The adapters are stacked as a sweep's members (`train.sweep.init`: ranks padded and masked, each its own seed,
learning rate, rank and alpha, and `train.sweep.init_optimizer`), but the batch is not repeated: row b runs with
adapter task_ids[b] (`stacked_lora.apply`, the rows gathering their own A and B over one shared base matmul), and
task k's loss is the mean over its rows, so its gradient comes from its own rows only.  A task with no rows in a
batch keeps its adapter and optimizer state unchanged, as if that step had not happened to it; so each adapter
trains exactly as a single-task run over the same rows of its own dataset would (tests/test_multitask.py).
Modules trained in full (modules_to_save) are not supported here.  `python -m train` with a config.multitask
section runs it over K datasets (`train.multitask_run`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from peftjax import stacked_lora
from peftjax import tree as ptree


def make_step(model_apply: Callable[..., Any], row_losses: Callable[[Any, dict], jax.Array],
              tx: optax.GradientTransformation, inputs: Callable[[dict], dict | tuple]):
  """step(state, opt_state, params, batch, task_ids) -> (state, opt_state, losses (K,)), jit-compiled.

  `task_ids` (batch,) names each row's task (0 .. K-1); `inputs(batch)` gives the model's keyword (dict) or
  positional (tuple) inputs and `row_losses(outputs, batch)` each row's loss.  A task's loss is the mean over its
  rows (0 for a task without rows, whose state is left as it was).
  """
  mixed = stacked_lora.apply(model_apply)

  def losses(trainable, scaling, params, batch, task_ids, k):
    given = inputs(batch)
    args, kwargs = (given, {}) if isinstance(given, tuple) else ((), given)
    per_row = row_losses(mixed(params, ptree.combine(trainable["lora"], scaling), task_ids, *args, **kwargs), batch)
    rows = jax.nn.one_hot(task_ids, k, dtype=per_row.dtype)  # (batch, K)
    member = (rows * per_row[:, None]).sum(axis=0) / jnp.maximum(rows.sum(axis=0), 1.0)
    return member.sum(), member

  @jax.jit
  def step(state, opt_state, params, batch, task_ids):
    if jax.tree.leaves(state["trainable"]["saved"]):
      raise ValueError("multi-task training takes LoRA adapters only; initialise the state without modules to save.")
    k = jax.tree.leaves(state["scaling"])[0].shape[-1]
    task_ids = jnp.asarray(task_ids, jnp.int32)
    grads, member = jax.grad(losses, has_aux=True)(state["trainable"], state["scaling"], params, batch, task_ids, k)
    updates, new_opt_state = jax.vmap(tx.update)(grads, opt_state, state["trainable"])
    present = jnp.any(task_ids[:, None] == jnp.arange(k)[None, :], axis=0)  # (K,): the tasks with rows here
    keep = lambda new, old: jnp.where(present.reshape(-1, *[1] * (new.ndim - 1)), new, old)  # noqa: E731
    updates = jax.tree.map(lambda u, m: u * m * present.reshape(-1, *[1] * (u.ndim - 1)), updates, state["mask"])
    trainable = optax.apply_updates(state["trainable"], updates)
    return {**state, "trainable": trainable}, jax.tree.map(keep, new_opt_state, opt_state), member
  return step
