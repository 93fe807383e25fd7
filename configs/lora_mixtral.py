"""LoRA on a Mixtral-architecture (mixture-of-experts) LM for review text:
`python -m train --config configs/lora_mixtral.py` (`configs/lora_mixtral.py:experts` adds LoRA on the experts).

configs/lora_qwen3.py's run (IMDB review text, next-token loss, held-out perplexity, the SmolLM2 tokenizer) on a
randomly initialised Mixtral (model_type "mixtral": 4 experts, 2 routed per token, grouped-query keys) small enough
for CPU.  LoRA adapts the attention projections and the routers (``gate``, one per layer) are trained in full
through modules_to_save; the experts stay frozen, unless config.lora.target_parameters names their stacked
weights ("gate_up_proj,down_proj", PEFT's target_parameters; the ``:experts`` variant): then every expert gets its
own LoRA pair of config.lora's rank and alpha.  workdir/base holds the random base as a folder transformers'
MixtralForCausalLM loads (one tensor per expert, as transformers writes them), workdir/adapter the PEFT adapter.
`--config.model_shape.model_type=qwen3_moe` (with num_local_experts, moe_intermediate_size, norm_topk_prob) makes it
a Qwen3-MoE.
"""

import pathlib
import runpy

import ml_collections

BASE = runpy.run_path(str(pathlib.Path(__file__).with_name("lora_qwen3.py")))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """lora_qwen3's run on a small random Mixtral, LoRA on the attention (and, for variant "experts", on the stacked
  expert weights) and trained routers."""
  if variant not in ("", "experts"):
    raise ValueError(f"configs/lora_mixtral.py:{variant} is not a variant; valid: configs/lora_mixtral.py or "
                     "configs/lora_mixtral.py:experts.")
  config = BASE["get_config"]()
  config.model_shape = ml_collections.ConfigDict(dict(
      model_type="mixtral", vocab_size=49152, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
      num_attention_heads=8, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
      moe_intermediate_size=192, norm_topk_prob=True, rms_norm_eps=1e-5, rope_theta=1e6,
      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.02))
  config.lora.targets = "q_proj,k_proj,v_proj,o_proj"
  config.lora.target_parameters = "gate_up_proj,down_proj" if variant == "experts" else ""
  config.modules_to_save = "gate"
  config.workdir = "workdir/lora_mixtral"
  return config
