"""UniPELT (Mao et al. 2022): gated LoRA + gated bottleneck adapter + gated prefix tuning, as AdapterHub defines it.

Each submodule's contribution is multiplied by a learned gate g = mean over positions of sigmoid(x W_g + b_g),
one value per example, computed from that submodule's own input x (AdapterHub's `use_gating=True`):

* LoRA: y = x W + g (x A) B with g from the layer input x.  The gate takes the place of LoRA's scaling
  alpha / r (AdapterHub applies no scaling to a gated LoRA), so `lora.alpha` plays no part here.
  W_g (in, 1) ~ N(0, 0.02), b_g as a torch.nn.Linear bias, U(-1/sqrt(in), 1/sqrt(in)).
* bottleneck adapter (default Pfeiffer / SeqBn, reduction factor 16): the adapter output times g, with g from
  the adapter's input.  W_g (d, 1) ~ N(0, 0.02), b_g = 0 (AdapterHub's bert init).
* prefix tuning (default 10 positions, MLP reparameterisation of width 512), placed as AdapterHub does: the
  tokens keep their positions (`PrefixTuningConfig.shift_positions=False`).  Each attention layer's gate, from
  the attention layer's input (T5: the normalised one), scales the prefix keys and values: with
  `shared_gating` (AdapterHub's default) one output g scales both, otherwise g_k the keys and g_v the values.
  W_g (d, 1 or 2) ~ N(0, 0.02), b_g as a torch.nn.Linear bias.  A gate of 0 does not remove the prefix: the
  queries then attend to k positions with zero keys and zero values.

Any submodule can be left out (None).  The adapter tree: ``{"lora": {<layer>/lora_A, lora_B, lora_gate/{kernel,
bias}}, "adapter": {<host>/adapter_down, adapter_up, adapter_gate}, "prefix": <prefix tuning tree>,
"prefix_gates": {<attention layer>/prefix_gate/{kernel, bias}}}``, with the stacking axes in front for
layer-stacked (scanned) models.  Gates depend on the input, so UniPELT cannot be merged into the weights.
LoRA targets default to T5's ("q", "v"); pass the model's names (BERT "query", "value"; Llama "q_proj",
"v_proj"; GPT-2 "c_attn").
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree as ptree
from peftjax.methods import bottleneck_adapter as bn
from peftjax.methods import lora, prefix_tuning, prompt_tuning
from peftjax.models import t5

COLLECTION = "unipelt"
# The collections the sub-trees travel in inside the adapted call.
LORA, ADAPTER, PREFIX, PREFIX_GATES = (f"{COLLECTION}_{n}" for n in ("lora", "adapter", "prefix", "prefix_gates"))
# Path endings of each layer's key projection kernel and the number of trailing segments to drop to name the
# attention module that receives `prefix_kv` (BERT/RoBERTa, GPT-2, Llama-family, T5's self-attention layer).
PREFIX_HOSTS = {"attention/self/key/kernel": 2, "attn/c_attn/kernel": 2, "self_attn/k_proj/kernel": 2,
                "SelfAttention/k/kernel": 3}


@dataclasses.dataclass(frozen=True)
class UniPeltConfig:
  """UniPELT settings, following AdapterHub's UniPELTConfig (its defaults): the gated submodules' own configs (None
  leaves one out) and `shared_gating` (one prefix gate output for keys and values, else two)."""

  lora: lora.LoraConfig | None = lora.LoraConfig(rank=8, alpha=2.0)
  adapter: bn.BnConfig | None = bn.SeqBnConfig(reduction_factor=16)
  prefix: prefix_tuning.PrefixTuningConfig | None = prefix_tuning.PrefixTuningConfig(
      num_virtual_tokens=10, encoder_hidden_size=512, stacks=("encoder", "decoder"), shift_positions=False)
  shared_gating: bool = True

  def __post_init__(self):
    expected = {"lora": lora.LoraConfig, "adapter": bn.BnConfig, "prefix": prefix_tuning.PrefixTuningConfig}
    for field, kind in expected.items():
      value = getattr(self, field)
      if value is not None and not isinstance(value, kind):
        raise ValueError(f"UniPeltConfig.{field} must be a {kind.__name__} (or None), got {type(value).__name__}.")
    if all(getattr(self, field) is None for field in expected):
      raise ValueError(f"UniPeltConfig has no submodule; set at least one of {list(expected)}.")


def _gate_init(rng: jax.Array, width_in: tuple[int, ...], outputs: int, torch_bias: bool) -> dict:
  """{kernel (*stack, d, outputs) ~ N(0, 0.02), bias (*stack, outputs)}: zero, or torch.nn.Linear's U(+-1/sqrt(d))."""
  *stack, d = width_in
  k_kernel, k_bias = jax.random.split(rng)
  bias = (jax.random.uniform(k_bias, (*stack, outputs), jnp.float32, -1.0, 1.0) / math.sqrt(d) if torch_bias
          else jnp.zeros((*stack, outputs), jnp.float32))
  return {"kernel": 0.02 * jax.random.normal(k_kernel, (*stack, d, outputs), jnp.float32), "bias": bias}


def gate(module: nn.Module, collection: str, name: str, x: jax.Array) -> jax.Array:
  """mean over positions of sigmoid(x W_g + b_g) for the gate `name` of `module`: (batch, 1, ..., outputs)."""
  params = module.get_variable(collection, name)
  g = jax.nn.sigmoid(x @ params["kernel"].astype(x.dtype) + params["bias"].astype(x.dtype))
  return jnp.mean(g, axis=tuple(range(1, x.ndim - 1)), keepdims=True)


def prefix_hosts(cfg: prefix_tuning.PrefixTuningConfig, params: ptree.Tree) -> dict[str, tuple[int, ...]]:
  """{attention module path that receives prefix_kv: (*stack, d) of its input} for the layers with prefixes."""
  encoder_decoder = prompt_tuning.is_encoder_decoder(params)
  hosts = {}
  for path, leaf in ptree.flatten(params).items():
    for ending, drop in PREFIX_HOSTS.items():
      if path.endswith(ending) and (not encoder_decoder or path.split("/")[0] in cfg.stacks):
        hosts["/".join(path.split("/")[:-drop])] = tuple(np.shape(leaf)[:-1])
  return hosts


def init(cfg: UniPeltConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """New UniPELT tree: each submodule's own init plus its gates (see the module docstring)."""
  k_lora, k_adapter, k_prefix, k_gates = jax.random.split(rng, 4)
  tree = {}
  if cfg.lora is not None:
    flat = ptree.flatten(lora.init(cfg.lora, k_lora, params))
    modules = sorted({path.rpartition("/")[0] for path in flat})
    for module, key in zip(modules, jax.random.split(jax.random.fold_in(k_gates, 0), len(modules))):
      flat.update(ptree.flatten({f"{module}/lora_gate": _gate_init(key, flat[f"{module}/lora_A"].shape[:-1], 1, True)}))
    tree["lora"] = ptree.unflatten(flat)
  if cfg.adapter is not None:
    flat = ptree.flatten(bn.init(cfg.adapter, k_adapter, params))
    hosts = sorted({path.split(f"/{bn.DOWN}/")[0] for path in flat if f"/{bn.DOWN}/" in path})
    for host, key in zip(hosts, jax.random.split(jax.random.fold_in(k_gates, 1), len(hosts))):
      width_in = flat[f"{host}/{bn.DOWN}/kernel"].shape[:-1]
      flat.update(ptree.flatten({f"{host}/adapter_gate": _gate_init(key, width_in, 1, False)}))
    tree["adapter"] = ptree.unflatten(flat)
  if cfg.prefix is not None:
    tree["prefix"] = prefix_tuning.init(cfg.prefix, k_prefix, params)
    hosts = prefix_hosts(cfg.prefix, params)
    keys = jax.random.split(jax.random.fold_in(k_gates, 2), len(hosts))
    tree["prefix_gates"] = ptree.unflatten({f"{host}/prefix_gate/{leaf}": value
                                            for (host, width_in), key in zip(sorted(hosts.items()), keys)
                                            for leaf, value in _gate_init(key, width_in, 1 if cfg.shared_gating else 2,
                                                                          True).items()})
  return tree


def _lora_interceptor(cfg: lora.LoraConfig):
  """LoRA's activation-space path with the gate in place of the scaling: y + g (dropout(x) A) B."""
  def intercept(next_fun, args, kwargs, context):
    module = lora.adapted_layer(context, LORA)
    if module is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    inputs = args[0] if args else kwargs["inputs"]
    x = lora.adapter_input(cfg, module, inputs)
    a, b = module.get_variable(LORA, "lora_A"), module.get_variable(LORA, "lora_B")
    return y + ((x @ a.astype(x.dtype)) @ b.astype(x.dtype) * gate(module, LORA, "lora_gate", inputs)).astype(y.dtype)
  return intercept


def _prefix_gate_interceptor(next_fun, args, kwargs, context):
  """Scales the prefix keys and values an attention layer receives by its gate (g, or g_k and g_v)."""
  module = context.module
  if context.method_name != "__call__" or not module.has_variable(PREFIX_GATES, "prefix_gate"):
    return next_fun(*args, **kwargs)
  bound = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
  if bound.arguments.get("prefix_kv") is None:
    return next_fun(*args, **kwargs)
  x = bound.arguments["x"]
  if isinstance(module, t5.T5LayerSelfAttention):
    x = module.layer_norm(x)  # T5's attention reads the normalised stream
  g = gate(module, PREFIX_GATES, "prefix_gate", x)[:, :, None]  # (batch, 1, 1, 1 or 2) vs (batch, k, heads, dim)
  keys, values = bound.arguments["prefix_kv"]
  bound.arguments["prefix_kv"] = (keys * g[..., :1].astype(keys.dtype), values * g[..., -1:].astype(values.dtype))
  return next_fun(*bound.args[1:], **bound.kwargs)


def wrap(cfg: UniPeltConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with the gated submodules of `variables["unipelt"]` inserted."""
  interceptors = []
  if cfg.lora is not None:
    interceptors.append(_lora_interceptor(cfg.lora))
  if cfg.adapter is not None:
    adapter_gate = lambda host, x: gate(host, ADAPTER, "adapter_gate", x)  # noqa: E731
    interceptors.append(bn.interceptor(cfg.adapter, ADAPTER, adapter_gate))
  if cfg.prefix is not None:
    interceptors.append(_prefix_gate_interceptor)

  def gated(variables, *args, **kwargs):
    with contextlib.ExitStack() as stack:
      for interceptor in interceptors:
        stack.enter_context(nn.intercept_methods(interceptor))
      return apply_fn(variables, *args, **kwargs)
  inner = gated if cfg.prefix is None else prefix_tuning.wrap(cfg.prefix, gated, collection=PREFIX)
  names = {"lora": LORA, "adapter": ADAPTER, "prefix": PREFIX, "prefix_gates": PREFIX_GATES}

  def adapted(variables, *args, **kwargs):
    variables = dict(variables)
    tree = variables.pop(COLLECTION)
    variables.update({names[part]: subtree for part, subtree in tree.items()})
    return inner(variables, *args, **kwargs)
  return adapted
