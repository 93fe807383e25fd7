"""Cached greedy / sampled decoding shared by the decoder-only families (GPT-2, Llama).

`generate` left-pads the prompts to a bucket length (a power of two, `bucket_length`), so prompts of nearby
lengths reuse one compilation, then runs one jit-compiled program: the prefill writes the prompt into a key/value
cache in the model's compute dtype, and a `jax.lax.while_loop` decodes one token per iteration and stops, inside
the compiled loop, once every row has emitted EOS (no host round trip per token).  Extra left padding changes
nothing a row sees: its positions count only real tokens (as Hugging Face generate does) and padding slots are
masked out of attention.  The exception: virtual tokens (a prefix, prompt tuning's) sit before the padding, so
with a sliding-window layer those prompts keep their length (and compile once per length).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from peftjax.models import sampling

MIN_BUCKET = 16  # the shortest padded prompt: shorter ones all share its compilation


def bucket_length(length: int) -> int:
  """The padded prompt length for a prompt of `length` tokens: the next power of two, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def write_cache(cache: dict, layer, cache_index, key: jax.Array, value: jax.Array) -> tuple:
  """(keys, values, cache): `key` and `value` (batch, length, kv heads, head_dim) written into `cache` at slot
  `cache_index`, and the layer's cached keys and values to attend over.  With `layer` None, `cache` holds one
  layer ((batch, slots, kv heads, head_dim) each, as under a layer scan); with a layer index it holds every layer
  (a leading layer axis) and only this call's slots are written, so inside the compiled decode loop the update is
  in place (slicing each layer out and stacking them back copied the whole cache every step)."""
  if layer is None:
    cache = {name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype), (0, cache_index, 0, 0))
             for name, new in (("key", key), ("value", value))}
    return cache["key"], cache["value"], cache
  cache = {name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype)[None],
                                              (layer, 0, cache_index, 0, 0))
           for name, new in (("key", key), ("value", value))}
  return cache["key"][layer], cache["value"][layer], cache


def left_pad(input_ids: jax.Array, attention_mask: jax.Array, length: int) -> tuple:
  """(ids, mask) with `length - prompt length` columns of padding added on the left: mask 0 and id 0, a real
  vocabulary id (never a prompt method's placeholder id, which no tokenizer produces, nor out of range)."""
  extra = length - input_ids.shape[1]
  if extra <= 0:
    return input_ids, attention_mask
  widths = ((0, 0), (extra, 0))
  return jnp.pad(input_ids, widths), jnp.pad(attention_mask, widths)


@functools.partial(jax.jit, static_argnames=("model", "init_cache", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "apply_fn"))
def _generate(model, init_cache, params, input_ids, attention_mask, prefix_kv, rng, eos, pad, max_new_tokens,
              temperature, top_k, top_p, apply_fn):
  call = apply_fn or (lambda p, *args, **kwargs: model.apply({"params": p}, *args, **kwargs))
  batch, prompt_length = input_ids.shape
  # Hugging Face generate: prompt positions count real tokens (padding gets 0); new tokens continue from the last.
  positions = jnp.where(attention_mask == 1, jnp.cumsum(attention_mask, axis=-1) - 1, 0)
  slots_mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), attention_mask.dtype)], axis=1)
  cache = init_cache(model.config, batch, prompt_length + max_new_tokens, model.dtype)
  logits, cache = call(params, input_ids, slots_mask, positions, cache, 0, prefix_kv, method="decode")

  def choose(logits, finished, rng):
    key = None
    if rng is not None:
      rng, key = jax.random.split(rng)
    token = sampling.next_token(logits, key, temperature, top_k, top_p).astype(input_ids.dtype)
    token = jnp.where(finished, pad, token)
    return token, finished | jnp.isin(token, eos), rng

  def running(carry):
    t, _, _, finished, _, _ = carry
    return (t < max_new_tokens) & ~jnp.all(finished)

  def step(carry):
    t, token, cache, finished, rng, out = carry
    logits, cache = call(params, token[:, None], slots_mask, positions[:, -1:] + t, cache, prompt_length + t - 1,
                         prefix_kv, method="decode")
    token, finished, rng = choose(logits, finished, rng)
    return t + 1, token, cache, finished, rng, jax.lax.dynamic_update_slice(out, token[:, None], (0, t))

  first, finished, rng = choose(logits, jnp.zeros((batch,), bool), rng)
  out = jnp.full((batch, max_new_tokens), pad, input_ids.dtype).at[:, 0].set(first)
  return jax.lax.while_loop(running, step, (1, first, cache, finished, rng, out))[-1]


def _virtual_tokens_in_a_window(model, prefix_kv, apply_fn) -> bool:
  """Whether the prompt keeps its length: a prefix or an `apply_fn` (which may prepend prompt tuning's virtual
  tokens) sits before the left padding, so in a sliding-window layer extra padding would push it out of the
  window sooner than the unpadded prompt does."""
  return (prefix_kv is not None or apply_fn is not None) and any(getattr(model.config, "sliding_layers", ()))


def generate(model, init_cache: Callable[..., dict], params: Any, input_ids, attention_mask, prefix_kv, rng,
             eos: tuple[int, ...], pad: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             apply_fn: Callable[..., Any] | None) -> jax.Array:
  """New tokens (batch, max_new_tokens) of a decoder-only `model` (its `decode` method, `init_cache(config, batch,
  length, dtype)`) after left-padded prompts; after EOS a row emits `pad`.  Arguments as the families' generate
  (which check them); `eos` and `pad` are traced, so other ids reuse the compilation."""
  input_ids = jnp.asarray(input_ids)
  attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
  if not _virtual_tokens_in_a_window(model, prefix_kv, apply_fn):
    input_ids, attention_mask = left_pad(input_ids, attention_mask, bucket_length(input_ids.shape[1]))
  eos = jnp.asarray(eos or (-1,), input_ids.dtype)
  return _generate(model, init_cache, params, input_ids, attention_mask, prefix_kv, rng, eos,
                   jnp.asarray(pad, input_ids.dtype), max_new_tokens, float(temperature), int(top_k), float(top_p),
                   apply_fn)
