"""Tiny models of every family with every dropout on, a method of each kind, and a batch for each: shared by
tests/test_dropout_rows.py and tests/dropout_worker.py."""

from __future__ import annotations

import jax
import numpy as np

import peftjax as pj

from train import steps, tasks

ROWS, LENGTH, RATE = 8, 12, 0.1
# (family, method): LoRA on every family, a bottleneck adapter and prefix tuning on two each.
CASES = [(family, "lora") for family in ("bert", "roberta", "t5", "gpt2", "llama")] + [
    ("bert", "adapter"), ("gpt2", "adapter"), ("t5", "prefix"), ("llama", "prefix")]


def shape(family: str, rate: float) -> dict:
  """A one-layer model shape of `family`, every dropout of the model at `rate`."""
  bert = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
              max_position_embeddings=32, hidden_dropout_prob=rate, attention_probs_dropout_prob=rate)
  return {
      "bert": bert,
      "roberta": {**bert, "max_position_embeddings": 34, "pad_token_id": 1},
      "t5": dict(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, dropout_rate=rate),
      "gpt2": dict(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=rate, embd_pdrop=rate,
                   attn_pdrop=rate),
      "llama": dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=32, attention_dropout=rate),
  }[family]


def method(name: str, rate: float):
  """The method config `name`, its own dropout (where it has one) at `rate`."""
  return {"lora": pj.LoraConfig(rank=4, alpha=8.0, targets="all-linear", dropout=rate),
          "adapter": pj.HoulsbyConfig(reduction_factor=4, dropout=rate),
          "prefix": pj.PrefixTuningConfig(4, encoder_hidden_size=16)}[name]


def batch(family: str) -> dict:
  """Random rows with right padding of random length; labels as the family's task wants them."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 64, (ROWS, LENGTH)).astype(np.int32)
  mask = (np.arange(LENGTH)[None] < rng.integers(4, LENGTH + 1, (ROWS, 1))).astype(np.int32)
  task = tasks.FAMILIES[family].task
  if task is tasks.SequenceClassification:
    labels = rng.integers(0, 2, ROWS).astype(np.int32)
  elif task is tasks.Seq2SeqLM:
    labels = rng.integers(3, 64, (ROWS, 5)).astype(np.int32)
  else:
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def setup(family: str, method_name: str, rate: float = RATE):
  """(task, model, params, method config, adapters, forward) for one case; forward as `train.steps.make_forward`."""
  spec = tasks.FAMILIES[family]
  model = spec.random_model(shape(family, rate), num_labels=2)
  params = spec.module.init_params(model, jax.random.key(0))
  method_cfg = method(method_name, rate)
  adapters = pj.init(method_cfg, jax.random.key(1), params)
  return spec.task, model, params, method_cfg, adapters, steps.make_forward(model, spec.task, method_cfg)
