"""Named adapters on one base: a thin registry over (config, adapter tree) pairs, as PEFT's adapter names.

The registry never owns or mutates the model: it is a dictionary {name: (config, tree)} plus the name of the
active adapter, and `apply` returns the plain `pj.apply` of the active one (the base model when none is
active or inside `disabled()`).  Every operation is also a pure function of the dictionary underneath
(`read_layout` / `write_layout` for folders).

Saving writes PEFT's multi-adapter layout, as ``PeftModel.save_pretrained`` does: the adapter named
"default" at the folder's root, every other adapter in a subfolder named after it, so that
``PeftModel.from_pretrained(base, folder)`` reads the default and ``load_adapter(folder, adapter_name=NAME,
subfolder=NAME)`` (or ``from_pretrained(base, folder + "/" + NAME, adapter_name=NAME)``) the others.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from peftjax import adapter_schema, api, interop
from peftjax.models import hf_io

DEFAULT = "default"  # PEFT's name of the adapter saved at a folder's root


def check_name(name: Any) -> str:
  """`name` if it can name an adapter (and a subfolder), else ValueError naming it."""
  if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
    raise ValueError(f"adapter name {name!r} is not valid; use a non-empty string without '/' or a leading '.' "
                     "(it names the adapter's subfolder).")
  return name


def read_layout(folder: str, params: dict) -> dict[str, tuple[Any, Any]]:
  """{name: (config, tree)} of a PEFT multi-adapter folder: its root adapter (if any) as "default" and each
  subfolder holding an adapter_config.json under the subfolder's name; AdapterFormatError if it holds none."""
  found = {}
  if os.path.isfile(os.path.join(folder, adapter_schema.ADAPTER_CONFIG)):
    found[DEFAULT] = interop.load_adapter(folder, params)
  if os.path.isdir(folder):
    for entry in sorted(os.listdir(folder)):
      sub = os.path.join(folder, entry)
      if not entry.startswith(".") and os.path.isfile(os.path.join(sub, adapter_schema.ADAPTER_CONFIG)):
        found[entry] = interop.load_adapter(sub, params)
  if not found:
    raise adapter_schema.AdapterFormatError(
        f"{folder!r} holds no {adapter_schema.ADAPTER_CONFIG}, at its root or in a subfolder; a saved set of "
        "adapters is PEFT's layout (the default adapter at the root, the others in subfolders named after them).")
  return found


def write_layout(folder: str, adapters: dict[str, tuple[Any, Any]], base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> None:
  """Writes `adapters` ({name: (config, tree)}) in PEFT's layout into `folder`, replaced whole via a temporary
  folder; every adapter is converted (and checked) before anything is written."""
  files = {check_name(name): interop.adapter_files(cfg, tree, base_model_name_or_path, task_type)
           for name, (cfg, tree) in adapters.items()}
  with hf_io.replacing_folder(folder) as tmp:
    for name, (config, tensors) in files.items():
      if name == DEFAULT:
        interop.write_folder(os.path.join(tmp, ".root"), config, tensors)
        for file in os.listdir(os.path.join(tmp, ".root")):
          os.rename(os.path.join(tmp, ".root", file), os.path.join(tmp, file))
        os.rmdir(os.path.join(tmp, ".root"))
      else:
        interop.write_folder(os.path.join(tmp, name), config, tensors)


class AdapterRegistry:
  """Named adapters for one base tree `params`: add, load, set_active, delete, disabled(), list, save.

  `apply(model.apply)` gives fn(params, *args, **kwargs) running the active adapter (pass the same base
  `params`); with no active adapter, or inside `with registry.disabled():`, it runs the base model.
  """

  def __init__(self, params: dict):
    self.params = params
    self.adapters: dict[str, tuple[Any, Any]] = {}
    self.active: str | None = None
    self._disabled = False

  def add(self, name: str, cfg: Any, tree: Any, activate: bool = False) -> None:
    """Registers (cfg, tree) under `name` (ValueError if taken); the first adapter added becomes active."""
    if check_name(name) in self.adapters:
      raise ValueError(f"adapter name {name!r} is already registered; delete it first or pick another name "
                       f"(registered: {sorted(self.adapters)}).")
    self.adapters[name] = (cfg, tree)
    if activate or self.active is None:
      self.active = name

  def load(self, name: str, folder: str, activate: bool = False) -> None:
    """Adds the PEFT adapter folder `folder` (any method `peftjax.interop.load_adapter` reads) as `name`."""
    check_name(name)
    self.add(name, *interop.load_adapter(folder, self.params), activate=activate)

  def load_all(self, folder: str) -> list[str]:
    """Adds every adapter of a PEFT multi-adapter folder (see `read_layout`); returns their names."""
    found = read_layout(folder, self.params)
    taken = sorted(set(found) & set(self.adapters))
    if taken:
      raise ValueError(f"{folder!r} holds adapters {taken} whose names are already registered.")
    for name, (cfg, tree) in found.items():
      self.add(name, cfg, tree)
    return list(found)

  def _known(self, name: str) -> str:
    if name not in self.adapters:
      raise KeyError(f"no adapter named {name!r}; registered: {sorted(self.adapters)}.")
    return name

  def set_active(self, name: str) -> None:
    """Makes `name` the adapter that `apply` runs."""
    self.active = self._known(name)

  def delete(self, name: str) -> None:
    """Removes `name`; if it was active, no adapter is active afterwards."""
    del self.adapters[self._known(name)]
    if self.active == name:
      self.active = None

  def get(self, name: str | None = None) -> tuple[Any, Any]:
    """(config, tree) of `name` (default: the active adapter)."""
    name = self.active if name is None else name
    if name is None:
      raise KeyError("no adapter is active; set_active(NAME) first.")
    return self.adapters[self._known(name)]

  def list(self) -> dict[str, Any]:
    """{name: config} in the order added."""
    return {name: cfg for name, (cfg, _) in self.adapters.items()}

  @contextlib.contextmanager
  def disabled(self) -> Iterator[None]:
    """Within the block, `apply`'s functions run the base model (PEFT's disable_adapter())."""
    previous, self._disabled = self._disabled, True
    try:
      yield
    finally:
      self._disabled = previous

  def apply(self, model_apply: Callable[..., Any]) -> Callable[..., Any]:
    """fn(params, *args, **kwargs): the active adapter's `pj.apply`, or the base model's apply when disabled or
    none is active.  The choice is made when fn is called (so `disabled()` acts where the call runs); under
    jax.jit it is fixed when fn is traced, so jit a fresh `registry.apply(...)` after switching adapters."""
    def run(params, *args, **kwargs):
      if self._disabled or self.active is None:
        return model_apply({"params": params}, *args, **kwargs)
      cfg, tree = self.adapters[self.active]
      return api.apply(cfg, model_apply)(params, tree, *args, **kwargs)
    return run

  def save(self, folder: str, names: list[str] | None = None, base_model_name_or_path: str | None = None,
           task_type: str | None = None) -> None:
    """Writes `names` (default: all) in PEFT's multi-adapter layout (see `write_layout`)."""
    chosen = list(self.adapters) if names is None else [self._known(n) for n in names]
    write_layout(folder, {n: self.adapters[n] for n in chosen}, base_model_name_or_path, task_type)
