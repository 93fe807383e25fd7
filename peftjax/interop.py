"""Hugging Face PEFT adapter folders (adapter_config.json + adapter_model.safetensors), both directions.

PEFT stores LoRA factors in PyTorch layout under the model's module names:
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r); ours are
(in, r) and (r, out), so both are transposed on the way in and out.  Only safetensors are read.
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
from peftjax.methods import lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _target_modules(cfg: lora.LoraConfig, modules: list[str]) -> list[str]:
  if isinstance(cfg.targets, tuple) and not cfg.exclude:
    return sorted(cfg.targets)
  return sorted(ptree.hf_name(m) for m in modules)  # regex / all-linear / exclude: the exact module list


def save_lora_adapter(folder: str, cfg: lora.LoraConfig, adapters: dict, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> None:
  """Writes `adapters` as a Hugging Face PEFT LoRA adapter folder that `PeftModel.from_pretrained` loads."""
  modules = lora.adapter_modules(adapters)
  ranks = {int(m["lora_A"].shape[-1]) for m in modules.values()}
  if ranks != {cfg.rank}:
    raise ValueError(f"adapters have ranks {sorted(ranks)} but LoraConfig.rank is {cfg.rank}.")
  tensors = {}
  for path, adapter in modules.items():
    a, b = (np.asarray(jax.device_get(adapter[k]), np.float32) for k in ("lora_A", "lora_B"))
    if a.ndim != 2:
      raise ValueError(f"adapter {path!r} is layer-stacked (shape {a.shape}); unstack scanned adapters before saving.")
    name = PREFIX + ptree.hf_name(path)
    tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
  config = {
      "peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
      "target_modules": _target_modules(cfg, list(modules)), "use_rslora": cfg.use_rslora, "use_dora": False,
      "bias": "none", "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
      "init_lora_weights": True, "inference_mode": True, "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
  }
  parent = os.path.dirname(os.path.abspath(folder))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if os.path.isdir(folder):
      shutil.rmtree(folder)
    os.rename(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_lora_adapter(folder: str, params: dict) -> tuple[lora.LoraConfig, dict]:
  """Reads a Hugging Face PEFT LoRA folder for the base tree `params`: (LoraConfig, adapter tree).

  `params` may hold arrays or jax.ShapeDtypeStruct leaves (only shapes are checked).
  """
  with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{folder!r}: adapter_config.json peft_type={config.get('peft_type')!r}; only 'LORA' is read here.")
  for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
    if config.get(key):
      raise ValueError(f"{folder!r}: adapter_config.json {key}={config[key]!r} is not supported by load_lora_adapter.")
  targets = config.get("target_modules") or ()
  cfg = lora.LoraConfig(rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                        dropout=float(config.get("lora_dropout", 0.0)),
                        targets=targets if isinstance(targets, str) else tuple(targets),
                        use_rslora=bool(config.get("use_rslora", False)))
  flat = ptree.flatten(params)
  by_hf_name = {ptree.hf_name(m): m for m in ptree.linear_modules(params)}
  adapters = {}
  with safe_open(os.path.join(folder, ADAPTER_WEIGHTS), framework="numpy") as f:
    for key in f.keys():
      name = key[len(PREFIX):] if key.startswith(PREFIX) else key
      module, kind, _ = name.rsplit(".", 2)
      if kind not in ("lora_A", "lora_B") or module not in by_hf_name:
        raise ValueError(f"{folder!r}: tensor {key!r} does not name a LoRA factor of a linear module of this model.")
      path = by_hf_name[module]
      value = f.get_tensor(key).T
      d_in, d_out = flat[f"{path}/kernel"].shape[-2:]
      expected = (d_in, cfg.rank) if kind == "lora_A" else (cfg.rank, d_out)
      if value.shape != expected:
        raise ValueError(f"{folder!r}: tensor {key!r} has shape {f.get_tensor(key).shape} but this model needs "
                         f"{expected[::-1]} (PyTorch layout) for {path!r}.")
      adapters[f"{path}/{kind}"] = jnp.asarray(value, jnp.float32)
  return cfg, ptree.unflatten(adapters)
