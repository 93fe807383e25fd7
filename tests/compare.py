"""Comparisons that say what differed: the first differing token of two generations, with both values."""

from __future__ import annotations

import numpy as np


def first_difference(ours, theirs) -> str:
  """'' when the token arrays are equal, else a sentence naming the first differing (row, position) and values."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  if ours.shape != theirs.shape:
    return f"shapes differ: ours {ours.shape}, theirs {theirs.shape}"
  differ = np.argwhere(ours != theirs)
  if not len(differ):
    return ""
  row, *position = (int(i) for i in differ[0])
  where = f"row {row}, position {position[0]}" if position else f"position {row}"
  rows = f"; ours {ours[row].tolist()}, theirs {theirs[row].tolist()}" if position else ""
  return (f"{len(differ)} of {ours.size} tokens differ; first at {where}: ours {ours[tuple(differ[0])]}, "
          f"theirs {theirs[tuple(differ[0])]}{rows}")


def assert_same_tokens(ours, theirs, what: str = "tokens") -> None:
  """Fails with the first differing (row, position) and both values unless the two token arrays are equal."""
  message = first_difference(ours, theirs)
  assert not message, f"{what}: {message}"
