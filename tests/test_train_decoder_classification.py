"""`python -m train` with config.task_type="sequence_classification" on a decoder: configs/lora_gpt2_sentiment.py trains
a few steps, exports a PEFT SEQ_CLS folder, and PyTorch PEFT (and transformers, for the merged folder) computes the
same logits; prompt tuning reaches the last-token head the same way."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers

import train
from train import inference, loop, predict, steps, tasks, validate

import test_train  # tests/ is on sys.path under pytest

TINY = {"steps": 6, "batch_size": 8, "max_length": 24, "eval_examples": 32, "train_examples": 64, "log_every": 3,
        "checkpoint_every": 6, "model_shape.n_embd": 32, "model_shape.n_positions": 40, "export_merged": True}


def _run(tmp_path, **overrides) -> dict:
  config = test_train.load_config("lora_gpt2_sentiment", None, workdir=str(tmp_path), **{**TINY, **overrides})
  return train.main(config)


def _batch(result: dict) -> dict:
  """Two right-padded sentences tokenised as the run tokenises them (labels unused)."""
  config = result["config"]
  _, _, tokenizer = loop.load_model(config, 2)
  enc = tokenizer(["a gripping, funny film", "dull"], max_length=config.max_length, padding="max_length",
                  truncation=True, return_tensors="np")
  return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
          "labels": np.zeros(2, np.int32)}


def _predicted(source, batch_size: int = 2) -> np.ndarray:
  """`train.predict`'s logits of _batch's two sentences, read from `source` (a workdir, PEFT or model folder)."""
  records = predict.predict(inference.load(str(source)), ["a gripping, funny film", "dull"], batch_size=batch_size)
  return np.asarray([r["logits"] for r in records])


def _ours(result: dict, batch: dict) -> np.ndarray:
  forward = steps.make_forward(result["model"], tasks.family(result["config"]).task, result["method"])
  return np.asarray(forward(result["state"]["trainable"], result["frozen"], batch))


def _torch(model, batch: dict) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(batch["input_ids"]).long(),
                 attention_mask=torch.tensor(batch["attention_mask"]).long()).logits.numpy()


@pytest.mark.slow
def test_lora_gpt2_sentiment_trains_and_peft_loads_the_seq_cls_folder(tmp_path):
  result = _run(tmp_path)
  assert type(result["model"]).__name__ == "GPT2ForSequenceClassification"
  assert result["final_step"] == 6 and set(result["after"]) == {"loss", "accuracy"}
  assert result["after"]["loss"] != result["before"]["loss"]
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    adapter = json.load(f)
  assert (adapter["task_type"], adapter["modules_to_save"], adapter["target_modules"]) == ("SEQ_CLS", ["score"],
                                                                                           ["c_attn"])
  batch = _batch(result)
  ours = _ours(result, batch)
  assert ours.shape == (2, 2)
  base = transformers.AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"])
  assert type(base).__name__ == "GPT2ForSequenceClassification" and base.config.pad_token_id is not None
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  np.testing.assert_allclose(_torch(peft_model, batch), ours, atol=1e-4, rtol=0)
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
  np.testing.assert_allclose(_torch(merged, batch), ours, atol=1e-4, rtol=0)
  untrained = transformers.AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"])
  assert np.max(np.abs(_torch(untrained.eval(), batch) - ours)) > 1e-3  # the adapter and trained score changed it
  # predict reads the workdir, its PEFT folder alone (the base it names) and the merged folder to the same logits
  # (the two folders pad to another length and batch size: the last-token head does not see the padding).
  for source, batch_size in ((tmp_path, 2), (tmp_path / "adapter", 3), (tmp_path / "merged", 1)):
    np.testing.assert_allclose(_predicted(source, batch_size), ours, atol=1e-5, rtol=0, err_msg=str(source))


@pytest.mark.slow
def test_prompt_tuning_on_the_decoder_classifier_matches_peft(tmp_path):
  result = _run(tmp_path, method="prompt_tuning", **{"prompt.num_virtual_tokens": 4})
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    adapter = json.load(f)
  assert (adapter["peft_type"], adapter["task_type"]) == ("PROMPT_TUNING", "SEQ_CLS")
  base = transformers.AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"])
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  batch = _batch(result)
  ours = _ours(result, batch)
  np.testing.assert_allclose(_torch(peft_model, batch), ours, atol=1e-4, rtol=0)
  # predict through the prompt: the workdir pads to the run's max_length, so the last position is the same one.
  np.testing.assert_allclose(_predicted(tmp_path), ours, atol=1e-5, rtol=0)


def test_bad_task_type_gives_one_clear_sentence(tmp_path):
  config = test_train.load_config("lora_gpt2_sentiment", None, workdir=str(tmp_path), task_type="tagging")
  with pytest.raises(ValueError, match=r"config.task_type='tagging' is not a known task type; valid: "):
    validate.check_sections(config)
  config = test_train.load_config("lora_t5", None, workdir=str(tmp_path))
  config.task_type = "sequence_classification"
  with pytest.raises(ValueError, match=r"not available for config.family='t5'; families with a sequence classifier: "
                                       r"\['bert', 'gemma', 'gpt2', 'llama', 'roberta'\]"):
    validate.check_sections(config)
