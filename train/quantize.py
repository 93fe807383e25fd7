"""config.quant: a quantised frozen base (QLoRA) for `python -m train`, e.g. `--config.quant.kind=nf4`.

Keys (QUANT_DEFAULTS): kind ("none", "nf4", "int4", "int8", or "gguf": a GGUF model's own Q4_0 / Q4_1 / Q8_0
blocks of the targeted layers stay as the frozen base, the other layers dequantised), block_size, double_quant,
targets ("all-linear" or comma-separated module names / a regex), exclude (comma-separated).  The base is
quantised once after it is placed on the mesh, and again identically on resume (quantisation is deterministic;
checkpoints hold only the trained leaves).  The quantised kernels' codes and scales are sharded along their
output dimension like the kernel.  A merged export folds the adapters into the dequantised weights, writes them
in full precision and prints the error re-quantising them would add.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from peftjax import quant, tree as ptree
from peftjax.models import gguf

from train import methods

QUANT_DEFAULTS = dict(kind="none", block_size=64, double_quant=True, targets="all-linear", exclude="")


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.quant with QUANT_DEFAULTS for the keys it leaves out."""
  return ml_collections.ConfigDict({**QUANT_DEFAULTS, **config.get("quant", ml_collections.ConfigDict()).to_dict()})


def quant_config(config: ml_collections.ConfigDict) -> quant.QuantConfig | None:
  """The QuantConfig config.quant asks for, None for kind "none"; ValueError naming config.quant.<key>."""
  unknown = sorted(set(config.get("quant", ml_collections.ConfigDict()).keys()) - set(QUANT_DEFAULTS))
  if unknown:
    raise ValueError(f"config.quant.{unknown[0]} is not a quantisation setting; valid: {sorted(QUANT_DEFAULTS)}.")
  q = settings(config)
  if q.kind == "none":
    return None
  if q.kind not in quant.KINDS:
    raise ValueError(f"config.quant.kind={q.kind!r} is not supported; valid: {['none', *quant.KINDS]}.")
  if not isinstance(q.block_size, int) or q.block_size < 2 or q.block_size % 2:
    raise ValueError(f"config.quant.block_size={q.block_size!r} must be an even integer >= 2 (QLoRA: 64).")
  if q.kind == "gguf" and not str(config.model).endswith(".gguf"):
    raise ValueError(f"config.quant.kind='gguf' keeps a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks as the frozen base, but "
                     f"config.model={config.model!r} is not a .gguf file; name one or choose another kind.")
  if config.method == "full":
    raise ValueError("config.quant.kind quantises the frozen base, but config.method='full' trains every weight; "
                     "choose a parameter-efficient method (e.g. lora) or config.quant.kind='none'.")
  exclude = tuple(n for n in str(q.exclude).split(",") if n)
  return quant.QuantConfig(kind=q.kind, block_size=q.block_size, double_quant=bool(q.double_quant),
                           targets=methods.names_or_regex(q.targets), exclude=exclude)


def check_targets(config: ml_collections.ConfigDict, params) -> None:
  """ValueError naming config.quant.targets when it selects no linear layer of `params` (shapes suffice)."""
  cfg = quant_config(config)
  if cfg is None:
    return
  try:
    ptree.match_targets(params, cfg.targets, cfg.exclude)
  except ValueError as e:
    raise ValueError(str(e).replace(f"targets={cfg.targets!r}", f"config.quant.targets={settings(config).targets!r}",
                                    1)) from None


def quantized_base(config: ml_collections.ConfigDict, frozen: dict) -> dict:
  """`frozen` with config.quant's kernels quantised (or kept in the GGUF file's blocks), as training runs it;
  unchanged when quantisation is off."""
  cfg = quant_config(config)
  if cfg is None:
    return frozen
  if cfg.kind == "gguf":
    from train import loop  # loop imports this module
    return quant.keep_gguf_blocks(cfg, frozen, gguf.read_blocks(loop.resolve(config.model)))
  return quant.quantize(cfg, frozen)


def quantize_frozen(config: ml_collections.ConfigDict, frozen: dict, frozen_shardings: dict) -> tuple[dict, dict]:
  """(frozen, frozen_shardings) with config.quant's kernels quantised (codes and scales sharded along the output
  dimension as the kernel, `quant.weight_sharding`); unchanged when
  quantisation is off.  Prints the stored size."""
  cfg = quant_config(config)
  if cfg is None:
    return frozen, frozen_shardings
  before = quant.stored_bytes(frozen)
  frozen = quantized_base(config, frozen)
  flat = ptree.flatten(frozen_shardings)
  for path, leaf in ptree.flatten(frozen).items():
    if quant.is_quantized(leaf):
      flat[path] = quant.weight_sharding(leaf, flat[path])
  frozen_shardings = ptree.unflatten(flat)
  frozen = jax.device_put(frozen, frozen_shardings)
  leaves = jax.tree.leaves(frozen, is_leaf=quant.is_quantized)
  kinds = sorted({leaf.kind for leaf in leaves if quant.is_quantized(leaf)})
  name = (f"the GGUF file's own blocks ({', '.join(quant.GGUF_KINDS[k] for k in kinds)})" if cfg.kind == "gguf"
          else f"{cfg.kind}{' + double quantisation' if cfg.double_quant else ''}")
  print(f"quantised the base to {name}: "
        f"{quant.stored_bytes(frozen) / 2**20:.1f} MiB instead of {before / 2**20:.1f} MiB "
        f"({quant.stored_bytes(frozen, quantized_only=True) * 8 / max(_quantized_count(frozen), 1):.3f} bits per "
        "quantised weight)")
  return frozen, frozen_shardings


def _quantized_count(frozen: dict) -> int:
  leaves = jax.tree.leaves(frozen, is_leaf=quant.is_quantized)
  return sum(math.prod(x.shape) for x in leaves if quant.is_quantized(x))


def merged_for_export(config: ml_collections.ConfigDict, method_cfg, frozen: dict, trainable) -> dict:
  """The adapters folded into the dequantised base (full precision, for a Hugging Face folder); prints the error
  re-quantising the merged weights adds."""
  merged, report = quant.merge(method_cfg, quant_config(config), frozen, trainable)
  if jax.process_index() == 0:
    print(quant.report_line(report))
  return merged
