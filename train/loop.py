"""`main(config)`: fine-tune a model of any family (T5, BERT/RoBERTa, GPT-2, Llama) with any method, resumably.

config.family picks the model module and its task adapter (`train.tasks`: sequence-to-sequence LM,
sequence classification, causal LM); config.method picks the method (`train.methods`).

workdir layout: checkpoints/<step>/ (Orbax: train state + data position), tensorboard/ (event
files), merged/ (the model with the method folded in + tokenizer, a Hugging Face folder), adapter/
(a Hugging Face PEFT folder for LoRA / DoRA, an Orbax tree of the trained leaves for the other
methods or with modules_to_save) and, for a randomly initialised model, base/ (the frozen base the
adapter applies to).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorboardX
import tqdm
import transformers

import peftjax as pj
from peftjax import assets, checkpoint, interop
from peftjax.models import gguf, hf_io

from train import data, methods, steps, tasks

RANDOM_MODELS = ("", "random")
ASSET = "asset:"
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve(spec: str) -> str:
  """A model or tokenizer location: "asset:<package>/<path>" (a file inside an asset package), a local path, or a
  hub id (downloaded when online)."""
  if spec.startswith(ASSET):
    package, _, relative = spec[len(ASSET):].partition("/")
    return assets.asset_path(package, *filter(None, relative.split("/")))
  return spec if os.path.exists(spec) else hf_io.resolve(spec)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one sentence naming the key and what is valid) for a bad config value."""
  if config.family not in tasks.FAMILIES:
    raise ValueError(f"config.family={config.family!r} is not a known model family; valid: {sorted(tasks.FAMILIES)}.")
  task = tasks.FAMILIES[config.family].task
  data.check_task(task.kind, config.task)
  methods.check(config)
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.compute_dtype={config.compute_dtype!r} is not supported; "
                     f"valid: {sorted(COMPUTE_DTYPES)}.")
  if config.optimizer.decay not in steps.DECAYS:
    raise ValueError(f"config.optimizer.decay={config.optimizer.decay!r} is not a known schedule; "
                     f"valid: {list(steps.DECAYS)}.")
  for key in ("batch_size", *task.length_keys, "log_every", "checkpoint_every", "keep_checkpoints"):
    if key not in config:
      raise ValueError(f"config.{key} is missing; a {task.kind} model needs {list(task.length_keys)}.")
    if config[key] < 1:
      raise ValueError(f"config.{key}={config[key]} must be a positive integer.")
  for key in ("steps", "eval_every", "train_examples"):
    if config[key] < 0:
      raise ValueError(f"config.{key}={config[key]} must be 0 or a positive integer.")
  if config.optimizer.learning_rate <= 0 or config.optimizer.grad_clip_norm <= 0:
    raise ValueError(f"config.optimizer.learning_rate={config.optimizer.learning_rate} and grad_clip_norm="
                     f"{config.optimizer.grad_clip_norm} must both be positive.")


def load_tokenizer(path: str):
  """A transformers tokenizer from a folder / hub id, or the one stored in a GGUF file."""
  if path.endswith(".gguf"):
    return gguf.load_tokenizer(path)
  return transformers.AutoTokenizer.from_pretrained(path)


def load_model(config: ml_collections.ConfigDict, num_labels: int = 2):
  """(model, params, tokenizer): from a checkpoint (folder, GGUF file, hub id or asset), or a random model.

  The tokenizer is config.tokenizer, else the checkpoint's own, else the family's default.
  """
  family = tasks.FAMILIES[config.family]
  if config.model in RANDOM_MODELS:
    model = family.random_model(config.model_shape.to_dict(), num_labels)
    params = family.module.init_params(model, jax.random.fold_in(jax.random.key(config.seed), 0))
    path = None
  else:
    path = resolve(config.model)
    model, params = family.pretrained(path, num_labels, jax.random.fold_in(jax.random.key(config.seed), 0))
  model = model.clone(dtype=COMPUTE_DTYPES[config.compute_dtype])
  own = path is not None and (path.endswith(".gguf") or any(
      os.path.exists(os.path.join(path, f)) for f in ("tokenizer_config.json", "tokenizer.json")))
  if not (config.tokenizer or own or family.default_tokenizer):
    raise ValueError(f"config.tokenizer is empty and the {config.family} model has no tokenizer of its own; "
                     "name a tokenizer folder or hub id.")
  tokenizer_path = resolve(config.tokenizer) if config.tokenizer else path if own else resolve(family.default_tokenizer)
  tokenizer = load_tokenizer(tokenizer_path)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  if len(tokenizer) > model.config.vocab_size:
    raise ValueError(f"the tokenizer at {tokenizer_path!r} has {len(tokenizer)} tokens but the model's vocab_size is "
                     f"{model.config.vocab_size}; use its own tokenizer or a larger config.model_shape.vocab_size.")
  return model, params, tokenizer


def trainable_and_frozen(config: ml_collections.ConfigDict, model, params: dict):
  """(method config(s) or None, trainable tree, frozen tree): new adapter leaves over frozen params, or all params."""
  method_cfg = methods.method_config(config, getattr(model.config, "model_type", config.family))
  if method_cfg is None:
    return None, params, {}
  return method_cfg, pj.init(method_cfg, jax.random.fold_in(jax.random.key(config.seed), 1), params), params


def initial_state(tx, trainable) -> dict:
  """Step 0 train state, committed to the device like a restored one (so both compile the same step)."""
  state = {"step": jnp.asarray(0, jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
  return jax.device_put(state, jax.devices()[0])


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _log(writer, prefix: str, step: int, values: dict) -> None:
  for name, value in values.items():
    writer.add_scalar(f"{prefix}/{name}", value, step)
  writer.flush()


def _train_summary(metrics: list[dict], seconds: float) -> dict:
  """Mean loss (of the applied steps) and gradient norm, last learning rate, skipped steps, speed."""
  applied = [m["loss"] for m in metrics if not m["skipped"]]
  return {"loss": float(np.mean(applied)) if applied else float("nan"),
          "grad_norm": float(np.mean([m["grad_norm"] for m in metrics])),
          "learning_rate": float(metrics[-1]["learning_rate"]),
          "skipped": int(sum(m["skipped"] for m in metrics)),
          "steps_per_second": len(metrics) / seconds}


def export(workdir: str, model, frozen, trainable, method_cfg, tokenizer, config) -> None:
  """Writes workdir/merged (+ tokenizer) and, for a method with adapters, workdir/adapter (+ workdir/base for a
  random model)."""
  family = tasks.FAMILIES[config.family]
  merged = trainable if method_cfg is None else pj.merge(method_cfg, frozen, trainable)
  if method_cfg is not None:
    base_name = config.model
    if config.model in RANDOM_MODELS:
      base_name = os.path.join(workdir, "base")
      family.module.save_pretrained(model, frozen, base_name)
      tokenizer.save_pretrained(base_name)
    adapter = os.path.join(workdir, "adapter")
    if isinstance(method_cfg, pj.LoraConfig):  # DoRA too
      interop.save_lora_adapter(adapter, method_cfg, _host(trainable), base_model_name_or_path=base_name,
                                task_type=family.task.peft_task_type)
    else:
      checkpoint.save_adapters(adapter, trainable)
  folder = os.path.join(workdir, "merged")
  family.module.save_pretrained(model, merged, folder)
  tokenizer.save_pretrained(folder)


def _metrics_line(step: int, metrics: dict) -> str:
  return f"step {step}: " + ", ".join(f"eval {name.replace('_', ' ')} {value:.4f}" for name, value in metrics.items())


def main(config: ml_collections.ConfigDict) -> dict:
  """Trains, evaluates before/after, checkpoints, exports; returns a summary with the final train state."""
  check_config(config)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  task = tasks.FAMILIES[config.family].task
  train_set, held_out = data.split(data.load_task(task.kind, config.task), config.eval_examples,
                                   config.train_examples)
  num_labels = 1 + max(label for _, label in train_set + held_out) if task is tasks.SequenceClassification else 0
  model, params, tokenizer = load_model(config, num_labels)
  train_data = task.tokenize(tokenizer, train_set, config)
  eval_data = task.tokenize(tokenizer, held_out, config)
  print(f"task {config.task}: {len(train_set)} training and {len(held_out)} held-out examples")

  method_cfg, trainable, frozen = trainable_and_frozen(config, model, params)
  trainable_line = pj.print_trainable_parameters(trainable, frozen)
  tx, schedule = steps.make_optimizer(config.optimizer, config.steps)
  forward = steps.make_forward(model, task, method_cfg)
  train_step, _ = steps.make_train_step(forward, task, tx, schedule, config.seed)
  exact_match = (steps.make_exact_match(model, method_cfg, tokenizer, config.target_length)
                 if task is tasks.Seq2SeqLM else None)
  evaluate = steps.make_evaluate(forward, task, config.batch_size, exact_match)
  state = initial_state(tx, trainable)
  position = {"epoch": 0, "index": 0}

  manager = checkpoint.manager(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
  try:
    restored = checkpoint.restore(manager, state)
  except ValueError as e:
    raise ValueError(f"the checkpoint in {workdir!r} does not fit this config (another model, task or method "
                     f"setting?); use a new config.workdir ({e}).") from e
  if restored is not None:
    state, position = restored
  start_step = int(state["step"])
  if start_step:
    print(f"resuming from step {start_step} (epoch {position['epoch']}, batch {position['index']}) in {workdir}")

  writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
  before = evaluate(state["trainable"], frozen, eval_data)
  print(_metrics_line(start_step, before))
  _log(writer, "eval", start_step, before)

  batches = data.batches(train_data, config.batch_size, config.seed, position["epoch"], position["index"])
  pending, start_time = [], time.perf_counter()
  last_log = start_time
  progress = tqdm.tqdm(total=config.steps, initial=min(start_step, config.steps), desc="train", unit="step")
  for step in range(start_step + 1, config.steps + 1):
    batch, position = next(batches)
    state, metrics = train_step(state, frozen, batch)
    pending.append(metrics)
    progress.update(1)
    if step % config.log_every == 0 or step == config.steps:
      now = time.perf_counter()
      summary, pending, last_log = _train_summary(_host(pending), now - last_log), [], now
      progress.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{summary['learning_rate']:.2e}")
      _log(writer, "train", step, summary)
    if config.eval_every and step % config.eval_every == 0 and step != config.steps:
      metrics = evaluate(state["trainable"], frozen, eval_data)
      progress.write(_metrics_line(step, metrics))
      _log(writer, "eval", step, metrics)
    if step % config.checkpoint_every == 0 or step == config.steps:
      checkpoint.save(manager, step, state, position)
  progress.close()
  train_seconds = time.perf_counter() - start_time

  final_step = int(state["step"])
  after = evaluate(state["trainable"], frozen, eval_data)
  print(_metrics_line(final_step, after))
  _log(writer, "eval", final_step, after)
  writer.close()
  manager.wait_until_finished()
  manager.close()
  export(workdir, model, frozen, state["trainable"], method_cfg, tokenizer, config)
  print(f"wrote {workdir}/merged" + ("" if method_cfg is None else f" and {workdir}/adapter"))
  return {"start_step": start_step, "final_step": final_step, "before": before, "after": after,
          "trainable_parameters": trainable_line, "train_seconds": train_seconds, "state": state,
          "frozen": frozen, "model": model, "method": method_cfg, "config": config, "workdir": workdir}
