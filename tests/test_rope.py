"""RoPE scaling (peftjax.models.rope) against transformers 5.23: the rotary cos/sin of every rope_type on the
Llama, Mistral and Qwen2 rotary classes, and tiny yarn / dynamic / longrope / proportional checkpoints end to end
(logits with both paddings below and above the original maximum length, greedy generation that crosses it)."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from peftjax.models import llama, rope

from compare import assert_same_tokens  # tests/ is on sys.path under pytest

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
HALF = 8  # head_dim 16 / 2
_factors = np.random.default_rng(0).uniform(1.0, 4.0, (2, HALF)).round(3).tolist()
# name: (max_position_embeddings, rope_parameters without rope_theta)
CASES = {
    "linear": (64, dict(rope_type="linear", factor=2.0)),
    "llama3": (64, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=16)),
    "dynamic": (16, dict(rope_type="dynamic", factor=3.0)),
    "yarn": (64, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    # the ramp, not truncated, runs from frequency 2.62 to 4.42 of 8: frequencies 3 and 4 are blended
    "yarn_ramp": (8192, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048, beta_fast=16,
                             beta_slow=2, truncate=False)),
    "yarn_mscale": (64, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=16, mscale=0.707,
                             mscale_all_dim=1.0)),
    "yarn_attention_factor": (64, dict(rope_type="yarn", factor=None, original_max_position_embeddings=16,
                                       attention_factor=1.5)),
    "longrope": (64, dict(rope_type="longrope", short_factor=_factors[0], long_factor=_factors[1],
                          original_max_position_embeddings=16)),
    "longrope_factor": (64, dict(rope_type="longrope", short_factor=_factors[0], long_factor=_factors[1],
                                 original_max_position_embeddings=16, factor=2.0)),
    "proportional": (64, dict(rope_type="proportional", partial_rotary_factor=0.25, factor=2.0)),
}
PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _hf_config(model_type: str, case: str, **kwargs):
  max_positions, parameters = CASES[case]
  config_cls = getattr(transformers, f"{PREFIX[model_type]}Config")
  return config_cls(**TINY, max_position_embeddings=max_positions,
                    rope_parameters=dict(parameters, rope_theta=10000.0), **kwargs)


def _torch_rotary_class(model_type: str):
  module = getattr(getattr(transformers.models, model_type), f"modeling_{model_type}")
  return getattr(module, f"{PREFIX[model_type]}RotaryEmbedding")


@functools.cache
def _our_rotary(config: llama.LlamaConfig):
  return jax.jit(lambda position_ids: llama.rotary(position_ids, *llama.rope_inv_freq(config, position_ids)))


def test_every_rope_type_of_the_shared_transformers_code_path_and_no_other():
  """Llama, Mistral and Qwen2 share transformers' rotary code path (ROPE_INIT_FUNCTIONS, dynamic_rope_update);
  every type it has is supported, and any other (e.g. 'axial', which only other models use) is refused in one
  sentence."""
  assert set(rope.ROPE_TYPES) == set(ROPE_INIT_FUNCTIONS) | {"default"}
  sources = {inspect.getsource(_torch_rotary_class(model_type)).replace(PREFIX[model_type], "X")
             for model_type in PREFIX}
  assert len(sources) == 1 and "@dynamic_rope_update" in sources.pop()
  with pytest.raises(ValueError) as error:
    llama.LlamaConfig.from_hf({**TINY, "rope_parameters": {"rope_type": "axial", "rope_theta": 1e4}})
  message = str(error.value)
  assert message.startswith("LlamaConfig.rope_scaling rope_type='axial' is not supported; valid: (")
  assert "yarn" in message and "\n" not in message and message.count(";") == 1


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model_type", list(PREFIX))
def test_rotary_matches_transformers(model_type, case):
  """cos and sin (with the attention factor) of transformers' rotary module for prefill-like calls below and
  above the original maximum and decode steps past it, in the order generate makes them, on one module."""
  hf = _hf_config(model_type, case)
  torch_rotary = _torch_rotary_class(model_type)(hf)
  config = llama.LlamaConfig.from_hf({**hf.to_dict(), "model_type": model_type})
  assert dict(config.rope_scaling)["rope_type"] == CASES[case][1]["rope_type"]
  x = torch.zeros(1)
  left_padded = np.array([[0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8], list(range(12))])
  calls = [left_padded, np.arange(24)[None], np.array([[23], [24]]), np.array([[40], [30]])]
  for position_ids in calls:
    with torch.no_grad():
      expected = [t.numpy() for t in torch_rotary(x, torch.tensor(position_ids))]
    ours = _our_rotary(config)(position_ids)
    for e, o in zip(expected, ours):
      np.testing.assert_allclose(np.asarray(o), e, atol=2e-6, rtol=0)


def _torch_model(model_type: str, case: str):
  torch.manual_seed(0)
  model = getattr(transformers, f"{PREFIX[model_type]}ForCausalLM")(_hf_config(model_type, case))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.uniform_(0.5, 1.5)
      else:
        param.normal_(0.0, 0.15)
  return model.eval()


def _padded(left: bool, lengths):
  rng = np.random.default_rng(len(lengths) + max(lengths))
  width = max(lengths)
  input_ids, attention_mask = np.zeros((len(lengths), width), np.int64), np.zeros((len(lengths), width), np.int64)
  for i, n in enumerate(lengths):
    span = slice(width - n, width) if left else slice(0, n)
    input_ids[i, span] = rng.integers(3, VOCAB, n)
    attention_mask[i, span] = 1
  return dict(input_ids=input_ids, attention_mask=attention_mask)


SHORT = [_padded(False, [9, 6, 3]), _padded(True, [9, 6, 3])]  # below every original maximum (16) here
LONG = [_padded(False, [24, 20, 11]), _padded(True, [24, 20, 11])]  # 24 positions: past it


def _torch_logits(model, batch) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


@functools.cache
def _jit_apply(model):
  return jax.jit(model.apply)


def _logits(model, params, batch) -> np.ndarray:
  return np.asarray(_jit_apply(model)({"params": params}, batch["input_ids"], batch["attention_mask"]))


def _max_diff(a, b, mask) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))[mask.astype(bool)]))


# case -> a rope_scaling change that the case's numbers must be sensitive to (and, for dynamic / longrope,
# only above the original maximum)
CHECKPOINTS = {
    ("llama", "yarn"): dict(attention_factor=1.0),
    ("qwen2", "yarn_mscale"): dict(mscale=0.0),
    ("llama", "dynamic"): None,  # plain RoPE
    ("llama", "longrope"): dict(long_factor=tuple(_factors[0])),
    ("mistral", "longrope_factor"): dict(long_factor=tuple(_factors[0])),
    ("llama", "proportional"): dict(partial_rotary_factor=1.0),
}


@pytest.mark.parametrize("model_type,case", list(CHECKPOINTS))
def test_checkpoint_logits_and_generation_match_transformers(model_type, case, tmp_path):
  folder = str(tmp_path / "hf")
  _torch_model(model_type, case).save_pretrained(folder)
  # calls ordered so that transformers' rotary module, which keeps the longest length's dynamic frequencies
  # until a call shorter than the original maximum resets them, computes each call's own (see peftjax.models.rope):
  # short calls, long calls, then generation
  torch_model = getattr(transformers, f"{PREFIX[model_type]}ForCausalLM").from_pretrained(folder).eval()
  model, params = llama.from_pretrained(folder)
  s = dict(model.config.rope_scaling)
  switches = s["rope_type"] in ("dynamic", "longrope")
  threshold = s.get("original_max_position_embeddings", model.config.max_position_embeddings)
  assert s["rope_type"] == CASES[case][1]["rope_type"] and (threshold == 16 or not switches)
  change = CHECKPOINTS[model_type, case]
  other_scaling = None if change is None else {**s, **change}
  other = model.clone(config=dataclasses.replace(model.config, rope_scaling=other_scaling))
  for i, batch in enumerate(SHORT + LONG):
    mask = batch["attention_mask"]
    expected = _torch_logits(torch_model, batch)
    assert np.abs(expected).max() > 1.0
    assert _max_diff(_logits(model, params, batch), expected, mask) < 1e-4
    changed = _max_diff(_logits(other, params, batch), expected, mask)
    if switches and i < len(SHORT):
      assert changed < 1e-5  # below the original maximum the long-context numbers are unused
    else:
      assert changed > 1e-3

  assert not switches or SHORT[1]["input_ids"].shape[1] < threshold < SHORT[1]["input_ids"].shape[1] + 16
  torch_model.generation_config.eos_token_id = None  # all 16 tokens in every row, as ours without EOS
  # dynamic: also a prompt already past the maximum, whose cached keys keep the prefill's frequencies while each
  # decoding step's grow (the long prompt first, for the reason above)
  for prompts in [LONG[1], SHORT[1]] if s["rope_type"] == "dynamic" else [SHORT[1]]:
    ours = np.asarray(llama.generate(model, params, prompts["input_ids"], prompts["attention_mask"],
                                     max_new_tokens=16, eos_token_id=(), pad_token_id=0))
    with torch.no_grad():
      theirs = torch_model.generate(torch.tensor(prompts["input_ids"]),
                                    attention_mask=torch.tensor(prompts["attention_mask"]), max_new_tokens=16,
                                    do_sample=False, pad_token_id=0).numpy()[:, prompts["input_ids"].shape[1]:]
    assert len(np.unique(ours)) > 4
    assert_same_tokens(ours, theirs, "ours vs transformers generate")

  ours_folder = str(tmp_path / "ours")
  llama.save_pretrained(model, params, ours_folder)
  reloaded = getattr(transformers, f"{PREFIX[model_type]}ForCausalLM").from_pretrained(ours_folder)
  assert reloaded.config.rope_parameters == torch_model.config.rope_parameters
  assert llama.from_pretrained(ours_folder)[0] == model


def test_config_errors_and_original_max_priority():
  def error(scaling, head_dim=16):
    with pytest.raises(ValueError) as info:
      rope.parse_scaling(scaling, 64, head_dim, "LlamaConfig.rope_scaling")
    assert "\n" not in str(info.value) and str(info.value).endswith(".")
    return str(info.value)

  assert "of rope_type 'yarn' needs ['factor']; missing ['factor']" in error({"rope_type": "yarn"})
  assert "missing ['long_factor']" in error({"rope_type": "longrope", "short_factor": [1.0] * HALF})
  assert "long_factor must be a list of 8 numbers (head_dim / 2), got [1.0, 1.0]" in error(
      {"rope_type": "longrope", "short_factor": [1.0] * HALF, "long_factor": [1.0, 1.0]})
  assert "factor must be a number for rope_type 'dynamic', got '2'" in error({"type": "dynamic", "factor": "2"})
  assert "partial_rotary_factor=0.5 is not supported for rope_type 'yarn'; valid: 1.0" in error(
      {"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5})
  assert "partial_rotary_factor=1.5 is not supported; valid: a number in [0, 1]" in error(
      {"rope_type": "proportional", "partial_rotary_factor": 1.5})
  assert rope.parse_scaling({"rope_type": "default"}, 64, 16) is None
  assert dict(rope.parse_scaling({"type": "yarn", "factor": 2.0}, 64, 16)) == {
      "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}

  # A top-level original_max_position_embeddings (Phi-3 style) wins over the one in rope_parameters, as in
  # transformers; the frequencies then equal transformers' (8, not the 64 in rope_parameters).
  hf = _hf_config("llama", "yarn", original_max_position_embeddings=8)
  hf_dict = {**hf.to_dict(), "rope_parameters": dict(CASES["yarn"][1], rope_theta=10000.0,
                                                     original_max_position_embeddings=64)}
  config = llama.LlamaConfig.from_hf(hf_dict)
  assert dict(config.rope_scaling)["original_max_position_embeddings"] == 8
  torch_rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)
  freqs, attention = rope.inv_freq(16, 10000.0, config.rope_scaling, 64)
  np.testing.assert_allclose(freqs, torch_rotary.inv_freq.numpy(), rtol=1e-6)
  assert attention == pytest.approx(torch_rotary.attention_scaling, rel=1e-12)
  theta, scaling = rope.from_hf({"rope_theta": 5e5, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
  assert theta == 5e5 and scaling == {"type": "dynamic", "factor": 2.0}
