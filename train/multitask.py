"""Multi-task: K LoRA adapters trained at once on K datasets, each batch row tagged with its task.

The adapters are stacked as a sweep's members (`train.sweep.init`: ranks padded and masked, each its own seed,
learning rate, rank and alpha, and `train.sweep.init_optimizer`), but the batch is not repeated: row b runs with
adapter task_ids[b] (`stacked_lora.apply`, the rows gathering their own A and B over one shared base matmul), and
task k's loss is the mean over its rows, so its gradient comes from its own rows only.  A task with no rows in a
batch keeps its adapter and optimizer state unchanged, as if that step had not happened to it; so each adapter
trains exactly as a single-task run over the same rows of its own dataset would (tests/test_multitask.py).
Modules trained in full next to LoRA (modules_to_save, e.g. a classifier's new head and BERT's pooler) get one
copy per task stacked on a leading task axis (`train.sweep.init`'s 'saved'); row b runs each such module with its
task's copy, gathered per row (y_b = x_b @ W[task_b] + bias[task_b]), so a copy's gradient comes from its own
task's rows only, and it has its own optimizer state like its adapter.  `python -m train` with a config.multitask
section runs it over K datasets (`train.multitask_run`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import stacked_lora
from peftjax import tree as ptree
from train import sweep


def _saved_rows(modules: dict[str, tuple[str, ...]], task_ids: jax.Array):
  """Runs each module at a path of `modules` ({module path: its leaf names}) on row b of its input with task
  task_ids[b]'s copy of the module's parameters (the sweep.SAVED collection), instead of the base parameters."""
  def intercept(next_fun, args, kwargs, context):
    path = "/".join(context.module.path)
    if context.method_name != "__call__" or path not in modules:
      return next_fun(*args, **kwargs)
    copies = {name: context.module.get_variable(sweep.SAVED, name)[task_ids] for name in modules[path]}
    own = context.module.clone(parent=None)
    rows = [i for i, a in enumerate(args) if np.ndim(a)]  # the arrays split into rows; flags pass as they are

    def call(p, *row):
      given = list(args)
      for i, x in zip(rows, row):
        given[i] = x[None]
      return jax.tree.map(lambda o: o[0], own.apply({"params": p}, *given, **kwargs))
    return jax.vmap(call)(copies, *(args[i] for i in rows))
  return intercept


def make_forward(model_apply: Callable[..., Any]) -> Callable[..., Any]:
  """forward(trainable, scaling, params, task_ids, *args, **kwargs): `model_apply` with row b run by task
  task_ids[b]'s LoRA adapter and modules-to-save copies (`trainable` and `scaling` as `train.sweep.init` makes)."""
  def forward(trainable, scaling, params, task_ids, *args, **kwargs):
    ids = jnp.asarray(task_ids, jnp.int32)
    modules = {}
    for path in ptree.flatten(trainable["saved"]):
      module, name = path.rsplit("/", 1)
      modules[module] = modules.get(module, ()) + (name,)

    def with_saved(variables, *a, **kw):
      return model_apply({**variables, sweep.SAVED: trainable["saved"]}, *a, **kw)
    with nn.intercept_methods(_saved_rows(modules, ids)):
      return stacked_lora.apply(with_saved)(params, ptree.combine(trainable["lora"], scaling), ids, *args, **kwargs)
  return forward


def make_step(model_apply: Callable[..., Any], row_losses: Callable[[Any, dict], jax.Array],
              tx: optax.GradientTransformation, inputs: Callable[[dict], dict | tuple]):
  """step(state, opt_state, params, batch, task_ids) -> (state, opt_state, losses (K,)), jit-compiled.

  `task_ids` (batch,) names each row's task (0 .. K-1); `inputs(batch)` gives the model's keyword (dict) or
  positional (tuple) inputs and `row_losses(outputs, batch)` each row's loss.  A task's loss is the mean over its
  rows (0 for a task without rows, whose state is left as it was).
  """
  forward = make_forward(model_apply)

  def losses(trainable, scaling, params, batch, task_ids, k):
    given = inputs(batch)
    args, kwargs = (given, {}) if isinstance(given, tuple) else ((), given)
    per_row = row_losses(forward(trainable, scaling, params, task_ids, *args, **kwargs), batch)
    rows = jax.nn.one_hot(task_ids, k, dtype=per_row.dtype)  # (batch, K)
    member = (rows * per_row[:, None]).sum(axis=0) / jnp.maximum(rows.sum(axis=0), 1.0)
    return member.sum(), member

  @jax.jit
  def step(state, opt_state, params, batch, task_ids):
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
