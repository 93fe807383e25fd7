"""Step time of LoRA vs full fine-tuning vs Hugging Face PEFT on a t5-small-shaped model.

Measures, in one run and on the same machine: (a) peftjax LoRA r=8 on q,v; (b) peftjax full
fine-tuning; (c) HF peft LoRA r=8 on q,v on transformers' PyTorch T5 with the same shapes.  Each
is one optimizer step (forward, backward, AdamW update) on batch 8, source 128, target 32, fp32.
Also reports (a)'s achieved GFLOP/s (XLA's FLOP count of the compiled step) against a large
plain matmul's GFLOP/s measured in the same run.  With --bf16 also (d) peftjax LoRA with bf16 compute (bf16 base
and operands, float32 accumulation, adapters and AdamW state float32) and (e) (c) under torch.autocast(bfloat16).
Usage: python bench/lora_t5.py [--repeats 7] [--bf16]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax as pj
from peftjax.models import t5

from common import interleaved_medians, jax_adamw_step, median_seconds, torch_adamw_step

BATCH, SOURCE, TARGET, RANK = 8, 128, 32, 8


def make_batch(vocab: int):
  rng = np.random.default_rng(0)
  return {"input_ids": rng.integers(2, vocab, (BATCH, SOURCE)), "attention_mask": np.ones((BATCH, SOURCE), np.int32),
          "labels": rng.integers(2, vocab, (BATCH, TARGET))}


def jax_steps(config: t5.T5Config, batch, dtype=jnp.float32):
  """Compiled (LoRA step, full fine-tuning step, LoRA step FLOPs) on the same model and batch, computing in
  `dtype` (the base stored in it)."""
  model = t5.T5ForConditionalGeneration(config)
  params = t5.init_params(model, jax.random.key(0))
  if dtype != jnp.float32:
    model = model.clone(dtype=dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
  lora_cfg = pj.LoraConfig(rank=RANK, alpha=2 * RANK, targets=("q", "v"))
  adapters = pj.init(lora_cfg, jax.random.key(1), params)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  decoder_input_ids = t5.shift_right(batch["labels"], config.decoder_start_token_id, config.pad_token_id)

  def loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def lora_loss(adapters, params):
    return loss(pj.apply(lora_cfg, model.apply)(params, adapters, batch["input_ids"], batch["attention_mask"],
                                                 decoder_input_ids))

  def full_loss(params):
    return loss(model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], decoder_input_ids))

  run_lora, lora_lowered = jax_adamw_step(lora_loss, adapters, params)
  run_full, _ = jax_adamw_step(full_loss, params)
  cost = lora_lowered.compile().cost_analysis()
  return run_lora, run_full, (cost[0] if isinstance(cost, list) else cost)["flops"]


def torch_peft_step(config: t5.T5Config, batch, autocast: bool = False):
  """HF peft LoRA r=8 on q,v over transformers' PyTorch T5: one AdamW step (under bf16 autocast if asked)."""
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config.to_hf()))
  model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q", "v"],
                                                     lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"))
  return torch_adamw_step(model, batch, autocast)


def matmul_gflops(repeats: int, n: int = 2048) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n))
  mm = jax.jit(lambda x: x @ x)
  seconds = median_seconds(lambda: mm(a).block_until_ready(), repeats)
  return 2 * n**3 / seconds / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--bf16", action="store_true", help="also (d) peftjax bf16 LoRA and (e) PEFT bf16 autocast")
  args = parser.parse_args()
  config = t5.T5Config.t5_small()
  batch = make_batch(config.vocab_size)
  run_lora, run_full, lora_flops = jax_steps(config, batch)
  run_torch, torch_device = torch_peft_step(config, batch)
  steps = {"lora": run_lora, "full": run_full, "torch": run_torch}
  if args.bf16:
    steps["lora bf16"] = jax_steps(config, batch, jnp.bfloat16)[0]
    steps["torch bf16"] = torch_peft_step(config, batch, autocast=True)[0]
  medians = interleaved_medians(steps, args.repeats)
  a, b, c = (medians[k] for k in ("lora", "full", "torch"))
  peak = matmul_gflops(args.repeats)
  achieved = lora_flops / a / 1e9
  print(f"jax on {jax.devices()[0].device_kind}, torch on {torch_device}; t5-small shapes, batch {BATCH}, "
        f"source {SOURCE}, target {TARGET}, fp32, median of 3x{args.repeats} steps")
  print(f"{'step':<34}{'ms':>10}")
  print(f"{'(a) peftjax LoRA r=8 q,v':<34}{a * 1e3:>10.1f}")
  print(f"{'(b) peftjax full fine-tuning':<34}{b * 1e3:>10.1f}")
  print(f"{'(c) HF peft LoRA r=8 q,v (torch)':<34}{c * 1e3:>10.1f}")
  if args.bf16:
    d, e = medians["lora bf16"], medians["torch bf16"]
    print(f"{'(d) peftjax LoRA bf16':<34}{d * 1e3:>10.1f}")
    print(f"{'(e) HF peft LoRA bf16 autocast':<34}{e * 1e3:>10.1f}")
    print(f"(d)/(e) = {d / e:.3f}   (target <= 1.0)    (d)/(c) = {d / c:.3f}   (target <= 0.4)")
  print(f"(a)/(b) = {a / b:.3f}   (target <= 0.72)")
  print(f"(a)/(c) = {a / c:.3f}   (target <= 0.50)")
  print(f"(a) achieved {achieved:.1f} GFLOP/s ({lora_flops / 1e9:.1f} GFLOP/step) vs 2048^3 matmul "
        f"{peak:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of practical peak")


if __name__ == "__main__":
  main()
