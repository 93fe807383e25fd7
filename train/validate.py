"""`check(config)`: every config section validated before any data or weights are loaded.

Each bad setting raises one ValueError sentence naming `config.<section>.<key>`, the value and what is valid:
the top-level keys and sections (family, task, method, optimizer, lengths, scale), the model and tokenizer
locations (an existing folder or .gguf file, an asset, or a hub id that resolves), the workdir (a folder that
can be written, created by nobody here), and the method config(s), built and applied to the model's parameter
shapes (`jax.eval_shape` of its init: no weights are read), so that a target list matching nothing is reported
with the module names that exist.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile

import jax
import ml_collections

import peftjax as pj
from peftjax import sharding
from peftjax.models import gguf, hf_io

from train import buckets, data_files, divergence, loop, methods, quantize, steps, tasks

# Methods whose virtual tokens are input positions of the row (`methods.PROMPT_CONFIGS`): no packing.
PACKING_REFUSED = ("prompt_tuning", "p_tuning")
MODEL_HELP = ('a checkpoint folder (config.json + safetensors), a .gguf file, "asset:<package>/<path>", a hub id, '
              'or "random"')


def _check_scale(config: ml_collections.ConfigDict) -> None:
  scale = loop.scale_settings(config)
  shape = tuple(scale.mesh_shape)
  if (len(shape) != len(sharding.MESH_AXES) or not all(isinstance(s, int) and (s > 0 or s == -1) for s in shape)
      or shape.count(-1) > 1):
    raise ValueError(f"config.scale.mesh_shape={shape} must be {len(sharding.MESH_AXES)} sizes for the mesh axes "
                     f"{sharding.MESH_AXES}, each a positive integer or -1 (at most one: the remaining devices).")
  for rule in scale.logical_axis_rules:
    targets = rule[1] if len(rule) == 2 and isinstance(rule[1], (tuple, list)) else rule[1:]
    if len(rule) != 2 or not isinstance(rule[0], str) or any(t not in (*sharding.MESH_AXES, None) for t in targets):
      raise ValueError(f"config.scale.logical_axis_rules holds {rule!r}; each rule is (logical axis name, mesh axis, "
                       f"tuple of mesh axes or None) with mesh axes from {sharding.MESH_AXES}.")
  if not isinstance(scale.micro_batches, int) or scale.micro_batches < 1 or config.batch_size % scale.micro_batches:
    raise ValueError(f"config.scale.micro_batches={scale.micro_batches} must be a positive integer that divides "
                     f"config.batch_size={config.batch_size}.")
  for key, value in (("compute_dtype", config.compute_dtype), ("scale.frozen_dtype", scale.frozen_dtype)):
    if value not in loop.DTYPES:
      raise ValueError(f"config.{key}={value!r} is not supported; valid: {sorted(loop.DTYPES)}.")


def check_sections(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one sentence naming the key and what is valid) for a bad top-level value or section."""
  if config.family not in tasks.FAMILIES:
    raise ValueError(f"config.family={config.family!r} is not a known model family; valid: {sorted(tasks.FAMILIES)}.")
  task = tasks.family(config).task
  if "multitask" not in config:  # a multi-task run checks each of its tasks (`check_multitask`)
    data_files.check_task(task.kind, config.task)
  data_files.settings(config)
  methods.check(config)
  if config.optimizer.decay not in steps.DECAYS:
    raise ValueError(f"config.optimizer.decay={config.optimizer.decay!r} is not a known schedule; "
                     f"valid: {list(steps.DECAYS)}.")
  for key in ("batch_size", *task.length_keys, "log_every", "checkpoint_every", "keep_checkpoints"):
    if key not in config:
      raise ValueError(f"config.{key} is missing; a {task.kind} model needs {list(task.length_keys)}.")
    if config[key] < 1:
      raise ValueError(f"config.{key}={config[key]} must be a positive integer.")
  for key in ("steps", "eval_every", "train_examples"):
    if config[key] < 0:
      raise ValueError(f"config.{key}={config[key]} must be 0 or a positive integer.")
  if config.eval_examples < 1:
    raise ValueError(f"config.eval_examples={config.eval_examples} must be a positive integer.")
  if config.optimizer.learning_rate <= 0 or config.optimizer.grad_clip_norm <= 0:
    raise ValueError(f"config.optimizer.learning_rate={config.optimizer.learning_rate} and grad_clip_norm="
                     f"{config.optimizer.grad_clip_norm} must both be positive.")
  _check_scale(config)
  quantize.quant_config(config)
  divergence.check_config(config)
  buckets.lengths_of(config, task)
  _check_packing(config, task)
  if "sweep" in config:
    check_sweep(config)
  if "multitask" in config:
    check_multitask(config)


def _check_packing(config: ml_collections.ConfigDict, task) -> None:
  """config.packing: a bool, for causal LMs only, without buckets or virtual input positions (`train.packing`)."""
  packing = config.get("packing", False)
  if not isinstance(packing, bool):
    raise ValueError(f"config.packing={packing!r} must be True or False.")
  if not packing:
    return
  if task.kind != "causal_lm":
    raise ValueError(f"config.packing=True packs documents for causal LMs only, but this run trains a {task.kind} "
                     f"model (config.family={config.family!r}, config.task_type={config.get('task_type', '')!r}); "
                     "set config.packing=False.")
  if tuple(config.get("buckets", ())):
    raise ValueError(f"config.packing=True fills every row to config.max_length, so config.buckets="
                     f"{tuple(config.buckets)} must be () with it.")
  if config.method in PACKING_REFUSED:
    raise ValueError(f"config.packing=True cannot be used with config.method={config.method!r}: its virtual tokens "
                     "are input positions in front of the row, which only the first packed document would follow; "
                     "use prefix_tuning / p_tuning_v2 (keys and values every document attends) or "
                     "config.packing=False.")


# config.sweep: each field a list of values (member i takes the i-th of every list, a list of one value applying
# to every member, or with grid=True every combination); a field left out keeps the run's own value (its key).
SWEEP_FIELDS = {"seed": "seed", "learning_rate": "optimizer.learning_rate", "rank": "lora.rank", "alpha": "lora.alpha"}
SWEEP_REFUSED = (("packing", False, "packs documents"), ("buckets", (), "cuts batches to other lengths"),
                 ("export_merged", False, "writes one merged model"))


def _sweep_value_ok(field: str, value) -> bool:
  if field in ("seed", "rank"):
    return isinstance(value, int) and not isinstance(value, bool) and value >= (0 if field == "seed" else 1)
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value > (0 if field == "learning_rate"
                                                                                      else float("-inf"))


def check_sweep(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one sentence naming config.sweep.<key>) for a sweep (`train.sweep_run`) it cannot run."""
  sweep = config.sweep
  unknown = sorted(set(sweep) - {*SWEEP_FIELDS, "grid"})
  if unknown:
    raise ValueError(f"config.sweep has the unknown key {unknown[0]!r}; valid: {[*SWEEP_FIELDS, 'grid']}.")
  if not isinstance(sweep.get("grid", False), bool):
    raise ValueError(f"config.sweep.grid={sweep.grid!r} must be True (every combination) or False (the lists zipped).")
  fields = [f for f in SWEEP_FIELDS if f in sweep]
  if not fields:
    raise ValueError(f"config.sweep lists no values; give one or more of {list(SWEEP_FIELDS)} as lists.")
  for field in fields:
    values = sweep[field]
    if not isinstance(values, (tuple, list)) or not values:
      raise ValueError(f"config.sweep.{field}={values!r} must be a non-empty list of values, e.g. (1e-3, 3e-3).")
    bad = [v for v in values if not _sweep_value_ok(field, v)]
    if bad:
      kind = {"seed": "integers >= 0", "rank": "integers >= 1", "learning_rate": "positive numbers",
              "alpha": "numbers"}[field]
      raise ValueError(f"config.sweep.{field} holds {bad[0]!r}; its values must be {kind}.")
  lengths = {f: len(sweep[f]) for f in fields}
  if not sweep.get("grid", False) and len(set(lengths.values()) - {1}) > 1:
    raise ValueError(f"config.sweep's lists have unequal lengths {lengths}; member i takes the i-th value of every "
                     "list (a list of one value: every member's), so give lists of one length, or set "
                     "config.sweep.grid=True for every combination.")
  if config.method != "lora":
    raise ValueError(f"config.method={config.method!r} cannot be swept: config.sweep trains LoRA members, so set it "
                     "to 'lora'.")
  _check_stacked_lora(config, "config.sweep", "members")


def _check_stacked_lora(config: ml_collections.ConfigDict, section: str, units: str) -> None:
  """The refusals that config.sweep and config.multitask share (`section` names it, `units` its LoRA adapters):
  they train stacked LoRA adapters on modules, without dropout, over an unquantised base on one device."""
  if config.lora.dropout:
    raise ValueError(f"config.lora.dropout={config.lora.dropout} cannot be used with {section}, which trains "
                     "without LoRA dropout; set it to 0.")
  if config.lora.get("target_parameters"):
    raise ValueError(f"config.lora.target_parameters={config.lora.target_parameters!r} cannot be used with "
                     f"{section}, whose {units} are LoRA on modules only; set it to ''.")
  for key, off, what in SWEEP_REFUSED:
    if config.get(key):
      raise ValueError(f"config.{key}={config[key]!r} cannot be used with {section} (it {what}); set it to {off!r}.")
  if quantize.quant_config(config) is not None:
    raise ValueError(f"config.quant quantises the base, which {section} does not support; set "
                     "config.quant.kind='none'.")
  scale = loop.scale_settings(config)
  if (scale.micro_batches != 1 or scale.num_processes > 1 or scale.coordinator_address
      or scale.frozen_dtype != "float32"):
    raise ValueError(f"{section} runs on one device without micro-batches, with float32 frozen weights, but "
                     f"config.scale has micro_batches={scale.micro_batches}, num_processes={scale.num_processes}, "
                     f"coordinator_address={scale.coordinator_address!r}, frozen_dtype={scale.frozen_dtype!r}; set "
                     "them to 1, 0, '' and 'float32'.")


# config.multitask: tasks (two or more task specs), and per task (a list of one entry per task, or () for the
# run's own value): data (config.data keys overriding the run's), learning_rate, rank, alpha (`train.multitask_run`).
MULTITASK_KEYS = ("tasks", "data", "learning_rate", "rank", "alpha")


def check_multitask(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one sentence naming config.multitask.<key> or the key in the way) for a multi-task run
  (`train.multitask_run`) it cannot run."""
  section = config.multitask
  unknown = sorted(set(section) - set(MULTITASK_KEYS))
  if unknown:
    raise ValueError(f"config.multitask has the unknown key {unknown[0]!r}; valid: {list(MULTITASK_KEYS)}.")
  specs = section.get("tasks", ())
  if not isinstance(specs, (tuple, list)) or len(specs) < 2 or not all(isinstance(s, str) and s for s in specs):
    raise ValueError(f"config.multitask.tasks={specs!r} must list two or more tasks (built-in task names or data "
                     "files), e.g. ('imdb', 'bbc_news').")
  if "sweep" in config:
    raise ValueError("config.sweep cannot be used with config.multitask (a sweep trains every member on one "
                     "dataset); remove one of the two sections.")
  task = tasks.family(config).task
  for i, spec in enumerate(specs):
    try:
      data_files.check_task(task.kind, spec)
    except ValueError as e:
      raise ValueError(str(e).replace("config.task=", f"config.multitask.tasks[{i}]=", 1)) from None
  if config.get("modules_to_save") and task.kind != "sequence_classification":
    raise ValueError(f"config.modules_to_save={config.modules_to_save!r} cannot be used with config.multitask on a "
                     f"{task.kind} model, whose tasks share its output layer (each row would gather its own copy of "
                     "the module); it is for a classifier's new head; set it to ''.")
  k = len(specs)
  for key in ("data", "learning_rate", "rank", "alpha"):
    values = section.get(key, ())
    if not isinstance(values, (tuple, list)) or len(values) not in (0, k):
      raise ValueError(f"config.multitask.{key}={values!r} must be () (the run's own value for every task) or a "
                       f"list of {k} entries, one per task of config.multitask.tasks.")
  for i, options in enumerate(section.get("data", ())):
    unknown = sorted(set(options) - set(data_files.DATA_DEFAULTS)) if isinstance(options, dict) else None
    if unknown is None or unknown:
      raise ValueError(f"config.multitask.data[{i}]={options!r} must be a dict of config.data keys for task {i} "
                       f"({'not ' + repr(unknown[0]) if unknown else 'a dict'}); valid keys: "
                       f"{list(data_files.DATA_DEFAULTS)}.")
  for key in ("learning_rate", "rank", "alpha"):
    bad = [v for v in section.get(key, ()) if not _sweep_value_ok(key, v)]
    if bad:
      kind = {"rank": "integers >= 1", "learning_rate": "positive numbers", "alpha": "numbers"}[key]
      raise ValueError(f"config.multitask.{key} holds {bad[0]!r}; its values must be {kind}.")
  if config.batch_size % k:
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of the {k} tasks of "
                     "config.multitask.tasks: every batch holds batch_size / K rows of each task.")
  if config.method != "lora":
    raise ValueError(f"config.method={config.method!r} cannot be used with config.multitask, which trains one LoRA "
                     "adapter per task; set it to 'lora'.")
  _check_stacked_lora(config, "config.multitask", "adapters")


def location(key: str, spec: str) -> str:
  """The local path of config.<key> (`spec`: asset, path or hub id, downloaded when online), or a ValueError
  sentence saying why it cannot be found."""
  if spec.startswith(loop.ASSET):
    try:
      return loop.resolve(spec)
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"config.{key}={spec!r} names no installed asset: {e}") from None
  if os.path.exists(spec):
    return spec
  from huggingface_hub.utils import HFValidationError, validate_repo_id
  try:
    validate_repo_id(spec)
    hub_id = not spec.startswith(("/", "./", "../", "~")) and not spec.endswith(".gguf")
  except HFValidationError:
    hub_id = False
  if not hub_id:
    raise ValueError(f"config.{key}={spec!r} is neither an existing file or folder nor a hub id; give "
                     f"{MODEL_HELP}.")
  try:
    return hf_io.resolve(spec)
  except Exception as e:  # huggingface_hub's many errors (offline, not found, gated, network): one sentence
    why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if os.environ.get("HF_HUB_OFFLINE", "0") not in
           ("0", "") else f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    raise ValueError(f"config.{key}={spec!r} is not a local path and cannot be fetched from the Hugging Face hub "
                     f"({why}); give {MODEL_HELP}.") from None


def abstract_model(config: ml_collections.ConfigDict, path: str | None):
  """(model, parameter shapes) of config.model at `path` (None: the random model): built from config.json or the
  GGUF metadata, with `jax.eval_shape` of the init (no weights read)."""
  family = tasks.family(config)
  if path is None:
    try:
      model = family.random_model(config.model_shape.to_dict(), 2)
      return model, _shapes(family, model)
    except (TypeError, ValueError) as e:
      reason = str(e).strip().splitlines()[0]
      raise ValueError(f"config.model_shape does not make a {config.family} model ({reason}); its keys are Hugging "
                       f"Face {family.config_cls.__name__} fields, sizes positive.") from None
  try:
    gguf_file = gguf.find(path) if config.family in ("llama", "gemma") else None
    hf_config = gguf.read_config(gguf_file) if gguf_file else _folder_config(path)
  except ValueError as e:
    raise ValueError(str(e) if str(e).startswith("config.") else f"config.model={config.model!r}: {e}") from None
  module = pj.models.FAMILIES.get(hf_config.get("model_type"))
  if module != family.module.__name__:
    fits = sorted(name for name, f in tasks.FAMILIES.items() if f.module.__name__ == module)
    raise ValueError(f"config.model={config.model!r} is a {hf_config.get('model_type')!r} checkpoint but "
                     f"config.family={config.family!r}; valid families for it: {fits}.")
  heads = {"num_labels": 2} if family.task is tasks.SequenceClassification else {}
  model = family.model_cls(family.config_cls.from_hf(hf_config), **heads)
  return model, _shapes(family, model)


def _shapes(family, model):
  return jax.eval_shape(functools.partial(family.module.init_params, model), jax.random.key(0))


def _folder_config(path: str) -> dict:
  if not os.path.isdir(path):
    raise ValueError(f"config.model={path!r} is a file but not a .gguf; give {MODEL_HELP}.")
  try:
    return hf_io.read_config(path)
  except FileNotFoundError:
    raise ValueError(f"config.model={path!r} holds no config.json (nor one .gguf file); give {MODEL_HELP}.") from None


def _targets_key(section: str) -> str:
  return "lora_targets" if section == "unipelt" else "targets"


def check_method(config: ml_collections.ConfigDict, model, params, tokenizer_path: str) -> None:
  """Builds the method config(s) and initialises them on the parameter shapes `params` (under eval_shape)."""
  method_cfg = methods.method_config(config, getattr(model.config, "model_type", config.family), tokenizer_path)
  if method_cfg is None:
    return
  section = methods.METHODS[config.method][0]
  key = _targets_key(section)
  typed = config[section].get(key) if section in config else None
  try:
    jax.eval_shape(functools.partial(pj.init, method_cfg), jax.random.key(0), params)
  except re.error as e:
    raise ValueError(f"config.{section}.{key}={typed!r} is not a valid regex ({e}); give module names separated by "
                     "commas, \"all-linear\" or a regex.") from None
  except ValueError as e:
    message = re.sub(r"^ModulesToSaveConfig\.modules=.*? match no module",
                     f"config.modules_to_save={config.get('modules_to_save')!r} matches no module", str(e))
    experts = config.get("lora", {}).get("target_parameters")
    message = re.sub(r"^ExpertLoraConfig\.targets=.*? match no",
                     f"config.lora.target_parameters={experts!r} matches no", message)
    message = re.sub(r"^(?:\w*Config\.)?targets=.*? match no linear module",
                     f"config.{section}.{key}={typed!r} matches no linear module", message)
    raise ValueError(re.sub(methods.CONFIG_FIELD, f"config.{section}.", message)) from None


def check_workdir(workdir: str) -> None:
  """Raises ValueError unless `workdir` is a folder, or can be made one, that this user can write (creates
  nothing)."""
  if "://" in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"config.workdir={workdir!r} is a file; give a folder (new or one of an earlier run).")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"config.workdir={workdir!r} cannot be created: {existing!r} is a file.")
  try:  # a probe folder, removed at once: permissions, read-only mounts and pseudo file systems all show
    os.rmdir(tempfile.mkdtemp(prefix=".peftjax-probe-", dir=existing))
  except OSError as e:
    raise ValueError(f"config.workdir={workdir!r} cannot be written: {existing!r} refuses new folders "
                     f"({e.strerror}).") from None


def check(config: ml_collections.ConfigDict) -> None:
  """Validates every section of `config` before any data or weights are loaded (see the module docstring)."""
  check_sections(config)
  check_workdir(config.workdir)
  path = None if config.model in loop.RANDOM_MODELS else location("model", config.model)
  tokenizer = location("tokenizer", config.tokenizer) if config.tokenizer else ""
  model, params = abstract_model(config, path)
  quantize.check_targets(config, params)
  default = tasks.FAMILIES[config.family].default_tokenizer
  check_method(config, model, params, tokenizer or own_tokenizer(path) or (loop.resolve(default) if default else ""))


def own_tokenizer(path: str | None) -> str:
  """`path` when the checkpoint there has its own tokenizer (a .gguf file, or tokenizer files), else ""."""
  own = path is not None and (path.endswith(".gguf") or any(
      os.path.exists(os.path.join(path, f)) for f in ("tokenizer_config.json", "tokenizer.json")))
  return path if own else ""


COMPARE_KEYS = ("methods", "seeds", "learning_rates", "forgetting_task", "forgetting_examples", "latency_repeats")


def check_compare(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one sentence naming config.compare.<key>) for a bad comparison section (`train.compare`);
  each method's run is checked by `check` itself."""
  if "compare" not in config:
    raise ValueError("the config has no config.compare section; start from configs/compare_bert_sentiment.py.")
  compare = config.compare
  unknown = sorted(set(compare) - set(COMPARE_KEYS))
  if unknown:
    raise ValueError(f"config.compare has the unknown key {unknown[0]!r}; valid: {list(COMPARE_KEYS)}.")
  names = [n for n in compare.methods.split(",") if n]
  for name in names + list(compare.learning_rates):
    if name not in methods.METHODS:
      where = "methods" if name in names else "learning_rates"
      raise ValueError(f"config.compare.{where} names {name!r}, which is not a method; valid: {list(methods.METHODS)}.")
  if len(set(names)) != len(names):
    raise ValueError(f"config.compare.methods={compare.methods!r} names a method twice.")
  seeds = tuple(compare.seeds)
  if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.compare.seeds={seeds} must be distinct non-negative integers (at least one).")
  for name, rate in compare.learning_rates.items():
    if not rate > 0:
      raise ValueError(f"config.compare.learning_rates.{name}={rate} must be positive.")
  kind = tasks.family(config).task.kind if config.family in tasks.FAMILIES else None
  if compare.forgetting_task:
    if kind != "causal_lm":
      raise ValueError(f"config.compare.forgetting_task={compare.forgetting_task!r} is for a causal LM (its loss on "
                       f"other text); this is a {kind} model, so leave it empty.")
    try:
      data_files.check_task(kind, compare.forgetting_task)
    except ValueError as e:
      raise ValueError(str(e).replace("config.task=", "config.compare.forgetting_task=", 1)) from None
  for key in ("forgetting_examples", "latency_repeats"):
    if not isinstance(compare[key], int) or compare[key] < 1:
      raise ValueError(f"config.compare.{key}={compare[key]!r} must be a positive integer.")
