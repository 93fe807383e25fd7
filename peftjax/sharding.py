"""Sharding on a named device mesh: mesh from a config tuple, logical-axis rules, placement, a sharded train step.

The mesh has the axes (data, fsdp, tensor).  Every model parameter carries logical axis names (set with
`nn.with_logical_partitioning` in the model files: 'embed', 'mlp', 'joined_kv', 'vocab', 'heads', 'layers', ...);
*rules*, a list of (logical name, mesh axis / tuple of mesh axes / None), map them to mesh axes.  A dimension
whose size the mesh axes do not divide, or whose mesh axis is already used by another dimension of the same
array, falls back to the next matching rule and finally to replication.

Adapters follow the weight they adapt: LoRA A (*stack, in, r) takes the kernel's input-dimension sharding,
B (*stack, r, out) its output-dimension sharding, and the rank dimension is replicated; (IA)³ vectors and the
DoRA magnitude take the sharding of the dimension they scale; leaves that copy a base leaf (BitFit,
modules_to_save) take that leaf's sharding; any other adapter leaf is replicated.  Optimizer moments take
the sharding of the leaf they belong to.  Batches are split over (data, fsdp) along their leading axis.

The same code runs on one CPU, simulated CPU devices, several processes, GPUs and TPU pods.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from peftjax import api, dropout, tree as ptree

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical names used by peftjax's models -> mesh axes (FSDP over the model width, tensor parallelism over
# heads / MLP / vocabulary).  Names not listed are replicated.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("joined_kv", "tensor"),
    ("heads", "tensor"),
    ("layers", None),
    ("norm", None),
)
# Adapter leaf name -> which dimension of the adapted kernel's spec each of its two trailing axes follows
# ("in", "out", or None for replicated).  Vectors have one trailing axis.
ADAPTER_LEAVES = {
    "lora_A": ("in", None),
    "lora_B": (None, "out"),
    "ia3_out": ("out",),
    "ia3_in": ("in",),
    "lora_magnitude_vector": ("out",),
}

Rules = Sequence[tuple[str, Any]]


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """`shape` with its (at most one) -1 replaced so that the product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  known = math.prod(s for s in shape if s != -1)
  if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
    raise ValueError(f"mesh shape {shape} must hold positive sizes and at most one -1 (\"the rest\").")
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape}: {num_devices} devices are not a multiple of {known}.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are available; "
                     "use -1 for one axis to take the rest.")
  return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), axes: Sequence[str] = MESH_AXES,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all devices of all processes) with the named axes; -1 takes the rest.

  Device order follows `jax.make_mesh` (topology-aware on TPU; process-contiguous across hosts).
  """
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} has {len(shape)} sizes but the mesh has axes {tuple(axes)}.")
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(mesh_shape(shape, len(devices)), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices)


def _check_rules(rules: Rules, mesh: Mesh) -> None:
  for name, target in rules:
    for axis in (target if isinstance(target, (tuple, list)) else (target,)):
      if axis is not None and axis not in mesh.axis_names:
        raise ValueError(f"logical-axis rule ({name!r}, {target!r}) names mesh axis {axis!r}; "
                         f"valid mesh axes: {list(mesh.axis_names)} or None.")


def mesh_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
  """The mesh PartitionSpec of an array of `shape` whose dimensions have the `logical` names.

  For each dimension the first rule for its name whose mesh axes are unused in this array and divide the
  dimension wins; otherwise the dimension is replicated.
  """
  _check_rules(rules, mesh)
  logical = tuple(logical) + (None,) * (len(shape) - len(logical))
  used, spec = set(), []
  for name, size in zip(logical, shape):
    chosen = None
    for rule_name, target in rules:
      axes = tuple(a for a in (target if isinstance(target, (tuple, list)) else (target,)) if a is not None)
      if (rule_name == name and name is not None and axes and not used & set(axes)
          and size % math.prod(mesh.shape[a] for a in axes) == 0):
        chosen = axes[0] if len(axes) == 1 else axes
        used |= set(axes)
        break
    spec.append(chosen)
  return P(*spec)


def model_logical_axes(model: Any) -> dict:
  """Tree of logical-axis PartitionSpecs of `model`'s parameters (from its family module's `logical_axes`)."""
  family = sys.modules[type(model).__module__]
  if not hasattr(family, "logical_axes"):
    raise ValueError(f"{type(model).__name__} (module {family.__name__}) defines no logical_axes(model); "
                     "pass the logical-axis tree yourself.")
  return family.logical_axes(model)


def param_shardings(logical_axes: Any, params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedSharding tree for `params` (arrays or ShapeDtypeStructs) from its logical-axis tree and `rules`."""
  flat_axes = ptree.flatten(logical_axes)
  out = {}
  for path, leaf in ptree.flatten(params).items():
    if path not in flat_axes:
      raise ValueError(f"parameter {path!r} has no entry in the logical-axis tree; it has "
                       f"{len(flat_axes)} entries, e.g. {next(iter(flat_axes), None)!r}.")
    out[path] = NamedSharding(mesh, mesh_spec(tuple(flat_axes[path] or ()), np.shape(leaf), mesh, rules))
  return ptree.unflatten(out)


def adapter_spec(path: str, ndim: int, base: dict[str, P]) -> P:
  """Spec of one adapter leaf from the base tree's mesh specs (see the module docstring)."""
  if path in base:
    return base[path]
  module, name = path.rsplit("/", 1) if "/" in path else ("", path)
  kernel = base.get(f"{module}/kernel")
  if name not in ADAPTER_LEAVES or kernel is None:
    return P()
  kernel = tuple(kernel) + (None,) * (2 - len(kernel))
  dims = {"in": kernel[-2] if len(kernel) >= 2 else None, "out": kernel[-1]}
  follows = ADAPTER_LEAVES[name]
  stack = tuple(kernel[:-2])[: ndim - len(follows)]
  return P(*stack, *(dims[f] if f else None for f in follows))


def adapter_shardings(adapters: Any, params_shardings: Any) -> Any:
  """NamedSharding tree for an adapter tree (or a tuple of them) that follows the adapted weights' shardings."""
  if isinstance(adapters, tuple):
    return tuple(adapter_shardings(a, params_shardings) for a in adapters)
  flat_base = ptree.flatten(params_shardings)
  mesh = next(iter(flat_base.values())).mesh
  base = {p: s.spec for p, s in flat_base.items()}
  roots = {p.split("/")[0] for p in base}

  def in_base(path: str) -> str:
    """The path from the parameters' root: a method may nest sub-trees under its own names (UniPELT: lora/...)."""
    parts = path.split("/")
    return "/".join(parts[next((i for i, part in enumerate(parts) if part in roots), 0):])
  return ptree.unflatten({p: NamedSharding(mesh, adapter_spec(in_base(p), np.ndim(x), base))
                          for p, x in ptree.flatten(adapters).items()})


def opt_state_shardings(tx: optax.GradientTransformation, trainable: Any, trainable_shardings: Any) -> Any:
  """NamedSharding tree for `tx.init(trainable)`: moments like their parameter, everything else replicated."""
  mesh = jax.tree.leaves(trainable_shardings)[0].mesh
  abstract = jax.eval_shape(tx.init, trainable)
  replicated = NamedSharding(mesh, P())
  return optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, abstract, trainable_shardings,
      transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading (example) axis split over the mesh's (data, fsdp) axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that puts a full copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def place(tree: Any, shardings: Any) -> Any:
  """Global arrays with the given shardings, built shard by shard from `tree`'s values (same on every process).

  Works across processes: each process only materialises its addressable shards, one leaf at a time.
  """
  def put(x, sharding):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda y: y, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


def abstract(tree: Any, shardings: Any) -> Any:
  """jax.ShapeDtypeStruct tree of `tree` with `shardings`: a restore target for an Orbax checkpoint."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """`tree` with its floating-point leaves cast to `dtype` (e.g. frozen base weights stored in bfloat16)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_remat(model: Any) -> Any:
  """`model` with per-layer rematerialisation (activations recomputed in the backward pass)."""
  if "remat" not in getattr(type(model), "__dataclass_fields__", {}):
    raise ValueError(f"{type(model).__name__} has no remat option; remat is available for T5, the Llama family, "
                     "GPT-2 and BERT/RoBERTa models.")
  return model.clone(remat=True)


def merge(cfg: Any, params: Any, adapters: Any, params_shardings: Any) -> Any:
  """`peftjax.merge` under jit with the result sharded like the parameters: no device holds the whole model."""
  return jax.jit(functools.partial(api.merge, cfg), out_shardings=params_shardings)(params, adapters)


def state_shardings(tx: optax.GradientTransformation, trainable: Any, trainable_shardings: Any) -> dict:
  """Shardings of the train state {'step', 'trainable', 'opt_state'}."""
  mesh = jax.tree.leaves(trainable_shardings)[0].mesh
  return {"step": replicated(mesh), "trainable": trainable_shardings,
          "opt_state": opt_state_shardings(tx, trainable, trainable_shardings)}


def _micro_batches(batch: Any, count: int, mesh: Mesh) -> Any:
  """(count, rows / count, ...) micro-batches; micro-batch j takes rows j, j + count, ... (no row leaves its device)."""
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f"batch of {x.shape[0]} rows cannot be split into micro_batches={count}; "
                       "use a batch size that is a multiple of it.")
    x = jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
  return jax.tree.map(split, batch)


# Bits of a step's metrics['nonfinite']: what held NaN or inf.
NONFINITE = {1: "loss", 2: "gradients", 4: "updated parameters or optimizer state"}


def nonfinite_flags(loss: jax.Array, grad_norm: jax.Array, updated: Any) -> jax.Array:
  """int32 sum of the NONFINITE bits of what is NaN or inf: the loss, the gradient norm, any updated leaf."""
  leaves = [x for x in map(jnp.asarray, jax.tree.leaves(updated)) if jnp.issubdtype(x.dtype, jnp.inexact)]
  params_finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)
  return sum(bit * (~ok).astype(jnp.int32)
             for bit, ok in zip(NONFINITE, (jnp.isfinite(loss), jnp.isfinite(grad_norm), params_finite)))


def nonfinite_names(flags: int) -> list[str]:
  """The NONFINITE names of the bits set in `flags`."""
  return [name for bit, name in NONFINITE.items() if flags & bit]


def make_train_step(loss_fn: Callable[..., tuple[jax.Array, jax.Array]], tx: optax.GradientTransformation,
                    shardings: dict, frozen_shardings: Any, *, micro_batches: int = 1, seed: int = 0,
                    donate: bool = True, post_update: Callable[[dict, Any], dict] | None = None
                    ) -> Callable[..., tuple[dict, dict]]:
  """Sharded train step: step(state, frozen, batch) -> (state, metrics), jit-compiled with explicit shardings.

  `loss_fn(trainable, frozen, batch, rng) -> (loss sum, weight)` (e.g. summed token cross-entropy and the
  number of target tokens); the step minimises sum / weight over the whole batch.  Only `trainable` is
  differentiated.  With `micro_batches` > 1 the batch is split and the gradients of the parts are summed in
  a `lax.scan` before one optimizer update, which equals the full-batch step.  `shardings` comes from
  `state_shardings`; the batch is split over (data, fsdp).  rng is fold_in(key(seed), step) for every micro-batch,
  and dropout masks are drawn per global row (`peftjax.dropout.rows`), so micro-batches and meshes do not change
  them.  A non-finite loss, gradient, updated parameter or optimizer moment
  leaves trainable, opt_state and the method's state unchanged (metrics['skipped'] = 1; metrics['nonfinite']
  holds the NONFINITE bits of what was non-finite).  Mixed precision comes from the inputs: a bfloat16-compute
  model, frozen weights cast with `cast_floating`, float32 adapters (so float32 gradients and optimizer state).

  The state may hold entries besides 'step', 'trainable' and 'opt_state' (e.g. a method's own state, with
  their shardings in `shardings`); they pass through unchanged unless `post_update(state, grads) -> state`
  changes them: it runs inside the step after the optimizer update, on the updated state ('step' still the
  index of this update) and the mean gradients, and its result is kept only when the step is finite.
  """
  if micro_batches < 1:
    raise ValueError(f"micro_batches={micro_batches} must be a positive integer.")
  mesh = jax.tree.leaves(shardings["trainable"])[0].mesh
  scalar = replicated(mesh)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def sums(trainable, frozen, batch, rng):
    (total, weight), grads = grad_fn(trainable, frozen, batch, rng)
    return total, weight.astype(jnp.float32), grads

  def step(state, frozen, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    trainable = state["trainable"]
    row_ids = jax.lax.with_sharding_constraint(jnp.arange(jax.tree.leaves(batch)[0].shape[0]), batch_sharding(mesh))
    if micro_batches == 1:
      with dropout.rows(row_ids):
        total, weight, grads = sums(trainable, frozen, batch, rng)
    else:
      def accumulate(carry, xs):
        part, part_rows = xs
        with dropout.rows(part_rows):
          part_sums = sums(trainable, frozen, part, rng)
        carry = jax.tree.map(jnp.add, carry, part_sums)
        return jax.lax.with_sharding_constraint(carry, (scalar, scalar, shardings["trainable"])), None
      zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
      (total, weight, grads), _ = jax.lax.scan(accumulate, zeros, _micro_batches((batch, row_ids), micro_batches, mesh))
    scale = 1.0 / jnp.maximum(weight, 1.0)
    loss, grads = total * scale, jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    updated = {**state, "trainable": optax.apply_updates(trainable, updates), "opt_state": opt_state}
    if post_update is not None:
      updated = post_update(updated, grads)
    nonfinite = nonfinite_flags(loss, grad_norm, {k: v for k, v in updated.items() if k != "step"})
    finite = nonfinite == 0
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), updated, state)
    new_state = {**kept, "step": state["step"] + 1}
    return new_state, {"loss": loss, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.int32),
                       "nonfinite": nonfinite}

  return jax.jit(step, in_shardings=(shardings, frozen_shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, scalar), donate_argnums=(0,) if donate else ())
