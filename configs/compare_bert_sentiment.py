"""Every method on the main job: `python -m train.compare --config configs/compare_bert_sentiment.py`.

configs/lora_bert_sentiment.py's model (all-MiniLM-L6-v2 with a classification head; the head and the pooler train
in full beside every method, as PEFT's SEQ_CLS does), data (Rotten Tomatoes, 1,000 held out), batch and step budget,
with every method's section and config.compare: the methods ("": every method that fits the model, plus full
fine-tuning), the seeds, and each method's learning rate (the usual ones: small for full fine-tuning, large for the
few parameters of (IA)³ and the prompts).  Your own data and methods: `--config.task=reviews.csv
--config.compare.methods=lora,bitfit,full --config.compare.seeds="(0,)"`.  The table, CSV, JSON and PNG go to
config.workdir.
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_bert_sentiment.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_bert_sentiment with every method's section and the comparison's settings."""
  config = BASE["get_config"]()
  steps = config.get_ref("steps")
  config.adalora = ml_collections.ConfigDict(dict(
      init_r=12, target_r=8, alpha=16.0, dropout=0.1, targets=config.lora.targets,
      tinit=steps // 10, tfinal=steps // 5, delta_t=5))  # budget schedule: a fraction of config.steps
  config.adapter = ml_collections.ConfigDict()  # "": each arrangement's (houlsby, pfeiffer, parallel) defaults
  config.prompt = ml_collections.ConfigDict(dict(num_virtual_tokens=20))
  config.mam = ml_collections.ConfigDict(dict(prefix_length=30, prefix_hidden=800, reduction_factor=2.0, scaling=4.0))
  config.unipelt = ml_collections.ConfigDict(dict(
      parts="lora,adapter,prefix", lora_rank=8, lora_targets="query,value", reduction_factor=16.0, prefix_length=10,
      prefix_hidden=512))
  config.compare = ml_collections.ConfigDict(dict(
      methods="",                  # names separated by commas; "": every method that fits the model, plus full
      seeds=(0, 1, 2),
      # config.optimizer.learning_rate (1e-3) for the methods not named here.  Prefix tuning keeps 1e-3: through its
      # MLP reparameterisation 1e-2 ended at chance (eval loss ln 2, 3 seeds); the plain table (p_tuning_v2) trains.
      learning_rates=ml_collections.ConfigDict(dict(
          full=5e-5, ia3=1e-2, bitfit=5e-3, prompt_tuning=3e-2, p_tuning=1e-2, p_tuning_v2=1e-2)),
      forgetting_task="",          # a causal LM's second held-out text; a classifier has none (see train/compare.py)
      forgetting_examples=64,
      latency_repeats=5))
  config.eval_every = 50  # held-out curves for comparison.png
  config.workdir = "workdir/compare_bert_sentiment"
  return config
