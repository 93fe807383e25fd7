"""Length-bucketed training batches: each batch is cut to the shortest of a few lengths that holds its rows.

Rows are tokenised to the full input length (config.max_length, or config.source_length for T5) as always;
config.buckets (ascending lengths, e.g. (32, 64); the full length is always the last bucket) lets a batch whose
rows are all short run at a shorter length, so it pads less, and the step compiles once per bucket.  Each epoch
shuffles the rows with np.random.default_rng([seed, epoch]), groups them by the smallest bucket that holds each row
(rows left over from a bucket's last partial batch move up to the next bucket), and shuffles the batches with the
same generator: the order depends only on (seed, epoch), so the data position {'epoch', 'index'} saved with a
checkpoint resumes it exactly, as `train.data.batch_indices` does for fixed shapes (config.buckets empty).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from train import data


def input_length(config, task) -> int:
  """The length the task's inputs are tokenised to (the last bucket)."""
  return config.source_length if "source_length" in task.length_keys else config.max_length


def lengths_of(config, task) -> tuple[int, ...]:
  """config.buckets checked and completed with the full input length; raises naming config.buckets."""
  full = input_length(config, task)
  chosen = tuple(config.get("buckets", ()))
  if any(not isinstance(b, int) or isinstance(b, bool) or not 0 < b <= full for b in chosen) or list(chosen) != sorted(
      set(chosen)):
    raise ValueError(f"config.buckets={chosen} must be increasing positive token lengths up to the input length "
                     f"{full} (e.g. ({full // 4}, {full // 2})); () pads every batch to {full}.")
  return tuple(b for b in chosen if b < full) + (full,)


def epoch_batches(row_lengths: np.ndarray, buckets: tuple[int, ...], batch_size: int, seed: int,
                  epoch: int) -> list[tuple[np.ndarray, int]]:
  """The epoch's batches as (row indices, bucket length), in training order."""
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(row_lengths))
  bucket_of = np.searchsorted(np.asarray(buckets), row_lengths[order])  # the smallest bucket >= each length
  batches, carry = [], np.zeros(0, order.dtype)
  for index, length in enumerate(buckets):
    rows = np.concatenate([carry, order[bucket_of == index]])
    full = len(rows) // batch_size
    batches += [(rows[i * batch_size:(i + 1) * batch_size], length) for i in range(full)]
    carry = rows[full * batch_size:]
  return [batches[i] for i in rng.permutation(len(batches))]


def batches(row_lengths: np.ndarray, buckets: tuple[int, ...], batch_size: int, seed: int, epoch: int = 0,
            index: int = 0) -> Iterator[tuple[np.ndarray, int, dict]]:
  """Endless (row indices, length, position) from data position (epoch, index); one bucket is fixed shapes
  (`train.data.batch_indices`' order)."""
  if len(buckets) == 1:
    for chosen, position in data.batch_indices(len(row_lengths), batch_size, seed, epoch, index):
      yield chosen, buckets[0], position
    return
  if len(row_lengths) < batch_size:
    raise ValueError(f"config.batch_size={batch_size} is larger than the {len(row_lengths)} training examples.")
  while True:
    order = epoch_batches(row_lengths, buckets, batch_size, seed, epoch)
    while index < len(order):
      chosen, length = order[index]
      index += 1
      yield chosen, length, {"epoch": epoch, "index": index}
    epoch, index = epoch + 1, 0


def row_lengths(rows: dict) -> np.ndarray:
  """Each row's length up to its last real token (a left-padded row counts as full length)."""
  mask = rows["attention_mask"]
  return mask.shape[1] - np.argmax(mask[:, ::-1] != 0, axis=1)


def cut(rows: dict, length: int, task) -> dict:
  """`rows` with the input arrays (and a causal LM's labels, aligned with them) cut to their first `length`
  positions (numpy views, no copies)."""
  keys = ("input_ids", "attention_mask") + (("labels",) if task.kind == "causal_lm" else ())
  return {k: v[:, :length] if k in keys else v for k, v in rows.items()}
