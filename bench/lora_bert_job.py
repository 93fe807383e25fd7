"""The main job's training step (`python -m train --config configs/lora_bert_sentiment.py`) vs Hugging Face PEFT.

peftjax: the compiled step `python -m train` runs (train.steps.make_train_step: LoRA r=8, alpha 16, dropout 0.1
on query, key, value, attention.output.dense and intermediate.dense of all-MiniLM-L6-v2, classifier and pooler
trained in full, AdamW after clipping, the model's dropout on) on one batch of 32 Rotten Tomatoes sentences
padded to 48 tokens.  PyTorch: transformers' BertForSequenceClassification of the same checkpoint under peft's
LoraConfig with the same settings (modules_to_save classifier, pooler), AdamW(1e-3, weight decay 0.01), clipping
at 1.0, training mode, the same batch.  fp32 on both sides, and bf16: peftjax's config.compute_dtype="bfloat16"
against torch.autocast("cpu", dtype=torch.bfloat16).  The steps take turns; each figure is the median over
rounds of the median of repeats, as wall and as process CPU time per step.
Usage: python bench/lora_bert_job.py [--repeats 5] [--rounds 3] [--dtypes float32 bfloat16] [--targets a,b]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # train/ and configs/

from configs import lora_bert_sentiment  # noqa: E402
from train import data, loop, methods, steps, tasks  # noqa: E402
from peftjax import sharding  # noqa: E402

from common import interleaved_times  # noqa: E402


def job_config(targets: str | None, dtype: str):
  config = lora_bert_sentiment.get_config()
  if targets:
    config.lora.targets = targets
  config.compute_dtype = dtype
  return config


def job_batch(config, tokenizer) -> dict:
  """The first 32 training sentences of the job's split, tokenised as the job does."""
  task = tasks.FAMILIES[config.family].task
  train_set, _ = data.split(data.load_task(task.kind, config.task), config.eval_examples, config.train_examples)
  return task.tokenize(tokenizer, train_set[:config.batch_size], config)


def job_step(config):
  """(train_step, step-0 state, frozen tree, mesh, tokenizer): the job's compiled train step as python -m train
  builds it."""
  mesh = loop.make_mesh(config)
  task = tasks.FAMILIES[config.family].task
  model, params, tokenizer = loop.load_model(config, num_labels=2)
  method_cfg, trainable, frozen = loop.trainable_and_frozen(config, model, params, tokenizer)
  tx, _ = steps.make_optimizer(config.optimizer, config.steps)
  hooks = methods.training_hooks(method_cfg, trainable)
  frozen, state, shardings = loop.shard(config, model, params, trainable, frozen, tx, mesh, hooks.get("method_state"))
  train_step = steps.make_train_step(steps.make_forward(model, task, method_cfg), task, tx, shardings,
                                     seed=config.seed)
  return train_step, state, frozen, mesh, tokenizer


def jax_step(config, batch: dict):
  """run(): one step of the job's compiled train step on `batch` (state carried from step to step)."""
  train_step, state, frozen, mesh, _ = job_step(config)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  holder = [state]

  def run():
    holder[0], metrics = train_step(holder[0], frozen, batch)
    jax.block_until_ready(metrics)
  return run


def torch_step(config, batch: dict, autocast: bool):
  """run(): one PEFT LoRA step of transformers' model of the same checkpoint, optionally under bf16 autocast."""
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(loop.resolve(config.model), num_labels=2)
  lora = peft.LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                         target_modules=config.lora.targets.split(","), task_type="SEQ_CLS",
                         modules_to_save=config.modules_to_save.split(","))
  model = peft.get_peft_model(model, lora)
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optimizer.learning_rate,
                          weight_decay=config.optimizer.weight_decay)
  inputs = {k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()}

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
    opt.step()
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dtypes", nargs="+", choices=sorted(loop.DTYPES), default=["float32", "bfloat16"])
  parser.add_argument("--targets", default=None, help="LoRA targets, names separated by commas (default: the job's)")
  args = parser.parse_args()
  config = job_config(args.targets, "float32")
  batch = job_batch(config, loop.load_tokenizer(loop.resolve(config.model)))
  runs = {}
  for dtype in args.dtypes:
    runs[f"peftjax {dtype}"] = jax_step(job_config(args.targets, dtype), batch)
    runs["torch " + ("bf16 autocast" if dtype == "bfloat16" else dtype)] = torch_step(config, batch,
                                                                                      dtype == "bfloat16")
  times = interleaved_times(runs, args.repeats, args.rounds)
  reference_wall, reference_cpu = times.get("torch float32", next(iter(times.values())))
  print(f"the main job's step: LoRA r={config.lora.rank} on {config.lora.targets}, batch {config.batch_size} x "
        f"{config.max_length}; jax on {jax.devices()[0].device_kind}; median of {args.rounds}x{args.repeats} steps; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
  print(f"{'step':<24}{'wall ms':>10}{'steps/s':>9}{'cpu ms':>10}{'vs torch fp32 (wall, cpu)':>28}")
  for name, (wall, cpu) in times.items():
    print(f"{name:<24}{wall * 1e3:>10.1f}{1 / wall:>9.2f}{cpu * 1e3:>10.1f}"
          f"{f'{wall / reference_wall:.3f}, {cpu / reference_cpu:.3f}':>28}")


if __name__ == "__main__":
  main()
