"""A sweep: K LoRA adapters that differ in seed, learning rate, rank or alpha, trained in one compiled step.

The members are stacked as `peftjax.stacked_lora` stacks adapters (ranks zero-padded to the largest; each
member's scaling alpha / rank is data, not a constant), every batch is repeated once per member with the rows
of copy k adapted by member k (`stacked_lora.apply_grouped`: one batched matmul per layer over the members), and one
forward / backward pass over the frozen base computes every member's loss: member k's gradient lands only in its
own slot.  With `make_step(..., members_per_pass=m)` the members go m at a time, one pass after another inside
the compiled step, so only m members' activations are held at once.  The optimizer runs `jax.vmap`ped over the members'
slots and optimizer states, with each member's learning rate injected (`optax.inject_hyperparams`); the padded
rank columns are masked out of every update, so a member of rank r trains exactly its r columns.

Modules trained in full next to LoRA (Hugging Face PEFT's `modules_to_save`, e.g. a new classifier head) get one
copy per member, stacked the same way; each such module runs group k with member k's copy (`jax.vmap` of the
module's own call over the groups), so every member trains its own head.

Each member's losses equal a separate single-adapter run with the same settings (tests/test_sweep.py).
LoRA dropout is not supported in a sweep (members would need their own dropout draws per row), and the model runs
deterministically (no dropout of its own).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax as pj
from peftjax import stacked_lora
from peftjax import tree as ptree
from peftjax.methods import modules_to_save

SAVED = "sweep_saved"  # the variable collection holding the members' stacked modules_to_save copies


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


def init(cfg: pj.LoraConfig, members: Sequence[Member], params: dict, saved: str | Sequence[str] = (),
         member_key: Callable[[int], jax.Array] = jax.random.key) -> dict:
  """The sweep state {'trainable': {'lora': stacked lora_A / lora_B, 'saved': stacked copies of the `saved`
  modules (modules_to_save names or regex; () none)}, 'scaling', 'mask' (1 on each member's own rank columns)} for
  `members`, each initialised as `pj.init` with the key `member_key(seed)`; the optimizer: `init_optimizer`."""
  cfgs = member_configs(cfg, members)
  trees = [pj.init(c, member_key(m.seed), params) for c, m in zip(cfgs, members)]
  stacked = ptree.flatten(stacked_lora.stack(cfgs, trees))
  if any(v.ndim > (1 if p.endswith("/scaling") else 3) for p, v in stacked.items()):
    raise ValueError("a sweep needs a model without scanned layers (load it with scan_layers=False).")
  lora_trainable = {p: v for p, v in stacked.items() if not p.endswith("/scaling")}
  mask = {}
  for path, value in lora_trainable.items():
    ranks = jnp.asarray([c.module_rank(path.rsplit("/", 1)[0]) for c in cfgs])[:, None, None]
    columns = jnp.arange(value.shape[-1])[None, None, :] if path.endswith("lora_A") else \
        jnp.arange(value.shape[-2])[None, :, None]
    mask[path] = (columns < ranks).astype(jnp.float32)
  copies = {}
  if saved:
    leaves = modules_to_save.module_leaves(params, saved, "modules_to_save")
    both = sorted({p.rsplit("/", 1)[0] for p in leaves} & {p.rsplit("/", 1)[0] for p in lora_trainable})
    if both:
      raise ValueError(f"{both[0]!r} is both a LoRA target and a module to save; a sweep trains a module one way.")
    copies = {p: jnp.stack([v] * len(members))
              for p, v in ptree.flatten(modules_to_save.copy_leaves(params, leaves)).items()}
  return {"trainable": {"lora": ptree.unflatten(lora_trainable), "saved": ptree.unflatten(copies)},
          "scaling": ptree.unflatten({p: v for p, v in stacked.items() if p.endswith("/scaling")}),
          "mask": {"lora": ptree.unflatten(mask), "saved": ptree.unflatten(
              {p: jnp.ones(v.shape[:1] + (1,) * (v.ndim - 1), jnp.float32) for p, v in copies.items()})}}


def init_optimizer(make_tx: Callable[..., optax.GradientTransformation], state: dict,
                   members: Sequence[Member]) -> tuple[optax.GradientTransformation, Any]:
  """(tx, the members' stacked optimizer states): `make_tx(learning_rate=...)` (e.g. optax.adamw) with each
  member's learning rate injected into its own state."""
  tx = optax.inject_hyperparams(make_tx)(learning_rate=members[0].learning_rate)
  opt_state = jax.vmap(tx.init)(state["trainable"])
  opt_state.hyperparams["learning_rate"] = jnp.asarray([m.learning_rate for m in members], jnp.float32)
  return tx, opt_state


def _saved_interceptor(modules: dict[str, tuple[str, ...]], k: int):
  """Runs each module at a path of `modules` ({module path: its leaf names}) on group g of its input with member
  g's copy of the module's parameters (the SAVED collection), instead of with the base parameters."""
  def intercept(next_fun, args, kwargs, context):
    path = "/".join(context.module.path)
    if context.method_name != "__call__" or path not in modules:
      return next_fun(*args, **kwargs)
    copies = {name: context.module.get_variable(SAVED, name) for name in modules[path]}
    own = context.module.clone(parent=None)
    rows = [i for i, a in enumerate(args) if np.ndim(a)]  # the arrays split into groups; flags pass as they are

    def call(p, *grouped):
      given = list(args)
      for i, x in zip(rows, grouped):
        given[i] = x
      return own.apply({"params": p}, *given, **kwargs)
    out = jax.vmap(call)(copies, *(jnp.reshape(args[i], (k, -1, *np.shape(args[i])[1:])) for i in rows))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:]), out)
  return intercept


def make_forward(model_apply: Callable[..., Any]) -> Callable[..., Any]:
  """forward(trainable, scaling, params, *args, **kwargs) on a batch of K equal contiguous row groups (every
  input tiled K times), group k run with member k's LoRA and modules-to-save copies."""
  def forward(trainable, scaling, params, *args, **kwargs):
    k = jax.tree.leaves(scaling)[0].shape[-1]
    modules = {}
    for path in ptree.flatten(trainable["saved"]):
      module, name = path.rsplit("/", 1)
      modules[module] = modules.get(module, ()) + (name,)

    def with_saved(variables, *a, **kw):
      return model_apply({**variables, SAVED: trainable["saved"]}, *a, **kw)
    with nn.intercept_methods(_saved_interceptor(modules, k)):
      return stacked_lora.apply_grouped(with_saved)(params, ptree.combine(trainable["lora"], scaling), *args, **kwargs)
  return forward


def tiled(batch: dict, k: int) -> dict:
  """`batch` with every array repeated K times along its rows (group k: member k's copy)."""
  return jax.tree.map(lambda x: jnp.concatenate([x] * k, axis=0), batch)


def _chunked(tree: Any, passes: int) -> Any:
  """Every leaf's member axis (K, ...) split into (passes, K / passes, ...)."""
  return jax.tree.map(lambda x: x.reshape(passes, -1, *x.shape[1:]), tree)


def _merged(tree: Any) -> Any:
  """The inverse of `_chunked`: (passes, K / passes, ...) back to (K, ...)."""
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)


def make_step(model_apply: Callable[..., Any], row_losses: Callable[[Any, dict], jax.Array],
              tx: optax.GradientTransformation, inputs: Callable[[dict], dict | tuple],
              members_per_pass: int | None = None):
  """step(state, opt_state, params, batch) -> (state, opt_state, losses (K,)), jit-compiled.

  `inputs(batch)` gives the model's keyword inputs (a dict) or positional ones (a tuple), and
  `row_losses(outputs, batch)` the loss of every row (batch,); a member's loss is the mean over the batch's rows,
  as a single run's loss.  `members_per_pass` (a divisor of K; None: all K) is how many members share one
  forward / backward pass over the base: the passes run one after another inside the compiled step
  (`jax.lax.map`), so the activations held at once are those of `members_per_pass` members (1: one run's).
  """
  forward = make_forward(model_apply)

  def losses(trainable, scaling, params, batch, k):
    rows = jax.tree.leaves(batch)[0].shape[0]
    batch = tiled(batch, k)
    given = inputs(batch)
    args, kwargs = (given, {}) if isinstance(given, tuple) else ((), given)
    per_row = row_losses(forward(trainable, scaling, params, *args, **kwargs), batch)
    member = per_row.reshape(k, rows).mean(axis=1)
    return member.sum(), member

  @jax.jit
  def step(state, opt_state, params, batch):
    k = jax.tree.leaves(state["scaling"])[0].shape[-1]
    per_pass = k if members_per_pass is None else members_per_pass
    if per_pass < 1 or k % per_pass:
      raise ValueError(f"members_per_pass={members_per_pass} must divide the sweep's {k} members.")

    def one_pass(chunk):
      return jax.grad(losses, has_aux=True)(chunk[0], chunk[1], params, batch, per_pass)
    if per_pass == k:
      grads, member = one_pass((state["trainable"], state["scaling"]))
    else:
      chunks = _chunked((state["trainable"], state["scaling"]), k // per_pass)
      grads, member = _merged(jax.lax.map(one_pass, chunks))
    updates, opt_state = jax.vmap(tx.update)(grads, opt_state, state["trainable"])
    updates = jax.tree.map(jnp.multiply, updates, state["mask"])
    return {**state, "trainable": optax.apply_updates(state["trainable"], updates)}, opt_state, member
  return step


def member_adapter(cfg: pj.LoraConfig, members: Sequence[Member], state: dict, k: int) -> tuple[pj.LoraConfig, dict]:
  """(config, adapter tree) of member k, cut to its own ranks: what `peftjax.interop.save_adapter` exports."""
  member_cfg = member_configs(cfg, members)[k]
  out = {}
  for path, value in ptree.flatten(state["trainable"]["lora"]).items():
    r = member_cfg.module_rank(path.rsplit("/", 1)[0])
    out[path] = value[k][..., :r] if path.endswith("lora_A") else value[k][..., :r, :]
  return member_cfg, ptree.unflatten(out)


def member_saved(state: dict, k: int) -> dict:
  """Member k's trained modules-to-save copies (a sparse tree over the base params; {} without any)."""
  return jax.tree.map(lambda v: v[k], state["trainable"]["saved"])
