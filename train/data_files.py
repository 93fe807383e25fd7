"""The user's own data as a task: local files, `Dataset.save_to_disk` folders or hub datasets, read by `datasets`.

config.task is a built-in task name (`train.data.TASKS`) or one of
  a local .csv / .tsv / .json / .jsonl / .parquet file,
  a folder written by `Dataset.save_to_disk` (a DatasetDict folder: its "train" split),
  a hub dataset "ID:SPLIT" or "ID:CONFIG:SPLIT" (e.g. "stanfordnlp/imdb:train", "nyu-mll/glue:sst2:train"; online).
config.data (DATA_DEFAULTS) names the columns each kind of model reads:
  sequence classification: text_column + label_column (labels as strings or integers; string labels get ids in
    sorted order, and the label names go into the exported model's id2label / label2id)
  seq2seq LM: source_column + target_column
  causal LM: text_column; or, for instruction tuning, prompt_column + completion_column, or messages_column (lists of
    {"role", "content"} rendered with the tokenizer's chat template or config.data.chat_template), with the loss on
    the completion / assistant tokens only unless config.data.completion_only_loss is False (`train.instruct`).
config.data.eval_file (same formats) is the held-out set; without it, the seeded held-out split of `train.data.split`.
`datasets` keeps its cache in config.data.cache_dir, else <workdir>/datasets_cache, never beside the user's data.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import ml_collections

from train import data

DATA_DEFAULTS = dict(
    text_column="text", label_column="label",          # classification (text also for a causal LM)
    source_column="source", target_column="target",    # seq2seq LM
    prompt_column="", completion_column="",            # causal LM instruction tuning: prompt -> completion, or
    messages_column="",                                # a column of chat messages ({"role", "content"} lists)
    chat_template="",                                  # "": the tokenizer's own chat template
    completion_only_loss=True,                         # instruction tuning: loss on the completion tokens only
    eval_file="",                                      # "": a seeded split of config.task holds out eval_examples
    cache_dir="")                                      # "": <workdir>/datasets_cache
# file extension -> (datasets builder, its options)
FORMATS = {".csv": ("csv", {"keep_default_na": False}), ".tsv": ("csv", {"keep_default_na": False, "delimiter": "\t"}),
           ".json": ("json", {}), ".jsonl": ("json", {}), ".parquet": ("parquet", {})}
ROLES = ("system", "user", "assistant")


class Completion(NamedTuple):
  """A causal LM instruction example: the prompt, and the completion the loss is on."""
  prompt: str
  completion: str


class Chat(NamedTuple):
  """A causal LM chat example: ({"role", "content"}, ...) messages; the loss is on the assistant turns."""
  messages: tuple


@dataclasses.dataclass
class Task:
  """A task's (train, held-out) examples and, for a classifier, its label names (None: ids only)."""
  train: list
  held_out: list
  label_names: list[str] | None = None

  def num_labels(self) -> int:
    """A classifier's number of labels: its label names, else 1 + the largest label id."""
    return len(self.label_names) if self.label_names else 1 + max(label for _, label in self.train + self.held_out)


def data_config(**overrides) -> ml_collections.ConfigDict:
  """A config.data section: DATA_DEFAULTS (documented there) with `overrides`."""
  return ml_collections.ConfigDict({**DATA_DEFAULTS, **overrides})


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.data with DATA_DEFAULTS for the keys it leaves out; raises naming a key it does not know."""
  given = config.get("data", ml_collections.ConfigDict()).to_dict()
  unknown = sorted(set(given) - set(DATA_DEFAULTS))
  if unknown:
    raise ValueError(f"config.data has the unknown key {unknown[0]!r}; valid: {list(DATA_DEFAULTS)}.")
  return data_config(**given)


def is_data_spec(task: str) -> bool:
  """Whether config.task names data (a file, a folder or a hub id) rather than a built-in task."""
  return os.path.splitext(task)[1].lower() in FORMATS or os.path.isdir(task) or "/" in task or ":" in task


def check_task(kind: str, task: str) -> None:
  """Raises ValueError unless `task` is a built-in task for models of `kind` or names data."""
  if task not in data.TASKS[kind] and not is_data_spec(task):  # a built-in name, a file, a folder or a hub id
    raise ValueError(f"config.task={task!r} is not a known task for a {kind} model; valid: {sorted(data.TASKS[kind])}"
                     f", or a {'/'.join(FORMATS)} file, a saved dataset folder, or a hub dataset 'ID:SPLIT'.")


def read(spec: str, cache_dir: str, key: str = "config.task"):
  """The `datasets.Dataset` that `spec` (a file, saved folder or hub "ID[:CONFIG]:SPLIT") names."""
  import datasets  # noqa: PLC0415 (imported only when a run reads the user's data)
  extension = os.path.splitext(spec)[1].lower()
  if extension in FORMATS:
    if not os.path.isfile(spec):
      raise ValueError(f"{key}={spec!r}: no such file.")
    builder, options = FORMATS[extension]
    try:
      return datasets.load_dataset(builder, data_files=os.path.abspath(spec), split="train", cache_dir=cache_dir,
                                   **options)
    except Exception as e:  # noqa: BLE001 (datasets raises many kinds for an unreadable file)
      raise ValueError(f"{key}={spec!r} could not be read as {extension} ({type(e).__name__}: {e}).") from None
  if os.path.isdir(spec):
    try:
      loaded = datasets.load_from_disk(spec)
    except FileNotFoundError:
      raise ValueError(f"{key}={spec!r} is a folder but not one written by Dataset.save_to_disk.") from None
    if isinstance(loaded, datasets.DatasetDict):
      if "train" not in loaded:
        raise ValueError(f"{key}={spec!r} holds the splits {sorted(loaded)}; a DatasetDict folder needs 'train'.")
      loaded = loaded["train"]
    return loaded
  name, *rest = spec.split(":")
  if len(rest) not in (1, 2):
    raise ValueError(f"{key}={spec!r}: a hub dataset is 'ID:SPLIT' or 'ID:CONFIG:SPLIT' "
                     "(e.g. 'stanfordnlp/imdb:train').")
  try:
    return datasets.load_dataset(name, rest[0] if len(rest) == 2 else None, split=rest[-1], cache_dir=cache_dir)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{key}={spec!r}: the hub dataset could not be loaded ({type(e).__name__}: {e}).") from None


def _columns(kind: str, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config.data keys naming the columns a `kind` model reads, in example order."""
  if kind == "sequence_classification":
    return ("text_column", "label_column")
  if kind == "seq2seq_lm":
    return ("source_column", "target_column")
  if cfg.messages_column:
    return ("messages_column",)
  if cfg.prompt_column or cfg.completion_column:
    return ("prompt_column", "completion_column")
  return ("text_column",)


def input_column(kind: str, cfg: ml_collections.ConfigDict) -> str:
  """The column a `kind` model's input comes from (what predict reads): text, source, messages or prompt."""
  return cfg[_columns(kind, cfg)[0]]


def text_value(value: Any, where: str) -> str:
  """`value` as text (numbers become strings); raises naming `where` when it is missing, empty or not text."""
  if value is None:
    raise ValueError(f"{where} is missing.")
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise ValueError(f"{where} holds {value!r}, not text.")
  if not value.strip():
    raise ValueError(f"{where} is empty.")
  return value


def chat_messages(value: Any, where: str, need_assistant: bool = True) -> tuple:
  """`value` as ({"role", "content"}, ...) messages; raises naming `where` for anything else."""
  if value is None:
    raise ValueError(f"{where} is missing.")
  if not isinstance(value, (list, tuple)) or not value:
    raise ValueError(f"{where} holds {value!r}, not a list of {{'role', 'content'}} messages.")
  messages = []
  for i, message in enumerate(value):
    if not isinstance(message, dict) or message.get("role") not in ROLES:
      raise ValueError(f"{where}: message {i} is {message!r}; each message needs a 'role' from {list(ROLES)}.")
    content = text_value(message.get("content"), f"{where}: message {i} content")
    messages.append({"role": message["role"], "content": content})
  if need_assistant and not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where} has no assistant message, so nothing to learn from.")
  return tuple(messages)


def examples(dataset, kind: str, cfg: ml_collections.ConfigDict, name: str) -> list:
  """The task examples of `dataset` (raw labels for a classifier); a bad row raises one sentence naming `name`, the
  row (counted from 1, a CSV header not counted) and the column."""
  keys = _columns(kind, cfg)
  columns = [cfg[k] for k in keys]
  for key, column in zip(keys, columns):
    if column not in dataset.column_names:
      raise ValueError(f"{name} has no column {column!r} (config.data.{key}); its columns: {dataset.column_names}.")
  values = [dataset[column] for column in columns]
  out = []
  for row, fields in enumerate(zip(*values), start=1):
    where = [f"{name} row {row}, column {column!r}" for column in columns]
    if keys == ("messages_column",):
      out.append(Chat(chat_messages(fields[0], where[0])))
    elif kind == "sequence_classification":
      label = fields[1]
      if label is None or (isinstance(label, str) and not label.strip()):
        raise ValueError(f"{where[1]} (the label) is missing.")
      out.append((text_value(fields[0], where[0]), label))
    else:
      texts = tuple(text_value(value, w) for value, w in zip(fields, where))
      out.append(texts[0] if len(texts) == 1 else Completion(*texts) if kind == "causal_lm" else texts)
  if not out:
    raise ValueError(f"{name} has no rows.")
  return out


def label_names(dataset, column: str, raw: list, name: str) -> list[str] | None:
  """The label names of a classifier's training rows: a ClassLabel's names, sorted string labels, or None for
  integer ids (then 0..max)."""
  feature = dataset.features.get(column)
  if hasattr(feature, "names"):
    return list(feature.names)
  if all(isinstance(label, str) for label in raw):
    return sorted(set(raw))
  for row, label in enumerate(raw, start=1):
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
      raise ValueError(f"{name} row {row}, column {column!r}: label {label!r} is neither a class name nor an integer "
                       "id >= 0 (the column must hold one kind).")
  return None


def label_ids(rows: list, names: list[str] | None, num_labels: int, column: str, name: str) -> list[tuple[str, int]]:
  """(text, label id) rows; a label outside the training labels raises one sentence naming the row."""
  index = {label: i for i, label in enumerate(names)} if names is not None else None
  out = []
  for row, (text, label) in enumerate(rows, start=1):
    if index is not None and isinstance(label, str) and label in index:
      label = index[label]
    elif index is not None or not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_labels:
      valid = names if names is not None else f"the integers 0..{num_labels - 1}"
      raise ValueError(f"{name} row {row}, column {column!r}: label {label!r} is not one of the training labels "
                       f"({valid}).")
    out.append((text, label))
  return out


def load(config: ml_collections.ConfigDict, kind: str, workdir: str) -> Task:
  """The (train, held-out) examples of config.task for a `kind` model: a built-in task or the user's data."""
  if config.task in data.TASKS[kind]:
    return Task(*data.split(data.load_task(kind, config.task), config.eval_examples, config.train_examples))
  check_task(kind, config.task)
  cfg = settings(config)
  cache_dir = cfg.cache_dir or (os.path.join(workdir, "datasets_cache") if "://" not in workdir else None)
  dataset = read(config.task, cache_dir)
  rows = examples(dataset, kind, cfg, config.task)
  held_out = examples(read(cfg.eval_file, cache_dir, "config.data.eval_file"), kind, cfg, cfg.eval_file) \
      if cfg.eval_file else None
  names = None
  if kind == "sequence_classification":
    names = label_names(dataset, cfg.label_column, [label for _, label in rows], config.task)
    num_labels = len(names) if names is not None else 1 + max(label for _, label in rows)
    rows = label_ids(rows, names, num_labels, cfg.label_column, config.task)
    if held_out is not None:
      held_out = label_ids(held_out, names, num_labels, cfg.label_column, cfg.eval_file)
  if held_out is None:
    return Task(*data.split(rows, config.eval_examples, config.train_examples), names)
  return Task(rows[:config.train_examples] if config.train_examples else rows, held_out, names)
