"""Dropout masks come from the step's key and each example's row in the batch (`peftjax.dropout`): the whole
batch, its micro-batches and any device mesh draw the same masks, for every family and a method of each kind,
while rows and steps still get different masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import dropout

import dropout_cases  # tests/ is on sys.path under pytest
import test_sharding


def test_keep_mask_per_row_follows_the_row_id():
  key = jax.random.key(3)
  with dropout.rows(jnp.arange(6)):
    whole = dropout.keep_mask(key, 0.5, (6, 40))
  with dropout.rows(jnp.array([4, 1])):
    part = dropout.keep_mask(key, 0.5, (2, 40))
  np.testing.assert_array_equal(part, whole[jnp.array([4, 1])])
  assert not np.array_equal(whole[0], whole[1])  # rows differ
  with dropout.rows(jnp.arange(6)):
    assert not np.array_equal(dropout.keep_mask(jax.random.fold_in(key, 1), 0.5, (6, 40)), whole)  # steps differ
    with pytest.raises(ValueError, match="must lead with the batch's 6 rows"):
      dropout.keep_mask(key, 0.5, (4, 40))
  outside = dropout.keep_mask(key, 0.5, (6, 40))  # one draw over the whole array
  assert outside.shape == (6, 40) and not np.array_equal(outside, whole)


@pytest.mark.parametrize("keep", [0.9, 0.25])
def test_keep_mask_is_bernoulli_of_keep_and_uncorrelated(keep):
  """The hashed mask bits: each element kept with probability `keep` (within 5 standard errors over 640k draws),
  no correlation between neighbouring elements, between rows
  or between steps; odd row lengths and arrays outside a `rows` block get their shape."""
  key, n = jax.random.key(11), 16 * 40_001
  with dropout.rows(jnp.arange(16)):
    mask = np.asarray(dropout.keep_mask(key, keep, (16, 40_001)), np.float64)
    next_step = np.asarray(dropout.keep_mask(jax.random.fold_in(key, 1), keep, (16, 40_001)), np.float64)
  assert abs(mask.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n)
  bound = 5 / np.sqrt(mask[:, 1:].size)
  assert abs(np.corrcoef(mask[:, :-1].ravel(), mask[:, 1:].ravel())[0, 1]) < bound  # neighbours
  assert abs(np.corrcoef(mask[:-1].ravel(), mask[1:].ravel())[0, 1]) < bound  # rows
  assert abs(np.corrcoef(mask.ravel(), next_step.ravel())[0, 1]) < bound  # steps
  outside = np.asarray(dropout.keep_mask(key, keep, (7, 5, 3)))
  assert outside.shape == (7, 5, 3) and 0 < outside.mean() < 1


@pytest.mark.parametrize("family,method", dropout_cases.CASES)
def test_forward_masks_do_not_depend_on_the_split(family, method):
  """With dropout on, each row's logits follow its row id, not its place in the batch (a micro-batch or a device
  holds a subset of the rows: tests/dropout_worker.py checks those); they differ from the deterministic logits,
  between steps, and between identical rows."""
  _, _, params, _, adapters, forward = dropout_cases.setup(family, method)
  batch = dropout_cases.batch(family)

  @jax.jit
  def logits(row_ids, rows, rng):
    with dropout.rows(row_ids):
      return forward(adapters, params, rows, rng)

  key = jax.random.key(7)
  whole = np.asarray(logits(jnp.arange(dropout_cases.ROWS), batch, key))
  order = np.random.default_rng(1).permutation(dropout_cases.ROWS)
  shuffled = np.asarray(logits(jnp.asarray(order), {k: v[order] for k, v in batch.items()}, key))
  np.testing.assert_allclose(shuffled, whole[order], atol=1e-5, rtol=0)
  deterministic = np.asarray(jax.jit(forward)(adapters, params, batch))
  assert np.max(np.abs(whole - deterministic)) > 1e-3  # dropout is active
  next_step = np.asarray(logits(jnp.arange(dropout_cases.ROWS), batch, jax.random.fold_in(key, 1)))
  assert np.max(np.abs(next_step - whole)) > 1e-3
  same_rows = {k: np.repeat(v[:1], dropout_cases.ROWS, axis=0) for k, v in batch.items()}
  repeated = np.asarray(logits(jnp.arange(dropout_cases.ROWS), same_rows, key))
  assert np.max(np.abs(repeated[0] - repeated[1])) > 1e-4


@pytest.mark.slow
def test_train_losses_equal_for_any_micro_batches_and_mesh():
  """Micro-batches 1, 2, 4 and meshes (1,1,1), (8,1,1), (2,2,2) log the same losses with dropout on (8 simulated
  devices in a subprocess), and the losses differ from the same runs without dropout."""
  cases = ["t5/lora", "gpt2/adapter"]
  results = test_sharding.run_worker(cases, timeout=1500, script="dropout_worker.py")
  for case in cases:
    runs = results[case]
    reference = runs.pop("(1, 1, 1)x1")
    without = runs.pop("no dropout")
    for setup, losses in runs.items():
      np.testing.assert_allclose(losses, reference, atol=1e-5, rtol=0, err_msg=f"{case} on {setup}")
    assert max(abs(a - b) for a, b in zip(reference, without)) > 1e-4, case
