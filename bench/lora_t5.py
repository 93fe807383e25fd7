"""Step time of LoRA vs full fine-tuning vs Hugging Face PEFT on a t5-small-shaped model.

Measures, in one run and on the same machine: (a) peftjax LoRA r=8 on q,v; (b) peftjax full
fine-tuning; (c) HF peft LoRA r=8 on q,v on transformers' PyTorch T5 with the same shapes.  Each
is one optimizer step (forward, backward, AdamW update) on batch 8, source 128, target 32, fp32.
Also reports (a)'s achieved GFLOP/s (XLA's FLOP count of the compiled step) against a large
plain matmul's GFLOP/s measured in the same run.  Usage: python bench/lora_t5.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax as pj
from peftjax.models import t5

BATCH, SOURCE, TARGET, RANK = 8, 128, 32, 8


def median_seconds(step, repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_batch(vocab: int):
  rng = np.random.default_rng(0)
  return {"input_ids": rng.integers(2, vocab, (BATCH, SOURCE)), "attention_mask": np.ones((BATCH, SOURCE), np.int32),
          "labels": rng.integers(2, vocab, (BATCH, TARGET))}


def jax_steps(config: t5.T5Config, batch):
  """Compiled (LoRA step, full fine-tuning step, LoRA step FLOPs) on the same model and batch."""
  model = t5.T5ForConditionalGeneration(config)
  params = t5.init_params(model, jax.random.key(0))
  lora_cfg = pj.LoraConfig(rank=RANK, alpha=2 * RANK, targets=("q", "v"))
  adapters = pj.init(lora_cfg, jax.random.key(1), params)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  decoder_input_ids = t5.shift_right(batch["labels"], config.decoder_start_token_id, config.pad_token_id)
  tx = optax.adamw(1e-4)

  def loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def lora_loss(adapters, params):
    return loss(pj.apply(lora_cfg, model.apply)(params, adapters, batch["input_ids"], batch["attention_mask"],
                                                 decoder_input_ids))

  def full_loss(params):
    return loss(model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], decoder_input_ids))

  @jax.jit
  def lora_step(adapters, opt_state, params):
    grads = jax.grad(lora_loss)(adapters, params)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  @jax.jit
  def full_step(params, opt_state):
    grads = jax.grad(full_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  lora_state = [adapters, tx.init(adapters)]
  full_state = [params, tx.init(params)]

  def run_lora():
    lora_state[:] = lora_step(lora_state[0], lora_state[1], params)
    jax.block_until_ready(lora_state)

  def run_full():
    full_state[:] = full_step(*full_state)
    jax.block_until_ready(full_state)

  flops = lora_step.lower(adapters, lora_state[1], params).compile().cost_analysis()
  flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
  return run_lora, run_full, flops


def torch_peft_step(config: t5.T5Config, batch):
  """HF peft LoRA r=8 on q,v over transformers' PyTorch T5: one AdamW step."""
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config.to_hf()))
  model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q", "v"],
                                                     lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"))
  model.train()
  for module in model.modules():  # dropout off, as in the JAX steps (deterministic=True)
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(device)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
  inputs = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}

  def run():
    opt.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
  return run, device


def matmul_gflops(repeats: int, n: int = 2048) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n))
  mm = jax.jit(lambda x: x @ x)
  seconds = median_seconds(lambda: mm(a).block_until_ready(), repeats)
  return 2 * n**3 / seconds / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  config = t5.T5Config.t5_small()
  batch = make_batch(config.vocab_size)
  run_lora, run_full, lora_flops = jax_steps(config, batch)
  run_torch, torch_device = torch_peft_step(config, batch)
  # Interleave the three so that machine noise hits them alike; report the medians.
  rounds = {"lora": [], "full": [], "torch": []}
  for _ in range(3):
    rounds["lora"].append(median_seconds(run_lora, args.repeats))
    rounds["full"].append(median_seconds(run_full, args.repeats))
    rounds["torch"].append(median_seconds(run_torch, args.repeats))
  a, b, c = (statistics.median(rounds[k]) for k in ("lora", "full", "torch"))
  peak = matmul_gflops(args.repeats)
  achieved = lora_flops / a / 1e9
  print(f"jax on {jax.devices()[0].device_kind}, torch on {torch_device}; t5-small shapes, batch {BATCH}, "
        f"source {SOURCE}, target {TARGET}, fp32, median of 3x{args.repeats} steps")
  print(f"{'step':<34}{'ms':>10}")
  print(f"{'(a) peftjax LoRA r=8 q,v':<34}{a * 1e3:>10.1f}")
  print(f"{'(b) peftjax full fine-tuning':<34}{b * 1e3:>10.1f}")
  print(f"{'(c) HF peft LoRA r=8 q,v (torch)':<34}{c * 1e3:>10.1f}")
  print(f"(a)/(b) = {a / b:.3f}   (target <= 0.72)")
  print(f"(a)/(c) = {a / c:.3f}   (target <= 0.50)")
  print(f"(a) achieved {achieved:.1f} GFLOP/s ({lora_flops / 1e9:.1f} GFLOP/step) vs 2048^3 matmul "
        f"{peak:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of practical peak")


if __name__ == "__main__":
  main()
