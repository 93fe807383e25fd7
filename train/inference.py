"""A trained model ready to run: the base and its adapter from a workdir, a PEFT folder, or a merged model folder.

`load(source)` takes
  a training workdir (it holds run.json, `train.run_record`): the base the run used and workdir/adapter (a Hugging Face
    PEFT folder or an Orbax tree), or workdir/merged after full fine-tuning;
  a Hugging Face PEFT folder (adapter_config.json): the base it names (base_model_name_or_path) plus the adapter;
  a model folder (config.json + safetensors, e.g. workdir/merged): the model as it is;
  a hub id of either kind (downloaded when online).
The same model loading and `pj.apply` as training (`train.loop`), so what runs here is what was trained.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
from safetensors import safe_open

import peftjax as pj
from peftjax import checkpoint, interop, quant, sharding
from peftjax import models as pj_models
from peftjax.models import gguf, hf_io

from train import data_files, loop, quantize, run_record, steps, tasks


@dataclasses.dataclass
class Loaded:
  """A model, its parameters and what reading its inputs takes."""
  family: tasks.Family
  model: Any
  params: Any              # the base tree (with `adapters`), or the whole model when `method_cfg` is None
  adapters: Any            # None for a merged / fully trained model
  method_cfg: Any
  tokenizer: Any
  label_names: list[str] | None
  data: ml_collections.ConfigDict  # the run's config.data (which columns hold the inputs)
  lengths: dict            # the run's token lengths ({'max_length'} or {'source_length', 'target_length'})
  quantized: bool = False  # `params` holds a quantised base (config.quant), run through peftjax.quant

  @property
  def task(self):
    return self.family.task

  @functools.cached_property
  def apply_fn(self):
    """apply_fn(params, *args, **kwargs) of the adapted (or plain) model, for params=`self.params_for_apply` (one
    function object, so the models' generate compiles once)."""
    if self.method_cfg is None:
      return lambda p, *args, **kwargs: self.model.apply({"params": p}, *args, **kwargs)
    adapted = (quant.apply if self.quantized else pj.apply)(self.method_cfg, self.model.apply)
    return lambda p, *args, **kwargs: adapted(p[0], p[1], *args, **kwargs)

  @functools.cached_property
  def forward(self):
    """The training forward pass (`train.steps.make_forward`), jit-compiled: forward(trainable, frozen, batch)."""
    return jax.jit(steps.make_forward(self.model, self.task, self.method_cfg,
                                      quant.wrap(self.model.apply) if self.quantized else None))

  @property
  def params_for_apply(self):
    return self.params if self.method_cfg is None else (self.params, self.adapters)


def _family_of(model) -> tasks.Family:
  for _, _, family in tasks.variants():
    if type(model) is family.model_cls:
      return family
  valid = sorted({f.model_cls.__name__ for _, _, f in tasks.variants()})
  raise ValueError(f"the model is a {type(model).__name__}, which predict cannot run; valid: {valid}.")


def _tokenizer(folder: str):
  tokenizer = loop.load_tokenizer(folder)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def _label_names(model) -> list[str] | None:
  names = list(getattr(model.config, "id2label", ()) or ())
  return names if names and len(names) == getattr(model, "num_labels", -1) else None


def from_model_folder(folder: str, data: ml_collections.ConfigDict | None = None,
                      lengths: dict | None = None) -> Loaded:
  """A Hugging Face model folder with its tokenizer (e.g. workdir/merged), run as it is."""
  model, params = pj_models.from_pretrained(folder)
  return Loaded(_family_of(model), model, params, None, None, _tokenizer(folder), _label_names(model),
                data or data_files.data_config(), lengths or {})


def from_workdir(workdir: str) -> Loaded:
  """The model a training run in `workdir` produced (its base and adapter, or merged/ after full fine-tuning)."""
  config, label_names, num_labels = run_record.load(workdir)
  lengths = {k: config[k] for k in tasks.family(config).task.length_keys}
  if config.method == "full":
    return from_model_folder(os.path.join(workdir, "merged"), data_files.settings(config), lengths)
  random_base = config.model in loop.RANDOM_MODELS
  if random_base:  # its exported base is already the dequantised quantised base, if the run had one
    config.model = os.path.join(workdir, "base")
  model, params, tokenizer = loop.load_model(config, num_labels)
  if label_names and hasattr(model.config, "id2label"):
    model = model.clone(config=dataclasses.replace(model.config, id2label=tuple(label_names)))
  method_cfg, trainable, _ = loop.trainable_and_frozen(config, model, params, tokenizer)
  folder = os.path.join(workdir, "adapter")
  if os.path.exists(os.path.join(folder, "adapter_config.json")):
    method_cfg, adapters = interop.load_adapter(folder, params)
  else:
    adapters = checkpoint.load_adapters(folder, trainable)
  quantized = quantize.quant_config(config) is not None and not random_base
  if quantized:  # the base the run trained over: stored in config.scale.frozen_dtype, then quantised (deterministic)
    params = quantize.quantized_base(config, sharding.cast_floating(
        params, loop.DTYPES[loop.scale_settings(config).frozen_dtype]))
  return Loaded(tasks.family(config), model, params, adapters, method_cfg, tokenizer, label_names,
                data_files.settings(config), lengths, quantized)


def _num_labels(folder: str) -> int | None:
  """The rows of a saved classification head (classifier.weight, classifier.out_proj.weight, or a decoder's
  score.weight) in a PEFT folder."""
  with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="numpy") as f:
    heads = sorted((k for k in f.keys() if k.endswith(".weight") and (".classifier." in f".{k}" or
                                                                      k.endswith("score.weight"))),
                   key=lambda k: "out_proj" not in k)
    return int(f.get_slice(heads[0]).get_shape()[0]) if heads else None


def from_adapter_folder(folder: str) -> Loaded:
  """A Hugging Face PEFT folder on the base model it names."""
  with open(os.path.join(folder, "adapter_config.json")) as f:
    adapter_config = json.load(f)
  base, task_type = adapter_config.get("base_model_name_or_path"), adapter_config.get("task_type")
  if not base:
    raise ValueError(f"{folder!r}: adapter_config.json names no base_model_name_or_path, so the base is unknown.")
  base_path = loop.resolve(base)
  base_config = gguf.read_config(base_path) if base_path.endswith(".gguf") else hf_io.read_config(base_path)
  model_type = base_config.get("model_type")
  module = pj_models.FAMILIES.get(model_type, "")
  found = [(name, kind, family) for name, kind, family in tasks.variants()
           if family.module.__name__ == module and family.task.peft_task_type == task_type]
  if not found:
    valid = sorted({(f.module.__name__.rsplit(".", 1)[1], f.task.peft_task_type) for _, _, f in tasks.variants()})
    raise ValueError(f"{folder!r}: a {task_type} adapter for a model_type={model_type!r} base, which predict cannot "
                     f"run; valid (family, task_type): {valid}.")
  name, kind, family = found[0]
  config = ml_collections.ConfigDict(dict(family=name, task_type=kind, model=base, model_shape={}, tokenizer="",
                                          compute_dtype="float32", seed=0))
  model, params, tokenizer = loop.load_model(config, _num_labels(folder) or 2)
  method_cfg, adapters = interop.load_adapter(folder, params)
  return Loaded(family, model, params, adapters, method_cfg, tokenizer, _label_names(model),
                data_files.data_config(), {})


def load(source: str) -> Loaded:
  """A workdir, a PEFT folder, a model folder, or a hub id of a PEFT or model repository (see the module doc)."""
  if not os.path.isdir(source):
    if os.path.exists(source):
      raise ValueError(f"{source!r} is a file; pass a workdir, a PEFT adapter folder or a model folder.")
    from huggingface_hub import snapshot_download  # noqa: PLC0415 (only online)
    try:
      source = snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 (offline, unknown repository, ...)
      raise ValueError(f"{source!r} is not a local folder and could not be downloaded from the hub "
                       f"({type(e).__name__}).") from None
  if os.path.exists(os.path.join(source, run_record.FILE)):
    return from_workdir(source)
  if os.path.exists(os.path.join(source, "adapter_config.json")):
    return from_adapter_folder(source)
  if os.path.exists(os.path.join(source, "config.json")):
    return from_model_folder(source)
  raise ValueError(f"{source!r} holds neither run.json (a workdir), adapter_config.json (a PEFT folder) nor "
                   "config.json (a model folder).")
