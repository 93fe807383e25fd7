"""`train.sweep`: K LoRA members (other seeds, learning rates, ranks, alphas) trained in one compiled step on a
random tiny BERT classifier; each member's 20 losses equal a separate single-adapter run's within 1e-5, and
its exported adapter equals that run's adapter,
also with the members run one pass each (`members_per_pass=1`)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax.methods import lora
from test_prompts import _batch, checkpoints  # noqa: F401 (a fixture)
from train import sweep

STEPS = 20
MEMBERS = [sweep.Member(seed=0, learning_rate=3e-2), sweep.Member(seed=1, learning_rate=1e-2, rank=4),
           sweep.Member(seed=2, learning_rate=3e-2, rank=3, alpha=1.0)]


def _row_losses(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


def _inputs(batch):
  return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.slow
def test_sweep_members_equal_separate_runs(checkpoints):
  model, params = pj.models.from_pretrained(checkpoints("bert_seq"))
  batch = {**_batch("bert_seq"), "labels": np.asarray([0, 2, 1])}
  batches = [{**batch, "input_ids": np.roll(batch["input_ids"], s, axis=1) * batch["attention_mask"]}
             for s in range(STEPS)]
  cfg = pj.LoraConfig(rank=2, alpha=4, targets=("query", "value", "intermediate.dense"))
  make_tx = lambda learning_rate: optax.adamw(learning_rate, weight_decay=0.01)

  state = sweep.init(cfg, MEMBERS, params)
  tx, opt_state = sweep.init_optimizer(make_tx, state, MEMBERS)
  step = sweep.make_step(model.apply, _row_losses, tx, _inputs)
  together = []
  for b in batches:
    state, opt_state, losses = step(state, opt_state, params, b)
    together.append(np.asarray(losses))
  together = np.stack(together)  # (steps, members)
  assert step._cache_size() == 1

  # One member per pass (jax.lax.map over the members inside the step): the same losses and adapters.
  state_1 = sweep.init(cfg, MEMBERS, params)
  opt_1 = sweep.init_optimizer(make_tx, state_1, MEMBERS)[1]
  per_member = sweep.make_step(model.apply, _row_losses, tx, _inputs, members_per_pass=1)
  for s, b in enumerate(batches):
    state_1, opt_1, losses = per_member(state_1, opt_1, params, b)
    np.testing.assert_allclose(losses, together[s], atol=1e-5)
  for got, want in zip(jax.tree.leaves(state_1["trainable"]), jax.tree.leaves(state["trainable"])):
    np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="members_per_pass=2 must divide the sweep's 3 members"):
    sweep.make_step(model.apply, _row_losses, tx, _inputs, members_per_pass=2)(state, opt_state, params, batches[0])

  for k, (member, member_cfg) in enumerate(zip(MEMBERS, sweep.member_configs(cfg, MEMBERS))):
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
    for b in batches:
      adapters, opt, loss = single(adapters, opt, b)
      alone.append(float(loss))
    np.testing.assert_allclose(together[:, k], alone, atol=1e-5)
    exported_cfg, exported = sweep.member_adapter(cfg, MEMBERS, state, k)
    assert exported_cfg == member_cfg
    for path, adapter in lora.adapter_modules(exported).items():
      np.testing.assert_allclose(lora.low_rank_update(member_cfg, path, adapter),
                                 lora.low_rank_update(member_cfg, path, lora.adapter_modules(adapters)[path]),
                                 atol=1e-5)
  assert together[-1].max() < together[0].min()  # every member learns
  assert np.min(np.abs(np.diff(together[-1]))) > 1e-4  # and the members differ
