"""`main(config)` for a config with a `config.sweep` section: K LoRA members trained together (`train.sweep`).

config.sweep holds lists of values for seed, learning_rate, rank (LoRA r) and alpha (`validate.SWEEP_FIELDS`);
member i takes the i-th value of every list (the lists zipped; a list of one value applies to every member), or
with config.sweep.grid=True every combination
(in the order seed, learning_rate, rank, alpha, the last changing fastest).  A field left out keeps the run's own
value (config.seed, config.optimizer.learning_rate, config.lora.rank, config.lora.alpha).  A member's seed is the
seed of its adapter's initialisation only: the base model (and a random model's or a new head's init), the data
order and the held-out split follow config.seed for every member, so a member with seed == config.seed equals a
separate `python -m train` run with its learning rate, rank and alpha.  Every member gets its own copy of
config.modules_to_save and its own optimizer state, with the run's schedule (warm-up, decay) scaled to its peak
learning rate.  The model runs without dropout in a sweep (and config.lora.dropout must be 0).  The held-out
metrics are the task's (loss, accuracy, perplexity); T5's exact match (which generates) is not computed.

Writes, in config.workdir: run.json, tensorboard/ (tags train/<member>/loss, .../learning_rate and
eval/<member>/<metric>), members/<member>/ (a Hugging Face PEFT folder per member), base/ for a random model, and
the table of every member's settings and held-out metrics as sweep.md, sweep.csv and sweep.json, and
checkpoints/<step>/ (Orbax: every member's adapter and optimizer state, and the data position) as `train.loop`
writes them: rerunning the command resumes an unfinished sweep (Ctrl-C / SIGTERM save the current step first); a
finished one says so and rewrites nothing.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import itertools
import json
import os
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

from train import data, data_files, loop, methods, packing, preemption, run_record, steps, sweep, tasks, validate

TABLE = "sweep"  # workdir/sweep.md, .csv, .json


def members(config: ml_collections.ConfigDict) -> list[tuple[str, sweep.Member]]:
  """(name, Member) of every member of config.sweep (zipped lists, one-value lists applying to all, or every
  combination with grid=True)."""
  own = {field: functools.reduce(lambda node, part: node[part], key.split("."), config)
         for field, key in validate.SWEEP_FIELDS.items()}
  fields = [f for f in validate.SWEEP_FIELDS if f in config.sweep]
  lists = [tuple(config.sweep[f]) for f in fields]
  size = max(map(len, lists))
  rows = itertools.product(*lists) if config.sweep.get("grid", False) else zip(
      *(values * size if len(values) == 1 else values for values in lists))
  out = []
  for i, values in enumerate(rows):
    settings = {**own, **dict(zip(fields, values))}
    name = f"{i}_lr{settings['learning_rate']:g}_r{settings['rank']}_alpha{settings['alpha']:g}_seed{settings['seed']}"
    out.append((name, sweep.Member(seed=settings["seed"], learning_rate=float(settings["learning_rate"]),
                                   rank=settings["rank"], alpha=float(settings["alpha"]))))
  return out


def optimizer(config: ml_collections.ConfigDict):
  """(make_tx(learning_rate), unit schedule): the run's clipping + AdamW with its schedule scaled to a member's peak."""
  unit = steps.make_optimizer(ml_collections.ConfigDict({**config.optimizer.to_dict(), "learning_rate": 1.0}),
                              config.steps)[1]

  def make_tx(learning_rate):
    schedule = lambda count: learning_rate * unit(count)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(config.optimizer.grad_clip_norm),
                       optax.adamw(schedule, weight_decay=config.optimizer.weight_decay))
  return make_tx, unit


def _row_losses(task):
  """row_losses(logits, tiled batch): each row's summed cross-entropy times rows / labels, so that a member's mean
  over its rows is the run's loss (summed cross-entropy over the number of labels)."""
  def row_losses(logits, batch):
    logits, labels = task.aligned(logits, batch["labels"])
    valid = labels != data.IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, labels, 0))
    rows = labels.shape[0]
    per_row = jnp.where(valid, losses, 0.0).reshape(rows, -1).sum(axis=1)
    return per_row * rows / jnp.maximum(valid.sum(), 1)
  return row_losses


def _evaluate(model, task, k: int, batch_size: int):
  """evaluate(state, params, rows) -> [each member's held-out metrics], all members in one compiled call."""
  forward = sweep.make_forward(model.apply)

  @jax.jit
  def sums(state, params, batch):
    logits = forward(state["trainable"], state["scaling"], params, *task.inputs(model, sweep.tiled(batch, k)))
    grouped = logits.reshape(k, -1, *logits.shape[1:])
    return jax.vmap(lambda member: steps.cross_entropy(*task.aligned(member, batch["labels"])))(grouped)

  def evaluate(state, params, rows: dict) -> list[dict]:
    totals = np.zeros((3, k))
    for batch, _ in data.padded_batches(rows, batch_size):
      totals += np.asarray([np.asarray(x, np.float64) for x in sums(state, params, batch)])
    total, count, correct = totals
    return [task.metrics(total[i] / max(count[i], 1.0), correct[i] / max(count[i], 1.0)) for i in range(k)]
  return evaluate


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def table_rows(named: list[tuple[str, sweep.Member]], train_losses: list[float], after: list[dict]) -> list[dict]:
  """One row per member: its name, settings, training loss (the mean of the last log_every steps) and held-out
  metrics."""
  return [{"member": name, "seed": m.seed, "learning_rate": m.learning_rate, "rank": m.rank, "alpha": m.alpha,
           "train_loss": loss, **{f"eval_{key}": float(value) for key, value in metrics.items()}}
          for (name, m), loss, metrics in zip(named, train_losses, after)]


def write_table(workdir: str, rows: list[dict], name: str = TABLE) -> str:
  """Writes workdir/<name>.md, .csv and .json (default sweep.*, each via a temporary name); returns the Markdown
  table."""
  columns = list(rows[0])
  cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  markdown = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                        *("| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows)]) + "\n"
  out = io.StringIO()
  writer = csv.DictWriter(out, columns)
  writer.writeheader()
  writer.writerows(rows)
  _write_text(os.path.join(workdir, f"{name}.md"), markdown)
  _write_text(os.path.join(workdir, f"{name}.csv"), out.getvalue())
  _write_text(os.path.join(workdir, f"{name}.json"), json.dumps(rows, indent=2))
  return markdown


def _export(workdir, config, model, params, tokenizer, task, lora_cfg, saved, named, state) -> None:
  """workdir/members/<name>/ (a PEFT folder) per member, and workdir/base/ for a random model."""
  base_name = loop.base_model_name(config.model)
  if config.model in loop.RANDOM_MODELS:
    base_name = f"{workdir}/base"
    distributed.export_merged(tasks.family(config).module.save_pretrained, model, params, base_name)
    tokenizer.save_pretrained(base_name)
  members_only = [m for _, m in named]
  for k, (name, _) in enumerate(named):
    member_cfg, tree = sweep.member_adapter(lora_cfg, members_only, state, k)
    if saved:
      member_cfg, tree = [member_cfg, modules_to_save.ModulesToSaveConfig(saved)], (tree, sweep.member_saved(state, k))
    tree = jax.tree.map(np.asarray, tree)
    interop.write_folder(os.path.join(workdir, "members", name),
                         *interop.adapter_files(member_cfg, tree, base_name, task.peft_task_type))


def main(config: ml_collections.ConfigDict, allow_config_change: bool = False) -> dict:
  """Trains every member of config.sweep in one compiled step, evaluates and exports each; returns a summary
  ({'start_step', 'members', 'rows', 'losses' (steps run, K), 'state', 'workdir', ...}); rerun, it resumes from
  the newest checkpoint in config.workdir."""
  validate.check(config)
  named = members(config)
  k = len(named)
  workdir = os.path.abspath(config.workdir)
  finished = run_record.check_rerun(config, workdir, allow_config_change)
  if finished is not None:
    print(f"the sweep in {workdir} finished at step {finished} and wrote its files there; nothing was rewritten.")
    return {"final_step": finished, "finished": True, "workdir": workdir, "config": config}
  task = tasks.family(config).task
  loaded = data_files.load(config, task.kind, workdir)
  num_labels = loaded.num_labels() if task is tasks.SequenceClassification else 0
  model, params, tokenizer = loop.load_model(config, num_labels)
  if loaded.label_names and hasattr(model.config, "id2label"):
    model = model.clone(config=dataclasses.replace(model.config, id2label=tuple(loaded.label_names)))
  train_data = task.tokenize(tokenizer, loaded.train, config)
  eval_data = task.tokenize(tokenizer, loaded.held_out, config)
  print(f"task {config.task}: {len(loaded.train)} training and {len(loaded.held_out)} held-out examples; "
        f"{k} sweep members, trained together in one compiled step on one device with the model's dropout off")

  method_cfg = methods.method_config(config, getattr(model.config, "model_type", config.family),
                                     getattr(tokenizer, "name_or_path", ""))
  lora_cfg = method_cfg[0] if isinstance(method_cfg, list) else method_cfg
  saved = method_cfg[1].modules if isinstance(method_cfg, list) else ()

  def member_key(seed):  # as `train.loop`: fold_in(key(seed), 1), split between the configs of a list
    key = jax.random.fold_in(jax.random.key(seed), 1)
    return jax.random.split(key, 2)[0] if saved else key

  members_only = [m for _, m in named]
  state = sweep.init(lora_cfg, members_only, params, saved, member_key)
  make_tx, unit = optimizer(config)
  tx, opt_state = sweep.init_optimizer(make_tx, state, members_only)
  train_step = sweep.make_step(model.apply, _row_losses(task), tx, lambda batch: task.inputs(model, batch))
  evaluate = _evaluate(model, task, k, config.batch_size)

  run_record.write(workdir, config, loaded.label_names, num_labels)
  manager = checkpoint.manager(f"{workdir}/checkpoints", max_to_keep=config.keep_checkpoints)
  train_state = {"step": np.int32(0), "sweep": state, "opt_state": opt_state}
  restored = checkpoint.restore(manager, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                                      train_state))
  position = {"epoch": 0, "index": 0}
  if restored is not None:
    train_state, position = restored
  start_step = int(train_state["step"])
  if start_step:
    print(f"resuming the sweep from step {start_step} (epoch {position['epoch']}, batch {position['index']}) in "
          f"{workdir}")
  writer = tensorboardX.SummaryWriter(f"{workdir}/tensorboard")

  def log_eval(step, metrics):
    for (name, _), values in zip(named, metrics):
      tqdm.tqdm.write(f"step {step} {name}: " + ", ".join(f"eval {n.replace('_', ' ')} {v:.4f}"
                                                         for n, v in values.items()))
      for n, v in values.items():
        writer.add_scalar(f"eval/{name}/{n}", v, step)

  if start_step:
    log_eval(start_step, evaluate(train_state["sweep"], params, eval_data))
  else:  # every member starts as the base model (LoRA's B is 0, the modules to save are the base's): evaluate one
    first = jax.tree.map(lambda v: v[:1], {"trainable": state["trainable"], "scaling": state["scaling"]})
    before = _evaluate(model, task, 1, config.batch_size)(first, params, eval_data)[0]
    tqdm.tqdm.write("step 0 (every member): " + ", ".join(f"eval {n.replace('_', ' ')} {v:.4f}"
                                                         for n, v in before.items()))
    for name, _ in named:
      for n, v in before.items():
        writer.add_scalar(f"eval/{name}/{n}", v, 0)
  state, opt_state = train_state["sweep"], train_state["opt_state"]
  batches = packing.training_batches(config, task, train_data, position["epoch"], position["index"])
  losses, pending, logged, start = [], [], [float("nan")] * k, time.perf_counter()
  progress = tqdm.tqdm(total=config.steps, initial=min(start_step, config.steps), desc="sweep", unit="step")
  with contextlib.closing(manager), preemption.Signals() as signals:
    for step in range(start_step + 1, config.steps + 1):
      rows, chosen, position = next(batches)
      state, opt_state, member_losses = train_step(state, opt_state, params, {key: rows[key][chosen] for key in rows})
      member_losses = np.asarray(member_losses)
      if not np.all(np.isfinite(member_losses)):
        bad = int(np.flatnonzero(~np.isfinite(member_losses))[0])
        raise ValueError(f"step {step}: sweep member {named[bad][0]}'s loss is {member_losses[bad]}; the sweep "
                         "stops (its last checkpoint is kept; lower that member's learning rate in config.sweep).")
      losses.append(member_losses)
      pending.append(member_losses)
      progress.update(1)
      if step % config.log_every == 0 or step == config.steps:
        mean = np.mean(pending, axis=0)
        pending, logged = [], [float(v) for v in mean]
        progress.set_postfix(loss="/".join(f"{v:.4f}" for v in mean))
        for (name, m), value in zip(named, mean):
          writer.add_scalar(f"train/{name}/loss", value, step)
          writer.add_scalar(f"train/{name}/learning_rate", m.learning_rate * float(unit(step - 1)), step)
        writer.flush()
      if config.eval_every and step % config.eval_every == 0 and step != config.steps:
        log_eval(step, evaluate(state, params, eval_data))
      train_state = {"step": np.int32(step), "sweep": state, "opt_state": opt_state}
      if step % config.checkpoint_every == 0 or step == config.steps:
        checkpoint.save(manager, step, train_state, position)
      if signum := signals.received():
        progress.close()
        preemption.save_and_exit(manager, step, train_state, position, signum)
  progress.close()
  train_seconds = time.perf_counter() - start
  after = evaluate(state, params, eval_data)
  log_eval(config.steps, after)
  writer.close()

  _export(workdir, config, model, params, tokenizer, task, lora_cfg, saved, named, state)
  rows = table_rows(named, logged, after)
  print(write_table(workdir, rows), end="")
  print(f"wrote {workdir}/members/<member> ({k} PEFT folders) and {workdir}/{TABLE}.md, .csv, .json "
        f"({config.steps - start_step} steps in {train_seconds:.1f}s)")
  run_record.write(workdir, config, loaded.label_names, num_labels, config.steps)
  return {"start_step": start_step, "final_step": config.steps, "members": named, "rows": rows,
          "losses": np.asarray(losses), "after": after, "state": state, "model": model, "params": params,
          "workdir": workdir, "config": config}
