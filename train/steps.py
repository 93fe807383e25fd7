"""The compiled pieces of training: forward pass, loss, optimizer, train step and held-out evaluation.

The train state is a dict {'step', 'trainable', 'opt_state'}.  `trainable` is the LoRA adapter tree
(the frozen base params travel separately and are never differentiated) or, for full fine-tuning,
the whole parameter tree (then the frozen tree is empty).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax as pj
from peftjax.models import t5

from train.data import IGNORE

DECAYS = ("cosine", "linear")


def make_forward(model: t5.T5ForConditionalGeneration, lora_cfg: pj.LoraConfig | None) -> Callable[..., jax.Array]:
  """forward(trainable, frozen, batch, rng) -> logits; rng None means deterministic (no dropout)."""
  lora_apply = pj.apply(lora_cfg, model.apply) if lora_cfg is not None else None

  def forward(trainable, frozen, batch, rng=None):
    c = model.config
    decoder_input_ids = t5.shift_right(batch["labels"], c.decoder_start_token_id, c.pad_token_id)
    args = (batch["input_ids"], batch["attention_mask"], decoder_input_ids)
    kwargs = dict(deterministic=rng is None, rngs={"dropout": rng} if rng is not None else None)
    if lora_apply is None:
      return model.apply({"params": trainable}, *args, **kwargs)
    return lora_apply(frozen, trainable, *args, **kwargs)
  return forward


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(summed token cross-entropy, number of target tokens), ignoring label positions equal to -100."""
  valid = labels != IGNORE
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, labels, 0))
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid)


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


def make_train_step(forward, tx: optax.GradientTransformation, schedule: optax.Schedule, seed: int):
  """One jit-compiled step: train_step(state, frozen, batch) -> (state, metrics).

  Differentiates the loss with respect to state['trainable'] only.  Dropout uses
  fold_in(key(seed), step), so a resumed run draws the same masks.  A non-finite loss or
  gradient keeps 'trainable' and 'opt_state' unchanged (metrics['skipped'] is 1); the step
  counter still advances past the batch.
  """
  def loss_fn(trainable, frozen, batch, rng):
    total, count = cross_entropy(forward(trainable, frozen, batch, rng), batch["labels"])
    return total / jnp.maximum(count, 1)

  grad_fn = jax.value_and_grad(loss_fn)  # argnums=0: the trainable tree only

  @jax.jit
  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    loss, grads = grad_fn(state["trainable"], frozen, batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {"step": state["step"] + 1, "trainable": keep_if_finite(trainable, state["trainable"]),
                 "opt_state": keep_if_finite(opt_state, state["opt_state"])}
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.int32),
               "learning_rate": schedule(state["step"])}
    return new_state, metrics
  return train_step, grad_fn


def _padded_batches(data: dict, batch_size: int):
  """Fixed-size batches over all rows; the last is padded with ignored rows. Yields (batch, real rows)."""
  rows = len(data["labels"])
  for start in range(0, rows, batch_size):
    chosen = np.arange(start, start + batch_size) % rows
    batch = {k: v[chosen] for k, v in data.items()}
    real = min(batch_size, rows - start)
    batch["labels"][real:] = IGNORE
    yield batch, real


def make_evaluate(model: t5.T5ForConditionalGeneration, forward, lora_cfg: pj.LoraConfig | None, tokenizer,
                  batch_size: int, max_new_tokens: int):
  """evaluate(trainable, frozen, data) -> {'loss': mean token loss, 'exact_match': fraction}.

  Exact match greedily generates `max_new_tokens` tokens, decodes them and compares the text with
  the decoded target (whitespace-normalised).
  """
  @jax.jit
  def loss_sums(trainable, frozen, batch):
    return cross_entropy(forward(trainable, frozen, batch), batch["labels"])

  lora_apply = pj.apply(lora_cfg, model.apply) if lora_cfg is not None else None
  # One function object for every call, so generate compiles once.
  generate_apply = (lambda p, *a, **kw: lora_apply(p[0], p[1], *a, **kw)) if lora_apply else None

  def text(ids) -> list[str]:
    return [" ".join(s.split()) for s in tokenizer.batch_decode(ids, skip_special_tokens=True)]

  def evaluate(trainable, frozen, data: dict) -> dict:
    total = count = matches = 0.0
    params = (frozen, trainable) if lora_apply else trainable
    for batch, real in _padded_batches(data, batch_size):
      batch_total, batch_count = loss_sums(trainable, frozen, batch)
      total, count = total + float(batch_total), count + float(batch_count)
      tokens = t5.generate(model, params, batch["input_ids"], batch["attention_mask"],
                           max_new_tokens=max_new_tokens, apply_fn=generate_apply)
      targets = np.where(batch["labels"] == IGNORE, tokenizer.pad_token_id, batch["labels"])
      matches += sum(p == t for p, t in zip(text(np.asarray(tokens)[:real]), text(targets[:real])))
    return {"loss": total / max(count, 1.0), "exact_match": matches / len(data["labels"])}
  return evaluate
