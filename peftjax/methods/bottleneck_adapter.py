"""Bottleneck adapters: Houlsby (serial, after attention and FFN), Pfeiffer (serial, after the FFN), parallel.

A bottleneck adapter is a(x) = s * f(x W_down + b_down) W_up + b_up with W_down (d, m), W_up (m, d),
m = d // reduction_factor (or `bottleneck_size`) and f a non-linearity.  It adds no weights to the base
model and cannot be folded into them (no `merge`: `peftjax.merge` raises).  The three arrangements, with
AdapterHub's (`adapters` package) names for the switches:

* serial, `original_ln_before=False` (Houlsby et al. 2019; AdapterHub `double_seq_bn`): on a sub-layer's
  output h, before the residual add, h <- h + a(h).  `mh_adapter` places one after the attention output
  projection, `output_adapter` one after the feed-forward block, `cross_adapter` one after T5's decoder
  cross-attention.
* serial, `original_ln_before=True` (Pfeiffer et al. 2020; AdapterHub `seq_bn`): the adapter reads the
  residual stream after the sub-layer, z = x + h: pre-LN models (T5, GPT-2, Llama) give z + a(z), post-LN
  blocks (BERT, RoBERTa: LN(z)) give LN(z + a(LN(z))), the block's own LayerNorm applied again.
* parallel (He et al. 2022; AdapterHub `par_bn`, `is_parallel=True`, s = 4): from the sub-layer's input x,
  h <- h + s * a(x).  x is what the sub-layer module receives: in pre-LN models (T5, GPT-2, Llama) the
  normalised stream, where AdapterHub feeds the stream before the norm; in BERT the block's input.

Presets (dataclass subclasses of `BnConfig`): `SeqBnConfig` = `PfeifferConfig`, `DoubleSeqBnConfig` =
`HoulsbyConfig`, `ParBnConfig` = `ParallelConfig`, with AdapterHub's defaults.

Where each adapter goes is found per model family from the parameter names (`SITES`: the sub-layer
module and its output projection, whose width is d).  The adapter tree mirrors the module paths, e.g.
``encoder/block_0/layer_1/DenseReluDense/adapter_down/{kernel,bias}`` and ``.../adapter_up/{kernel,bias}``;
layer-stacked (scanned) trees get the stacking axes in front (*stack, d, m).  Per adapter that is
d*m + m + m*d + d trainable numbers.  Where a model applies residual dropout outside the sub-layer module
(T5), that dropout also falls on the adapter's output (identical in evaluation).

Methods composed with it (e.g. LoRA on the projections) act inside the sub-layer, so the adapter sees
their effect whatever the order of the configs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import dropout, tree as ptree
from peftjax.models import layers

COLLECTION = "bottleneck"
DOWN, UP = "adapter_down", "adapter_up"

NON_LINEARITIES = {
    "relu": jax.nn.relu,
    "gelu": layers.gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}
INIT_WEIGHTS = ("bert", "houlsby", "mam_adapter")
POSITIONS = ("mh_adapter", "cross_adapter", "output_adapter")

# (sub-layer module name, its output projection, position) per family; a module path ending in the name
# (whole segments) with that projection is the sub-layer.  The first matching row wins.
SITES = (
    ("SelfAttention", "o", "mh_adapter"),            # T5
    ("EncDecAttention", "o", "cross_adapter"),       # T5 decoder
    ("DenseReluDense", "wo", "output_adapter"),      # T5
    ("attention/output", "dense", "mh_adapter"),     # BERT, RoBERTa
    ("output", "dense", "output_adapter"),           # BERT, RoBERTa
    ("attn", "c_proj", "mh_adapter"),                # GPT-2
    ("mlp", "c_proj", "output_adapter"),             # GPT-2
    ("self_attn", "o_proj", "mh_adapter"),           # Llama, Mistral, Qwen2
    ("mlp", "down_proj", "output_adapter"),          # Llama, Mistral, Qwen2
)
# Linen classes of post-LN output blocks, LN(dropout(dense(h)) + residual): their serial adapter reads the
# output of their `Dropout` (or wraps their `LayerNorm`), their parallel adapter is added to the residual argument.
POST_LN_BLOCKS = ("BertSelfOutput", "BertOutput")
_LAYER = re.compile(r"(?:^|/)(?:block|layer|layers|h)_(\d+)(?:/|$)")


@dataclasses.dataclass(frozen=True)
class BnConfig:
  """Bottleneck adapter settings under AdapterHub's BnConfig names (defaults of its base class).

  `reduction_factor`: m = d // reduction_factor (at least 1); `bottleneck_size` sets m directly.
  `non_linearity`: relu, gelu, gelu_new, silu (= swish), tanh.  `init_weights`: "bert" (both kernels
  N(0, 0.02)), "houlsby" (both truncated N(0, 0.01) within two standard deviations) or "mam_adapter"
  (W_down PyTorch-Linear uniform, W_up = 0: exactly the base model at init); biases start at zero.
  `scaling` multiplies the adapter output; `dropout` drops it out when the call gets a 'dropout' rng.
  `leave_out`: layer indices without adapters (T5's decoder layers count on after the encoder's).
  Presets: `SeqBnConfig` (Pfeiffer), `DoubleSeqBnConfig` (Houlsby), `ParBnConfig` (parallel).
  """

  mh_adapter: bool = False
  output_adapter: bool = True
  cross_adapter: bool = False
  reduction_factor: float = 16.0
  bottleneck_size: int | None = None
  non_linearity: str = "relu"
  original_ln_before: bool = False
  is_parallel: bool = False
  scaling: float = 1.0
  init_weights: str = "bert"
  dropout: float = 0.0
  leave_out: tuple[int, ...] = ()

  def __post_init__(self):
    name = type(self).__name__
    object.__setattr__(self, "non_linearity", self.non_linearity.lower())
    object.__setattr__(self, "leave_out", tuple(int(i) for i in self.leave_out))
    if self.non_linearity not in NON_LINEARITIES:
      raise ValueError(f"{name}.non_linearity={self.non_linearity!r} is not supported; valid: "
                       f"{sorted(NON_LINEARITIES)}.")
    if self.init_weights not in INIT_WEIGHTS:
      raise ValueError(f"{name}.init_weights={self.init_weights!r} is not supported; valid: {list(INIT_WEIGHTS)}.")
    if not any(getattr(self, p) for p in POSITIONS):
      raise ValueError(f"{name} places no adapter; set at least one of {list(POSITIONS)} to True.")
    if not self.reduction_factor > 0:
      raise ValueError(f"{name}.reduction_factor must be positive, got {self.reduction_factor}.")
    if self.bottleneck_size is not None and self.bottleneck_size < 1:
      raise ValueError(f"{name}.bottleneck_size must be a positive integer (or None), got {self.bottleneck_size}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout}.")
    if self.is_parallel and self.original_ln_before:
      raise ValueError(f"{name}.original_ln_before=True applies to serial adapters only; a parallel adapter "
                       "(is_parallel=True) reads the sub-layer's input, so set original_ln_before=False.")

  def size(self, d: int) -> int:
    """Bottleneck width m for hidden width d."""
    return self.bottleneck_size or max(1, int(d // self.reduction_factor))


@dataclasses.dataclass(frozen=True)
class SeqBnConfig(BnConfig):
  """Pfeiffer adapter (AdapterHub `seq_bn` / `pfeiffer`): one serial adapter after the FFN, on the residual stream."""

  original_ln_before: bool = True


@dataclasses.dataclass(frozen=True)
class DoubleSeqBnConfig(BnConfig):
  """Houlsby adapter (AdapterHub `double_seq_bn` / `houlsby`): serial adapters after attention and after the FFN."""

  mh_adapter: bool = True
  non_linearity: str = "swish"


@dataclasses.dataclass(frozen=True)
class ParBnConfig(BnConfig):
  """Parallel adapter (He et al. 2022; AdapterHub `par_bn` / `parallel`): h <- FFN(x) + 4 a(x)."""

  reduction_factor: float = 2.0
  is_parallel: bool = True
  scaling: float = 4.0
  init_weights: str = "mam_adapter"


PfeifferConfig, HoulsbyConfig, ParallelConfig = SeqBnConfig, DoubleSeqBnConfig, ParBnConfig


def _layer_index(path: str, n_encoder: int) -> int | None:
  found = _LAYER.search(path)
  if found is None:
    return None
  return int(found.group(1)) + (n_encoder if path.startswith("decoder/") or "/decoder/" in path else 0)


def sub_layers(params: ptree.Tree) -> dict[str, tuple[str, int]]:
  """{sub-layer module path: (position, hidden width d)} for every `SITES` match in `params`."""
  flat = ptree.flatten(params)
  found = {}
  for module in ptree.linear_modules(params):
    parent, _, proj = module.rpartition("/")
    for name, site_proj, position in SITES:
      if proj == site_proj and (parent == name or parent.endswith("/" + name)):
        found[parent] = (position, int(np.shape(flat[f"{module}/kernel"])[-1]))
        break
  return found


def adapter_hosts(cfg: BnConfig, params: ptree.Tree) -> dict[str, int]:
  """{module path that holds an adapter: d} for `cfg` on `params` (raises when the model has no place for it)."""
  name = type(cfg).__name__
  subs = sub_layers(params)
  flat = ptree.flatten(params)
  n_encoder = len({m.group(0) for p in flat if (m := re.match(r"encoder/block_\d+/", p))})
  hosts: dict[str, int] = {}
  for position in POSITIONS:
    if not getattr(cfg, position):
      continue
    chosen = [p for p, (pos, _) in subs.items() if pos == position]
    if not chosen:
      known = sorted({f"{n}/{proj}" for n, proj, pos in SITES if pos == position})
      raise ValueError(f"{name}.{position}=True, but the parameter tree has no such sub-layer (valid modules: "
                       f"{known}); set {position}=False or use a T5, BERT/RoBERTa, GPT-2 or Llama-family model.")
    for path in chosen:
      index = _layer_index(path, n_encoder)
      if cfg.leave_out and index is None:
        raise ValueError(f"{name}.leave_out={cfg.leave_out} needs per-layer parameters, but {path!r} holds "
                         "layer-stacked (scanned) leaves; unstack the layers or set leave_out=().")
      if index in cfg.leave_out:
        continue
      host = path
      if cfg.original_ln_before and f"{path}/LayerNorm/scale" not in flat:
        host = path.rpartition("/")[0]  # the module that adds the residual (T5 layer_k, GPT-2/Llama block)
      if host in hosts:
        raise ValueError(f"{name}.original_ln_before=True puts both the attention and the FFN adapter on "
                         f"{host!r}, whose attention residual is added inside the block; set mh_adapter=False "
                         "or original_ln_before=False.")
      hosts[host] = subs[path][1]
  if not hosts:
    raise ValueError(f"{name}.leave_out={cfg.leave_out} leaves out every layer; no adapter would be trained.")
  return hosts


def _init_kernels(cfg: BnConfig, rng: jax.Array, shape_down: tuple, shape_up: tuple):
  k_down, k_up = jax.random.split(rng)
  if cfg.init_weights == "bert":
    return 0.02 * jax.random.normal(k_down, shape_down), 0.02 * jax.random.normal(k_up, shape_up)
  if cfg.init_weights == "houlsby":
    return (0.01 * jax.random.truncated_normal(k_down, -2.0, 2.0, shape_down),
            0.01 * jax.random.truncated_normal(k_up, -2.0, 2.0, shape_up))
  bound = 1.0 / math.sqrt(shape_down[-2])  # PyTorch's kaiming_uniform(a=sqrt(5)) for a Linear of fan-in d
  return jax.random.uniform(k_down, shape_down, jnp.float32, -bound, bound), jnp.zeros(shape_up, jnp.float32)


def init(cfg: BnConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """New adapter tree: ``<host>/adapter_down/{kernel (*stack, d, m), bias}``, ``<host>/adapter_up/{kernel, bias}``."""
  hosts = adapter_hosts(cfg, params)
  flat = ptree.flatten(params)
  adapters = {}
  for (host, d), key in zip(hosts.items(), jax.random.split(rng, len(hosts))):
    stack = _stack_shape(flat, host)
    m = cfg.size(d)
    down, up = _init_kernels(cfg, key, (*stack, d, m), (*stack, m, d))
    adapters[f"{host}/{DOWN}/kernel"], adapters[f"{host}/{DOWN}/bias"] = down, jnp.zeros((*stack, m), jnp.float32)
    adapters[f"{host}/{UP}/kernel"], adapters[f"{host}/{UP}/bias"] = up, jnp.zeros((*stack, d), jnp.float32)
  return ptree.unflatten(adapters)


def _stack_shape(flat: dict, host: str) -> tuple[int, ...]:
  """The layer-stacking axes of a host: the leading axes of its first kernel beyond (in, out)."""
  kernel = next(v for p, v in flat.items() if p.startswith(host + "/") and p.endswith("/kernel"))
  return tuple(np.shape(kernel)[:-2])


def adapter_modules(adapters: ptree.Tree) -> dict[str, dict]:
  """{module path: its adapter subtree {'adapter_down': {...}, 'adapter_up': {...}}} of an adapter tree."""
  modules: dict[str, dict] = {}
  for path, leaf in ptree.flatten(adapters).items():
    host, rest = re.split(f"/(?={DOWN}/|{UP}/)", path, maxsplit=1)
    modules.setdefault(host, {})[rest] = leaf
  return {host: ptree.unflatten(leaves) for host, leaves in modules.items()}


def _adapter(cfg: BnConfig, host: nn.Module, x: jax.Array, collection: str = COLLECTION,
             gate: Callable[[nn.Module, jax.Array], jax.Array] | None = None) -> jax.Array:
  """s * f(x W_down + b_down) W_up + b_up for the adapter held by `host` in `collection`, times `gate(host, x)` when
  given, with dropout when a 'dropout' rng is given."""
  down, up = host.get_variable(collection, DOWN), host.get_variable(collection, UP)
  h = NON_LINEARITIES[cfg.non_linearity](x @ down["kernel"].astype(x.dtype) + down["bias"].astype(x.dtype))
  out = (h @ up["kernel"].astype(x.dtype) + up["bias"].astype(x.dtype)) * cfg.scaling
  if gate is not None:
    out = out * gate(host, x)
  if cfg.dropout > 0.0 and host.has_rng("dropout"):
    out = dropout.drop(out, cfg.dropout, host.make_rng("dropout"))
  return out.astype(x.dtype)


def interceptor(cfg: BnConfig, collection: str = COLLECTION,
                gate: Callable[[nn.Module, jax.Array], jax.Array] | None = None):
  """The linen interceptor that inserts the adapters found in `collection`, each output times `gate(host, x)` when
  given (x: the adapter's input)."""
  adapter = functools.partial(_adapter, cfg, collection=collection, gate=gate)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if module.has_variable(collection, DOWN):
      if type(module).__name__ in POST_LN_BLOCKS:
        if not cfg.is_parallel:  # the serial adapter sits on a child call (below)
          return next_fun(*args, **kwargs)
        h, residual, *rest = args
        return next_fun(h, residual + adapter(module, residual), *rest, **kwargs)
      out = next_fun(*args, **kwargs)
      y = out[0] if isinstance(out, tuple) else out
      y = y + adapter(module, args[0] if cfg.is_parallel else y)
      return (y, *out[1:]) if isinstance(out, tuple) else y
    parent = module.parent
    child = nn.LayerNorm if cfg.original_ln_before else nn.Dropout
    if (cfg.is_parallel or not isinstance(module, child) or not isinstance(parent, nn.Module)
        or type(parent).__name__ not in POST_LN_BLOCKS or not parent.has_variable(collection, DOWN)):
      return next_fun(*args, **kwargs)
    if cfg.original_ln_before:  # LN(z + a(LN(z))) with z = dropout(dense(h)) + residual
      z = args[0]
      normed = module.clone(parent=None).apply({"params": module.variables["params"]}, z)  # a second LN call
      return next_fun(z + adapter(parent, normed))
    y = next_fun(*args, **kwargs)  # dropout(dense(h))
    return y + adapter(parent, y)
  return intercept


def wrap(cfg: BnConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with the adapters of `variables["bottleneck"]` inserted."""
  def adapted(variables, *args, **kwargs):
    with nn.intercept_methods(interceptor(cfg)):
      return apply_fn(variables, *args, **kwargs)
  return adapted
