"""bench/accelerator.py stays runnable: its FLOP and parameter counts against XLA's and peftjax's own, and its
`--tiny` run on the CPU (LoRA starts at the base model's loss; both modes learn)."""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

import peftjax as pj
from peftjax.models import llama

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import accelerator  # noqa: E402


def test_flop_and_parameter_counts_match_the_compiled_model():
  c = llama.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  model = llama.LlamaForCausalLM(c)
  params = llama.init_params(model, jax.random.key(0))
  tokens = jnp.zeros((2, 128), jnp.int32)
  xla = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).compile().cost_analysis()["flops"]
  assert math.isclose(accelerator.forward_flops(c, 2, 128), xla, rel_tol=0.03)
  adapters = pj.init(pj.LoraConfig(rank=accelerator.RANK, targets="all-linear"), jax.random.key(1), params)
  assert accelerator.lora_params(c) == sum(x.size for x in jax.tree.leaves(adapters))
  assert accelerator.linear_params(c) == sum(x.size for x in jax.tree.leaves(params) if x.ndim == 2)


@pytest.mark.slow
def test_tiny_run(capsys):
  lora, full = accelerator.main(["--tiny", "--steps", "2"])
  assert "| lora | 2 x 32 |" in capsys.readouterr().out
  assert math.isclose(lora["losses"][0], full["losses"][0], rel_tol=1e-3)  # B = 0: the base model
  for result in (lora, full):
    assert result["losses"][-1] < result["losses"][0]
    assert result["tokens_per_s"] > 0 and result["peak_bytes"] > 0
