"""Fixed padding vs length buckets: training tokens/s (real tokens, padding excluded) and held-out accuracy.

all-MiniLM-L6-v2 with LoRA on Rotten Tomatoes (configs/lora_bert_sentiment.py: max_length 48, batch 32), side by
side in one process.  For each setting: `train.main` runs `--steps` steps (its held-out accuracy is reported), and
the jit-compiled train step is timed at every bucket length (median of --repeats calls, the settings interleaved);
tokens/s is the real tokens of the run's batches over the sum of their lengths' median step times (compilation
excluded).  `python bench/buckets.py [--steps 150 --buckets 16,32 --repeats 5]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import tempfile


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from train import buckets, data_files, loop, steps, tasks  # noqa: E402

import common  # noqa: E402  (bench/ is this script's folder)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def base_config(workdir: str, steps_: int, chosen: tuple[int, ...]):
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / "lora_bert_sentiment.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(dict(workdir=workdir, steps=steps_, checkpoint_every=steps_, buckets=chosen, log_every=50))
  return config


def step_timer(config):
  """run(length) takes one train step on a batch cut to `length` and waits for it."""
  task = tasks.family(config).task
  model, params, tokenizer = loop.load_model(config, 2)
  train_data = task.tokenize(tokenizer, data_files.load(config, task.kind, config.workdir).train, config)
  method_cfg, trainable, frozen = loop.trainable_and_frozen(config, model, params, tokenizer)
  tx, _ = steps.make_optimizer(config.optimizer, config.steps)
  frozen, state, shardings = loop.shard(config, model, params, trainable, frozen, tx, loop.make_mesh(config))
  train_step = steps.make_train_step(steps.make_forward(model, task, method_cfg), task, tx, shardings,
                                     seed=config.seed)
  rows = {k: v[:config.batch_size] for k, v in train_data.items()}
  holder = [state]

  def run(length):
    holder[0], metrics = train_step(holder[0], frozen, buckets.cut(rows, length, task))
    metrics["loss"].block_until_ready()
  return run, train_data, task


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--buckets", default="16,32")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  settings = {"fixed": (), "buckets": tuple(int(b) for b in args.buckets.split(","))}
  results, timed = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, chosen in settings.items():
      config = base_config(os.path.join(tmp, name), args.steps, chosen)
      accuracy = train.main(config)["after"]["accuracy"]
      run, train_data, task = step_timer(config)
      lengths = buckets.lengths_of(config, task)
      order = buckets.batches(buckets.row_lengths(train_data), lengths, config.batch_size, config.seed)
      used = [next(order)[:2] for _ in range(args.steps)]
      real = sum(int(train_data["attention_mask"][chosen, :length].sum()) for chosen, length in used)
      padded = sum(len(chosen) * length for chosen, length in used)
      results[name] = dict(accuracy=accuracy, real=real, padded=padded, used=[length for _, length in used])
      for length in lengths:
        timed[f"{name}@{length}"] = lambda run=run, length=length: run(length)
    medians = common.interleaved_medians(timed, args.repeats)
  print(f"\n{args.steps} steps, batch 32, max_length 48, buckets {settings['buckets']}")
  print("| setting | step ms per length | real tokens | padding % | real tokens/s | held-out accuracy |")
  print("|---|---|---|---|---|---|")
  for name, r in results.items():
    per_length = {k.split("@")[1]: v for k, v in medians.items() if k.startswith(name + "@")}
    seconds = sum(per_length[str(length)] for length in r["used"])
    times = ", ".join(f"{k}: {1e3 * v:.1f}" for k, v in per_length.items())
    print(f"| {name} | {times} | {r['real']} | {100 * (1 - r['real'] / r['padded']):.1f} | "
          f"{r['real'] / seconds:.0f} | {r['accuracy']:.4f} |")


if __name__ == "__main__":
  main()
