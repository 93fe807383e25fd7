"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): trained keys and values in front of every layer.

Each attention layer attends to k extra key/value positions before the tokens (the models' `prefix_kv`
hooks): always attended, with the tokens' positions shifted by k, as Hugging Face PEFT passes them
through past_key_values.  With `shift_positions=False` (AdapterHub's placement, which adds the prefixes inside
attention: the MAM and UniPELT presets) the tokens keep the positions they have without prefixes (BERT /
RoBERTa's embeddings, GPT-2's wpe, Llama's rotary angles); T5's relative position bias keeps PEFT's placement.
The prefixes of all layers form one table (k, layers * 2 * width), width = the key projection's output size
(kv heads * head_dim); layer i's keys are columns block 2i and its values block 2i + 1, PEFT's layout.

`PrefixTuningConfig` trains the table through PEFT's PrefixEncoder reparameterisation
(``prefix_projection=True``): an embedding (k, width) and ``transform`` = Linear(width, h), tanh,
Linear(h, layers * 2 * width), h = `encoder_hidden_size` (default width).  `fold` evaluates it once and
returns the plain table with a config that has projection=False, which is what PEFT saves and what
inference needs.  `PTuningV2Config` trains the plain table directly (deep prompts, no
reparameterisation; PEFT's PrefixTuningConfig default), e.g. for token classification.

Encoder-decoders (T5) get prefixes in the stacks of `stacks`: ("decoder",), PEFT's behaviour, puts
them in the decoder's self-attention only; ("encoder", "decoder") also in the encoder's (the table
then holds the encoder's layers first).  The decoder part follows PEFT's layout exactly: PEFT doubles
the table for encoder-decoders and hands block i four consecutive key/value blocks of which transformers
uses the first pair (the cross-attention pair is dropped), so decoder block i of L reads pair 2i mod L
and, for even L, the odd pairs are never used (they still count as parameters, as in PEFT).  Generation
works through the models' `generate` with `apply_fn`; the prefixes go to every `decode` / `decode_step`
call, not into the cache.

The adapter tree: ``{"embedding": (k, width), "transform": {"0": {kernel, bias}, "2": {...}}}`` with
projection, ``{"embedding": (k, layers * 2 * width)}`` without (PEFT's ``prompt_encoder.embedding``).
Initialisation as PEFT: embeddings N(0, 1), Linear layers as torch.nn.Linear.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree as ptree
from peftjax.methods import p_tuning, prompt_tuning
from peftjax.models import bert, t5

COLLECTION = "prefix_tuning"
STACKS = ("encoder", "decoder")
# Path endings of each layer's key projection kernel (BERT/RoBERTa, GPT-2's fused q|k|v, Llama) and the
# share of its output that is the keys.
KEY_KERNELS = {"attention/self/key/kernel": 1, "attn/c_attn/kernel": 3, "self_attn/k_proj/kernel": 1}


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig:
  """Prefix tuning settings, following Hugging Face PEFT's PrefixTuningConfig (prefix_projection is `projection`);
  `shift_positions` False keeps the tokens' positions as AdapterHub does (see the module docstring)."""

  num_virtual_tokens: int = 20
  projection: bool = True
  encoder_hidden_size: int | None = None
  stacks: tuple[str, ...] = ("decoder",)
  shift_positions: bool = True

  def __post_init__(self):
    name = type(self).__name__
    prompt_tuning.check_virtual_tokens(name, self.num_virtual_tokens, None)
    object.__setattr__(self, "stacks", tuple(self.stacks))
    if not self.stacks or not set(self.stacks) <= set(STACKS) or len(set(self.stacks)) != len(self.stacks):
      raise ValueError(f"{name}.stacks={self.stacks!r} is not valid; list some of {STACKS}, each once.")
    if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
      raise ValueError(f"{name}.encoder_hidden_size must be positive (or None), got {self.encoder_hidden_size}.")


@dataclasses.dataclass(frozen=True)
class PTuningV2Config(PrefixTuningConfig):
  """P-tuning v2: prefix tuning of the plain per-layer table, no reparameterisation (Hugging Face PEFT's
  PrefixTuningConfig default, whose placement it follows)."""

  projection: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.projection:
      raise ValueError("PTuningV2Config.projection must be False (P-tuning v2 has no reparameterisation); use "
                       "PrefixTuningConfig for the MLP-reparameterised prefixes.")


def layers_and_width(cfg: PrefixTuningConfig, params: ptree.Tree) -> tuple[list[tuple[str | None, int]], int]:
  """([(stack or None, number of layers)], key width) of a zoo model's parameters."""
  if prompt_tuning.is_encoder_decoder(params):
    stacks = [(s, sum(k.startswith("block_") for k in params[s])) for s in cfg.stacks]
    width = np.shape(params["decoder"]["block_0"]["layer_0"]["SelfAttention"]["k"]["kernel"])[-1]
    return stacks, width
  layers, width = 0, None
  for path, leaf in ptree.flatten(params).items():
    for ending, share in KEY_KERNELS.items():
      if path.endswith(ending):
        layers += np.shape(leaf)[0] if np.ndim(leaf) == 3 else 1
        width = np.shape(leaf)[-1] // share
  if not layers:
    raise ValueError(f"the parameters hold no attention key projection (a kernel ending in one of "
                     f"{sorted(KEY_KERNELS)}, or a T5 encoder/decoder); prefix tuning has nowhere to go.")
  return [(None, layers)], width


def init(cfg: PrefixTuningConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """The prefix table (or, with projection, its embedding and transform), initialised as PEFT does."""
  stacks, width = layers_and_width(cfg, params)
  columns = sum(n for _, n in stacks) * 2 * width
  keys = jax.random.split(rng, 3)
  if not cfg.projection:
    return {"embedding": jax.random.normal(keys[0], (cfg.num_virtual_tokens, columns), jnp.float32)}
  hidden = cfg.encoder_hidden_size or width
  return {"embedding": jax.random.normal(keys[0], (cfg.num_virtual_tokens, width), jnp.float32),
          "transform": {"0": p_tuning.linear_init(keys[1], width, hidden),
                        "2": p_tuning.linear_init(keys[2], hidden, columns)}}


def prefix_table(cfg: PrefixTuningConfig, adapters: dict) -> jax.Array:
  """(k, layers * 2 * width): the plain table, through the transform when `cfg.projection`."""
  if cfg.projection:
    return p_tuning.mlp(adapters["transform"], adapters["embedding"], jnp.tanh)
  return adapters["embedding"]


def fold(cfg: PrefixTuningConfig, adapters: dict) -> tuple[PrefixTuningConfig, dict]:
  """Evaluates the reparameterisation once: (config with projection=False, {"embedding": plain table})."""
  return dataclasses.replace(cfg, projection=False), {"embedding": prefix_table(cfg, adapters)}


def prefix_kv(table: jax.Array, head_dim: int, layers: int, batch: int) -> list[tuple[jax.Array, jax.Array]]:
  """Per layer (keys, values), each (batch, k, heads, head_dim), from a (k, layers * 2 * heads * head_dim) table."""
  per_layer = table.reshape(table.shape[0], layers, 2, -1, head_dim)
  per_layer = jnp.broadcast_to(per_layer, (batch, *per_layer.shape))
  return [(per_layer[:, :, i, 0], per_layer[:, :, i, 1]) for i in range(layers)]


def _add_prefixes(cfg: PrefixTuningConfig, table: jax.Array, layout, module, method: str, args: dict, call):
  """Runs a top-level model call with the prefixes in its prefix_kv arguments."""
  if isinstance(module, t5.T5ForConditionalGeneration):
    names = {"__call__": {"encoder_prefix_kv": "encoder", "decoder_prefix_kv": "decoder"},
             "encode": {"prefix_kv": "encoder"}, "decode": {"prefix_kv": "decoder"},
             "decode_step": {"prefix_kv": "decoder"}}.get(method, {})
    names = {arg: stack for arg, stack in names.items() if stack in dict(layout)}
  else:
    names = {"prefix_kv": None} if method in ("__call__", "decode") else {}
  if not names:
    return call(args)
  head_dim = getattr(module.config, "d_kv", None) or module.config.head_dim
  width = table.shape[1] // (2 * sum(layers for _, layers in layout))
  batch = next(args[name].shape[0] for name in ("input_ids", "inputs_embeds", "decoder_input_ids", "token_ids")
               if args.get(name) is not None)
  kv, start = {}, 0
  for stack, layers in layout:
    pairs = prefix_kv(table[:, start:start + 2 * layers * width], head_dim, layers, batch)
    kv[stack] = [pairs[2 * i % layers] for i in range(layers)] if stack == "decoder" else pairs
    start += 2 * layers * width
  for arg, stack in names.items():
    if args.get(arg) is not None:
      raise ValueError(f"{type(cfg).__name__} supplies {arg} itself; call the adapted model without {arg}.")
    args[arg] = kv[stack]
  if not cfg.shift_positions:
    _keep_positions(module, args, table.shape[0])
  return call(args)


def _keep_positions(module, args: dict, k: int) -> None:
  """Sets args' position_ids so that the model's prefix shift by k leaves the tokens' positions as without prefixes.

  BERT / RoBERTa shift only their default positions, so those are passed unshifted; GPT-2 and Llama shift any
  positions, so k is taken off first.  T5 (relative position bias) is left as it is.
  """
  if isinstance(module, t5.T5ForConditionalGeneration):
    return
  tokens = args["input_ids"] if args.get("input_ids") is not None else args["inputs_embeds"]
  positions = args.get("position_ids")
  if isinstance(module.config, bert.BertConfig):
    if positions is None:
      args["position_ids"] = bert.default_position_ids(module.config, args.get("input_ids"), tokens.shape[1])
    return
  if positions is None:
    positions = args.get("cache_index", 0) + jnp.arange(tokens.shape[1])[None]
  args["position_ids"] = positions - k


def wrap(cfg: PrefixTuningConfig, apply_fn: Callable[..., Any], collection: str = COLLECTION) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with the prefixes of `variables[collection]` (default "prefix_tuning")
  in every layer."""

  def adapted(variables, *args, **kwargs):
    variables = dict(variables)
    table = prefix_table(cfg, variables.pop(collection))
    layout, _ = layers_and_width(cfg, variables["params"])
    transform = lambda *a: _add_prefixes(cfg, table, layout, *a)  # noqa: E731
    with nn.intercept_methods(prompt_tuning.top_level_interceptor(transform)):
      return apply_fn(variables, *args, **kwargs)
  return adapted
