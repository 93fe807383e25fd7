"""Padding vs packing for a causal LM: training tokens/s (real tokens, padding excluded) and held-out perplexity.

SmolLM2-135M (the offline GGUF asset of configs/lora_llama.py: LoRA r=8 on q_proj, v_proj) learning IMDB reviews,
side by side in one process.  For each setting (config.packing off / on): `train.main` runs `--steps` steps (its
held-out perplexity, on the same unpacked held-out reviews, is reported), then the jit-compiled train step is timed
on the run's first batch (median of --repeats calls, the settings interleaved; every batch of a setting has that
shape); tokens/s is the real tokens of the run's batches over steps x the median step time (compilation excluded).
`python bench/packing.py [--steps 6 --batch 4 --max-length 256 --repeats 3]`; `--density` prints only the rows and
padding an epoch of --train-examples reviews takes, padded vs packed, at max_length 128 ... 1024 (no model).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from train import data_files, loop, packing, steps, tasks  # noqa: E402

import common  # noqa: E402  (bench/ is this script's folder)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def base_config(workdir: str, args, packed: bool):
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / "lora_llama.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(dict(workdir=workdir, steps=args.steps, checkpoint_every=args.steps, log_every=args.steps,
                     batch_size=args.batch, max_length=args.max_length, train_examples=args.train_examples,
                     eval_examples=args.eval_examples, packing=packed))
  config.optimizer.warmup_steps = 1
  return config


def step_timer(config):
  """(run, the run's batches): run() takes one train step on the run's first batch and waits for it."""
  task = tasks.family(config).task
  model, params, tokenizer = loop.load_model(config)
  train_data = task.tokenize(tokenizer, data_files.load(config, task.kind, config.workdir).train, config)
  method_cfg, trainable, frozen = loop.trainable_and_frozen(config, model, params, tokenizer)
  tx, _ = steps.make_optimizer(config.optimizer, config.steps)
  frozen, state, shardings = loop.shard(config, model, params, trainable, frozen, tx, loop.make_mesh(config))
  train_step = steps.make_train_step(steps.make_forward(model, task, method_cfg), task, tx, shardings,
                                     seed=config.seed)
  order = packing.training_batches(config, task, train_data, 0, 0)
  used = [{k: v[chosen] for k, v in rows.items()} for rows, chosen, _ in (next(order) for _ in range(config.steps))]
  holder = [state]

  def run():
    holder[0], metrics = train_step(holder[0], frozen, used[0])
    metrics["loss"].block_until_ready()
  return run, used


def density(args) -> None:
  """Rows and padding per epoch of --train-examples reviews, padded vs packed, at several max_lengths (no model)."""
  print("| max_length | reviews | rows padded / packed | padding % padded / packed | real tokens per row, "
        "packed / padded |")
  print("|---|---|---|---|---|")
  for length in (128, 256, 512, 1024):
    config = base_config(tempfile.mkdtemp(), argparse.Namespace(**{**vars(args), "max_length": length}), True)
    tokenizer = loop.load_tokenizer(loop.resolve(config.model))
    task = tasks.family(config).task
    rows = task.tokenize(tokenizer, data_files.load(config, task.kind, config.workdir).train, config)
    real = packing.document_lengths(rows)
    packed = len(packing.epoch_rows(real, length, config.seed, 0))
    print(f"| {length} | {len(real)} | {len(real)} / {packed} | {100 * (1 - real.sum() / (len(real) * length)):.1f} "
          f"/ {100 * (1 - real.sum() / (packed * length)):.1f} | {len(real) / packed:.2f} |")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--max-length", type=int, default=256)
  parser.add_argument("--train-examples", type=int, default=400)
  parser.add_argument("--eval-examples", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--density", action="store_true", help="only the rows and padding per epoch (no model)")
  args = parser.parse_args()
  if args.density:
    return density(args)
  results, timed = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, packed in (("padded", False), ("packed", True)):
      config = base_config(os.path.join(tmp, name), args, packed)
      summary = train.main(config)
      run, used = step_timer(config)
      real = sum(int(np.count_nonzero(batch["attention_mask"])) for batch in used)
      documents = sum(int(batch["attention_mask"].max(axis=1).sum()) for batch in used)
      results[name] = dict(before=summary["before"]["perplexity"], after=summary["after"]["perplexity"], real=real,
                           documents=documents, padded=len(used) * args.batch * args.max_length)
      timed[name] = run
    medians = common.interleaved_medians(timed, args.repeats, rounds=1)
  print(f"\nSmolLM2-135M LoRA (q_proj, v_proj) on IMDB, {args.steps} steps, batch {args.batch}, max_length "
        f"{args.max_length}, held-out perplexity on {args.eval_examples} reviews")
  print("| setting | step ms | documents | real tokens | padding % | real tokens/s | held-out ppl before -> after |")
  print("|---|---|---|---|---|---|---|")
  for name, r in results.items():
    seconds = args.steps * medians[name]
    print(f"| {name} | {1e3 * medians[name]:.0f} | {r['documents']} | {r['real']} | "
          f"{100 * (1 - r['real'] / r['padded']):.1f} | {r['real'] / seconds:.0f} | "
          f"{r['before']:.2f} -> {r['after']:.2f} |")
  print(f"packed / padded real tokens/s: "
        f"{(results['packed']['real'] / medians['packed']) / (results['padded']['real'] / medians['padded']):.2f}")


if __name__ == "__main__":
  main()
