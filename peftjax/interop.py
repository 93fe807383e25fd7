"""Hugging Face PEFT adapter folders (adapter_config.json + adapter_model.safetensors), both directions.

`save_adapter` / `load_adapter` pick the format by config class / by the file's ``peft_type``; the
method-specific functions below stay for LoRA and AdaLoRA.  Tensor names are the PyTorch model's module
names under ``base_model.model.``:

- LoRA (``LORA``): ``<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r); ours are (in, r) and
  (r, out), so both are transposed on the way in and out.  DoRA adapters (``use_dora: true``) add
  ``<module>.lora_magnitude_vector`` (out,).  Per-module ranks and alphas travel as ``rank_pattern`` /
  ``alpha_pattern``.
- AdaLoRA (``ADALORA``): ``<module>.lora_A`` (r, in), ``.lora_E`` (r, 1) and ``.lora_B`` (out, r), cut down to
  the singular values its ``rank_pattern`` keeps.
- (IA)³ (``IA3``): ``<module>.ia3_l``, (out, 1) for output scaling and (1, in) for the `feedforward_modules`
  (input scaling), also for GPT-2's Conv1D layers (``fan_in_fan_out: true``).
- modules_to_save (a `ModulesToSaveConfig` listed with the method): the modules' full weights under their own
  names, ``<module>.weight`` / ``.bias`` (PyTorch layout), and their names in ``modules_to_save``.
- the soft-prompt family: see `peftjax.interop_prompts` (one ``prompt_embeddings`` tensor; modules_to_save
  tensors there sit under ``base_model.`` only).

Only safetensors are read, and every folder is checked first (`peftjax.adapter_schema`): any bad folder raises
`AdapterFormatError` (a ValueError) naming the folder, the file and the field or tensor.
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from peftjax import adapter_schema, finite, interop_prompts
from peftjax import tree as ptree
from peftjax.methods import adalora, dora, ia3, lora, modules_to_save
from peftjax.models import hf_io

ADAPTER_CONFIG = adapter_schema.ADAPTER_CONFIG
ADAPTER_WEIGHTS = adapter_schema.ADAPTER_WEIGHTS
AdapterFormatError = adapter_schema.AdapterFormatError
PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."  # PEFT's prompt-learning models hold the transformers model directly
BASE_LAYER = "base_layer"  # PEFT's name for the wrapped base module of an adapted layer
PEFT_TYPES = ("LORA", "ADALORA", "IA3", *interop_prompts.PEFT_TYPES)
NoPeftFormatError = interop_prompts.NoPeftFormatError
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
def _is_conv1d(path: str) -> bool:
  """GPT-2's layers (everything under transformer/) are Conv1D, whose weights PyTorch stores (in, out) like ours."""
  return path.startswith("transformer/")


def _torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  """A leaf in PyTorch's layout (Linear kernels transposed; the transposition is its own inverse)."""
  transposed = path.endswith("/kernel") and not _is_conv1d(path)
  return np.ascontiguousarray(np.swapaxes(value, -1, -2) if transposed else value)


def _common(base_model_name_or_path: str | None, task_type: str | None, modules: list[str] | None = None) -> dict:
  if task_type not in (None, *TASK_TYPES):
    raise ValueError(f"task_type={task_type!r} is not a Hugging Face PEFT task type; valid: None, {TASK_TYPES}.")
  return {"modules_to_save": modules, "inference_mode": True, "task_type": task_type,
          "base_model_name_or_path": base_model_name_or_path}


def _target_modules(cfg, modules: list[str]) -> list[str]:
  if isinstance(cfg.targets, tuple) and not cfg.exclude:
    return sorted(cfg.targets)
  return sorted(ptree.hf_name(m) for m in modules)  # regex / all-linear / exclude: the exact module list


def _lora_files(cfg: lora.LoraConfig, adapters: dict) -> tuple[dict, dict]:
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
      "bias": "none", "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
      "fan_in_fan_out": False, "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
      "layers_to_transform": list(cfg.layers_to_transform) or None,
      "layers_pattern": (cfg.layers_pattern[0] if len(cfg.layers_pattern) == 1 else list(cfg.layers_pattern)) or None,
  }
  return config, tensors


def save_lora_adapter(folder: str, cfg: lora.LoraConfig, adapters: dict, base_model_name_or_path: str | None = None,
                      task_type: str | None = None) -> None:
  """Writes LoRA or DoRA `adapters` as a Hugging Face PEFT adapter folder that `PeftModel.from_pretrained` loads.

  The file says ``init_lora_weights: true`` for PiSSA adapters: they belong to the residual base weights
  that `lora.pissa_init` returned, and PEFT would otherwise redo PiSSA on the base it loads them into.
  """
  config, tensors = _lora_files(cfg, adapters)
  write_folder(folder, {**config, **_common(base_model_name_or_path, task_type)}, tensors)


def write_folder(folder: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
  """Writes adapter_config.json and adapter_model.safetensors into `folder` (replaced whole, via a temporary folder);
  a tensor holding NaN or inf is refused (`peftjax.finite`) before anything is written."""
  finite.check(tensors, f"the adapter {os.path.join(folder, ADAPTER_WEIGHTS)!r}")
  with hf_io.replacing_folder(folder) as tmp:
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
      json.dump(dict(sorted(config.items())), f, indent=2)  # keys sorted as PEFT does; pattern order kept
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})


@contextlib.contextmanager
def _reading(folder: str):
  """Turns a ValueError raised while reading `folder` (e.g. by a method config's own checks) into an
  AdapterFormatError that names the folder."""
  try:
    yield
  except AdapterFormatError:
    raise
  except ValueError as e:
    message = str(e)
    raise AdapterFormatError(message if message.startswith(repr(folder)) else
                             f"{folder!r}: {ADAPTER_CONFIG} does not make a valid config: {message}") from None


def _check_peft_type(folder: str, config: dict, peft_type: str) -> None:
  if config.get("peft_type") != peft_type:
    raise AdapterFormatError(f"{folder!r}: adapter_config.json peft_type={config.get('peft_type')!r}; only "
                             f"{peft_type!r} is read here.")


def _targets(value) -> str | tuple[str, ...]:
  return value if isinstance(value, str) else tuple(sorted(value or ()))


def _exclude(folder: str, config: dict) -> tuple[str, ...]:
  """exclude_modules as a tuple of names (PEFT's regex form is refused)."""
  if isinstance(config.get("exclude_modules"), str):
    raise AdapterFormatError(f"{folder!r}: adapter_config.json exclude_modules={config['exclude_modules']!r} is a "
                             "regex; only a list of module names is supported.")
  return tuple(config.get("exclude_modules") or ())


def _init_name(value, use_dora: bool) -> str:
  """Our `init` for PEFT's init_lora_weights (only informative for a trained adapter)."""
  if isinstance(value, str) and (value == "gaussian" or (value.startswith("pissa") and not use_dora)):
    return value
  return "default"


def _lora_from(folder: str, config: dict, tensors: dict[str, np.ndarray], params: dict) -> tuple[lora.LoraConfig, dict]:
  for key in ("lora_bias", "layer_replication"):
    if config.get(key):
      raise AdapterFormatError(f"{folder!r}: adapter_config.json {key}={config[key]!r} is not supported.")
  if config.get("bias", "none") != "none":
    raise AdapterFormatError(f"{folder!r}: adapter_config.json bias={config['bias']!r} is not supported; only "
                             "'none' is.")
  use_dora = bool(config.get("use_dora", False))
  cfg = (dora.DoraConfig if use_dora else lora.LoraConfig)(
      rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
      dropout=float(config.get("lora_dropout", 0.0)), targets=_targets(config.get("target_modules")),
      exclude=_exclude(folder, config), use_rslora=bool(config.get("use_rslora", False)),
      rank_pattern=config.get("rank_pattern") or {}, alpha_pattern=config.get("alpha_pattern") or {},
      init=_init_name(config.get("init_lora_weights", True), use_dora),
      layers_to_transform=config.get("layers_to_transform"), layers_pattern=config.get("layers_pattern"))
  flat = ptree.flatten(params)
  by_hf_name = {ptree.hf_name(m): m for m in ptree.linear_modules(params)}
  kinds = ("lora_A", "lora_B", dora.MAGNITUDE) if use_dora else ("lora_A", "lora_B")
  adapters = {}
  _check_base_layers(folder, _base_layers(folder, tensors, params), params)
  for key, tensor in tensors.items():
    if BASE_LAYER in key:
      continue
    name = key.removeprefix(PREFIX)
    module, kind = name, ""
    if name.endswith("." + dora.MAGNITUDE):
      module, kind = name[: -len(dora.MAGNITUDE) - 1], dora.MAGNITUDE
    elif name.endswith(".weight") and name.count(".") >= 2:
      module, kind, _ = name.rsplit(".", 2)
    if kind not in kinds or module not in by_hf_name:
      raise AdapterFormatError(f"{folder!r}: tensor {key!r} does not name a {'DoRA' if use_dora else 'LoRA'} factor "
                               "of a linear module of this model.")
    path = by_hf_name[module]
    value = tensor.T
    d_in, d_out = flat[f"{path}/kernel"].shape[-2:]
    rank = cfg.module_rank(path)
    expected = {"lora_A": (d_in, rank), "lora_B": (rank, d_out), dora.MAGNITUDE: (d_out,)}[kind]
    if value.shape != expected:
      raise AdapterFormatError(f"{folder!r}: tensor {key!r} has shape {tensor.shape} but this model needs "
                               f"{expected[::-1]} (PyTorch layout) for {path!r}.")
    adapters[f"{path}/{kind}"] = jnp.asarray(value, jnp.float32)
  _check_complete(folder, adapters, kinds)
  return cfg, ptree.unflatten(adapters)


def _base_layers(folder: str, tensors: dict[str, np.ndarray], params: dict) -> dict[str, np.ndarray]:
  """{our leaf path: value in our layout} of the base weights PEFT saves next to an adapted module it counts as an
  embedding layer (``<module>.base_layer.weight``, e.g. lm_head with save_embedding_layers="auto")."""
  flat = ptree.flatten(params)
  by_key = {}
  for path in flat:
    module, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
    if leaf in ("kernel", "bias"):
      by_key[f"{PREFIX}{ptree.hf_name(module)}.{BASE_LAYER}.{'weight' if leaf == 'kernel' else 'bias'}"] = path
  leaves = {}
  for key, value in tensors.items():
    if BASE_LAYER not in key:
      continue
    if key not in by_key:
      raise AdapterFormatError(f"{folder!r}: tensor {key!r} names a base layer this model does not have.")
    path = by_key[key]
    value = _torch_layout(path, value)
    if value.shape != tuple(np.shape(flat[path])):
      raise AdapterFormatError(f"{folder!r}: tensor {key!r} has shape {value.shape[::-1]} but this model's {path!r} "
                               f"is {np.shape(flat[path])} (ours; PyTorch Linear weights are transposed).")
    leaves[path] = value
  return leaves


def _check_base_layers(folder: str, leaves: dict[str, np.ndarray], params: dict) -> None:
  """The folder's saved base weights must equal `params`' (when `params` holds arrays, not only shapes)."""
  flat = ptree.flatten(params)
  for path, value in leaves.items():
    if isinstance(flat[path], jax.ShapeDtypeStruct):
      continue
    ours = np.asarray(jax.device_get(flat[path]), np.float32)
    if not np.allclose(value, ours, rtol=1e-5, atol=1e-6):
      raise AdapterFormatError(
          f"{folder!r}: the base weight {path!r} saved with the adapter differs from this model's by up to "
          f"{float(np.max(np.abs(value - ours))):.3g}; load it onto the base it was trained with, or take the saved "
          "weights with peftjax.interop.with_saved_base_layers(folder, params).")


def with_saved_base_layers(folder: str, params: dict) -> dict:
  """`params` with the base weights a PEFT LoRA folder saved beside its adapters (``<module>.base_layer.weight``,
  e.g. a resized lm_head) put in their places; the other leaves are `params`' own."""
  _, tensors = adapter_schema.read_folder(folder)
  leaves = _base_layers(folder, tensors, params)
  flat = ptree.flatten(params)
  return ptree.unflatten({**flat, **{p: jnp.asarray(v, flat[p].dtype) for p, v in leaves.items()}})


def _check_complete(folder: str, adapters: dict, kinds: tuple[str, ...]) -> None:
  for path, adapter in lora.adapter_modules(ptree.unflatten(adapters)).items():
    missing = [k for k in kinds if k not in adapter]
    if missing:
      raise AdapterFormatError(f"{folder!r}: module {ptree.hf_name(path)!r} has no {missing} tensor.")


def load_lora_adapter(folder: str, params: dict) -> tuple[lora.LoraConfig, dict]:
  """Reads a Hugging Face PEFT LoRA or DoRA folder for the base tree `params`: (LoraConfig | DoraConfig, adapter tree).

  `params` may hold arrays or jax.ShapeDtypeStruct leaves (only shapes are checked).  Folders with
  modules_to_save are read by `load_adapter`.
  """
  config, tensors = adapter_schema.read_folder(folder)
  _check_peft_type(folder, config, "LORA")
  if config.get("modules_to_save"):
    raise AdapterFormatError(f"{folder!r}: adapter_config.json modules_to_save={config['modules_to_save']!r} is not "
                             "supported by load_lora_adapter; load_adapter reads it.")
  with _reading(folder):
    return _lora_from(folder, config, tensors, params)


def _adalora_files(cfg: adalora.AdaLoraConfig, adapters: dict, state: dict | None) -> tuple[dict, dict]:
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
      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
  }
  return config, tensors


def save_adalora_adapter(folder: str, cfg: adalora.AdaLoraConfig, adapters: dict, state: dict | None = None,
                         base_model_name_or_path: str | None = None, task_type: str | None = None) -> None:
  """Writes AdaLoRA `adapters` as a Hugging Face PEFT adapter folder that `PeftModel.from_pretrained` loads.

  With the allocator `state`, the file carries its `rank_pattern` and, as PEFT saves them, only the singular
  triplets the pattern keeps; without it, all init_r of every module.
  """
  config, tensors = _adalora_files(cfg, adapters, state)
  write_folder(folder, {**config, **_common(base_model_name_or_path, task_type)}, tensors)


def _adalora_from(folder: str, config: dict, tensors: dict[str, np.ndarray],
                  params: dict) -> tuple[adalora.AdaLoraConfig, dict, dict]:
  cfg = adalora.AdaLoraConfig(
      total_step=config.get("total_step"), init_r=int(config.get("init_r", 12)),
      target_r=int(config.get("target_r", 8)), alpha=float(config.get("lora_alpha", 8)),
      dropout=float(config.get("lora_dropout", 0.0)), targets=_targets(config.get("target_modules")),
      tinit=int(config.get("tinit", 0)), tfinal=int(config.get("tfinal", 0)), delta_t=int(config.get("deltaT", 1)),
      beta1=float(config.get("beta1", 0.85)), beta2=float(config.get("beta2", 0.85)),
      orth_reg_weight=float(config.get("orth_reg_weight", 0.5)))
  pattern = config.get("rank_pattern") or {}
  flat = ptree.flatten(params)
  by_hf_name = {ptree.hf_name(m): m for m in ptree.linear_modules(params)}
  adapters, masks = {}, {}
  for key, value in tensors.items():
    module, kind = key.removeprefix(PREFIX).rsplit(".", 1)
    if kind not in ("lora_A", "lora_E", "lora_B") or module not in by_hf_name:
      raise AdapterFormatError(f"{folder!r}: tensor {key!r} does not name an AdaLoRA factor of a linear module of "
                               "this model.")
    path = by_hf_name[module]
    keep = np.asarray(pattern.get(f"{module}.lora_E", [True] * cfg.init_r), bool)
    if keep.shape != (cfg.init_r,):
      raise AdapterFormatError(f"{folder!r}: rank_pattern[{module + '.lora_E'!r}] has {keep.size} entries; it needs "
                               f"init_r={cfg.init_r}.")
    d_in, d_out = flat[f"{path}/kernel"].shape[-2:]
    rank = int(keep.sum())
    expected = {"lora_A": (rank, d_in), "lora_E": (rank, 1), "lora_B": (d_out, rank)}[kind]
    if value.shape != expected:
      raise AdapterFormatError(f"{folder!r}: tensor {key!r} has shape {value.shape} but this model and rank_pattern "
                               f"need {expected} for {path!r}.")
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
  _check_complete(folder, adapters, ("lora_A", "lora_E", "lora_B"))
  adapters = ptree.unflatten(adapters)
  return cfg, adapters, {**adalora.init_state(adapters), "mask": ptree.unflatten(masks)}


def load_adalora_adapter(folder: str, params: dict) -> tuple[adalora.AdaLoraConfig, dict, dict]:
  """Reads a Hugging Face PEFT AdaLoRA folder for the base tree `params`: (AdaLoraConfig, adapters, state).

  Adapters come back at init_r with zeros for the singular triplets the file's rank_pattern dropped, and the
  state's masks are that pattern (so training can go on with the same ranks).
  """
  config, tensors = adapter_schema.read_folder(folder)
  _check_peft_type(folder, config, "ADALORA")
  with _reading(folder):
    return _adalora_from(folder, config, tensors, params)


def _ia3_files(cfg: ia3.IA3Config, adapters: dict) -> tuple[dict, dict]:
  tensors, modules, feedforward = {}, [], []
  for path, vector in ptree.flatten(adapters).items():
    module, kind = path.rsplit("/", 1)
    value = np.asarray(jax.device_get(vector), np.float32)
    if value.ndim != 1:
      raise ValueError(f"adapter {module!r} is layer-stacked (shape {value.shape}); unstack scanned adapters before "
                       "saving.")
    tensors[f"{PREFIX}{ptree.hf_name(module)}.ia3_l"] = value[None, :] if kind == ia3.INPUT else value[:, None]
    modules.append(module)
    if kind == ia3.INPUT:
      feedforward.append(module)
  as_given = isinstance(cfg.targets, tuple) and isinstance(cfg.feedforward, tuple) and not cfg.exclude
  config = {
      "peft_type": "IA3",  # PEFT wants feedforward_modules inside target_modules: both as given or both exact
      "target_modules": sorted(cfg.targets) if as_given else sorted(ptree.hf_name(m) for m in modules),
      "feedforward_modules": sorted(cfg.feedforward) if as_given else sorted(ptree.hf_name(m) for m in feedforward),
      "exclude_modules": None, "fan_in_fan_out": any(_is_conv1d(m) for m in modules), "init_ia3_weights": True,
  }
  return config, tensors


def _ia3_from(folder: str, config: dict, tensors: dict[str, np.ndarray], params: dict) -> tuple[ia3.IA3Config, dict]:
  cfg = ia3.IA3Config(targets=_targets(config.get("target_modules")),
                      feedforward=_targets(config.get("feedforward_modules")),
                      exclude=_exclude(folder, config))
  paths, feedforward = ia3.target_paths(cfg, params)
  by_hf_name = {ptree.hf_name(p): p for p in paths}
  flat = ptree.flatten(params)
  adapters = {}
  for key, value in tensors.items():
    module = key.removeprefix(PREFIX).removesuffix(".ia3_l")
    if not key.endswith(".ia3_l") or module not in by_hf_name:
      raise AdapterFormatError(f"{folder!r}: tensor {key!r} does not name the ia3_l vector of a target module of this "
                               f"model; valid modules are {sorted(by_hf_name)}.")
    path = by_hf_name[module]
    d_in, d_out = flat[f"{path}/kernel"].shape[-2:]
    expected, kind = ((1, d_in), ia3.INPUT) if path in feedforward else ((d_out, 1), ia3.OUTPUT)
    if value.shape != expected:
      raise AdapterFormatError(f"{folder!r}: tensor {key!r} has shape {value.shape} but this model needs {expected} "
                               f"for {path!r} ({'feed-forward' if path in feedforward else 'output'} scaling).")
    adapters[f"{path}/{kind}"] = jnp.asarray(value.reshape(-1), jnp.float32)
  missing = sorted(ptree.hf_name(p) for p in paths if not any(k.startswith(p + "/") for k in adapters))
  if missing:
    raise AdapterFormatError(f"{folder!r}: target modules {missing} have no ia3_l tensor.")
  return cfg, ptree.unflatten(adapters)


def _saved_modules_files(cfg: modules_to_save.ModulesToSaveConfig, adapters: dict,
                         prefix: str) -> tuple[list[str], dict]:
  """(PEFT's modules_to_save names, their tensors) for a modules_to_save adapter tree."""
  flat = ptree.flatten(adapters)
  tensors = {prefix + hf_io.hf_key(path): _torch_layout(path, np.asarray(jax.device_get(v), np.float32))
             for path, v in flat.items()}
  if isinstance(cfg.modules, str):  # a regex: the exact modules it selected
    return sorted({ptree.hf_name(p.rsplit("/", 1)[0]) for p in flat}), tensors
  return [ptree.hf_name(m) for m in cfg.modules], tensors


def _saved_modules_from(folder: str, names: list[str], tensors: dict[str, np.ndarray], params: dict,
                        prefix: str) -> tuple[modules_to_save.ModulesToSaveConfig, dict, dict]:
  """(config, tree of the saved modules' leaves, the tensors that are not theirs)."""
  cfg = modules_to_save.ModulesToSaveConfig(tuple(dict.fromkeys(names)))  # PEFT may list a name twice
  leaves = modules_to_save.module_leaves(params, cfg.modules, f"{folder!r}: adapter_config.json modules_to_save")
  by_key = {prefix + hf_io.hf_key(p): p for p in leaves}
  flat = ptree.flatten(params)
  saved, rest = {}, {}
  for key, value in tensors.items():
    if key not in by_key:
      rest[key] = value
      continue
    path = by_key[key]
    value = _torch_layout(path, value)
    if value.shape != np.shape(flat[path]):
      raise AdapterFormatError(f"{folder!r}: tensor {key!r} has shape {value.shape[::-1]} but this model's {path!r} "
                               f"is {np.shape(flat[path])} (ours; PyTorch Linear weights are transposed).")
    saved[path] = jnp.asarray(value, jnp.float32)
  missing = sorted(prefix + hf_io.hf_key(p) for p in leaves if p not in saved)
  if missing:
    raise AdapterFormatError(f"{folder!r}: modules_to_save={names!r} needs the tensors {missing}, which the "
                             "file lacks.")
  return cfg, ptree.unflatten(saved), rest


def adapter_files(cfg, adapters, base_model_name_or_path: str | None = None, task_type: str | None = None,
                  state: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json entries, safetensors tensors) of the Hugging Face PEFT folder `save_adapter` writes."""
  cfgs, trees = (list(cfg), list(adapters)) if isinstance(cfg, (list, tuple)) else ([cfg], [adapters])
  from peftjax.methods import lora_experts  # noqa: PLC0415 (it imports this module)
  if any(isinstance(c, lora_experts.ExpertLoraConfig) for c in cfgs):  # LoRA with target_parameters
    return lora_experts.adapter_files(cfgs, trees, base_model_name_or_path, task_type)
  saved = [i for i, c in enumerate(cfgs) if isinstance(c, modules_to_save.ModulesToSaveConfig)]
  methods = [i for i in range(len(cfgs)) if i not in saved]
  if len(trees) != len(cfgs):
    raise ValueError(f"save_adapter takes one adapter tree per config; got configs {[type(c).__name__ for c in cfgs]} "
                     f"and {len(trees)} trees.")
  if len(methods) != 1 or len(saved) > 1:
    raise NoPeftFormatError(f"save_adapter takes one method config, optionally listed with one ModulesToSaveConfig; "
                            f"got configs {[type(c).__name__ for c in cfgs]}.")
  method, tree = cfgs[methods[0]], trees[methods[0]]
  common = _common(base_model_name_or_path, task_type)
  prefix = PREFIX
  if isinstance(method, adalora.AdaLoraConfig):
    config, tensors = _adalora_files(method, tree, state)
  elif isinstance(method, lora.LoraConfig):
    config, tensors = _lora_files(method, tree)
  elif isinstance(method, ia3.IA3Config):
    config, tensors = _ia3_files(method, tree)
  elif isinstance(method, interop_prompts.CONFIGS):
    config, tensors = interop_prompts.files(method, tree, task_type)
    prefix = PROMPT_PREFIX
  else:
    raise NoPeftFormatError(f"{type(method).__name__} has no Hugging Face PEFT format; save_adapter writes "
                            f"{['LoraConfig', 'DoraConfig', 'AdaLoraConfig', 'IA3Config']} and "
                            f"{[c.__name__ for c in interop_prompts.CONFIGS]} (and PTuningV2Config) configs.")
  if saved:
    common["modules_to_save"], more = _saved_modules_files(cfgs[saved[0]], trees[saved[0]], prefix)
    tensors.update(more)
  return {**config, **common}, tensors


def save_adapter(folder: str, cfg, adapters, base_model_name_or_path: str | None = None, task_type: str | None = None,
                 state: dict | None = None) -> None:
  """Writes a Hugging Face PEFT adapter folder for any method PEFT also has.

  `cfg` is a LoraConfig, DoraConfig, AdaLoraConfig (with the allocator `state`, see `save_adalora_adapter`),
  IA3Config, PromptTuningConfig, PTuningConfig, PrefixTuningConfig or PTuningV2Config, or a list of one of
  them and a ModulesToSaveConfig (with `adapters` the matching tuple), or a list with an ExpertLoraConfig (written by
  `lora_experts.save_peft_adapter`).  Soft prompts are saved folded, as PEFT saves them, and need `task_type` (see
  `peftjax.interop_prompts`).  A method or setting PEFT has no format for (bottleneck adapters, UniPELT, several
  methods, encoder prefixes, placeholder templates) raises NoPeftFormatError (a ValueError) before anything is written.
  """
  write_folder(folder, *adapter_files(cfg, adapters, base_model_name_or_path, task_type, state))


def load_adapter(folder: str, params: dict):
  """Reads any Hugging Face PEFT folder that `save_adapter` writes, for the base tree `params`: (config, adapters).

  With ``modules_to_save`` in the file, both come back as a list [method config, ModulesToSaveConfig] and a
  tuple of two trees; with ``target_parameters``, as `lora_experts.load_peft_adapter` reads them.  Soft prompts come
  back folded (prompt tuning for P-tuning, the plain table for prefix tuning), as PEFT loads them for inference.
  AdaLoRA's allocator state: `load_adalora_adapter`.
  """
  config, tensors = adapter_schema.read_folder(folder)  # peft_type is one of PEFT_TYPES
  if config.get("target_parameters"):  # LoRA on stacked expert weights too
    from peftjax.methods import lora_experts  # noqa: PLC0415 (it imports this module)
    return lora_experts.load_peft_adapter(folder, params)
  peft_type = config["peft_type"]
  prompt = peft_type in interop_prompts.PEFT_TYPES
  names = config.get("modules_to_save")
  with _reading(folder):
    if names:
      saved_cfg, saved, tensors = _saved_modules_from(folder, names, tensors, params,
                                                      PROMPT_PREFIX if prompt else PREFIX)
    if peft_type == "LORA":
      cfg, adapters = _lora_from(folder, config, tensors, params)
    elif peft_type == "ADALORA":
      cfg, adapters, _ = _adalora_from(folder, config, tensors, params)
    elif peft_type == "IA3":
      cfg, adapters = _ia3_from(folder, config, tensors, params)
    else:
      cfg, adapters = interop_prompts.read(folder, config, tensors, params)
  return ([cfg, saved_cfg], (adapters, saved)) if names else (cfg, adapters)
