"""The decoder families' shared generate loop (peftjax.models.decoding) on tiny random GPT-2 and Llama models:
prompts of lengths in one bucket compile once and give the tokens of full forward passes, the compiled loop
stops once every row has emitted EOS, and each layer writes only its new slots of the stacked cache."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from peftjax.models import decoding, gpt2, llama

from compare import assert_same_tokens

FAMILIES = {
    "gpt2": (gpt2, gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2,
                                                        n_head=4))),
    "llama": (llama, llama.LlamaForCausalLM(llama.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              num_key_value_heads=2, tie_word_embeddings=True))),
}
NEW = 6


def _prompts(length: int) -> tuple[np.ndarray, np.ndarray]:
  """Three left-padded rows of `length` columns holding length, length - 2 and 1 real tokens."""
  rng = np.random.default_rng(length)
  ids = rng.integers(3, 97, (3, length)).astype(np.int32)
  mask = np.ones((3, length), np.int32)
  mask[1, :2], mask[2, :-1] = 0, 0
  return np.where(mask == 1, ids, 0), mask


def _greedy_without_cache(model, params, ids, mask, steps: int) -> np.ndarray:
  """Greedy tokens from full forward passes over the growing sequence, positions counting real tokens."""
  forward = jax.jit(lambda i, m, p: model.apply({"params": params}, i, m, p))
  new = []
  for _ in range(steps):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    token = np.argmax(np.asarray(forward(ids, mask, positions))[:, -1], axis=-1).astype(np.int32)
    new.append(token)
    ids, mask = np.concatenate([ids, token[:, None]], 1), np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
  return np.stack(new, 1)


@pytest.mark.parametrize("kind", FAMILIES)
def test_prompt_lengths_in_one_bucket_compile_once(kind):
  module, model = FAMILIES[kind]
  params = module.init_params(model, jax.random.key(1))
  assert [decoding.bucket_length(n) for n in (1, 16, 17, 32, 33)] == [16, 16, 32, 32, 64]
  before = decoding._generate._cache_size()
  for length in (5, 11):  # both pad to 16: one compilation
    ids, mask = _prompts(length)
    tokens = np.asarray(module.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=()))
    assert_same_tokens(tokens, _greedy_without_cache(model, params, ids, mask, NEW), f"prompt length {length}")
    assert decoding._generate._cache_size() == before + 1
  ids, mask = _prompts(17)  # the next bucket compiles again
  tokens = np.asarray(module.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=()))
  assert_same_tokens(tokens, _greedy_without_cache(model, params, ids, mask, NEW), "prompt length 17")
  assert decoding._generate._cache_size() == before + 2


@pytest.mark.parametrize("kind", FAMILIES)
def test_loop_stops_once_every_row_emitted_eos(kind):
  module, model = FAMILIES[kind]
  params = module.init_params(model, jax.random.key(2))
  ids, mask = _prompts(7)
  calls = []

  def counted(p, *args, **kwargs):  # counts the decode calls the compiled program makes (prefill + one per step)
    jax.debug.callback(lambda: calls.append(1))
    return model.apply({"params": p}, *args, **kwargs)

  def run(**kwargs):
    calls.clear()
    tokens = np.asarray(module.generate(model, params, ids, mask, max_new_tokens=NEW, apply_fn=counted,
                                        pad_token_id=0, **kwargs))
    jax.effects_barrier()
    return tokens, len(calls)

  free, free_calls = run(eos_token_id=())
  assert free_calls == NEW
  # EOS = each row's third token: the loop ends once the last row has emitted one, rows that ended emit pad.
  eos = tuple(int(t) for t in free[:, 2])
  ends = [next(i for i, t in enumerate(tokens) if t in eos) + 1 for tokens in free.tolist()]
  stopped, stopped_calls = run(eos_token_id=eos)
  assert stopped_calls == max(ends) < NEW
  for row, (tokens, end) in enumerate(zip(free.tolist(), ends)):
    assert_same_tokens(stopped[row], tokens[:end] + [0] * (NEW - end), f"row {row}")


def test_write_cache_writes_one_layers_new_slots():
  rng = np.random.default_rng(0)
  cache = {name: rng.standard_normal((3, 2, 8, 2, 4)).astype(np.float32) for name in ("key", "value")}
  key, value = rng.standard_normal((2, 2, 2, 4)).astype(np.float32), rng.standard_normal((2, 2, 2, 4))
  keys, values, written = decoding.write_cache(cache, 1, 5, key, value)
  expected = {name: array.copy() for name, array in cache.items()}
  expected["key"][1, :, 5:7], expected["value"][1, :, 5:7] = key, value
  for name in cache:
    np.testing.assert_array_equal(written[name], expected[name])
  np.testing.assert_array_equal(keys, expected["key"][1])
  np.testing.assert_array_equal(values, expected["value"][1])
  # one layer's cache (the layout under a layer scan): the same slots, no layer axis
  keys, values, written = decoding.write_cache({k: v[1] for k, v in cache.items()}, None, 5, key, value)
  np.testing.assert_array_equal(written["key"], expected["key"][1])
  np.testing.assert_array_equal(values, expected["value"][1])


@pytest.mark.parametrize("kind", FAMILIES)
def test_decode_loop_never_rebuilds_the_whole_cache(kind):
  """The compiled program has no op that concatenates the layers' caches into the stacked one (what slicing
  each layer out and stacking them back compiled to: a copy of the whole cache every step)."""
  module, model = FAMILIES[kind]
  params = module.init_params(model, jax.random.key(3))
  ids, mask = decoding.left_pad(*map(jax.numpy.asarray, _prompts(5)), 16)
  hlo = decoding._generate.lower(model, module.init_cache, params, ids, mask, None, None,
                                 jax.numpy.asarray([-1], ids.dtype), jax.numpy.asarray(0, ids.dtype), NEW, 0.0, 0,
                                 1.0, None).compile().as_text()
  shape = module.init_cache(model.config, 3, 16 + NEW)["key"].shape
  stacked = f"f32[{','.join(map(str, shape))}]"
  rebuilt = [line for line in hlo.splitlines() if f"= {stacked}{{" in line and " concatenate(" in line]
  assert not rebuilt, rebuilt[:2]
  assert "dynamic-update-slice" in hlo
