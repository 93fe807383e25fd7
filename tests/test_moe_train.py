"""`python -m train` with LoRA on the stacked expert weights of a mixture-of-experts model
(config.lora.target_parameters, configs/lora_mixtral.py:experts): the run's adapter is a Hugging Face PEFT folder
with target_parameters that transformers + peft load to the run's logits, train.merge and train.predict's loader
compute the same, and bad settings are refused in one sentence naming the key."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import transformers

from test_llama import _max_diff, _torch_logits  # tests/ is on sys.path under pytest
from test_train_zoo import adapted_logits, load_config


@pytest.mark.slow
def test_expert_lora_run_exports_a_peft_folder_with_target_parameters(tmp_path):
  """configs/lora_mixtral.py:experts shrunk to 4 steps: the experts' LoRA trains, and peft on workdir/base +
  workdir/adapter, train.predict's loader and train.merge's folder all give the run's logits."""
  import train
  from train import inference, merge
  config = load_config("lora_mixtral", tmp_path, "experts", steps=4, batch_size=4, max_length=16, eval_examples=4,
                       train_examples=16, log_every=2, checkpoint_every=4,
                       **{"optimizer.warmup_steps": 1, "optimizer.learning_rate": 1e-2})
  result = train.main(config)
  experts = result["state"]["trainable"][1]["model"]["layers_0"]["mlp"]["experts"]
  assert experts["gate_up_proj_lora_A"].shape == (4, 128, 8) and experts["down_proj_lora_B"].shape == (4, 8, 128)
  assert float(np.abs(np.asarray(experts["down_proj_lora_B"])).max()) > 0  # B starts at 0: the experts trained
  adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert adapter_config["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
  assert adapter_config["modules_to_save"] == ["gate"]

  ids = np.random.default_rng(0).integers(3, 49152, (2, 10)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  ours = adapted_logits(result, batch)
  base = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
  base_logits = _torch_logits(base, batch)
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  assert _max_diff(_torch_logits(peft_model, batch), ours) < 1e-4
  assert _max_diff(base_logits, ours) > 1e-3  # the adapter changes the model

  loaded = inference.load(str(tmp_path))  # what train.predict runs
  assert _max_diff(np.asarray(loaded.forward(loaded.adapters, loaded.params, batch)), ours) < 1e-4
  merge.merge(str(tmp_path), str(tmp_path / "merged"))
  merged = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert _max_diff(_torch_logits(merged, batch), ours) < 1e-4


@pytest.mark.parametrize("name, overrides, message", [
    ("lora_mixtral", {"lora.target_parameters": "w1,w2"},
     r"^config.lora.target_parameters='w1,w2' is not valid; name the stacked expert weights 'gate_up_proj,down_proj' "
     r"or one of them.$"),
    ("lora_mixtral", {"lora.target_parameters": "down_proj", "lora.dropout": 0.1},
     r"^config.lora.target_parameters='down_proj' needs config.lora.dropout=0 "),
    ("lora_mixtral", {"lora.target_parameters": "down_proj", "method": "dora"},
     r"^config.lora.target_parameters='down_proj' needs config.method='lora' "),
    ("lora_qwen3", {"lora.target_parameters": "experts.gate_up_proj"},
     r"^config.lora.target_parameters='experts.gate_up_proj' matches no stacked expert weight; the model has no "
     r"mixture-of-experts layers"),
    ("sweep_lora_bert_sentiment", {"lora.target_parameters": "down_proj"},
     r"^config.lora.target_parameters='down_proj' cannot be used with config.sweep, "),
])
def test_bad_target_parameters_are_refused_in_one_sentence(tmp_path, name, overrides, message):
  from train import validate
  config = load_config(name, tmp_path, **overrides)
  with pytest.raises(ValueError, match=message) as error:
    validate.check(config)
  assert str(error.value).count(". ") == 0 and "\n" not in str(error.value)
