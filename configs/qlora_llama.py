"""QLoRA on SmolLM2-135M for review text: `python -m train --config configs/qlora_llama.py`.

configs/lora_llama.py with the frozen base quantised at load to NF4 with double quantisation (QLoRA: 4.127
bits per weight of every linear layer but the head; embeddings and norms stay float32) and LoRA on all
linear layers, as the QLoRA paper trains.  `--config.quant.kind=int8` / `int4` choose the other formats,
`--config.quant.kind=none` turns quantisation off; `--config.quant.targets` / `exclude` choose the layers.
"""

import importlib.util
import pathlib

import ml_collections

from train import quantize


def _lora_llama():
  spec = importlib.util.spec_from_file_location("lora_llama", pathlib.Path(__file__).with_name("lora_llama.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config() -> ml_collections.ConfigDict:
  """lora_llama's run with config.quant (nf4, double quantisation, all linear layers) and LoRA on all of them."""
  config = _lora_llama().get_config()
  config.quant = ml_collections.ConfigDict({**quantize.QUANT_DEFAULTS, "kind": "nf4"})
  config.lora.targets = "all-linear"
  config.workdir = "workdir/qlora_llama"
  return config
