"""workdir/run.json: the resolved config of the run a workdir holds, its label names, and whether it finished.

predict and merge rebuild the model from it (`load`).  A rerun into the same workdir resumes its run only with
the same settings: `check_rerun` refuses a config that differs in any key but those that say how the run is
carried out (`HOW_KEYS`, the scale section), naming the keys, unless the caller allows the change.  A finished
run (its exports written) rerun with no more steps is reported as finished and rewrites nothing.
"""

from __future__ import annotations

import json
import os

import ml_collections
from etils import epath

FILE = "run.json"
# Keys that change how a run is carried out, not what it computes (steps: a finished run may be extended).
HOW_KEYS = ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "workdir")
HOW_SECTIONS = ("scale",)


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def _json(config: ml_collections.ConfigDict) -> dict:
  """`config` as it comes back from the file (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict()))


def read(workdir: str) -> dict | None:
  """The record of `workdir` ({'config', 'label_names', 'num_labels', 'finished_step'}), or None."""
  path = epath.Path(workdir) / FILE
  return json.loads(path.read_text()) if path.exists() else None


def write(workdir: str, config: ml_collections.ConfigDict, label_names: list[str] | None = None,
          num_labels: int = 0, finished_step: int | None = None) -> None:
  """Writes the record (creating the workdir), to a temporary name renamed into place for a local workdir;
  num_labels is 0 but for a classifier."""
  text = json.dumps({"config": _json(config), "label_names": label_names, "num_labels": num_labels,
                     "finished_step": finished_step}, indent=2, sort_keys=True)
  folder = epath.Path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  if "://" in workdir:
    (folder / FILE).write_text(text)
    return
  tmp = os.path.join(workdir, f".{FILE}.tmp")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, os.path.join(workdir, FILE))


def load(workdir: str) -> tuple[ml_collections.ConfigDict, list[str] | None, int]:
  """(config, label names or None, number of labels) of the run in `workdir`."""
  record = read(workdir)
  if record is None:
    raise ValueError(f"{workdir!r} holds no {FILE}: it is not a peftjax training workdir.")
  return ml_collections.ConfigDict(record["config"]), record["label_names"], record["num_labels"]


def differences(stored: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'config.<key> (<stored> there, <value> now)' for each setting (but the how-keys) that differs."""
  stored, current = _flat(stored), _flat(_json(config))
  keys = sorted(set(stored) | set(current))
  return [f"config.{k} ({stored.get(k, '<absent>')!r} there, {current.get(k, '<absent>')!r} now)" for k in keys
          if stored.get(k) != current.get(k) and k not in HOW_KEYS and k.split(".")[0] not in HOW_SECTIONS]


def check_rerun(config: ml_collections.ConfigDict, workdir: str, allow_changes: bool = False) -> int | None:
  """The step at which the run in `workdir` finished, when it did with these settings and config.steps asks for
  no more (else None); raises ValueError naming the differing keys when the stored run used other settings."""
  record = read(workdir)
  if record is None:
    return None
  changed = differences(record["config"], config)
  if changed and not allow_changes:
    raise ValueError(f"config.workdir={workdir!r} holds a run with other settings: {', '.join(changed)}; use a new "
                     "config.workdir, or pass --allow_config_change to continue that run with these settings.")
  finished = record.get("finished_step")
  return finished if finished is not None and not changed and config.steps <= finished else None
