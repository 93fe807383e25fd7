"""What the command lines (`python -m train`, `python -m train.compare`) share: reading --config overrides and
naming a mistyped key in one sentence instead of a traceback."""

from __future__ import annotations

import importlib.util
import sys

from absl import app, flags, logging


def config_file(argv: list[str]) -> tuple[str | None, str | None]:
  """(config file, its argument after ':' or None) named on the command line."""
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is not None:
      path, colon, config_arg = value.partition(":")
      return path, config_arg if colon else None
  return None, None


def load_config(argv: list[str]):
  """The ConfigDict of the config file named on the command line (before overrides), or None."""
  path, config_arg = config_file(argv)
  spec = importlib.util.spec_from_file_location("_train_config", path) if path else None
  if spec is None:
    return None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if config_arg is None else module.get_config(config_arg)


def unknown_key(argv: list[str]) -> str | None:
  """The first --config.a.b=... override naming a key the config file does not define, as an error sentence."""
  config = load_config(argv)
  if config is None:
    return None
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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a bad flag or --config override ending the command with one sentence."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: {unknown_key(argv) or e}")


def start(argv: list[str]) -> None:
  """Refuses positional arguments and quiets absl's logging to warnings unless --verbosity was given."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.key=value.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
