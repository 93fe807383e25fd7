"""The main job's training loss in bf16 against fp32: `config.compute_dtype="bfloat16"` vs "float32".

Both run the compiled step `python -m train --config configs/lora_bert_sentiment.py` runs (bench/lora_bert_job.py
builds it) from the same initial adapters over the same first `--steps` batches of the job's training split, in
order; the table gives the loss every 10 steps and the largest |bf16 - fp32| over all steps (the issue's bound:
0.01).  Usage: python bench/bf16_loss.py [--steps 150]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # train/ and configs/

from train import data, tasks  # noqa: E402
from peftjax import sharding  # noqa: E402

from lora_bert_job import job_config, job_step  # noqa: E402


def losses(dtype: str, n_steps: int) -> np.ndarray:
  """Training loss of each of the first `n_steps` steps of the main job computing in `dtype`."""
  config = job_config(None, dtype)
  task = tasks.FAMILIES[config.family].task
  train_step, state, frozen, mesh, tokenizer = job_step(config)
  train_set, _ = data.split(data.load_task(task.kind, config.task), config.eval_examples, config.train_examples)
  out = []
  for i in range(n_steps):
    rows = train_set[i * config.batch_size:(i + 1) * config.batch_size]
    batch = jax.device_put(task.tokenize(tokenizer, rows, config), sharding.batch_sharding(mesh))
    state, metrics = train_step(state, frozen, batch)
    out.append(float(metrics["loss"]))
  return np.asarray(out)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=150)
  args = p.parse_args()
  fp32, bf16 = losses("float32", args.steps), losses("bfloat16", args.steps)
  print(f"\nthe main job's training loss, fp32 vs bf16 compute, {args.steps} steps (jax {jax.__version__}):")
  print("| step | fp32 | bf16 | bf16 - fp32 |")
  print("|---|---|---|---|")
  for i in list(range(0, args.steps, 10)) + [args.steps - 1]:
    print(f"| {i + 1} | {fp32[i]:.4f} | {bf16[i]:.4f} | {bf16[i] - fp32[i]:+.4f} |")
  print(f"largest |bf16 - fp32| over the {args.steps} steps: {np.abs(bf16 - fp32).max():.4f} (step "
        f"{int(np.abs(bf16 - fp32).argmax()) + 1}); mean over the last 10 steps: fp32 {fp32[-10:].mean():.4f}, "
        f"bf16 {bf16[-10:].mean():.4f}")


if __name__ == "__main__":
  main()
