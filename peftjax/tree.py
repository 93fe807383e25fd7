"""Parameter-tree utilities: '/'-joined paths, target matching, masks, split/combine, counts.

Trees are nested dicts (what Flax `init` returns under "params").  A *module path* is
the path of the dict that holds a layer's leaves, e.g. ``encoder/block_0/layer_0/SelfAttention/q``
for the leaf ``.../q/kernel``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Tree = Mapping[str, Any]

ALL_LINEAR = "all-linear"
# Output heads that HF PEFT leaves out of "all-linear".
OUTPUT_HEADS = ("lm_head", "classifier", "score", "qa_outputs")


def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
  """Flattens a nested dict into {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


# Module names ending in _<digits> that are not list indices: T5's wi_0 / wi_1, GPT-2's ln_1 / ln_2.
_NAMES_WITH_DIGITS = re.compile(r"(wi|ln)_\d+")


def hf_name(path: str) -> str:
  """Our module path -> Hugging Face PyTorch name: 'encoder/block_0/layer_1/wo' -> 'encoder.block.0.layer.1.wo'
  (list entries become '.N'; T5's wi_0 / wi_1 and GPT-2's ln_1 / ln_2 keep their names)."""
  return ".".join(part if _NAMES_WITH_DIGITS.fullmatch(part) else re.sub(r"^(.+)_(\d+)$", r"\1.\2", part)
                  for part in path.split("/"))


def linear_modules(params: Tree) -> list[str]:
  """Paths of every module holding a 'kernel' of rank >= 2 (Dense layers, possibly layer-stacked)."""
  return [p[: -len("/kernel")] for p, leaf in flatten(params).items()
          if p.endswith("/kernel") and np.ndim(leaf) >= 2]


def _matches(path: str, target: str) -> bool:
  """HF list semantics on the dotted name ('block.1.q', 'SelfAttention.q') or on our path ('block_1/q')."""
  dotted = hf_name(path)
  return (dotted == target or dotted.endswith("." + target)
          or path == target or path.endswith("/" + target))


def layer_index(path: str, layers_pattern: Sequence[str] = ()) -> int | None:
  """The layer number in a module's dotted name, as PEFT finds it for layers_to_transform: the first numbered
  segment ('model.layers.3.self_attn.q_proj' -> 3), or the one after a `layers_pattern` entry; None if none."""
  dotted = hf_name(path)
  patterns = ([rf"(?:^|.*?\.){p}\.(\d+)\." for p in layers_pattern] if layers_pattern
              else [r".*?\.[^.]*\.(\d+)\."])
  for pattern in patterns:
    match = re.match(pattern, dotted)
    if match:
      return int(match.group(1))
  return None


def match_targets(params: Tree, targets: str | Sequence[str], exclude: Sequence[str] = (),
                  layers: Sequence[int] = (), layers_pattern: Sequence[str] = ()) -> list[str]:
  """Module paths of the linear layers selected by `targets`, Hugging Face PEFT style.

  `targets` is a list of names (a module whose dotted name equals an entry or ends with '.' + entry,
  e.g. ("q", "v") or ("SelfAttention.q", "block.1.q"); '/'-joined paths like "block_1/q" work too), the
  string "all-linear" (every linear layer but the output head), or any other string, a regex that must fully
  match the '/'-joined module path or its dotted Hugging Face name.  `layers` (PEFT's layers_to_transform) keeps,
  of the modules a list entry matches as a suffix, those in the listed layers (`layer_index`, with
  `layers_pattern`); a module named in full is kept whatever its layer, as in PEFT.  Raises ValueError when
  nothing matches.
  """
  candidates = linear_modules(params)
  if isinstance(targets, str):
    if targets == ALL_LINEAR:
      found = [p for p in candidates if p.split("/")[-1] not in OUTPUT_HEADS]
    else:
      pattern = re.compile(targets)
      found = [p for p in candidates if pattern.fullmatch(p) or pattern.fullmatch(hf_name(p))]
  else:
    found = [p for p in candidates if any(_matches(p, t) for t in targets)
             and (not layers or hf_name(p) in targets or layer_index(p, layers_pattern) in layers)]
  found = [p for p in found if not any(_matches(p, e) for e in exclude)]
  if not found:
    names = sorted({p.split("/")[-1] for p in candidates})
    raise ValueError(f"targets={targets!r} match no linear module; valid module names are {names} "
                     f"(e.g. path {candidates[0] if candidates else None!r}), \"all-linear\", or a regex.")
  return found


def mask(tree: Tree, select: Callable[[str, Any], bool] | Iterable[str]) -> dict[str, Any]:
  """Boolean tree of `tree`'s shape: True where `select(path, leaf)` holds (or path is listed)."""
  if not callable(select):
    chosen = set(select)
    select = lambda path, leaf: path in chosen  # noqa: E731
  return unflatten({p: bool(select(p, v)) for p, v in flatten(tree).items()})


def split(tree: Tree, bool_mask: Tree) -> tuple[dict, dict]:
  """Splits `tree` into (selected, rest): two sparse trees holding only their own leaves."""
  flat, keep = flatten(tree), flatten(bool_mask)
  return (unflatten({p: v for p, v in flat.items() if keep[p]}),
          unflatten({p: v for p, v in flat.items() if not keep[p]}))


def combine(*trees: Tree) -> dict:
  """Merges sparse trees with disjoint leaves back into one tree (inverse of `split`)."""
  flat: dict[str, Any] = {}
  for tree in trees:
    for path, value in flatten(tree).items():
      if path in flat:
        raise ValueError(f"combine: leaf {path!r} is present in more than one tree.")
      flat[path] = value
  return unflatten(flat)


def count(tree: Tree) -> int:
  """Number of scalar parameters (works on arrays and jax.ShapeDtypeStruct leaves)."""
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def nbytes(tree: Tree) -> int:
  """Bytes held by the leaves of `tree`."""
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def print_trainable_parameters(trainable: Tree, frozen: Tree) -> str:
  """Prints (and returns) Hugging Face peft's line: trainable params: N || all params: M || trainable%: P."""
  n_train = count(trainable)
  n_all = n_train + count(frozen)
  line = f"trainable params: {n_train:,d} || all params: {n_all:,d} || trainable%: {100 * n_train / n_all:.4f}"
  print(line)
  return line


def optax_freeze(tx: optax.GradientTransformation, trainable_mask: Tree) -> optax.GradientTransformation:
  """Wraps `tx` for a full tree: trainable leaves get `tx`, the rest get zero updates and no state."""
  labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask)
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def stack_layers(tree: Tree, layer_list: str) -> dict:
  """Per-layer tree (<list>_0/..., <list>_1/...) -> scanned layout (<list>/... with a leading layer axis).

  `layer_list` is a regex of the list's path (e.g. 'model/layers').  Works on parameters and on adapter trees
  that mirror them.
  """
  pattern, layers, rest = re.compile(rf"^({layer_list})_(\d+)/"), {}, {}
  for path, leaf in flatten(tree).items():
    found = pattern.match(path)
    if found:
      layers.setdefault(f"{found.group(1)}/{path[found.end():]}", {})[int(found.group(2))] = leaf
    else:
      rest[path] = leaf
  for path, by_layer in layers.items():
    rest[path] = jnp.stack([by_layer[i] for i in range(len(by_layer))])
  return unflatten(rest)


def unstack_layers(tree: Tree, layer_list: str) -> dict:
  """Inverse of `stack_layers`."""
  pattern, out = re.compile(rf"^({layer_list})/"), {}
  for path, leaf in flatten(tree).items():
    found = pattern.match(path)
    if found:
      for i in range(leaf.shape[0]):
        out[f"{found.group(1)}_{i}/{path[found.end():]}"] = leaf[i]
    else:
      out[path] = leaf
  return unflatten(out)

