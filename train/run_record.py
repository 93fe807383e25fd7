"""workdir/run.json: the config a run trained with and its labels, so predict and merge can rebuild the model."""

from __future__ import annotations

import json
import os
import tempfile

import ml_collections

FILE = "run.json"


def save(workdir: str, config: ml_collections.ConfigDict, label_names: list[str] | None, num_labels: int) -> None:
  """Writes workdir/run.json atomically (a temporary file, then a rename); num_labels is 0 but for a classifier."""
  fd, tmp = tempfile.mkstemp(prefix=".run-", dir=workdir)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump({"config": config.to_dict(), "label_names": label_names, "num_labels": num_labels}, f, indent=2)
    os.replace(tmp, os.path.join(workdir, FILE))
  except BaseException:
    os.remove(tmp)
    raise


def load(workdir: str) -> tuple[ml_collections.ConfigDict, list[str] | None, int]:
  """(config, label names or None, number of labels) of the run in `workdir`."""
  with open(os.path.join(workdir, FILE)) as f:
    record = json.load(f)
  return ml_collections.ConfigDict(record["config"]), record["label_names"], record["num_labels"]
