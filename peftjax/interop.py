"""Hugging Face PEFT adapter folders (adapter_config.json + adapter_model.safetensors), both directions.

PEFT stores LoRA factors in PyTorch layout under the model's module names:
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r); ours are
(in, r) and (r, out), so both are transposed on the way in and out.  DoRA adapters (``use_dora: true``)
add ``...<module>.lora_magnitude_vector`` (out,), with no ``.weight`` suffix.  Per-module ranks and
alphas travel as ``rank_pattern`` / ``alpha_pattern``.  Only safetensors are read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from peftjax import tree as ptree
from peftjax.methods import dora, lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _target_modules(cfg: lora.LoraConfig, modules: list[str]) -> list[str]:
  if isinstance(cfg.targets, tuple) and not cfg.exclude:
    return sorted(cfg.targets)
  return sorted(ptree.hf_name(m) for m in modules)  # regex / all-linear / exclude: the exact module list


def save_lora_adapter(folder: str, cfg: lora.LoraConfig, adapters: dict, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> None:
  """Writes LoRA or DoRA `adapters` as a Hugging Face PEFT adapter folder that `PeftModel.from_pretrained` loads.

  The file says ``init_lora_weights: true`` for PiSSA adapters: they belong to the residual base weights
  that `lora.pissa_init` returned, and PEFT would otherwise redo PiSSA on the base it loads them into.
  """
  use_dora = isinstance(cfg, dora.DoraConfig)
  modules = lora.adapter_modules(adapters)
  tensors = {}
  for path, adapter in modules.items():
    a, b = (np.asarray(jax.device_get(adapter[k]), np.float32) for k in ("lora_A", "lora_B"))
    if a.ndim != 2:
      raise ValueError(f"adapter {path!r} is layer-stacked (shape {a.shape}); unstack scanned adapters before saving.")
    if a.shape[-1] != cfg.module_rank(path):
      raise ValueError(f"adapter {path!r} has rank {a.shape[-1]} but {type(cfg).__name__} gives it rank "
                       f"{cfg.module_rank(path)} (from rank and rank_pattern).")
    name = PREFIX + ptree.hf_name(path)
    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    if use_dora:
      tensors[f"{name}.{dora.MAGNITUDE}"] = np.asarray(jax.device_get(adapter[dora.MAGNITUDE]), np.float32)
  config = {
      "peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
      "target_modules": _target_modules(cfg, list(modules)), "use_rslora": cfg.use_rslora, "use_dora": use_dora,
      "bias": "none", "modules_to_save": None, "rank_pattern": dict(cfg.rank_pattern),
      "alpha_pattern": dict(cfg.alpha_pattern), "fan_in_fan_out": False,
      "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True, "inference_mode": True,
      "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
  }
  parent = os.path.dirname(os.path.abspath(folder))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
      json.dump(dict(sorted(config.items())), f, indent=2)  # keys sorted as PEFT does; pattern order kept
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if os.path.isdir(folder):
      shutil.rmtree(folder)
    os.rename(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _init_name(value, use_dora: bool) -> str:
  """Our `init` for PEFT's init_lora_weights (only informative for a trained adapter)."""
  if isinstance(value, str) and (value == "gaussian" or (value.startswith("pissa") and not use_dora)):
    return value
  return "default"


def load_lora_adapter(folder: str, params: dict) -> tuple[lora.LoraConfig, dict]:
  """Reads a Hugging Face PEFT LoRA or DoRA folder for the base tree `params`: (LoraConfig | DoraConfig, adapter tree).

  `params` may hold arrays or jax.ShapeDtypeStruct leaves (only shapes are checked).
  """
  with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{folder!r}: adapter_config.json peft_type={config.get('peft_type')!r}; "
                     "only 'LORA' is read here.")
  for key in ("modules_to_save", "lora_bias", "layer_replication"):
    if config.get(key):
      raise ValueError(f"{folder!r}: adapter_config.json {key}={config[key]!r} is not supported by load_lora_adapter.")
  if config.get("bias", "none") != "none":
    raise ValueError(f"{folder!r}: adapter_config.json bias={config['bias']!r} is not supported; only 'none' is.")
  use_dora = bool(config.get("use_dora", False))
  targets = config.get("target_modules") or ()
  cfg = (dora.DoraConfig if use_dora else lora.LoraConfig)(
      rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
      dropout=float(config.get("lora_dropout", 0.0)),
      targets=targets if isinstance(targets, str) else tuple(sorted(targets)),
      use_rslora=bool(config.get("use_rslora", False)), rank_pattern=config.get("rank_pattern") or {},
      alpha_pattern=config.get("alpha_pattern") or {},
      init=_init_name(config.get("init_lora_weights", True), use_dora))
  flat = ptree.flatten(params)
  by_hf_name = {ptree.hf_name(m): m for m in ptree.linear_modules(params)}
  kinds = ("lora_A", "lora_B", dora.MAGNITUDE) if use_dora else ("lora_A", "lora_B")
  adapters = {}
  with safe_open(os.path.join(folder, ADAPTER_WEIGHTS), framework="numpy") as f:
    for key in f.keys():
      name = key[len(PREFIX):] if key.startswith(PREFIX) else key
      module, kind = name, ""
      if name.endswith("." + dora.MAGNITUDE):
        module, kind = name[: -len(dora.MAGNITUDE) - 1], dora.MAGNITUDE
      elif name.endswith(".weight") and name.count(".") >= 2:
        module, kind, _ = name.rsplit(".", 2)
      if kind not in kinds or module not in by_hf_name:
        raise ValueError(f"{folder!r}: tensor {key!r} does not name a {'DoRA' if use_dora else 'LoRA'} factor of a "
                         "linear module of this model.")
      path = by_hf_name[module]
      value = f.get_tensor(key).T
      d_in, d_out = flat[f"{path}/kernel"].shape[-2:]
      rank = cfg.module_rank(path)
      expected = {"lora_A": (d_in, rank), "lora_B": (rank, d_out), dora.MAGNITUDE: (d_out,)}[kind]
      if value.shape != expected:
        raise ValueError(f"{folder!r}: tensor {key!r} has shape {f.get_tensor(key).shape} but this model needs "
                         f"{expected[::-1]} (PyTorch layout) for {path!r}.")
      adapters[f"{path}/{kind}"] = jnp.asarray(value, jnp.float32)
  for path, adapter in lora.adapter_modules(ptree.unflatten(adapters)).items():
    missing = [k for k in kinds if k not in adapter]
    if missing:
      raise ValueError(f"{folder!r}: module {ptree.hf_name(path)!r} has no {missing} tensor.")
  return cfg, ptree.unflatten(adapters)
