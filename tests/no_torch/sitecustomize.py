"""On PYTHONPATH, makes torch (and peft, which needs it) look uninstalled: no module, no distribution metadata.

The tests run `python -m train` this way to check that every config runs on the README's install (no torch).
"""

import importlib.machinery
import sys

BLOCKED = ("torch", "peft")


def _blocked(name: str) -> bool:
  return any(name == b or name.startswith(b + ".") for b in BLOCKED)


class _WithoutTorch(importlib.machinery.PathFinder):
  """The standard path finder, blind to the blocked packages."""

  @classmethod
  def find_spec(cls, name, path=None, target=None):
    return None if _blocked(name) else super().find_spec(name, path, target)

  @classmethod
  def find_distributions(cls, *args, **kwargs):
    return (d for d in super().find_distributions(*args, **kwargs) if not _blocked((d.metadata["Name"] or "").lower()))


sys.meta_path = [_WithoutTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
