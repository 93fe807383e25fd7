"""Quantised frozen bases (QLoRA, Dettmers et al. 2023): NF4 with double quantisation, int4 and int8.

`quantize(cfg, params)` replaces the targeted linear kernels of a parameter tree, once, at load, with
`QuantizedWeight` leaves: the codes and scales only, no full-precision copy.  `apply(method_cfg, model.apply)`
is `peftjax.apply` over such a tree: an interceptor on every `nn.Dense` / single-axis `nn.DenseGeneral` call
whose kernel is quantised computes ``x @ dequantize(kernel)`` itself, inside the compiled step, with a custom
VJP whose residual is the codes: each layer's weight exists in full precision only next to its own matmul, in
the forward and again in the backward pass (made to depend on the layer's input and on its output's cotangent,
so XLA neither hoists nor merges them), and never as a saved residual, scanned or not.  LoRA, DoRA and the
other methods add their paths around it in activation space; the quantised leaves get no gradient.

Formats (`QuantConfig.kind`):
- "nf4": bitsandbytes' `quantize_4bit(quant_type="nf4")`.  The kernel is taken in PyTorch layout (out, in),
  flattened row-major, cut in blocks of `block_size` (64) values; each block is scaled by its absmax into
  [-1, 1] (multiplied by the reciprocal, clamped) and every value gets the index of the nearest of the 16
  NormalFloat levels (ties to the lower one); two indices per uint8, the first in the high nibble.  With
  `double_quant` (bitsandbytes' compress_statistics) the fp32 absmax values minus their mean (`absmax_offset`)
  are quantised again with bitsandbytes' signed dynamic 8-bit map in blocks of 256 (divided by the block's
  absmax, nearest code, ties to the lower one), keeping one fp32 scale per 256 blocks: 4 + 8/64 + 32/(64*256)
  = 4.127 bits per weight.  The codes are identical to bitsandbytes' (tests/reference/bnb/).
- "int4": the same blocks with 16 evenly spaced symmetric levels k/7, k = -8..7 (only -7..7 are reached).
- "int8": absmax per output channel, codes round(127 w / absmax) in int8 in the kernel's own layout.

A layer-stacked (scanned) kernel (*stack, in, out) is quantised slice by slice; every leaf of its
`QuantizedWeight` keeps the leading *stack axes, so `nn.scan` slices it like the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec

from peftjax import api, tree as ptree
from peftjax.models import layers

KINDS = ("nf4", "int4", "int8", "gguf")
# GGUF block types kept as they are in the file (kind "gguf"): QuantizedWeight.kind -> gguf-py's type name.
GGUF_KINDS = {"gguf_q4_0": "Q4_0", "gguf_q4_1": "Q4_1", "gguf_q8_0": "Q8_0"}
GGUF_BLOCK = 32  # values per block of all three
ABSMAX_BLOCK = 256  # bitsandbytes' block of the double quantisation

# The 16 NormalFloat levels as bitsandbytes ships them (QLoRA appendix E; create_normal_map(0.9677083)).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
    1.0], np.float32)
INT4_LEVELS = (np.arange(16, dtype=np.float32) - 8) / np.float32(7)


def _torch_linspace(n: int) -> np.ndarray:
  """torch.linspace(0.1, 1, n) in float32 as PyTorch's CPU kernel rounds it (fused a + s*i, from both ends)."""
  i = np.arange(n)
  step = (np.float32(1) - np.float32(0.1)) / np.float32(n - 1)
  low = (np.float64(np.float32(0.1)) + np.float64(step) * i).astype(np.float32)
  high = (np.float64(1.0) - np.float64(step) * (n - 1 - i)).astype(np.float32)
  return np.where(i < n // 2, low, high)


def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)): 256 sorted float32 values."""
  values = [0.0, 1.0]
  for i in range(7):
    bounds = _torch_linspace(2 ** i + 1)
    means = np.float32(10.0 ** (i - 6)) * ((bounds[:-1] + bounds[1:]) / np.float32(2))
    values += means.tolist() + (-means).tolist()
  return np.array(sorted(values), np.float32)


DYNAMIC_MAP = dynamic_map()


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Which kernels to quantise and how: `kind` ("nf4", "int4", "int8", or "gguf": a GGUF file's own Q4_0 / Q4_1 /
  Q8_0 blocks, `keep_gguf_blocks`), `block_size` (values per absmax of
  the 4-bit kinds, 64 as QLoRA), `double_quant` (8-bit absmax values in blocks of 256, QLoRA's double
  quantisation), `targets` / `exclude` (as LoraConfig's: "all-linear", the default, is every linear layer
  but the output head; embeddings and norms are never quantised)."""

  kind: str = "nf4"
  block_size: int = 64
  double_quant: bool = True
  targets: str | tuple[str, ...] = "all-linear"
  exclude: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"QuantConfig.kind={self.kind!r} is not a quantisation; valid: {list(KINDS)}.")
    if self.block_size < 2 or self.block_size % 2:
      raise ValueError(f"QuantConfig.block_size must be an even integer >= 2, got {self.block_size}.")
    for key in ("targets", "exclude"):
      if isinstance(getattr(self, key), list):
        object.__setattr__(self, key, tuple(getattr(self, key)))


class QuantizedWeight(flax.struct.PyTreeNode, meta.AxisMetadata):
  """A quantised kernel in the place of the array: `codes` (uint8, two 4-bit codes a byte; int8 for "int8"),
  `absmax` (float32 per block / output channel, or its uint8 codes with double quantisation),
  `absmax_scale` / `absmax_offset` (the double quantisation's fp32 scale per 256 blocks and mean).  The GGUF
  kinds keep the file's blocks in PyTorch layout: `codes` (*stack, out, in / 32, 16) uint8 (Q4_0 / Q4_1: the
  block's first 16 values in the low nibbles) or (..., 32) int8 (Q8_0), `absmax` the blocks' float16 scales d
  (*stack, out, in / 32) and `mins` Q4_1's float16 minimums m.

  It stands in for the kernel where code reads only its `shape` / `ndim` / `dtype`, `astype(dtype)` (and
  Flax's unboxing in `self.param`) give the dequantised kernel.
  """

  codes: jax.Array
  absmax: jax.Array
  absmax_scale: jax.Array | None = None
  absmax_offset: jax.Array | None = None
  mins: jax.Array | None = None
  kind: str = flax.struct.field(pytree_node=False, default="nf4")
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  dtype_name: str = flax.struct.field(pytree_node=False, default="float32")
  block_size: int = flax.struct.field(pytree_node=False, default=64)

  @property
  def dtype(self):
    """The dtype of the kernel this weight replaced (what it dequantises to by default)."""
    return jnp.dtype(self.dtype_name)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def astype(self, dtype) -> jax.Array:
    """The dequantised kernel in `dtype`."""
    return dequantize(self, dtype)

  def unbox(self) -> jax.Array:
    return dequantize(self)

  def replace_boxed(self, val):
    raise ValueError("a quantised kernel cannot be replaced by a full-precision one inside the model; "
                     "use peftjax.quant.merge to fold adapters into it.")

  def add_axis(self, index: int, params: dict[Any, Any]) -> "QuantizedWeight":
    if index != 0:
      raise ValueError(f"a quantised kernel can only be stacked along axis 0, not {index}.")
    return self.replace(shape=(self.codes.shape[0], *self.shape))

  def remove_axis(self, index: int, params: dict[Any, Any]) -> "QuantizedWeight":
    if index != 0:
      raise ValueError(f"a quantised kernel can only be unstacked along axis 0, not {index}.")
    return self.replace(shape=self.shape[1:])


def _levels(kind: str) -> jax.Array:
  return jnp.asarray(NF4_LEVELS if kind == "nf4" else INT4_LEVELS)


def _nearest(levels: jax.Array, values: jax.Array) -> jax.Array:
  """Index of the nearest level (sorted `levels`), ties to the lower one, as uint8."""
  return jnp.searchsorted((levels[:-1] + levels[1:]) / 2, values, side="left").astype(jnp.uint8)


def _blocks(flat: jax.Array, block: int) -> jax.Array:
  """(n,) -> (ceil(n / block), block), the last block padded with zeros."""
  count = -(-flat.shape[0] // block)
  return jnp.pad(flat, (0, count * block - flat.shape[0])).reshape(count, block)


@jax.jit
def _quantize_absmax(absmax: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
  """bitsandbytes' double quantisation of (..., blocks) absmax values: (uint8 codes, fp32 scale per 256) of
  absmax - offset, offset their mean (an input, so that the stored offset is the one subtracted)."""
  def one(values, mean):
    blocks = _blocks(values - mean, ABSMAX_BLOCK)
    scale = jnp.max(jnp.abs(blocks), axis=1)
    normed = blocks / jnp.where(scale > 0, scale, 1.0)[:, None]
    return _nearest(jnp.asarray(DYNAMIC_MAP), normed).reshape(-1)[: values.shape[0]], scale
  for _ in range(absmax.ndim - 1):
    one = jax.vmap(one)
  return one(absmax, offset)


def _quantize_4bit(w: jax.Array, kind: str, block: int) -> dict:
  """Codes and scales of one (out, in) matrix, PyTorch layout."""
  flat = w.astype(jnp.float32).reshape(-1)
  blocks = _blocks(flat, block)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.where(absmax > 0, absmax, 1.0)  # an all-zero block scales to zeros, as bitsandbytes' clamp(1e-38)
  scaled = jnp.clip(blocks * (1.0 / safe)[:, None], -1.0, 1.0).reshape(-1)
  codes = _nearest(_levels(kind), scaled)
  codes = codes[: flat.shape[0] + flat.shape[0] % 2]
  codes = codes.reshape(-1, 2)
  return {"codes": (codes[:, 0] << 4) | codes[:, 1], "absmax": absmax, "absmax_offset": jnp.mean(absmax)}


def _quantize_int8(kernel: jax.Array) -> dict:
  """int8 codes of an (in, out) kernel with one absmax per output channel."""
  w = kernel.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w), axis=0)
  codes = jnp.round(w * (127.0 / jnp.where(absmax > 0, absmax, 1.0))).astype(jnp.int8)
  return {"codes": codes, "absmax": absmax}


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_kernel(kernel: jax.Array, cfg: QuantConfig) -> dict:
  def one(matrix):  # (in, out)
    if cfg.kind == "int8":
      return _quantize_int8(matrix)
    return _quantize_4bit(matrix.T, cfg.kind, cfg.block_size)
  fn = one
  for _ in range(kernel.ndim - 2):
    fn = jax.vmap(fn)
  return fn(kernel)


def quantize_kernel(kernel: jax.Array, cfg: QuantConfig = QuantConfig()) -> QuantizedWeight:
  """The `QuantizedWeight` of one (*stack, in, out) kernel."""
  if np.ndim(kernel) < 2:
    raise ValueError(f"only kernels of rank >= 2 can be quantised, got shape {np.shape(kernel)}.")
  if cfg.kind == "gguf":
    raise ValueError("QuantConfig.kind='gguf' keeps a GGUF file's own blocks (keep_gguf_blocks); it does not "
                     "quantise float kernels: choose 'nf4', 'int4' or 'int8'.")
  parts = _quantize_kernel(jnp.asarray(kernel), cfg)
  if cfg.kind != "int8" and cfg.double_quant:
    parts["absmax"], parts["absmax_scale"] = _quantize_absmax(parts["absmax"], parts["absmax_offset"])
  else:
    parts.pop("absmax_offset", None)
  return QuantizedWeight(**parts, kind=cfg.kind, shape=tuple(np.shape(kernel)),
                         dtype_name=jnp.dtype(kernel.dtype).name, block_size=cfg.block_size)


def block_absmax(weight: QuantizedWeight) -> jax.Array:
  """The fp32 absmax of every block (*stack, blocks): the stored ones, or the double quantisation undone."""
  if weight.absmax_scale is None:
    return weight.absmax.astype(jnp.float32)
  table = jnp.asarray(DYNAMIC_MAP)
  scale = jnp.repeat(weight.absmax_scale, ABSMAX_BLOCK, axis=-1)[..., : weight.absmax.shape[-1]]
  return table[weight.absmax.astype(jnp.int32)] * scale + weight.absmax_offset[..., None]


def _dequantize_gguf(weight: QuantizedWeight) -> jax.Array:
  """The float32 (*stack, out, in) weight of GGUF blocks, as gguf-py's dequantize computes it: Q4_0 d (q - 8),
  Q4_1 d q + m, Q8_0 d q (d and m float16 widened to float32)."""
  d = weight.absmax.astype(jnp.float32)[..., None]
  if weight.kind == "gguf_q8_0":
    values = weight.codes.astype(jnp.float32) * d
  else:
    codes = jnp.concatenate([weight.codes & 15, weight.codes >> 4], axis=-1)
    if weight.kind == "gguf_q4_0":
      values = d * (codes.astype(jnp.int8) - 8).astype(jnp.float32)
    else:  # the sum rounded on its own, as numpy's (XLA:CPU does not fuse it into an FMA)
      values = d * codes.astype(jnp.float32) + weight.mins.astype(jnp.float32)[..., None]
  return values.reshape(*values.shape[:-2], -1)


def _dequantize_out_in(weight: QuantizedWeight, dtype) -> jax.Array:
  """The kernel in PyTorch layout (*stack, out, in), where the 4-bit codes run along the input axis."""
  if weight.kind in GGUF_KINDS:
    return _dequantize_gguf(weight).astype(dtype)
  *stack, d_in, d_out = weight.shape
  high, low = weight.codes >> 4, weight.codes & 15
  codes = jnp.stack([high, low], axis=-1).reshape(*weight.codes.shape[:-1], -1)
  values = _levels(weight.kind)[codes.astype(jnp.int32)]
  count = weight.absmax.shape[-1] * weight.block_size
  values = jnp.pad(values, [(0, 0)] * len(stack) + [(0, count - values.shape[-1])])
  values = values.reshape(*stack, -1, weight.block_size) * block_absmax(weight)[..., None]
  return values.reshape(*stack, -1)[..., : d_in * d_out].reshape(*stack, d_out, d_in).astype(dtype)


def dequantize(weight: QuantizedWeight, dtype=None) -> jax.Array:
  """The (*stack, in, out) kernel `weight` stands for, in `dtype` (default: the original kernel's)."""
  dtype = weight.dtype if dtype is None else dtype
  if weight.kind == "int8":
    w = weight.codes.astype(jnp.float32) * (weight.absmax / 127.0)[..., None, :]
    return w.astype(dtype)
  return jnp.swapaxes(_dequantize_out_in(weight, dtype), -1, -2)


def gguf_weight(type_name: str, blocks: np.ndarray, dtype=jnp.float32) -> QuantizedWeight:
  """The `QuantizedWeight` of one GGUF tensor's raw blocks (out, in / 32, bytes per block) of type `type_name`
  ("Q4_0", "Q4_1", "Q8_0"), standing for an (in, out) kernel of `dtype`; the bytes are kept as they are."""
  kinds = {name: kind for kind, name in GGUF_KINDS.items()}
  if type_name not in kinds:
    raise ValueError(f"GGUF type {type_name} cannot stay quantised; valid: {sorted(kinds)}.")
  blocks = np.ascontiguousarray(blocks, np.uint8)
  d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
  mins = blocks[..., 2:4].copy().view(np.float16)[..., 0] if type_name == "Q4_1" else None
  codes = blocks[..., 4 if type_name == "Q4_1" else 2:].copy()
  if type_name == "Q8_0":
    codes = codes.view(np.int8)
  *stack, d_out, count = d.shape
  return QuantizedWeight(codes=jnp.asarray(codes), absmax=jnp.asarray(d),
                         mins=None if mins is None else jnp.asarray(mins),
                         kind=kinds[type_name], shape=(*stack, count * GGUF_BLOCK, d_out),
                         dtype_name=jnp.dtype(dtype).name, block_size=GGUF_BLOCK)


def _layer_names(path: str, count: int) -> list[list[str]]:
  """The Hugging Face names of the `count` per-layer kernels a layer-stacked (scanned) kernel at `path` stacks,
  for every place its layer list could be (model/layers/... -> model.layers.0...., model.layers.1...., ...)."""
  from peftjax.models import hf_io
  parts = path.split("/")
  return [[hf_io.hf_key("/".join([*parts[:cut - 1], f"{parts[cut - 1]}_{i}", *parts[cut:], "kernel"]))
           for i in range(count)] for cut in range(1, len(parts))]


def _kept_blocks(path: str, kernel: Any, blocks: dict) -> tuple[str, np.ndarray] | None:
  """(type name, raw blocks (*stack, out, in / 32, bytes)) of the kernel at `path` in `blocks`, or None: a
  layer-stacked kernel (*stack, in, out) keeps its layers' blocks stacked along the layer axis where every layer's
  tensor is there in one type (else it stays dequantised)."""
  from peftjax.models import hf_io
  if np.ndim(kernel) == 2:
    return blocks.get(hf_io.hf_key(f"{path}/kernel"))
  if np.ndim(kernel) != 3:
    return None
  for names in _layer_names(path, kernel.shape[0]):
    if all(name in blocks for name in names) and len({blocks[name][0] for name in names}) == 1:
      return blocks[names[0]][0], np.stack([blocks[name][1] for name in names])
  return None


def keep_gguf_blocks(cfg: QuantConfig, params: ptree.Tree, blocks: dict) -> dict:
  """`params` with every kernel `cfg` targets that `blocks` ({Hugging Face tensor name: (GGUF type name, raw
  blocks)}, `peftjax.models.gguf.read_blocks`) holds replaced by those blocks; the other kernels stay as they
  are (dequantised).  The blocks must be of the tensors the float kernels were dequantised from.  Over scanned
  layers (`scan_layers=True`) each stacked kernel keeps its layers' blocks stacked like the kernels, where all its
  layers are in `blocks` in one type."""
  flat = ptree.flatten(params)
  for path in ptree.match_targets(params, cfg.targets, cfg.exclude):
    kernel = flat[f"{path}/kernel"]
    found = _kept_blocks(path, kernel, blocks)
    if found is not None:
      weight = gguf_weight(*found, dtype=kernel.dtype)
      if weight.shape != tuple(kernel.shape):
        raise ValueError(f"GGUF blocks for {path} stand for an (in, out) kernel of shape {weight.shape}, but the "
                         f"model's {path} kernel is {tuple(kernel.shape)}.")
      flat[f"{path}/kernel"] = weight
  return ptree.unflatten(flat)


def weight_sharding(weight: QuantizedWeight, kernel_sharding: NamedSharding) -> QuantizedWeight:
  """The NamedShardings of `weight`'s leaves derived from its kernel's: codes and scales split along the output
  dimension over the mesh axes the kernel's output dimension uses, where they divide (int8 codes keep the kernel's
  own spec; the 4-bit kinds' flat row-major (out, in) arrays split into whole rows); the rest replicated."""
  mesh = kernel_sharding.mesh
  spec = tuple(kernel_sharding.spec) + (None,) * (len(weight.shape) - len(kernel_sharding.spec))
  stack, (in_axes, out_axes) = spec[:-2], spec[-2:]
  size = math.prod(mesh.shape[a] for a in ((out_axes,) if isinstance(out_axes, str) else out_axes or ()))
  d_out = weight.shape[-1]
  whole_rows = weight.kind in GGUF_KINDS or weight.kind == "int8" or weight.shape[-2] % weight.block_size == 0

  def split(leaf):  # the leaf's first axis after the stack runs over output rows
    if leaf is None:
      return None
    ok = out_axes is not None and whole_rows and d_out % size == 0 and leaf.shape[len(stack)] % size == 0
    return NamedSharding(mesh, PartitionSpec(*stack, out_axes if ok else None))

  def replicated(leaf):
    return None if leaf is None else NamedSharding(mesh, PartitionSpec())
  if weight.kind == "int8":
    return weight.replace(codes=NamedSharding(mesh, PartitionSpec(*stack, in_axes, out_axes)),
                          absmax=split(weight.absmax))
  return weight.replace(codes=split(weight.codes), absmax=split(weight.absmax), mins=split(weight.mins),
                        absmax_scale=replicated(weight.absmax_scale), absmax_offset=replicated(weight.absmax_offset))


def is_quantized(leaf: Any) -> bool:
  return isinstance(leaf, QuantizedWeight)


def quantize(cfg: QuantConfig, params: ptree.Tree) -> dict:
  """`params` with every kernel `cfg` targets replaced by its `QuantizedWeight` (the other leaves as they are).

  Kernels are quantised one at a time; the returned tree holds no full-precision copy of them (drop your
  reference to `params` so the originals can be freed).  Deterministic: the same weights give the same codes.
  """
  flat = ptree.flatten(params)
  for path in ptree.match_targets(params, cfg.targets, cfg.exclude):
    flat[f"{path}/kernel"] = quantize_kernel(flat[f"{path}/kernel"], cfg)
  return ptree.unflatten(flat)


def dequantize_tree(params: ptree.Tree) -> dict:
  """`params` with every `QuantizedWeight` dequantised to its original dtype."""
  return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, params, is_leaf=is_quantized)


def stored_bytes(params: Any, quantized_only: bool = False) -> int:
  """Bytes the arrays of `params` occupy (only those of its quantised kernels with `quantized_only`)."""
  leaves = jax.tree.leaves(params, is_leaf=is_quantized)
  if quantized_only:
    leaves = [leaf for leaf in leaves if is_quantized(leaf)]
  return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(leaves))


def bits_per_parameter(weight: QuantizedWeight) -> float:
  """Stored bits per weight of one quantised kernel."""
  return 8.0 * stored_bytes(weight) / math.prod(weight.shape)


def _contract(x: jax.Array, weight: QuantizedWeight, dtype, precision) -> jax.Array:
  """x @ dequantize(weight) in `dtype` (the 4-bit and GGUF kinds contract with the (out, in) weight as dequantised,
  with no transposed copy).  Below float32 the operands are `dtype` and the sums float32, as the models' own
  nn.Dense (`layers.dot_general`)."""
  dot = layers.dot_general(dtype)
  if weight.kind == "int8":
    return dot(x, dequantize(weight, dtype), (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  return dot(x, _dequantize_out_in(weight, dtype), (((x.ndim - 1,), (1,)), ((), ())), precision=precision)


def _after(value: jax.Array, weight: QuantizedWeight) -> QuantizedWeight:
  """`weight` with its codes made to depend on `value` (plus min(|value[0]|, 0) > 0, always 0, which XLA does not
  fold away), so that its dequantisation is computed only once `value` exists.  XLA:CPU drops optimization barriers
  before CSE and schedules freely: without this it merges the backward's dequantisation with the forward's, or
  hoists it to the start, and keeps every layer's weight live across both passes."""
  zero = jnp.minimum(jnp.abs(value[(0,) * value.ndim]), 0) > 0
  return weight.replace(codes=weight.codes + zero.astype(weight.codes.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _quantized_matmul(x: jax.Array, weight: QuantizedWeight, dtype, precision) -> jax.Array:
  """x @ dequantize(weight) in `dtype`.  The backward pass saves only the codes (already an argument) and
  dequantises them again next to its own matmul, once the output's cotangent exists, so no dequantised weight
  lives from the forward to the backward pass; the quantised leaves get zero cotangents."""
  return _contract(x, _after(x, weight), dtype, precision)


def _quantized_matmul_fwd(x, weight, dtype, precision):
  return _quantized_matmul(x, weight, dtype, precision), weight


def _zero_cotangent(leaf: jax.Array) -> Any:
  if jnp.issubdtype(leaf.dtype, jnp.inexact):
    return jnp.zeros_like(leaf)
  return np.zeros(leaf.shape, jax.dtypes.float0)


def _quantized_matmul_bwd(dtype, precision, weight, g):
  weight_now = _after(g, weight)
  dot = layers.dot_general(dtype)
  g = g.astype(dtype)
  if weight.kind == "int8":  # (in, out): contract the output axis
    dx = dot(g, dequantize(weight_now, dtype), (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  else:  # (out, in)
    dx = dot(g, _dequantize_out_in(weight_now, dtype), (((g.ndim - 1,), (0,)), ((), ())), precision=precision)
  return dx.astype(dtype), jax.tree.map(_zero_cotangent, weight)  # x is in `dtype` (_intercept)


_quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


def _quantized_layer(context) -> nn.Module | None:
  module = context.module
  if (context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral))
      or not module.has_variable("params", "kernel") or not is_quantized(module.get_variable("params", "kernel"))):
    return None
  if isinstance(module, nn.DenseGeneral) and (np.ndim(module.features) > 0 or module.axis not in (-1,)
                                              or module.batch_dims):
    raise ValueError(f"quantised layer {'/'.join(module.path)!r} is a DenseGeneral with several axes; "
                     "quantisation supports Dense and single-axis DenseGeneral layers (exclude it).")
  return module


def _intercept(next_fun, args, kwargs, context):
  module = _quantized_layer(context)
  if module is None:
    return next_fun(*args, **kwargs)
  if next_fun is not context.orig_method:
    raise ValueError("peftjax.quant.wrap must wrap model.apply itself, inside the methods' wrappers "
                     "(quant.apply(method_cfg, model.apply) does), so that their paths go around the quantised layer.")
  x = args[0] if args else kwargs["inputs"]
  weight = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  dtype = module.dtype or jnp.result_type(x.dtype, weight.dtype, *(() if bias is None else (bias.dtype,)))
  y = _quantized_matmul(x.astype(dtype), weight, jnp.dtype(dtype), module.precision)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


def wrap(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`model.apply` running quantised kernels in place (the innermost wrapper: Flax runs the interceptor
  entered last next to the layer, so the methods' paths, entered before it, go around it)."""
  def quantized(*args, **kwargs):
    with nn.intercept_methods(_intercept):
      return apply_fn(*args, **kwargs)
  return quantized


def apply(method_cfg: Any, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`peftjax.apply(method_cfg, apply_fn)` over a quantised base: fn(params, adapters, *args, **kwargs)."""
  return api.apply(method_cfg, wrap(apply_fn))


def _gguf_requantized(kind: str, kernel: jax.Array) -> QuantizedWeight:
  """`kernel` quantised to the GGUF block type `kind` with gguf-py's quantize (llama.cpp's reference rounding)."""
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
  qtype = GGMLQuantizationType[GGUF_KINDS[kind]]
  rows = np.swapaxes(np.asarray(kernel, np.float32), -1, -2)  # (*stack, out, in): blocks along the input
  blocks = quants.quantize(rows, qtype).reshape(*rows.shape[:-1], -1, GGML_QUANT_SIZES[qtype][1])
  return gguf_weight(GGUF_KINDS[kind], blocks, jnp.asarray(kernel).dtype)


def requantization_error(cfg: QuantConfig, kernel: jax.Array, kind: str | None = None) -> tuple[QuantizedWeight, dict]:
  """(quantised `kernel`, {'max_abs', 'sq_err', 'sq_weight'}): what re-quantising `kernel` changes, as
  max |Q(W) - W|, sum (Q(W) - W)^2 and sum W^2 (Q(W) = dequantize(quantize(W))).  Q is `cfg`'s, or for a GGUF
  `kind` (the base layer's) that block type's."""
  weight = _gguf_requantized(kind, kernel) if kind in GGUF_KINDS else quantize_kernel(kernel, cfg)
  w = jnp.asarray(kernel, jnp.float32)
  err = dequantize(weight, jnp.float32) - w
  return weight, {"max_abs": float(jnp.max(jnp.abs(err))), "sq_err": float(jnp.sum(err * err)),
                  "sq_weight": float(jnp.sum(w * w))}


def merge(method_cfg: Any, cfg: QuantConfig, params: ptree.Tree, adapters: Any,
          requantize: bool = False) -> tuple[dict, dict]:
  """(merged params, error report): the adapters folded into the dequantised weights.

  The merged kernels stay in the base's float dtype, or with `requantize` are quantised again with `cfg` (a
  GGUF base's layers in their own block type).
  Either way the report says what re-quantising each merged kernel adds: {'layers': {module path:
  {'max_abs', 'relative'}}, 'max_abs', 'relative'} with relative = ||Q(W') - W'|| / ||W'|| (Frobenius;
  overall over all quantised kernels together).
  """
  quantized = {p: leaf.kind for p, leaf in ptree.flatten(params).items() if is_quantized(leaf)}
  merged = ptree.flatten(api.merge(method_cfg, dequantize_tree(params), adapters))
  layers, sq_err, sq_weight, max_abs = {}, 0.0, 0.0, 0.0
  for path in sorted(quantized):
    weight, err = requantization_error(cfg, merged[path], quantized[path])
    layers[path[: -len("/kernel")]] = {"max_abs": err["max_abs"],
                                       "relative": math.sqrt(err["sq_err"] / max(err["sq_weight"], 1e-30))}
    sq_err, sq_weight, max_abs = sq_err + err["sq_err"], sq_weight + err["sq_weight"], max(max_abs, err["max_abs"])
    if requantize:
      merged[path] = weight
  report = {"layers": layers, "max_abs": max_abs, "relative": math.sqrt(sq_err / max(sq_weight, 1e-30))}
  return ptree.unflatten(merged), report


def report_line(report: dict) -> str:
  """One line summing up a merge's re-quantisation error report."""
  worst = max(report["layers"].items(), key=lambda kv: kv[1]["relative"], default=(None, {"relative": 0.0}))
  return (f"re-quantising the merged weights changes them by at most {report['max_abs']:.3g} (relative "
          f"{report['relative']:.3g} over {len(report['layers'])} layers; worst layer {worst[0]}: relative "
          f"{worst[1]['relative']:.3g})")
