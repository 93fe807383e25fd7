"""Reading and writing Hugging Face checkpoint folders (config.json + safetensors) with no torch.

Our parameter paths mirror Hugging Face module names: ``encoder/block_0/layer_0/SelfAttention/q/kernel``
is ``encoder.block.0.layer.0.SelfAttention.q.weight``.  Leaf names map as kernel -> weight
(transposed: Flax stores (in, out), PyTorch Linear (out, in)), embedding/scale -> weight,
bias -> bias.  Model files pass `rename` for keys that differ and `transpose` for layouts that do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable, Mapping

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from peftjax import finite
from peftjax import tree as ptree

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def resolve(path_or_hub_id: str) -> str:
  """A local folder as is; otherwise a hub id, downloaded (config + safetensors + tokenizer) when online."""
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  if os.path.exists(path_or_hub_id):
    raise ValueError(f"{path_or_hub_id!r} is a file; pass the checkpoint folder that holds config.json.")
  from huggingface_hub import snapshot_download  # only needed online
  return snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])


def read_config(folder: str) -> dict:
  """The folder's config.json as a dict."""
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{folder!r} has no config.json; a Hugging Face checkpoint folder needs one.")
  with open(path) as f:
    return json.load(f)


def safetensors_files(folder: str) -> list[str]:
  """The weight files of a folder: model.safetensors, or the shards listed in its index."""
  index = os.path.join(folder, SAFE_INDEX)
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(folder, s) for s in shards]
  single = os.path.join(folder, SAFE_WEIGHTS)
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(f"{folder!r} holds neither {SAFE_WEIGHTS} nor {SAFE_INDEX}.")


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder as numpy arrays, keyed by their Hugging Face names."""
  state = {}
  for file in safetensors_files(folder):
    with safe_open(file, framework="numpy") as f:
      for key in f.keys():
        state[key] = f.get_tensor(key)
  return state


def hf_key(path: str) -> str:
  """Our leaf path -> Hugging Face tensor name."""
  module, leaf = path.rsplit("/", 1)
  return f"{ptree.hf_name(module)}.{_LEAF_TO_HF.get(leaf, leaf)}"


def params_from_state_dict(state: Mapping[str, np.ndarray], abstract: Any,
                           rename: Callable[[str], str] = hf_key,
                           transpose: Callable[[str], bool] = lambda path: path.endswith("/kernel"),
                           dtype=None) -> dict:
  """Builds our parameter tree (shaped like `abstract`, e.g. from jax.eval_shape) from HF tensors.

  Raises one error naming every missing key and every shape mismatch (key and both shapes).
  """
  out, missing, mismatched = {}, [], []
  for path, spec in ptree.flatten(abstract).items():
    key = rename(path)
    if key not in state:
      missing.append(key)
      continue
    value = np.asarray(state[key])
    if transpose(path):
      value = np.swapaxes(value, -1, -2)
    if value.shape != tuple(spec.shape):
      mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(spec.shape)}")
      continue
    out[path] = jax.numpy.asarray(value, dtype or spec.dtype)
  if missing or mismatched:
    raise ValueError("checkpoint does not fit the model: " + "; ".join(
        ([f"missing tensors {missing}"] if missing else []) + mismatched))
  return ptree.unflatten(out)


def params_with_new_head(state: Mapping[str, np.ndarray], abstract: Any, head: tuple[str, ...], owner: str,
                         initializer_range: float, rng: jax.Array | None, rename: Callable[[str], str] = hf_key,
                         transpose: Callable[[str], bool] = lambda path: path.endswith("/kernel"),
                         dtype=None) -> dict:
  """`params_from_state_dict`, except that leaves under the `head` path prefixes (a task head) that the checkpoint
  lacks are initialised as transformers does (normal(initializer_range) kernels from `rng`, zero biases), with a
  warning naming them and `owner` (the model class)."""
  flat = ptree.flatten(abstract)
  new = sorted(p for p in flat if p.startswith(head) and rename(p) not in state)
  params = ptree.flatten(params_from_state_dict(state, ptree.unflatten({p: s for p, s in flat.items() if p not in new}),
                                                rename=rename, transpose=transpose, dtype=dtype))
  if new:
    warnings.warn(f"{owner}: {[rename(p) for p in new]} are not in the checkpoint and were newly initialised; "
                  "train them before use.")
    keys = jax.random.split(jax.random.key(0) if rng is None else rng, len(new))
    for path, key in zip(new, keys):
      spec = flat[path]
      params[path] = (jax.random.normal(key, spec.shape, dtype or spec.dtype) * initializer_range
                      if path.endswith("/kernel") else jax.numpy.zeros(spec.shape, dtype or spec.dtype))
  return ptree.unflatten(params)


def id2label_from_hf(hf: Mapping[str, Any]) -> tuple[str, ...]:
  """config.json's id2label ({"0": "negative", ...}) as the label names in label order; () when it has none."""
  labels = {int(i): label for i, label in (hf.get("id2label") or {}).items()}
  return tuple(labels[i] for i in range(len(labels)))


def label_fields(id2label: tuple[str, ...], num_labels: int) -> dict:
  """config.json's id2label / label2id for a head of `num_labels` classes: the names when they are as many, else
  LABEL_0, LABEL_1, ... as transformers names them."""
  names = id2label if len(id2label) == num_labels else tuple(f"LABEL_{i}" for i in range(num_labels))
  return {"id2label": {str(i): name for i, name in enumerate(names)},
          "label2id": {name: i for i, name in enumerate(names)}}


def state_dict_from_params(params: Any, rename: Callable[[str], str] = hf_key,
                           transpose: Callable[[str], bool] = lambda path: path.endswith("/kernel")) -> dict:
  """Inverse of `params_from_state_dict`: {HF name: contiguous numpy array}."""
  state = {}
  for path, value in ptree.flatten(params).items():
    value = np.asarray(jax.device_get(value))
    state[rename(path)] = np.ascontiguousarray(np.swapaxes(value, -1, -2) if transpose(path) else value)
  return state


@contextlib.contextmanager
def replacing_folder(folder: str):
  """Yields a new temporary folder beside `folder`; on success it replaces `folder` whole (rename), on any error
  it is removed and `folder` is left as it was."""
  parent = os.path.dirname(os.path.abspath(folder))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    yield tmp
    if os.path.isdir(folder):
      shutil.rmtree(folder)
    os.rename(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_folder(folder: str, config: dict, state: Mapping[str, np.ndarray], extra_files: Mapping[str, str] = ()) -> None:
  """Writes config.json + model.safetensors (+ extra text files) atomically: temp folder, then rename.

  A tensor holding NaN or inf is refused (`peftjax.finite`) before anything is written."""
  finite.check(dict(state), f"the model {os.path.join(folder, SAFE_WEIGHTS)!r}")
  with replacing_folder(folder) as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    save_file(dict(state), os.path.join(tmp, SAFE_WEIGHTS), metadata={"format": "pt"})
    for name, text in dict(extra_files).items():
      with open(os.path.join(tmp, name), "w") as f:
        f.write(text)
