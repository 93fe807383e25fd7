"""config.method -> the peftjax method config(s) that `pj.init` / `pj.apply` / `pj.merge` take.

config.method is "lora", "dora", "ia3", "bitfit" or "full".  LoRA and DoRA read config.lora (as Hugging
Face's LoraConfig(use_dora=True) does), (IA)³ reads config.ia3, BitFit config.bitfit.
config.modules_to_save (names separated by commas, e.g. "classifier,pooler") are trained in full next to
the method, as Hugging Face PEFT does for a new task head; "full" trains every parameter.
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections

import peftjax as pj
from peftjax.methods import bitfit, dora, ia3, modules_to_save

METHODS = ("lora", "dora", "ia3", "bitfit", "full")


def names_or_regex(value: str) -> str | tuple[str, ...]:
  """A config string -> method targets: "all-linear" stays, "q,v" -> ("q", "v"), anything else is a regex."""
  if value != pj.tree.ALL_LINEAR and re.fullmatch(r"[\w.]+(,[\w.]+)*", value):
    return tuple(value.split(","))
  return value


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one sentence naming the key and what is valid) for a bad method choice."""
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r} is not a known method; valid: {list(METHODS)}.")
  section = "lora" if config.method == "dora" else config.method
  if section != "full" and section not in config:
    raise ValueError(f"config.method={config.method!r} reads its settings from config.{section}, which this config "
                     "file does not define; add that section.")


def method_config(config: ml_collections.ConfigDict, model_type: str) -> Any:
  """The method config(s) for `config` (a list when modules_to_save are added); None for full fine-tuning."""
  check(config)
  saved = tuple(n for n in config.get("modules_to_save", "").split(",") if n)
  if config.method == "full":
    return None
  if config.method == "bitfit":
    targets = config.bitfit.targets
    return bitfit.BitFitConfig(targets=names_or_regex(targets) if targets else None, modules_to_save=saved)
  if config.method == "ia3":
    overrides = {k: names_or_regex(config.ia3[k]) for k in ("targets", "feedforward") if config.ia3[k]}
    cfg = ia3.IA3Config.for_model(model_type, **overrides)
  else:
    cls = dora.DoraConfig if config.method == "dora" else pj.LoraConfig
    cfg = cls(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
              targets=names_or_regex(config.lora.targets))
  return [cfg, modules_to_save.ModulesToSaveConfig(saved)] if saved else cfg
