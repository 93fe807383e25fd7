"""The compiled pieces of training: forward pass, loss, optimizer, train step and held-out evaluation.

The train state is a dict {'step', 'trainable', 'opt_state', 'method_state'}.  `trainable` is the method's
adapter tree (the frozen base params travel separately and are never differentiated) or, for full fine-tuning,
the whole parameter tree (then the frozen tree is empty); 'method_state' is what a method keeps besides its
trainable leaves (replicated; empty for most methods).  What differs between model kinds (inputs, label
alignment, metrics) comes from the task adapter (`train.tasks`).  Every array is a global jax.Array placed on
the device mesh (`peftjax.sharding`); batches arrive sharded over the mesh's (data, fsdp) axes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax as pj
from peftjax import distributed, sharding
from peftjax.models import t5

from train import data, methods

DECAYS = ("cosine", "linear")


def make_forward(model, task, method_cfg, apply_fn=None) -> Callable[..., jax.Array]:
  """forward(trainable, frozen, batch, rng) -> logits; rng None means deterministic (no dropout).

  `task` is the task adapter (it names the model inputs); `method_cfg` the peftjax method config(s),
  or None for full fine-tuning (then `trainable` is the whole parameter tree and `frozen` is empty).
  A prompt method on a task whose logits keep the virtual positions (`task.virtual_positions_in_logits`: a causal
  LM) gets its virtual tokens as placeholder ids in front of each row, with attention-mask ones, so the logits are
  that much longer; otherwise the method strips them from per-token outputs itself.  `apply_fn` replaces
  model.apply under the method (e.g. `peftjax.quant.wrap(model.apply)` over a quantised base).
  """
  virtual = methods.virtual_tokens(method_cfg) if task.virtual_positions_in_logits else 0
  if virtual:
    method_cfg = methods.at_placeholders(method_cfg)
  adapted = pj.apply(method_cfg, apply_fn or model.apply) if method_cfg is not None else None

  def forward(trainable, frozen, batch, rng=None):
    if virtual:
      rows = batch["input_ids"].shape[0]
      batch = {**batch, "input_ids": jnp.concatenate([jnp.full((rows, virtual), methods.PLACEHOLDER, jnp.int32),
                                                      batch["input_ids"]], axis=1),
               "attention_mask": jnp.concatenate([jnp.ones((rows, virtual), batch["attention_mask"].dtype),
                                                  batch["attention_mask"]], axis=1)}
    args = task.inputs(model, batch)
    kwargs = dict(deterministic=rng is None, rngs={"dropout": rng} if rng is not None else None)
    if adapted is None:
      return model.apply({"params": trainable}, *args, **kwargs)
    return adapted(frozen, trainable, *args, **kwargs)
  return forward


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed cross-entropy, number of labels, number the argmax gets right), ignoring labels equal to -100."""
  valid = labels != data.IGNORE
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  correct = valid & (jnp.argmax(logits, -1) == labels)
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid), jnp.sum(correct)


def make_optimizer(opt: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW after global-norm clipping, with linear warm-up then cosine or linear decay to 0 at decay_steps."""
  if opt.decay not in DECAYS:
    raise ValueError(f"config.optimizer.decay={opt.decay!r} is not a known schedule; valid: {list(DECAYS)}.")
  decay_steps = opt.decay_steps or total_steps
  warmup = min(opt.warmup_steps, max(decay_steps - 1, 0))
  rest = max(decay_steps - warmup, 1)
  decay = (optax.cosine_decay_schedule(opt.learning_rate, rest) if opt.decay == "cosine"
           else optax.linear_schedule(opt.learning_rate, 0.0, rest))
  schedule = optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup), decay], [warmup])
  tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm),
                   optax.adamw(schedule, weight_decay=opt.weight_decay))
  return tx, schedule


def make_loss(forward, task, extra_loss: Callable[[Any], jax.Array] | None = None):
  """loss_fn(trainable, frozen, batch, rng) -> (summed cross-entropy, number of labels), the pair the sharded
  step divides (so micro-batches of unequal label counts add up to the full-batch mean).

  `extra_loss(trainable) -> scalar` (a method's regulariser) is added to the mean loss: as extra x count here.
  """
  def loss_fn(trainable, frozen, batch, rng):
    total, count, _ = cross_entropy(*task.aligned(forward(trainable, frozen, batch, rng), batch["labels"]))
    if extra_loss is not None:  # method hook: extra loss term
      total = total + extra_loss(trainable) * count
    return total, count
  return loss_fn


def make_train_step(forward, task, tx: optax.GradientTransformation, shardings: dict, *, micro_batches: int = 1,
                    seed: int = 0, extra_loss=None, post_update=None):
  """One sharded, jit-compiled step: train_step(state, frozen, batch) -> (state, metrics).

  `shardings` is {'state': train-state shardings, 'frozen': frozen-tree shardings} (`train.loop.shard`).
  Differentiates the mean cross-entropy (over the labels `task` aligns with the logits) with respect to
  state['trainable'] only, summing the gradients of `micro_batches` parts of the batch before one update.
  Dropout uses fold_in(key(seed), step) and each row's index in the batch (`peftjax.dropout`), so a resumed run, any
  micro-batching and any mesh draw the same masks.  A non-finite loss, gradient or
  updated parameter keeps the state unchanged (metrics['skipped'] is 1, metrics['nonfinite'] says what; see
  `train.divergence`); the step counter still advances past the batch.
  `post_update(state, grads) -> state` (method hook: e.g. AdaLoRA's rank allocation) runs after the optimizer
  update inside the step (see `peftjax.sharding.make_train_step`).
  """
  return sharding.make_train_step(make_loss(forward, task, extra_loss), tx, shardings["state"], shardings["frozen"],
                                  micro_batches=micro_batches, seed=seed, post_update=post_update)


def make_exact_match(model, method_cfg, tokenizer, max_new_tokens: int):
  """exact_match(trainable, frozen, batch, real) -> how many of the first `real` rows a T5 model gets right.

  Greedily generates `max_new_tokens` tokens, decodes them and compares the text with the decoded
  target (whitespace-normalised).
  """
  adapted = pj.apply(method_cfg, model.apply) if method_cfg is not None else None
  # One function object for every call, so generate compiles once.
  generate_apply = (lambda p, *a, **kw: adapted(p[0], p[1], *a, **kw)) if adapted else None

  def text(ids) -> list[str]:
    return [" ".join(s.split()) for s in tokenizer.batch_decode(ids, skip_special_tokens=True)]

  def exact_match(trainable, frozen, batch, real) -> int:
    params = (frozen, trainable) if adapted else trainable
    tokens = t5.generate(model, params, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                         apply_fn=generate_apply)
    labels = distributed.to_host(batch["labels"])
    targets = np.where(labels == data.IGNORE, tokenizer.pad_token_id, labels)
    return sum(p == t for p, t in zip(text(distributed.to_host(tokens)[:real]), text(targets[:real])))
  return exact_match


def make_evaluate(forward, task, batch_size: int, put_batch: Callable[[dict], dict], exact_match=None):
  """evaluate(trainable, frozen, data) -> held-out metrics: 'loss' (mean over labels) and the task's own.

  `put_batch` turns a batch of numpy rows into global arrays on the mesh (each process loading its rows).
  Sequence classification adds 'accuracy', a causal LM 'perplexity'; with `exact_match` (see
  `make_exact_match`) the fraction of rows whose generated text equals the target is 'exact_match'.
  """
  @jax.jit
  def sums(trainable, frozen, batch):
    return cross_entropy(*task.aligned(forward(trainable, frozen, batch), batch["labels"]))

  def evaluate(trainable, frozen, rows: dict) -> dict:
    total = count = correct = matches = 0.0
    for batch, real in data.padded_batches(rows, batch_size):
      batch = put_batch(batch)
      batch_total, batch_count, batch_correct = (float(distributed.to_host(x)) for x in sums(trainable, frozen, batch))
      total, count, correct = total + batch_total, count + batch_count, correct + batch_correct
      if exact_match is not None:
        matches += exact_match(trainable, frozen, batch, real)
    metrics = task.metrics(total / max(count, 1.0), correct / max(count, 1.0))
    if exact_match is not None:
      metrics["exact_match"] = matches / len(rows["labels"])
    return metrics
  return evaluate
