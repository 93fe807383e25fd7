"""Length buckets: each batch at the shortest bucket that holds its rows, seeded, and resumed bit for bit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import train
from train import buckets, data, tasks

import test_train  # tests/ is on sys.path under pytest


def test_bucketed_batches_fit_their_rows_and_resume_mid_epoch():
  lengths = np.random.default_rng(3).integers(1, 33, 203)
  order = buckets.epoch_batches(lengths, (8, 16, 32), 8, seed=5, epoch=0)
  assert {length for _, length in order} == {8, 16, 32}
  rows = np.concatenate([chosen for chosen, _ in order])
  assert len(rows) == len(set(rows)) == 8 * (203 // 8)  # one partial batch dropped, leftovers moved up
  for chosen, length in order:
    assert lengths[chosen].max() <= length and len(chosen) == 8
  straight = buckets.batches(lengths, (8, 16, 32), 8, seed=5)
  seen = [next(straight) for _ in range(len(order) + 5)]  # into the second epoch
  _, _, position = seen[len(order) - 2]
  resumed = buckets.batches(lengths, (8, 16, 32), 8, seed=5, **position)
  for chosen, length, where in seen[len(order) - 1:]:
    again = next(resumed)
    np.testing.assert_array_equal(again[0], chosen)
    assert again[1:] == (length, where)
  assert seen[len(order)][2] == {"epoch": 1, "index": 1}
  # One bucket is the fixed-shape order of train.data.batch_indices.
  fixed, reference = buckets.batches(lengths, (32,), 8, seed=5), data.batch_indices(203, 8, seed=5)
  for _ in range(30):
    (chosen, length, position), (expected, expected_position) = next(fixed), next(reference)
    np.testing.assert_array_equal(chosen, expected)
    assert length == 32 and position == expected_position


def test_row_lengths_and_cut():
  rows = {"input_ids": np.arange(12).reshape(3, 4), "attention_mask": np.array([[1, 1, 0, 0], [1, 0, 0, 0],
                                                                                 [0, 0, 1, 1]]),
          "labels": np.arange(3)}
  np.testing.assert_array_equal(buckets.row_lengths(rows), [2, 1, 4])  # left padding counts as full length
  cut = buckets.cut(rows, 2, tasks.SequenceClassification)
  assert cut["input_ids"].shape == (3, 2) and cut["labels"].shape == (3,)
  assert buckets.cut(rows | {"labels": rows["input_ids"]}, 2, tasks.CausalLM)["labels"].shape == (3, 2)


def test_bad_buckets_give_one_clear_sentence(tmp_path):
  for bad in ((16, 8), (8, 40), (0,)):
    with pytest.raises(ValueError, match=r"config\.buckets=.* must be increasing positive token lengths up to the "
                                         r"input length 24"):
      train.main(test_train.tiny_config(tmp_path, buckets=bad))


@pytest.mark.slow
def test_kill_and_resume_with_buckets_is_bit_identical(tmp_path):
  # The tiny T5 of test_train (source_length 24, LoRA dropout on) with buckets 8 and 16: 40 examples, 5 batches an
  # epoch, so the 12 steps cross epochs; the resumed run must use the same batches, lengths and dropout masks.
  settings = dict(buckets=(8, 16))
  first = train.main(test_train.tiny_config(tmp_path / "resumed", steps=6, **settings))
  assert first["final_step"] == 6
  resumed = train.main(test_train.tiny_config(tmp_path / "resumed", steps=12, **settings))
  assert resumed["start_step"] == 6
  straight = train.main(test_train.tiny_config(tmp_path / "straight", steps=12, **settings))
  for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(straight["state"])):
    np.testing.assert_array_equal(a, b)
  # The buckets changed the run: fixed shapes train other batches.
  fixed = train.main(test_train.tiny_config(tmp_path / "fixed", steps=12))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fixed["state"]["trainable"]),
                                                      jax.tree.leaves(straight["state"]["trainable"])))
