"""`python -m train --config configs/lora_bert_sentiment.py[:ARG] [--config.lora.rank=16 ...]`."""

from __future__ import annotations

import importlib.util
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, e.g. configs/lora_bert_sentiment.py (or FILE:ARG).", lock_config=True)
flags.mark_flag_as_required("config")


def _config_file(argv: list[str]) -> tuple[str | None, str | None]:
  """(config file, its argument after ':' or None) named on the command line."""
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is not None:
      path, colon, config_arg = value.partition(":")
      return path, config_arg if colon else None
  return None, None


def _unknown_key(argv: list[str]) -> str | None:
  """The first --config.a.b=... override naming a key the config file does not define, as an error sentence."""
  path, config_arg = _config_file(argv)
  spec = importlib.util.spec_from_file_location("_train_config", path) if path else None
  if spec is None:
    return None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config() if config_arg is None else module.get_config(config_arg)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node, parts = config, arg[len("--config."):].split("=", 1)[0].split(".")
    for depth, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        where = "config" + "".join("." + p for p in parts[:depth])
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"{arg}: {where} has no key {part!r}; valid keys: {valid}."
      node = node[part]
  return None


def _parse(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: {_unknown_key(argv) or e}")


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.key=value.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    train.main(_CONFIG.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:  # before the training loop (which saves on SIGINT), or Ctrl-C pressed twice
    print("interrupted: nothing new was saved; the checkpoints already in config.workdir are kept and the same "
          "command resumes from the newest.", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
  app.run(_main, flags_parser=_parse)
