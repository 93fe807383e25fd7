"""The sparse mixture-of-experts MLP of Mixtral and Qwen3-MoE, with transformers 5's parameter names.

`SparseMoeBlock` is ``gate`` (the router, a bias-free Dense to the experts' logits) and ``experts``, whose
weights are stacked as transformers 5 holds them in memory: ``gate_up_proj`` (experts, 2 * moe_intermediate,
hidden) (gate rows, then up rows) and ``down_proj`` (experts, hidden, moe_intermediate).  Routing is
transformers': softmax over the experts in float32, the top `num_experts_per_tok`, renormalised to sum to 1
(always for Mixtral, with `norm_topk_prob` for Qwen3-MoE).  The experts are computed densely, every token
through every expert (einsums over the stacked weights), and summed with the (mostly zero) routing weights: no
Python loop over experts, shapes static under jit, and exactly transformers' sum, at num_experts / top_k times
the FLOPs of a dispatching implementation.  `peftjax.methods.lora_experts` adds LoRA to the stacked weights.

Each block sows its router logits (``intermediates`` collection, ``router_logits``) when the caller makes that
collection mutable; `load_balancing_loss` turns them into transformers' auxiliary loss (Switch Transformer's).

transformers' save_pretrained writes one tensor per expert (Mixtral: ``block_sparse_moe.experts.E.w1/w3/w2``,
Qwen3-MoE: ``mlp.experts.E.gate_proj/up_proj/down_proj``); `fuse_experts` / `split_experts` convert between
those files and the stacked names.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models import layers

# model_type -> (the file's name of the MoE block, its per-expert (gate, up, down) names).
FILE_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
              "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}
_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")


def routing_weights(router_logits: jax.Array, top_k: int, normalize: bool) -> jax.Array:
  """(..., experts) float32: the softmax probabilities of each token's top_k experts (renormalised to sum to 1
  when `normalize`), zero for the other experts."""
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  top, index = jax.lax.top_k(probs, top_k)
  if normalize:
    top = top / jnp.sum(top, axis=-1, keepdims=True)
  return jnp.sum(jax.nn.one_hot(index, probs.shape[-1], dtype=jnp.float32) * top[..., None], axis=-2)


class Experts(nn.Module):
  """The stacked experts: sum over e of weights[..., e] * down_e(act(gate_e x) * up_e x).

  Both matmuls go through `project`, the call `peftjax.methods.lora_experts` intercepts to add its low-rank path.
  """

  num_experts: int
  hidden_size: int
  intermediate_size: int
  activation: Callable[[jax.Array], jax.Array]
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(self.initializer_range), axes)  # noqa
    self.gate_up_proj = self.param("gate_up_proj", init(("expert", "mlp", "embed")),
                                   (self.num_experts, 2 * self.intermediate_size, self.hidden_size), self.param_dtype)
    self.down_proj = self.param("down_proj", init(("expert", "embed", "mlp")),
                                (self.num_experts, self.hidden_size, self.intermediate_size), self.param_dtype)

  def project(self, x: jax.Array, name: str, per_expert: bool) -> jax.Array:
    """(..., experts, out): x through each expert's `name` weight (experts, out, in); x is (..., experts, in) when
    `per_expert`, else (..., in), the same for every expert."""
    spec = "...ei,eoi->...eo" if per_expert else "...i,eoi->...eo"
    return layers.einsum(spec, x, getattr(self, name), self.dtype).astype(self.dtype)

  def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
    """x (..., hidden), weights (..., experts) -> (..., hidden)."""
    gate, up = jnp.split(self.project(x, "gate_up_proj", False), 2, -1)
    out = self.project(self.activation(gate) * up, "down_proj", True)
    return layers.einsum("...eh,...e->...h", out, weights, self.dtype).astype(self.dtype)


class SparseMoeBlock(nn.Module):
  """``gate`` (router) and ``experts`` of one Mixtral / Qwen3-MoE layer; `config` is a LlamaConfig."""

  config: Any
  activation: Callable[[jax.Array], jax.Array]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), ("embed", "expert"))
    router_logits = nn.Dense(c.num_local_experts, use_bias=False, name="gate", kernel_init=init,
                             dot_general=layers.dot_general(self.dtype), **kw)(x)
    self.sow("intermediates", "router_logits", router_logits)
    weights = routing_weights(router_logits, c.num_experts_per_tok, c.normalize_top_k)
    return Experts(c.num_local_experts, c.hidden_size, c.moe_intermediate_size, self.activation, c.initializer_range,
                   name="experts", **kw)(x, weights)


def sown_router_logits(intermediates: Mapping[str, Any]) -> list[jax.Array]:
  """Every MoE layer's router logits (..., experts) from `model.apply(..., mutable=["intermediates"])`'s second
  result (a scanned model's come stacked on a leading layer axis)."""
  flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  return [leaf for path, leaf in flat if "router_logits" in jax.tree_util.keystr(path)]


def load_balancing_loss(router_logits: Sequence[jax.Array], top_k: int, attention_mask: jax.Array | None = None
                        ) -> jax.Array:
  """transformers' load_balancing_loss_func: num_experts * sum_e f_e P_e over the tokens of every layer, f_e the
  share of top-k choices that go to expert e (summing to top_k), P_e the mean routing probability of expert e.

  `router_logits`: per layer (batch, length, experts), or stacked (layers, batch, length, experts); padding
  (attention_mask 0) is left out.  Scale it by config.json's router_aux_loss_coef to add it to the LM loss.
  """
  logits = jnp.concatenate([jnp.reshape(l, (-1, *l.shape[-3:])) for l in router_logits]).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  chosen = jnp.sum(jax.nn.one_hot(jax.lax.top_k(probs, top_k)[1], probs.shape[-1]), axis=-2)
  mask = jnp.ones(logits.shape[:-1]) if attention_mask is None else \
      jnp.broadcast_to((attention_mask != 0).astype(jnp.float32), logits.shape[:-1])
  rows = jnp.sum(mask)
  tokens_per_expert = jnp.einsum("...e,...->e", chosen, mask) / rows
  prob_per_expert = jnp.einsum("...e,...->e", probs, mask) / rows
  return probs.shape[-1] * jnp.sum(tokens_per_expert * prob_per_expert)


def fuse_experts(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A transformers MoE checkpoint's tensors with the per-expert ones stacked under the in-memory names
  (``model.layers.N.mlp.experts.gate_up_proj`` / ``down_proj``, ``model.layers.N.mlp.gate.weight``); other
  tensors, and checkpoints already stacked, pass through."""
  out, experts = {}, {}
  for key, value in state.items():
    match = _EXPERT_KEY.fullmatch(key)
    if match:
      layer, _, expert, name = match.groups()
      experts.setdefault(int(layer), {})[(int(expert), name)] = np.asarray(value)
    else:
      out[key.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = value
  for layer, tensors in experts.items():
    names = next(names for _, names in FILE_NAMES.values() if names[0] in {n for _, n in tensors})
    count = 1 + max(e for e, _ in tensors)
    missing = [f"model.layers.{layer}.experts.{e}.{n}" for e in range(count) for n in names if (e, n) not in tensors]
    if missing:
      raise ValueError(f"checkpoint has {count} experts in layer {layer} but lacks the tensors {missing[:6]}.")
    prefix = f"model.layers.{layer}.mlp.experts"
    out[f"{prefix}.gate_up_proj"] = np.stack([np.concatenate([tensors[e, names[0]], tensors[e, names[1]]])
                                              for e in range(count)])
    out[f"{prefix}.down_proj"] = np.stack([tensors[e, names[2]] for e in range(count)])
  return out


def split_experts(state: Mapping[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
  """Inverse of `fuse_experts`: the stacked tensors as one per expert, named as `model_type`'s files name them."""
  block, (gate_name, up_name, down_name) = FILE_NAMES[model_type]
  out = {}
  for key, value in state.items():
    match = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)", key)
    if not match:
      out[key] = value
    elif match.group(2) == "gate.weight":
      out[f"{match.group(1)}.{block}.gate.weight"] = value
    elif match.group(2) == "experts.down_proj":
      for e, w in enumerate(value):
        out[f"{match.group(1)}.{block}.experts.{e}.{down_name}.weight"] = np.ascontiguousarray(w)
    else:
      for e, w in enumerate(value):
        gate, up = np.split(w, 2)
        out[f"{match.group(1)}.{block}.experts.{e}.{gate_name}.weight"] = np.ascontiguousarray(gate)
        out[f"{match.group(1)}.{block}.experts.{e}.{up_name}.weight"] = np.ascontiguousarray(up)
  return out
