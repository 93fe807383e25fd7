"""Hugging Face PEFT adapter folders (adapter_config.json + adapter_model.safetensors), both directions.

PEFT stores LoRA factors in PyTorch layout under the model's module names:
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r); ours are
(in, r) and (r, out), so both are transposed on the way in and out.  DoRA adapters (``use_dora: true``)
add ``...<module>.lora_magnitude_vector`` (out,), with no ``.weight`` suffix.  Per-module ranks and
alphas travel as ``rank_pattern`` / ``alpha_pattern``.  AdaLoRA (``peft_type: ADALORA``) stores
``<module>.lora_A`` (r, in), ``.lora_E`` (r, 1) and ``.lora_B`` (out, r), cut down to the singular values its
``rank_pattern`` keeps.  Only safetensors are read.
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
from peftjax.methods import adalora, dora, lora

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
  _write_folder(folder, config, tensors)


def _write_folder(folder: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
  """Writes adapter_config.json and adapter_model.safetensors into `folder` (replaced whole, via a temporary folder)."""
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


def save_adalora_adapter(folder: str, cfg: adalora.AdaLoraConfig, adapters: dict, state: dict | None = None,
                         base_model_name_or_path: str | None = None, task_type: str | None = None) -> None:
  """Writes AdaLoRA `adapters` as a Hugging Face PEFT adapter folder that `PeftModel.from_pretrained` loads.

  With the allocator `state`, the file carries its `rank_pattern` and, as PEFT saves them, only the singular
  triplets the pattern keeps; without it, all init_r of every module.
  """
  pattern = None if state is None else adalora.rank_pattern(state)
  tensors = {}
  for path, adapter in lora.adapter_modules(adapters).items():
    a, e, b = (np.asarray(jax.device_get(adapter[k]), np.float32) for k in ("lora_A", "lora_E", "lora_B"))
    if e.ndim != 1:
      raise ValueError(f"adapter {path!r} is layer-stacked (shape {a.shape}); unstack scanned adapters before saving.")
    name = ptree.hf_name(path)
    keep = np.ones(e.shape, bool) if pattern is None else np.asarray(pattern[f"{name}.lora_E"], bool)
    tensors[f"{PREFIX}{name}.lora_A"] = np.ascontiguousarray(a[:, keep].T)
    tensors[f"{PREFIX}{name}.lora_E"] = np.ascontiguousarray(e[keep][:, None])
    tensors[f"{PREFIX}{name}.lora_B"] = np.ascontiguousarray(b[keep].T)
  config = {
      "peft_type": "ADALORA", "init_r": cfg.init_r, "target_r": cfg.target_r, "lora_alpha": cfg.alpha,
      "lora_dropout": cfg.dropout, "target_modules": _target_modules(cfg, list(lora.adapter_modules(adapters))),
      "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.delta_t, "beta1": cfg.beta1, "beta2": cfg.beta2,
      "orth_reg_weight": cfg.orth_reg_weight, "total_step": cfg.total_step, "rank_pattern": pattern,
      "bias": "none", "modules_to_save": None, "fan_in_fan_out": False, "init_lora_weights": True,
      "inference_mode": True, "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
  }
  _write_folder(folder, config, tensors)


def load_adalora_adapter(folder: str, params: dict) -> tuple[adalora.AdaLoraConfig, dict, dict]:
  """Reads a Hugging Face PEFT AdaLoRA folder for the base tree `params`: (AdaLoraConfig, adapters, state).

  Adapters come back at init_r with zeros for the singular triplets the file's rank_pattern dropped, and the
  state's masks are that pattern (so training can go on with the same ranks).
  """
  with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
    config = json.load(f)
  if config.get("peft_type") != "ADALORA":
    raise ValueError(f"{folder!r}: adapter_config.json peft_type={config.get('peft_type')!r}; "
                     "only 'ADALORA' is read here.")
  targets = config.get("target_modules") or ()
  cfg = adalora.AdaLoraConfig(
      total_step=config.get("total_step"), init_r=int(config.get("init_r", 12)),
      target_r=int(config.get("target_r", 8)), alpha=float(config.get("lora_alpha", 8)),
      dropout=float(config.get("lora_dropout", 0.0)),
      targets=targets if isinstance(targets, str) else tuple(sorted(targets)),
      tinit=int(config.get("tinit", 0)), tfinal=int(config.get("tfinal", 0)), delta_t=int(config.get("deltaT", 1)),
      beta1=float(config.get("beta1", 0.85)), beta2=float(config.get("beta2", 0.85)),
      orth_reg_weight=float(config.get("orth_reg_weight", 0.5)))
  pattern = config.get("rank_pattern") or {}
  flat = ptree.flatten(params)
  by_hf_name = {ptree.hf_name(m): m for m in ptree.linear_modules(params)}
  adapters, masks = {}, {}
  with safe_open(os.path.join(folder, ADAPTER_WEIGHTS), framework="numpy") as f:
    for key in f.keys():
      module, kind = (key[len(PREFIX):] if key.startswith(PREFIX) else key).rsplit(".", 1)
      if kind not in ("lora_A", "lora_E", "lora_B") or module not in by_hf_name:
        raise ValueError(f"{folder!r}: tensor {key!r} does not name an AdaLoRA factor of a linear module of this "
                         "model.")
      path = by_hf_name[module]
      keep = np.asarray(pattern.get(f"{module}.lora_E", [True] * cfg.init_r), bool)
      if keep.shape != (cfg.init_r,):
        raise ValueError(f"{folder!r}: rank_pattern[{module + '.lora_E'!r}] has {keep.size} entries; it needs "
                         f"init_r={cfg.init_r}.")
      d_in, d_out = flat[f"{path}/kernel"].shape[-2:]
      rank = int(keep.sum())
      value = f.get_tensor(key)
      expected = {"lora_A": (rank, d_in), "lora_E": (rank, 1), "lora_B": (d_out, rank)}[kind]
      if value.shape != expected:
        raise ValueError(f"{folder!r}: tensor {key!r} has shape {value.shape} but this model and rank_pattern need "
                         f"{expected} for {path!r}.")
      full = np.zeros({"lora_A": (d_in, cfg.init_r), "lora_E": (cfg.init_r,), "lora_B": (cfg.init_r, d_out)}[kind],
                      np.float32)
      if kind == "lora_A":
        full[:, keep] = value.T
      elif kind == "lora_E":
        full[keep] = value[:, 0]
      else:
        full[keep] = value.T
      adapters[f"{path}/{kind}"] = jnp.asarray(full)
      masks[f"{path}/lora_E"] = jnp.asarray(keep)
  adapters = ptree.unflatten(adapters)
  for path, adapter in lora.adapter_modules(adapters).items():
    missing = [k for k in ("lora_A", "lora_E", "lora_B") if k not in adapter]
    if missing:
      raise ValueError(f"{folder!r}: module {ptree.hf_name(path)!r} has no {missing} tensor.")
  return cfg, adapters, {**adalora.init_state(adapters), "mask": ptree.unflatten(masks)}
