"""`python -m train --config configs/lora_bert_sentiment.py[:ARG] [--config.lora.rank=16 ...]`."""

from __future__ import annotations

import importlib.util
import pathlib
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import train
from train import data, methods, tasks

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, e.g. configs/lora_bert_sentiment.py (or FILE:ARG).", lock_config=True)
flags.mark_flag_as_required("config")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue the run in config.workdir although its stored config differs.")


def _config_file(argv: list[str]) -> tuple[str | None, str | None]:
  """(config file, its argument after ':' or None) named on the command line."""
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is not None:
      path, colon, config_arg = value.partition(":")
      return path, config_arg if colon else None
  return None, None


def _load_config(argv: list[str]):
  """The ConfigDict of the config file named on the command line (before overrides), or None."""
  path, config_arg = _config_file(argv)
  spec = importlib.util.spec_from_file_location("_train_config", path) if path else None
  if spec is None:
    return None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if config_arg is None else module.get_config(config_arg)


def _unknown_key(argv: list[str]) -> str | None:
  """The first --config.a.b=... override naming a key the config file does not define, as an error sentence."""
  config = _load_config(argv)
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


def _keys(node, prefix: str = "config") -> list[str]:
  lines = []
  for key, value in node.items():
    lines += _keys(value, f"{prefix}.{key}") if hasattr(value, "keys") else [f"  {prefix}.{key} = {value!r}"]
  return lines


def help_text(argv: list[str]) -> str:
  """The usage, the config files, families with their tasks, methods with their sections, and the keys (with
  their values) of the config file named in `argv`."""
  configs = sorted(p.name for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
  lines = [__doc__.strip(), "", "Run the same command again to resume; --allow_config_change continues a workdir's "
           "run with changed settings.", "", f"config files (configs/): {', '.join(configs)}", "",
           "config.family -> its tasks (config.task):"]
  lines += [f"  {name}: {', '.join(sorted(data.TASKS[f.task.kind]))}" for name, f in sorted(tasks.FAMILIES.items())]
  lines += ["", "config.method -> the section it reads:"]
  lines += [f"  {name}: {'config.' + section if section else '(none: every parameter trains)'}"
            for name, (section, _) in methods.METHODS.items()]
  try:
    config = _load_config(argv)
  except Exception as e:  # the user's file: say what failed, keep the help
    return "\n".join([*lines, "", f"{_config_file(argv)[0]} could not be loaded: {type(e).__name__}: {e}"])
  if config is None:
    lines += ["", "Name a config file (--config FILE --help) to list its keys and values."]
  else:
    lines += ["", f"keys of {_config_file(argv)[0]} (override any with --config.KEY=VALUE):", *_keys(config)]
  return "\n".join(lines)


def _parse(argv: list[str]) -> list[str]:
  if any(arg in ("-h", "--help", "--helpshort", "-?") for arg in argv[1:]):
    print(help_text(argv))
    sys.exit(0)
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
    train.main(_CONFIG.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:  # before the training loop (which saves on SIGINT), or Ctrl-C pressed twice
    print("interrupted: nothing new was saved; the checkpoints already in config.workdir are kept and the same "
          "command resumes from the newest.", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
  app.run(_main, flags_parser=_parse)
