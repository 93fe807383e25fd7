"""Reading a Hugging Face PEFT adapter folder defensively: a schema for adapter_config.json, checked tensors.

`read_folder(folder)` returns (adapter_config.json as a dict, {tensor name: numpy array}) or raises
`AdapterFormatError` (a ValueError) with one sentence naming the folder, the file, the field or tensor, and
what is valid:

- adapter_config.json must be a JSON object whose fields peftjax reads have the types and ranges of `SCHEMAS`
  (common fields, then those of its ``peft_type``); fields it does not read are ignored, as PEFT ignores them.
- adapter_model.safetensors must parse (a truncated or garbled file is reported with its name) and hold only
  floating-point tensors (F16, BF16, F32, F64): an integer or boolean adapter tensor is refused, not cast.
- Pickle files (adapter_model.bin, .pt, ...) are never read, on purpose: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import numpy as np
from safetensors import safe_open

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class AdapterFormatError(ValueError):
  """A PEFT adapter folder that cannot be read; the message names the folder, the file and what is wrong."""


Check = tuple[Callable[[Any], bool], str]  # (is the value valid?, what is valid, in words)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _is_names(v) -> bool:
  return isinstance(v, list) and all(isinstance(n, str) for n in v)


def _optional(check: Check) -> Check:
  return (lambda v: v is None or check[0](v)), f"null or {check[1]}"


INT_AT_LEAST_1: Check = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
INT_AT_LEAST_0: Check = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
NUMBER: Check = (_is_number, "a finite number")
POSITIVE: Check = (lambda v: _is_number(v) and v > 0, "a positive number")
PROBABILITY: Check = (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
BOOL: Check = (lambda v: isinstance(v, bool), "true or false")
STRING: Check = (lambda v: isinstance(v, str), "a string")
NAMES: Check = (_is_names, "a list of module names (strings)")
TARGETS: Check = (lambda v: v is None or isinstance(v, str) or _is_names(v),
                  "null, a regex string or a list of module names")
LAYERS: Check = (lambda v: v is None or (_is_int(v) and v >= 0) or (isinstance(v, list) and all(
    _is_int(i) and i >= 0 for i in v)), "null, a layer index >= 0 or a list of them")
LAYERS_PATTERN: Check = (lambda v: v is None or isinstance(v, str) or _is_names(v),
                         "null, a string or a list of strings")
RANK_PATTERN: Check = (lambda v: v is None or (isinstance(v, dict) and all(
    _is_int(r) and r >= 1 for r in v.values())), "an object mapping module names to integer ranks >= 1")
ALPHA_PATTERN: Check = (lambda v: v is None or (isinstance(v, dict) and all(_is_number(a) for a in v.values())),
                        "an object mapping module names to numbers")
ADALORA_PATTERN: Check = (lambda v: v is None or (isinstance(v, dict) and all(
    isinstance(m, list) and all(isinstance(b, bool) for b in m) for m in v.values())),
                          "null or an object mapping module names to lists of true / false")
INIT_WEIGHTS: Check = (lambda v: isinstance(v, (bool, str)), "true, false or an initialisation name")

COMMON: dict[str, Check] = {
    "peft_type": STRING, "modules_to_save": _optional(NAMES), "base_model_name_or_path": _optional(STRING),
    "task_type": _optional(STRING), "inference_mode": BOOL,
}
_LORA_COMMON: dict[str, Check] = {
    "lora_alpha": NUMBER, "lora_dropout": PROBABILITY, "target_modules": TARGETS,
    "layers_to_transform": LAYERS, "layers_pattern": LAYERS_PATTERN, "bias": STRING, "fan_in_fan_out": BOOL,
}
_PROMPT: dict[str, Check] = {
    "num_virtual_tokens": INT_AT_LEAST_1, "num_transformer_submodules": _optional(INT_AT_LEAST_1),
    "token_dim": _optional(INT_AT_LEAST_1), "prompt_tuning_init": _optional(STRING),
    "prompt_tuning_init_text": _optional(STRING), "tokenizer_name_or_path": _optional(STRING),
    "prefix_projection": BOOL, "encoder_hidden_size": _optional(INT_AT_LEAST_1),
}
# peft_type -> {field: check} of the fields peftjax reads; REQUIRED: the fields a folder of that type must have.
SCHEMAS: dict[str, dict[str, Check]] = {
    "LORA": {**_LORA_COMMON, "r": INT_AT_LEAST_1, "use_rslora": BOOL, "use_dora": BOOL, "rank_pattern": RANK_PATTERN,
             "alpha_pattern": ALPHA_PATTERN, "init_lora_weights": INIT_WEIGHTS, "exclude_modules": TARGETS,
             "lora_bias": BOOL, "layer_replication": _optional((lambda v: isinstance(v, list), "a list"))},
    "ADALORA": {**_LORA_COMMON, "init_r": INT_AT_LEAST_1, "target_r": INT_AT_LEAST_1, "tinit": INT_AT_LEAST_0,
                "tfinal": INT_AT_LEAST_0, "deltaT": INT_AT_LEAST_1, "beta1": PROBABILITY, "beta2": PROBABILITY,
                "orth_reg_weight": NUMBER, "total_step": _optional(INT_AT_LEAST_1), "rank_pattern": ADALORA_PATTERN},
    "IA3": {"target_modules": TARGETS, "feedforward_modules": TARGETS, "exclude_modules": TARGETS,
            "fan_in_fan_out": BOOL},
    "PROMPT_TUNING": _PROMPT, "P_TUNING": _PROMPT, "PREFIX_TUNING": _PROMPT,
}
REQUIRED = {"PROMPT_TUNING": ("num_virtual_tokens",), "P_TUNING": ("num_virtual_tokens",),
            "PREFIX_TUNING": ("num_virtual_tokens",)}


def check_config(folder: str, config: Any) -> dict:
  """`config` (a parsed adapter_config.json) if it fits `SCHEMAS`, else AdapterFormatError naming the field."""
  where = f"{folder!r}: {ADAPTER_CONFIG}"
  if not isinstance(config, dict):
    raise AdapterFormatError(f"{where} holds a JSON {type(config).__name__}; it must be an object of settings.")
  peft_type = config.get("peft_type")
  if peft_type not in SCHEMAS:
    raise AdapterFormatError(f"{where} peft_type={peft_type!r} is not supported; valid: {list(SCHEMAS)}.")
  for key in REQUIRED.get(peft_type, ()):
    if key not in config:
      raise AdapterFormatError(f"{where} has no {key!r}, which a {peft_type} adapter needs.")
  for key, (valid, description) in {**COMMON, **SCHEMAS[peft_type]}.items():
    if key in config and not valid(config[key]):
      raise AdapterFormatError(f"{where} {key}={config[key]!r} is not valid; it must be {description}.")
  return config


def _pickles(folder: str) -> list[str]:
  return sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a safetensors file holding only floating-point tensors; AdapterFormatError names the file."""
  try:
    with safe_open(path, framework="numpy") as f:
      tensors = {}
      for key in f.keys():
        dtype = f.get_slice(key).get_dtype()
        if dtype not in FLOAT_DTYPES:
          raise AdapterFormatError(f"{path!r}: tensor {key!r} has dtype {dtype}; adapter tensors must be floating "
                                   f"point ({', '.join(FLOAT_DTYPES)}).")
        tensors[key] = f.get_tensor(key)
      return tensors
  except AdapterFormatError:
    raise
  except Exception as e:  # safetensors' own errors (a truncated or garbled file): name the file
    raise AdapterFormatError(f"{path!r} is not a readable safetensors file ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}).") from None


def read_folder(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json checked against `SCHEMAS`, its tensors) of a PEFT adapter folder."""
  if not os.path.isdir(folder):
    raise AdapterFormatError(f"{folder!r} is not a folder; an adapter is a folder holding {ADAPTER_CONFIG} and "
                             f"{ADAPTER_WEIGHTS}.")
  config_path = os.path.join(folder, ADAPTER_CONFIG)
  try:
    with open(config_path, encoding="utf-8") as f:
      config = check_config(folder, json.load(f))
  except FileNotFoundError:
    raise AdapterFormatError(f"{folder!r} holds no {ADAPTER_CONFIG}; a PEFT adapter folder needs one.") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise AdapterFormatError(f"{config_path!r} is not valid JSON ({e}).") from None
  weights = os.path.join(folder, ADAPTER_WEIGHTS)
  if not os.path.isfile(weights):
    pickles = _pickles(folder)
    if pickles:
      raise AdapterFormatError(f"{folder!r} holds {pickles} but no {ADAPTER_WEIGHTS}; peftjax refuses pickle files on "
                               "purpose (unpickling can run arbitrary code): save the adapter with PEFT's "
                               "save_pretrained(safe_serialization=True) or convert it to safetensors.")
    raise AdapterFormatError(f"{folder!r} holds no {ADAPTER_WEIGHTS}.")
  return config, read_tensors(weights)
