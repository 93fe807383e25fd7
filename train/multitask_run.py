"""`main(config)` for a config with a `config.multitask` section: one LoRA adapter per task, K tasks trained
together in one compiled step (`train.multitask`), each batch row tagged with its task.

config.multitask.tasks lists K >= 2 tasks, each what config.task accepts (a built-in task name of the family's
kind, or the user's data: a file, a saved dataset folder, a hub id; `train.data_files`).  Per task, as lists of
one entry per task (or () for the run's own value): data (config.data keys overriding the run's for that task,
e.g. its text column or eval_file), learning_rate, rank and alpha.  The tasks share the run's lengths
(config.max_length, or source_length / target_length).  A classifier's tasks must have the same number of labels;
each task trains its own copy of the modules of config.modules_to_save (the new classifier head, and BERT's pooler
as configs/lora_bert_sentiment.py trains it), each batch row running its own task's copy (`train.multitask`).

Rows: every batch holds config.batch_size / K rows of each task, task k's rows drawn in its own seeded order
(`train.data.batch_indices` with config.seed: the order a single-task run with batch size batch_size / K draws),
so task k's adapter trains exactly as a separate `python -m train` run on task k alone with that batch size, its
learning rate, rank and alpha (and no dropout) would; a small dataset simply starts its next epoch sooner.  Task
k's loss is its rows' summed cross-entropy over their number of labels.  Each adapter starts from the seed
config.seed, as a single run's does, and has its own optimizer state and the run's schedule scaled to its peak
learning rate.  The model runs without dropout.  Held-out metrics are each task's own (loss, and perplexity or a
classifier's accuracy); T5's exact match (which generates) is not computed.

Writes, in config.workdir: run.json, tensorboard/ (train/<task>/loss, .../learning_rate, eval/<task>/<metric>),
tasks/<task>/ (a Hugging Face PEFT folder per task, with its own modules_to_save weights), base/ for a random
model, the table (task, data, settings, trainable parameters, training loss, held-out metrics) as multitask.md,
.csv and .json, and checkpoints/<step>/ (Orbax: every adapter, head copy and optimizer state, and each task's data
position): rerunning the command resumes an unfinished run (Ctrl-C / SIGTERM save the current step first); a
finished one says so and rewrites nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
import tqdm

from peftjax import checkpoint, distributed, interop
from peftjax.methods import modules_to_save

from train import (data, data_files, loop, methods, multitask, preemption, run_record, steps, sweep, sweep_run,
                   tasks, validate)

TABLE = "multitask"  # workdir/multitask.md, .csv, .json


def task_names(specs) -> list[str]:
  """Each task's folder and tag name: a built-in task's name, else the data file's or folder's name without its
  extension (characters other than letters, digits, '.', '-' become '_'); prefixed with its index if two clash."""
  stems = [re.sub(r"[^\w.-]+", "_", os.path.splitext(os.path.basename(spec.rstrip("/")))[0]) or f"task{i}"
           for i, spec in enumerate(specs)]
  return stems if len(set(stems)) == len(stems) else [f"{i}_{stem}" for i, stem in enumerate(stems)]


def task_config(config: ml_collections.ConfigDict, i: int) -> ml_collections.ConfigDict:
  """The single-task config of task i: the run's, with config.task its spec and config.data its own options."""
  section = config.multitask
  single = ml_collections.ConfigDict({key: value for key, value in config.to_dict().items() if key != "multitask"})
  single.task = section.tasks[i]
  options = section.get("data", ())
  single.data = data_files.data_config(**{**data_files.settings(config).to_dict(), **(options[i] if options else {})})
  return single


def task_members(config: ml_collections.ConfigDict) -> list[sweep.Member]:
  """Each task's adapter settings: its learning rate, rank and alpha (the run's where config.multitask gives ())."""
  section = config.multitask
  own = lambda key, default, i: section[key][i] if section.get(key, ()) else default  # noqa: E731
  return [sweep.Member(seed=config.seed, learning_rate=float(own("learning_rate", config.optimizer.learning_rate, i)),
                       rank=own("rank", config.lora.rank, i), alpha=float(own("alpha", config.lora.alpha, i)))
          for i in range(len(section.tasks))]


def _row_losses(task, k: int):
  """row_losses(logits, batch): each row's summed cross-entropy times its task's rows / labels in the batch, so
  that a task's mean over its rows is its summed cross-entropy over its number of labels (a single run's loss)."""
  def row_losses(logits, batch):
    logits, labels = task.aligned(logits, batch["labels"])
    valid = labels != data.IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, labels, 0))
    rows = labels.shape[0]
    per_row = jnp.where(valid, losses, 0.0).reshape(rows, -1).sum(axis=1)
    counts = valid.reshape(rows, -1).sum(axis=1)
    ids = batch["task_ids"]
    of_task = jax.nn.one_hot(ids, k, dtype=jnp.float32)  # (rows, K)
    task_rows, task_labels = of_task.sum(axis=0), of_task.T @ counts.astype(jnp.float32)
    return per_row * task_rows[ids] / jnp.maximum(task_labels[ids], 1.0)
  return row_losses


def _evaluate(model, task, batch_size: int):
  """evaluate(state, params, held_out) -> [task k's metrics with adapter k (and its modules-to-save copies) on its
  own held-out rows held_out[k]]."""
  forward = multitask.make_forward(model.apply)

  @jax.jit
  def sums(state, params, batch, task_id):
    ids = jnp.full(batch["labels"].shape[0], task_id, jnp.int32)
    logits = forward(state["trainable"], state["scaling"], params, ids, *task.inputs(model, batch))
    return steps.cross_entropy(*task.aligned(logits, batch["labels"]))

  def evaluate(state, params, held_out: list[dict]) -> list[dict]:
    out = []
    for k, rows in enumerate(held_out):
      totals = np.zeros(3)
      for batch, _ in data.padded_batches(rows, batch_size):
        totals += np.asarray([np.asarray(x, np.float64) for x in sums(state, params, batch, k)])
      total, count, correct = totals
      out.append(task.metrics(total / max(count, 1.0), correct / max(count, 1.0)))
    return out
  return evaluate


def _num_labels(config: ml_collections.ConfigDict, loaded: list) -> int:
  """The classifier's number of labels, which every task must share (one head shape, a copy per task)."""
  counts = [one.num_labels() for one in loaded]
  for i, count in enumerate(counts):
    if count != counts[0]:
      raise ValueError(f"config.multitask.tasks[{i}]={config.multitask.tasks[i]!r} has {count} labels but "
                       f"config.multitask.tasks[0]={config.multitask.tasks[0]!r} has {counts[0]}; every task of a "
                       "multi-task classifier needs the same number of labels.")
  return counts[0]


def _batch(train_data: list[dict], chosen: list[np.ndarray]) -> dict:
  """One batch: task k's chosen rows after task k-1's, with 'task_ids' naming each row's task."""
  batch = {key: np.concatenate([rows[key][c] for rows, c in zip(train_data, chosen)]) for key in train_data[0]}
  batch["task_ids"] = np.concatenate([np.full(len(c), k, np.int32) for k, c in enumerate(chosen)])
  return batch


def _export(workdir, config, model, params, tokenizer, task, lora_cfg, saved, names, members, state) -> list[int]:
  """workdir/tasks/<name>/ (a PEFT folder, with the task's modules_to_save copies) per task, and workdir/base/ for
  a random model; returns each task's number of trainable parameters."""
  base_name = loop.base_model_name(config.model)
  if config.model in loop.RANDOM_MODELS:
    base_name = f"{workdir}/base"
    distributed.export_merged(tasks.family(config).module.save_pretrained, model, params, base_name)
    tokenizer.save_pretrained(base_name)
  sizes = []
  for k, name in enumerate(names):
    member_cfg, tree = sweep.member_adapter(lora_cfg, members, state, k)
    if saved:
      member_cfg, tree = [member_cfg, modules_to_save.ModulesToSaveConfig(saved)], (tree, sweep.member_saved(state, k))
    tree = jax.tree.map(np.asarray, tree)
    sizes.append(int(sum(leaf.size for leaf in jax.tree.leaves(tree))))
    interop.write_folder(os.path.join(workdir, "tasks", name),
                         *interop.adapter_files(member_cfg, tree, base_name, task.peft_task_type))
  return sizes


def main(config: ml_collections.ConfigDict, allow_config_change: bool = False) -> dict:
  """Trains one LoRA adapter per task of config.multitask in one compiled step, evaluates each on its own held-out
  rows and exports each; returns a summary ({'start_step', 'names', 'rows', 'losses' (steps run, K), 'before' and
  'after' (each task's held-out metrics), 'state', 'workdir', ...}); rerun, it resumes from the newest checkpoint
  in config.workdir."""
  validate.check(config)
  names, members = task_names(config.multitask.tasks), task_members(config)
  k, per_task = len(names), config.batch_size // len(names)
  workdir = os.path.abspath(config.workdir)
  finished = run_record.check_rerun(config, workdir, allow_config_change)
  if finished is not None:
    print(f"the multi-task run in {workdir} finished at step {finished} and wrote its files there; nothing was "
          "rewritten.")
    return {"final_step": finished, "finished": True, "workdir": workdir, "config": config}
  task = tasks.family(config).task
  singles = [task_config(config, i) for i in range(k)]
  loaded = [data_files.load(single, task.kind, workdir) for single in singles]
  for i, one in enumerate(loaded):
    if len(one.train) < per_task:
      raise ValueError(f"config.multitask.tasks[{i}]={config.multitask.tasks[i]!r} has {len(one.train)} training "
                       f"examples, fewer than the {per_task} rows of it every batch holds (config.batch_size / "
                       f"{k}); give it more rows or lower config.batch_size.")
  num_labels = _num_labels(config, loaded) if task is tasks.SequenceClassification else 0
  model, params, tokenizer = loop.load_model(config, num_labels)
  label_names = [one.label_names for one in loaded]
  if label_names[0] and all(n == label_names[0] for n in label_names) and hasattr(model.config, "id2label"):
    model = model.clone(config=dataclasses.replace(model.config, id2label=tuple(label_names[0])))
  train_data = [task.tokenize(tokenizer, one.train, single) for one, single in zip(loaded, singles)]
  held_out = [task.tokenize(tokenizer, one.held_out, single) for one, single in zip(loaded, singles)]
  for name, one in zip(names, loaded):
    print(f"task {name}: {len(one.train)} training and {len(one.held_out)} held-out examples")
  print(f"{k} tasks, {per_task} rows of each per batch, trained together in one compiled step on one device with "
        "the model's dropout off")

  method_cfg = methods.method_config(config, getattr(model.config, "model_type", config.family),
                                     getattr(tokenizer, "name_or_path", ""))
  lora_cfg, saved = (method_cfg[0], method_cfg[1].modules) if isinstance(method_cfg, list) else (method_cfg, ())

  def member_key(seed):  # as `train.loop`: fold_in(key(seed), 1), split between the configs of a list
    key = jax.random.fold_in(jax.random.key(seed), 1)
    return jax.random.split(key, 2)[0] if saved else key
  state = sweep.init(lora_cfg, members, params, saved, member_key)
  make_tx, unit = sweep_run.optimizer(config)
  tx, opt_state = sweep.init_optimizer(make_tx, state, members)
  train_step = multitask.make_step(model.apply, _row_losses(task, k), tx, lambda batch: task.inputs(model, batch))
  evaluate = _evaluate(model, task, config.batch_size)

  run_record.write(workdir, config)
  manager = checkpoint.manager(f"{workdir}/checkpoints", max_to_keep=config.keep_checkpoints)
  train_state = {"step": np.int32(0), "multitask": state, "opt_state": opt_state}
  restored = checkpoint.restore(manager, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                                      train_state))
  position = {"tasks": [{"epoch": 0, "index": 0}] * k}
  if restored is not None:
    train_state, position = restored
  start_step = int(train_state["step"])
  if start_step:
    print(f"resuming the multi-task run from step {start_step} in {workdir}")
  writer = tensorboardX.SummaryWriter(f"{workdir}/tensorboard")

  def log_eval(step, metrics):
    for name, values in zip(names, metrics):
      tqdm.tqdm.write(f"step {step} {name}: " + ", ".join(f"eval {n.replace('_', ' ')} {v:.4f}"
                                                         for n, v in values.items()))
      for n, v in values.items():
        writer.add_scalar(f"eval/{name}/{n}", v, step)

  state, opt_state = train_state["multitask"], train_state["opt_state"]
  before = evaluate(state, params, held_out)
  log_eval(start_step, before)
  orders = [data.batch_indices(len(rows["labels"]), per_task, config.seed, p["epoch"], p["index"])
            for rows, p in zip(train_data, position["tasks"])]
  losses, pending, logged, start = [], [], [float("nan")] * k, time.perf_counter()
  progress = tqdm.tqdm(total=config.steps, initial=min(start_step, config.steps), desc="multitask", unit="step")
  with contextlib.closing(manager), preemption.Signals() as signals:
    for step in range(start_step + 1, config.steps + 1):
      chosen, positions = zip(*(next(order) for order in orders))
      position = {"tasks": list(positions)}
      batch = _batch(train_data, list(chosen))
      state, opt_state, task_losses = train_step(state, opt_state, params, batch, batch["task_ids"])
      task_losses = np.asarray(task_losses)
      if not np.all(np.isfinite(task_losses)):
        bad = int(np.flatnonzero(~np.isfinite(task_losses))[0])
        raise ValueError(f"step {step}: task {names[bad]}'s loss is {task_losses[bad]}; the run stops (its last "
                         "checkpoint is kept; lower that task's learning rate in config.multitask.learning_rate).")
      losses.append(task_losses)
      pending.append(task_losses)
      progress.update(1)
      if step % config.log_every == 0 or step == config.steps:
        mean = np.mean(pending, axis=0)
        pending, logged = [], [float(v) for v in mean]
        progress.set_postfix(loss="/".join(f"{v:.4f}" for v in mean))
        for name, m, value in zip(names, members, mean):
          writer.add_scalar(f"train/{name}/loss", value, step)
          writer.add_scalar(f"train/{name}/learning_rate", m.learning_rate * float(unit(step - 1)), step)
        writer.flush()
      if config.eval_every and step % config.eval_every == 0 and step != config.steps:
        log_eval(step, evaluate(state, params, held_out))
      train_state = {"step": np.int32(step), "multitask": state, "opt_state": opt_state}
      if step % config.checkpoint_every == 0 or step == config.steps:
        checkpoint.save(manager, step, train_state, position)
      if signum := signals.received():
        progress.close()
        preemption.save_and_exit(manager, step, train_state, position, signum)
  progress.close()
  train_seconds = time.perf_counter() - start
  after = evaluate(state, params, held_out)
  log_eval(config.steps, after)
  writer.close()

  sizes = _export(workdir, config, model, params, tokenizer, task, lora_cfg, saved, names, members, state)
  rows = [{"task": name, "data": spec, "learning_rate": m.learning_rate, "rank": m.rank, "alpha": m.alpha,
           "trainable_params": size, "train_loss": loss, **{f"eval_{n}": float(v) for n, v in metrics.items()}}
          for name, spec, m, size, loss, metrics in zip(names, config.multitask.tasks, members, sizes, logged, after)]
  print(sweep_run.write_table(workdir, rows, TABLE), end="")
  print(f"wrote {workdir}/tasks/<task> ({k} PEFT folders) and {workdir}/{TABLE}.md, .csv, .json "
        f"({config.steps - start_step} steps in {train_seconds:.1f}s)")
  run_record.write(workdir, config, finished_step=config.steps)
  return {"start_step": start_step, "final_step": config.steps, "names": names, "members": members, "rows": rows,
          "losses": np.asarray(losses), "before": before, "after": after, "state": state, "model": model,
          "params": params, "workdir": workdir, "config": config}
