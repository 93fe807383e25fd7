"""Packing for causal LMs (config.packing): several documents share one row of config.max_length tokens.

A document is a tokenised row's real tokens (attention mask non-zero, either padding side) and their labels (a
plain text's every token, an instruction / chat row's completion tokens: `train.tasks.CausalLM.tokenize`).  Each
epoch shuffles the rows with np.random.default_rng([seed, epoch]) and fills packed rows in that order, starting a
new row when the next document does not fit; full batches of packed rows are the epoch's steps (the last partial
one is dropped).  The order depends only on (seed, epoch), so the data position {'epoch', 'index'} saved with a
checkpoint resumes it exactly, as for unpacked batches.

In a packed row the attention mask holds each document's segment id (1, 2, ...; 0 is padding), so the models attend
only within a document (`peftjax.models.layers.same_segment`), position_ids restart at 0 in each document, and
each document's first label is -100, so the last token of one document does not predict the first of the next:
a packed row's loss is the sum of its documents' losses run alone.  Prefix tuning's keys and values are in front
of every document alike, so prefix methods pack too; prompt tuning / P-tuning (virtual input positions in front of
the row) are refused by `train.validate`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from train import buckets
from train.data import IGNORE


def document_lengths(rows: dict) -> np.ndarray:
  """Each row's number of real tokens (attention mask non-zero)."""
  return np.count_nonzero(rows["attention_mask"], axis=1)


def epoch_rows(lengths: np.ndarray, max_length: int, seed: int, epoch: int) -> list[list[int]]:
  """The epoch's packed rows, each a list of document (row) indices whose lengths add up to at most max_length."""
  packed, current, used = [], [], 0
  for row in np.random.default_rng([seed, epoch]).permutation(len(lengths)):
    if current and used + lengths[row] > max_length:
      packed.append(current)
      current, used = [], 0
    current.append(int(row))
    used += int(lengths[row])
  return packed + [current] if current else packed


def batches(lengths: np.ndarray, max_length: int, batch_size: int, seed: int, epoch: int = 0,
            index: int = 0) -> Iterator[tuple[list[list[int]], dict]]:
  """Endless (batch_size packed rows of document indices, position) from data position (epoch, index)."""
  while True:
    order = epoch_rows(lengths, max_length, seed, epoch)
    per_epoch = len(order) // batch_size
    if per_epoch == 0:
      raise ValueError(f"config.batch_size={batch_size} is larger than the {len(order)} packed rows the "
                       f"{len(lengths)} training examples fill at config.max_length={max_length}.")
    while index < per_epoch:
      chosen = order[index * batch_size:(index + 1) * batch_size]
      index += 1
      yield chosen, {"epoch": epoch, "index": index}
    epoch, index = epoch + 1, 0


def pack(rows: dict, packed_rows: list[list[int]], max_length: int) -> dict:
  """{'input_ids', 'attention_mask' (segment ids), 'position_ids', 'labels'} int32 (len(packed_rows), max_length)
  arrays of the documents `packed_rows` names, right-padded (ids 0, labels -100)."""
  shape = (len(packed_rows), max_length)
  out = {"input_ids": np.zeros(shape, np.int32), "attention_mask": np.zeros(shape, np.int32),
         "position_ids": np.zeros(shape, np.int32), "labels": np.full(shape, IGNORE, np.int32)}
  for packed_row, documents in enumerate(packed_rows):
    start = 0
    for segment, row in enumerate(documents, start=1):
      real = rows["attention_mask"][row] != 0
      length = int(np.count_nonzero(real))
      span = slice(start, start + length)
      out["input_ids"][packed_row, span] = rows["input_ids"][row][real]
      out["attention_mask"][packed_row, span] = segment
      out["position_ids"][packed_row, span] = np.arange(length)
      out["labels"][packed_row, span] = rows["labels"][row][real]
      out["labels"][packed_row, start:start + 1] = IGNORE  # not a target of the previous document's last token
      start += length
  return out


def training_batches(config, task, rows: dict, epoch: int, index: int) -> Iterator[tuple[dict, np.ndarray, dict]]:
  """Endless (rows, indices of the batch in them, position) from data position (epoch, index): packed rows under
  config.packing, else length-bucketed (`train.buckets`) or fixed-shape batches of `rows`."""
  if config.get("packing", False):
    for packed_rows, position in batches(document_lengths(rows), config.max_length, config.batch_size, config.seed,
                                         epoch, index):
      yield pack(rows, packed_rows, config.max_length), np.arange(config.batch_size), position
    return
  for chosen, length, position in buckets.batches(buckets.row_lengths(rows), buckets.lengths_of(config, task),
                                                  config.batch_size, config.seed, epoch, index):
    yield buckets.cut(rows, length, task), chosen, position
