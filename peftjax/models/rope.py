"""Rotary-embedding frequencies with Hugging Face's `rope_scaling` types, as transformers 5.23 computes them.

Family-neutral: every function takes plain numbers (head_dim, rope_theta, max_position_embeddings) and the
scaling as sorted (key, value) pairs (`parse_scaling`), so any model's config can use it.

- "default": inv_freq = 1 / theta^(2i / head_dim).
- "linear": inv_freq / factor.
- "llama3": Llama 3.1's per-frequency blend of inv_freq and inv_freq / factor.
- "yarn": YaRN's blend of interpolated and extrapolated frequencies over a ramp between the dimensions that
  turn beta_fast and beta_slow times in original_max_position_embeddings (floor / ceil when `truncate`), and an
  attention factor (given, or from mscale / mscale_all_dim, or 0.1 ln(factor) + 1) multiplying cos and sin.
- "dynamic": dynamic NTK; while the longest position of a call is within max_position_embeddings the
  frequencies are the default ones, beyond it the base grows to
  theta (factor seq_len / max_position_embeddings - (factor - 1))^(d / (d - 2)).
- "longrope": inv_freq / short_factor, or / long_factor once the longest position of a call passes
  original_max_position_embeddings, with the attention factor sqrt(1 + ln(factor) / ln(original max)).
- "proportional": the first partial_rotary_factor of the angles (exponents over the whole head_dim), the rest
  zero (those dimensions pass unrotated), all divided by factor (default 1).  It is the only type that takes a
  partial_rotary_factor other than 1.

For "dynamic" and "longrope" the call's sequence length is max(position_ids) + 1 over the whole batch (traced,
so it works inside jit and in each step of cached generation), as transformers' `dynamic_rope_update`.  Keys
already in a cache keep the frequencies they were rotated with, as in transformers.  One difference: a
transformers model keeps the dynamic frequencies of the longest call it has seen until a call shorter than
max_position_embeddings resets them, whereas here each call uses its own length (what a freshly loaded
transformers model computes, and what it computes within one generate call, whose lengths only grow).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope", "proportional")
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",), "proportional": (),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "longrope": ("short_factor", "long_factor")}
_WITH_ORIGINAL_MAX = ("llama3", "yarn", "longrope")  # transformers fills original_max_position_embeddings for these


def from_hf(hf: Mapping[str, Any], default_theta: float = 10000.0) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling dict or None) from a config.json dict, as transformers 5.23 reads them.

  transformers 5 writes `rope_parameters` (with rope_theta inside); older files have `rope_theta` and
  `rope_scaling`.  A top-level `original_max_position_embeddings` (Phi-3 style) overrides the one in the
  scaling for llama3 / yarn / longrope, as transformers' standardize_rope_params does.
  """
  scaling = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = scaling.pop("rope_theta", None)
  theta = hf.get("rope_theta", default_theta) if theta is None else theta
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type in _WITH_ORIGINAL_MAX and hf.get("original_max_position_embeddings") is not None:
    scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
  return theta, scaling or None


def parse_scaling(scaling, max_position_embeddings: int, head_dim: int,
                  where: str = "rope_scaling") -> tuple[tuple[str, Any], ...] | None:
  """Hugging Face rope_scaling (dict or pairs) -> sorted hashable pairs with 'rope_type', or None for plain RoPE.

  Lists (longrope's factors) become tuples; original_max_position_embeddings defaults to max_position_embeddings
  for llama3 / yarn / longrope.  A bad value raises ValueError naming `where` and the key.
  """
  if not scaling:
    return None
  scaling = dict(scaling)
  rope_type = scaling.get("rope_type") or scaling.get("type") or "default"  # as transformers: rope_type first
  scaling.pop("type", None)
  scaling["rope_type"] = rope_type
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{where} rope_type={rope_type!r} is not supported; valid: {ROPE_TYPES}.")
  partial = scaling.get("partial_rotary_factor", 1.0)
  if rope_type == "proportional" and not (isinstance(partial, (int, float)) and 0.0 <= partial <= 1.0):
    raise ValueError(f"{where} partial_rotary_factor={partial!r} is not supported; valid: a number in [0, 1].")
  if rope_type != "proportional" and partial != 1.0:
    raise ValueError(f"{where} partial_rotary_factor={partial!r} is not supported for rope_type {rope_type!r}; "
                     "valid: 1.0 (or rope_type 'proportional').")
  if rope_type == "default":
    return None
  if rope_type in _WITH_ORIGINAL_MAX:
    scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
  required = _REQUIRED[rope_type]
  missing = [key for key in required if key not in scaling]
  if missing:
    raise ValueError(f"{where} of rope_type {rope_type!r} needs {list(required)}; missing {missing}.")
  if rope_type == "longrope":
    for key in ("short_factor", "long_factor"):
      factors = scaling[key]
      if (not isinstance(factors, (list, tuple)) or len(factors) != head_dim // 2
          or not all(isinstance(f, (int, float)) for f in factors)):
        raise ValueError(f"{where} {key} must be a list of {head_dim // 2} numbers (head_dim / 2), got {factors!r}.")
      scaling[key] = tuple(float(f) for f in factors)
  factor = scaling.get("factor")
  if "factor" in required and not (isinstance(factor, (int, float)) or (rope_type == "yarn" and factor is None)):
    raise ValueError(f"{where} factor must be a number for rope_type {rope_type!r}, got {factor!r}.")
  return tuple(sorted(scaling.items()))


def _default(head_dim: int, rope_theta: float) -> np.ndarray:
  return 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _llama3(inv_freq: np.ndarray, s: dict) -> np.ndarray:
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_context = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
  return np.where(medium, smoothed, scaled)


def _yarn(head_dim: int, rope_theta: float, s: dict, max_position_embeddings: int) -> tuple[np.ndarray, float]:
  original = s["original_max_position_embeddings"]
  factor = max_position_embeddings / original if s["factor"] is None else s["factor"]  # None: as DeepSeek-V3

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention = s.get("attention_factor")
  if attention is None:
    both = s.get("mscale") and s.get("mscale_all_dim")
    attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]) if both else mscale(factor)
  beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

  def correction_dim(rotations):  # the dimension that turns `rotations` times in `original` positions
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope_theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # as transformers: avoids dividing by zero
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolation = _default(head_dim, rope_theta)
  inv_freq = extrapolation / factor * ramp + extrapolation * (1 - ramp)
  return inv_freq, float(attention)


def _longrope_attention(s: dict, max_position_embeddings: int) -> float:
  original = s["original_max_position_embeddings"]
  factor = s.get("factor")
  factor = max_position_embeddings / original if factor is None else factor
  if s.get("attention_factor") is not None:
    return float(s["attention_factor"])
  return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def inv_freq(head_dim: int, rope_theta: float, scaling, max_position_embeddings: int) -> tuple[np.ndarray, float]:
  """(inv_freq (head_dim // 2,) float32, attention_scaling): the frequencies a short call uses.

  For "dynamic" and "longrope" these are the ones up to the original maximum length (transformers' initial
  ones); `call_inv_freq` switches to the long ones for a given call.  `scaling` is `parse_scaling`'s pairs.
  """
  s = dict(scaling or {})
  rope_type = s.get("rope_type", "default")
  freqs, attention = _default(head_dim, rope_theta), 1.0
  if rope_type == "linear":
    freqs = freqs / s["factor"]
  elif rope_type == "llama3":
    freqs = _llama3(freqs, s)
  elif rope_type == "yarn":
    freqs, attention = _yarn(head_dim, rope_theta, s, max_position_embeddings)
  elif rope_type == "longrope":
    freqs, attention = freqs / np.asarray(s["short_factor"]), _longrope_attention(s, max_position_embeddings)
  elif rope_type == "proportional":
    angles = int(s.get("partial_rotary_factor", 1.0) * head_dim // 2)
    freqs = np.where(np.arange(head_dim // 2) < angles, freqs, 0.0) / s.get("factor", 1.0)
  return freqs.astype(np.float32), attention


def _dynamic(seq_len: jax.Array, head_dim: int, rope_theta: float, factor: float,
             max_position_embeddings: int) -> jax.Array:
  """Dynamic NTK frequencies for a (traced) seq_len, in float32 with transformers' order of operations."""
  seq_len = jnp.maximum(seq_len, max_position_embeddings).astype(jnp.float32)
  base = rope_theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
  return 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def call_inv_freq(position_ids: jax.Array, head_dim: int, rope_theta: float, scaling,
                  max_position_embeddings: int) -> tuple[jax.Array, float]:
  """(inv_freq, attention_scaling) of one call over `position_ids` (any shape, may be traced).

  "dynamic" and "longrope" switch on seq_len = max(position_ids) + 1 (see the module docstring); the other
  types return `inv_freq`'s.
  """
  freqs, attention = inv_freq(head_dim, rope_theta, scaling, max_position_embeddings)
  s = dict(scaling or {})
  rope_type = s.get("rope_type", "default")
  if rope_type not in ("dynamic", "longrope"):
    return jnp.asarray(freqs), attention
  seq_len = jnp.max(position_ids) + 1
  if rope_type == "dynamic":
    long = _dynamic(seq_len, head_dim, rope_theta, s["factor"], max_position_embeddings)
    return jnp.where(seq_len > max_position_embeddings, long, freqs), attention
  long = (_default(head_dim, rope_theta) / np.asarray(s["long_factor"])).astype(np.float32)
  return jnp.where(seq_len > s["original_max_position_embeddings"], long, freqs), attention
