"""`python -m train --config configs/lora_bert_sentiment.py[:ARG] [--config.lora.rank=16 ...]`."""

from __future__ import annotations

import pathlib
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

import train
from train import cli, data, methods, tasks

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, e.g. configs/lora_bert_sentiment.py (or FILE:ARG).", lock_config=True)
flags.mark_flag_as_required("config")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue the run in config.workdir although its stored config differs.")


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
    config = cli.load_config(argv)
  except Exception as e:  # the user's file: say what failed, keep the help
    return "\n".join([*lines, "", f"{cli.config_file(argv)[0]} could not be loaded: {type(e).__name__}: {e}"])
  if config is None:
    lines += ["", "Name a config file (--config FILE --help) to list its keys and values."]
  else:
    lines += ["", f"keys of {cli.config_file(argv)[0]} (override any with --config.KEY=VALUE):", *_keys(config)]
  return "\n".join(lines)


def _parse(argv: list[str]) -> list[str]:
  if any(arg in ("-h", "--help", "--helpshort", "-?") for arg in argv[1:]):
    print(help_text(argv))
    sys.exit(0)
  return cli.parse_flags(argv)


def _main(argv: list[str]) -> None:
  cli.start(argv)
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
