"""`train.multitask`: two LoRA adapters (other ranks, learning rates, seeds), each with its own copy of the
classifier head trained in full (modules_to_save), on two datasets in one compiled step, rows of both tasks mixed
in every batch (and one batch with a single task); each task's 12 losses, adapter and head equal its own
single-task run's within 1e-5."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax.methods import modules_to_save
from test_prompts import _batch, checkpoints  # noqa: F401 (a fixture)
from train import multitask, sweep

STEPS = 12
MEMBERS = [sweep.Member(seed=0, learning_rate=3e-2), sweep.Member(seed=1, learning_rate=1e-2, rank=4, alpha=2.0)]


def _row_losses(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


def _inputs(batch):
  return {k: v for k, v in batch.items() if k != "labels"}


def _task_batches():
  """Per step, each task's own rows: task 0 rolls the tokens one way with labels (0, 2, 1), task 1 the other way
  with labels (2, 2, 0); at step 5 task 1 has no rows."""
  base = _batch("bert_seq")
  out = []
  for s in range(STEPS):
    rows = []
    for task, (shift, labels) in enumerate([(s, [0, 2, 1]), (-2 * s - 1, [2, 2, 0])]):
      ids = np.roll(base["input_ids"], shift, axis=1) * base["attention_mask"]
      rows.append(None if (task == 1 and s == 5) else {**base, "input_ids": ids, "labels": np.asarray(labels)})
    out.append(rows)
  return out


@pytest.mark.slow
def test_each_task_adapter_equals_its_single_task_run(checkpoints):
  model, params = pj.models.from_pretrained(checkpoints("bert_seq"))
  cfg = pj.LoraConfig(rank=2, alpha=4, targets=("query", "value"))
  make_tx = lambda learning_rate: optax.adamw(learning_rate, weight_decay=0.01)  # noqa: E731
  # As a single run's [LoRA, modules_to_save] configs split their key: the first half is LoRA's.
  state = sweep.init(cfg, MEMBERS, params, ("classifier",), lambda seed: jax.random.split(jax.random.key(seed))[0])
  tx, opt_state = sweep.init_optimizer(make_tx, state, MEMBERS)
  step = multitask.make_step(model.apply, _row_losses, tx, _inputs)
  interleaved = np.asarray([3, 0, 1, 4, 2, 5])  # the rows of the two tasks mixed
  together = []
  for rows in _task_batches():
    present = [r for r in rows if r is not None]
    ids = np.concatenate([np.full(3, t) for t, r in enumerate(rows) if r is not None])
    mixed = {key: np.concatenate([r[key] for r in present]) for key in present[0]}
    perm = interleaved if len(present) == 2 else np.arange(3)
    state, opt_state, losses = step(state, opt_state, params, {k: v[perm] for k, v in mixed.items()}, ids[perm])
    together.append(np.asarray(losses))
  together = np.stack(together)

  for k, (member, member_cfg) in enumerate(zip(MEMBERS, sweep.member_configs(cfg, MEMBERS))):
    member_cfg = [member_cfg, modules_to_save.ModulesToSaveConfig(("classifier",))]
    adapters = pj.init(member_cfg, jax.random.key(member.seed), params)
    single_tx = make_tx(member.learning_rate)
    opt = single_tx.init(adapters)
    adapted = pj.apply(member_cfg, model.apply)

    @jax.jit
    def single(adapters, opt, b):
      loss, grads = jax.value_and_grad(lambda a: _row_losses(adapted(params, a, **_inputs(b)), b).mean())(adapters)
      updates, opt = single_tx.update(grads, opt, adapters)
      return optax.apply_updates(adapters, updates), opt, loss
    alone = []
    for rows in _task_batches():
      if rows[k] is None:
        alone.append(0.0)
        continue
      adapters, opt, loss = single(adapters, opt, rows[k])
      alone.append(float(loss))
    np.testing.assert_allclose(together[:, k], alone, atol=1e-5)
    _, exported = sweep.member_adapter(cfg, MEMBERS, state, k)
    for path, leaf in pj.tree.flatten(exported).items():
      np.testing.assert_allclose(leaf, pj.tree.flatten(adapters[0])[path], atol=1e-5, err_msg=path)
    head = pj.tree.flatten(sweep.member_saved(state, k))
    assert sorted(head) == ["classifier/bias", "classifier/kernel"]
    for path, leaf in pj.tree.flatten(adapters[1]).items():
      np.testing.assert_allclose(head[path], leaf, atol=1e-5, err_msg=path)
  assert together[-1, 0] < together[0, 0] and together[-1, 1] < together[0, 1]  # both tasks learn
