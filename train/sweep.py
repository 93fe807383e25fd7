"""A sweep: K LoRA adapters that differ in seed, learning rate, rank or alpha, trained in one compiled step.

The members are stacked as `peftjax.stacked_lora` stacks adapters (ranks zero-padded to the largest; each
member's scaling alpha / rank is data, not a constant), every batch is repeated once per member with the rows
of copy k adapted by member k (`stacked_lora.apply_grouped`: one batched matmul per layer over the members), and one
forward / backward pass over the frozen base computes every member's loss: member k's gradient lands only in its
own slot.  The optimizer runs `jax.vmap`ped over the members'
slots and optimizer states, with each member's learning rate injected (`optax.inject_hyperparams`); the padded
rank columns are masked out of every update, so a member of rank r trains exactly its r columns.

Each member's losses equal a separate single-adapter run with the same settings (tests/test_sweep.py).
LoRA dropout is not supported in a sweep (members would need their own dropout draws per row).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

import peftjax as pj
from peftjax import stacked_lora
from peftjax import tree as ptree


@dataclasses.dataclass(frozen=True)
class Member:
  """One sweep member's settings (None: the base config's / the sweep's default)."""

  seed: int = 0
  learning_rate: float = 1e-3
  rank: int | None = None
  alpha: float | None = None


def member_configs(cfg: pj.LoraConfig, members: Sequence[Member]) -> list[pj.LoraConfig]:
  """Each member's LoraConfig: `cfg` with the member's rank and alpha."""
  if cfg.dropout:
    raise ValueError(f"LoraConfig.dropout={cfg.dropout}: a sweep trains without LoRA dropout; set it to 0.")
  return [dataclasses.replace(cfg, rank=m.rank or cfg.rank, alpha=cfg.alpha if m.alpha is None else m.alpha)
          for m in members]


def init(cfg: pj.LoraConfig, members: Sequence[Member], params: dict) -> dict:
  """The sweep state {'trainable': stacked lora_A / lora_B, 'scaling', 'mask' (1 on each member's own rank
  columns)} for `members`, each initialised as `pj.init` with its own seed; the optimizer: `init_optimizer`."""
  cfgs = member_configs(cfg, members)
  trees = [pj.init(c, jax.random.key(m.seed), params) for c, m in zip(cfgs, members)]
  stacked = ptree.flatten(stacked_lora.stack(cfgs, trees))
  if any(v.ndim > (1 if p.endswith("/scaling") else 3) for p, v in stacked.items()):
    raise ValueError("a sweep needs a model without scanned layers (load it with scan_layers=False).")
  trainable = {p: v for p, v in stacked.items() if not p.endswith("/scaling")}
  mask = {}
  for path, value in trainable.items():
    ranks = jnp.asarray([c.module_rank(path.rsplit("/", 1)[0]) for c in cfgs])[:, None, None]
    columns = jnp.arange(value.shape[-1])[None, None, :] if path.endswith("lora_A") else \
        jnp.arange(value.shape[-2])[None, :, None]
    mask[path] = (columns < ranks).astype(jnp.float32)
  return {"trainable": ptree.unflatten(trainable),
          "scaling": ptree.unflatten({p: v for p, v in stacked.items() if p.endswith("/scaling")}),
          "mask": ptree.unflatten(mask)}


def init_optimizer(make_tx: Callable[..., optax.GradientTransformation], state: dict,
                   members: Sequence[Member]) -> tuple[optax.GradientTransformation, Any]:
  """(tx, the members' stacked optimizer states): `make_tx(learning_rate=...)` (e.g. optax.adamw) with each
  member's learning rate injected into its own state."""
  tx = optax.inject_hyperparams(make_tx)(learning_rate=members[0].learning_rate)
  opt_state = jax.vmap(tx.init)(state["trainable"])
  opt_state.hyperparams["learning_rate"] = jnp.asarray([m.learning_rate for m in members], jnp.float32)
  return tx, opt_state


def make_step(model_apply: Callable[..., Any], row_losses: Callable[[Any, dict], jax.Array],
              tx: optax.GradientTransformation, inputs: Callable[[dict], dict]):
  """step(state, opt_state, params, batch) -> (state, opt_state, losses (K,)), jit-compiled.

  `inputs(batch)` gives the model's keyword inputs and `row_losses(outputs, batch)` the loss of every row
  (batch,); a member's loss is the mean over the batch's rows, as a single run's loss.
  """
  grouped = stacked_lora.apply_grouped(model_apply)

  def losses(trainable, scaling, params, batch, k):
    rows = jax.tree.leaves(batch)[0].shape[0]
    tiled = jax.tree.map(lambda x: jnp.concatenate([x] * k, axis=0), batch)
    stacked = ptree.combine(trainable, scaling)
    per_row = row_losses(grouped(params, stacked, **inputs(tiled)), tiled)
    member = per_row.reshape(k, rows).mean(axis=1)
    return member.sum(), member

  @jax.jit
  def step(state, opt_state, params, batch):
    k = jax.tree.leaves(state["scaling"])[0].shape[0]
    grads, member = jax.grad(losses, has_aux=True)(state["trainable"], state["scaling"], params, batch, k)
    updates, opt_state = jax.vmap(tx.update)(grads, opt_state, state["trainable"])
    updates = jax.tree.map(jnp.multiply, updates, state["mask"])
    return {**state, "trainable": optax.apply_updates(state["trainable"], updates)}, opt_state, member
  return step


def member_adapter(cfg: pj.LoraConfig, members: Sequence[Member], state: dict, k: int) -> tuple[pj.LoraConfig, dict]:
  """(config, adapter tree) of member k, cut to its own ranks: what `peftjax.interop.save_adapter` exports."""
  member_cfg = member_configs(cfg, members)[k]
  out = {}
  for path, value in ptree.flatten(state["trainable"]).items():
    r = member_cfg.module_rank(path.rsplit("/", 1)[0])
    out[path] = value[k][..., :r] if path.endswith("lora_A") else value[k][..., :r, :]
  return member_cfg, ptree.unflatten(out)
