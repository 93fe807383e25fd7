"""One run of a comparison, in its own process: `python -m train.compare_run SPEC.json` (`train.compare` starts it).

SPEC.json holds {'mode': 'train' or 'base', 'config': a `python -m train` config (dict), 'profile': whether to
measure the compiled step's memory and the inference latency, 'latency_repeats', 'forgetting': {'task', 'examples'}
or null}.  'train' runs `train.main(config)` (the code path of `python -m train`, into config.workdir) and measures
the trained model; 'base' evaluates the untrained base model (no method) on the held-out and forgetting texts.
Either writes config.workdir/compare.json (a temporary name renamed into place); the process peak RSS is this
process's own.  A user mistake (ValueError) is one line `error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time

import jax
import ml_collections
import numpy as np
from tensorboardX.proto import event_pb2

import peftjax as pj
from peftjax import distributed, sharding

import train
from train import data_files, loop, methods, steps, tasks

RESULT = "compare.json"
MIB = 2 ** 20


def logged(workdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of every TensorBoard scalar in workdir/tensorboard (a resumed run adds event files)."""
  values: dict[str, dict[int, float]] = {}
  folder = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    raw, pos = open(os.path.join(folder, name), "rb").read(), 0
    while pos < len(raw):  # records: u64 length, u32 crc, event, u32 crc
      (length,) = struct.unpack("<Q", raw[pos:pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
      pos += 16 + length
      for value in event.summary.value:
        values.setdefault(value.tag, {})[event.step] = value.simple_value
  return values


def folder_bytes(path: str) -> int:
  """Bytes of every file under `path` (0 when it does not exist)."""
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def median_ms(fn, *args, repeats: int) -> float:
  """Median wall milliseconds of `fn(*args)` (blocked until ready) over `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1000 * (time.perf_counter() - start))
  return float(np.median(times))


def compiled_memory(train_step, state, frozen, batch) -> dict:
  """XLA's memory analysis of the compiled train step: arguments, outputs, temporaries, and their peak sum (MiB)."""
  analysis = train_step.lower(state, frozen, batch).compile().memory_analysis()
  if analysis is None:  # a backend without the analysis
    return {}
  argument, output = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
  alias, temp = getattr(analysis, "alias_size_in_bytes", 0), analysis.temp_size_in_bytes
  return {"compiled_temp_mib": temp / MIB, "compiled_peak_mib": (argument + output - alias + temp) / MIB}


def latency(model, task, method_cfg, trainable, frozen, batch, repeats: int) -> dict:
  """Median forward milliseconds of one training-size batch: through the method (unmerged) and, for a method that
  folds into the weights, through the merged weights with no method (full fine-tuning: both are the plain model)."""
  plain = jax.jit(steps.make_forward(model, task, None))
  if method_cfg is None:
    ms = median_ms(plain, trainable, {}, batch, repeats=repeats)
    return {"latency_unmerged_ms": ms, "latency_merged_ms": ms}
  adapted = jax.jit(steps.make_forward(model, task, method_cfg))
  result = {"latency_unmerged_ms": median_ms(adapted, trainable, frozen, batch, repeats=repeats),
            "latency_merged_ms": None}
  if methods.mergeable(method_cfg):
    merged = pj.merge(method_cfg, frozen, trainable)
    result["latency_merged_ms"] = median_ms(plain, merged, {}, batch, repeats=repeats)
  return result


def text_metrics(config, model, tokenizer, mesh, method_cfg, trainable, frozen, **overrides) -> dict:
  """Held-out metrics of the model (with `method_cfg`, or none) on config's held-out set, or on another task's
  (`overrides` of config: task, eval_examples, data.eval_file)."""
  task = tasks.family(config).task
  other = ml_collections.ConfigDict(config.to_dict())
  other.train_examples = 1  # only the held-out rows are tokenised
  for key, value in overrides.items():
    node, *path, leaf = [other, *key.split(".")]
    for part in path:
      node = node[part]
    node[leaf] = value
  rows = task.tokenize(tokenizer, data_files.load(other, task.kind, config.workdir).held_out, config)
  batch_sharding = sharding.batch_sharding(mesh)
  put_batch = lambda b: distributed.load_local(b, np.arange(config.batch_size), batch_sharding)  # noqa: E731
  evaluate = steps.make_evaluate(steps.make_forward(model, task, method_cfg), task, config.batch_size, put_batch)
  return evaluate(trainable, frozen, rows)


def forgetting_loss(config, model, tokenizer, mesh, method_cfg, trainable, frozen, forgetting: dict) -> float:
  """Mean held-out loss on forgetting['task'] (its first forgetting['examples'] held-out rows), a text the base
  model knows and the run did not train on."""
  return text_metrics(config, model, tokenizer, mesh, method_cfg, trainable, frozen, task=forgetting["task"],
                      eval_examples=forgetting["examples"], **{"data.eval_file": ""})["loss"]


def run_trained(spec: dict) -> dict:
  """Trains config (train.main) and measures the trained model (see the module docstring)."""
  config = ml_collections.ConfigDict(spec["config"])
  result = train.main(config)
  if result.get("finished"):
    raise ValueError(f"{config.workdir} holds a finished run but no {RESULT}; remove that folder to rerun it.")
  state, frozen, model, method_cfg = result["state"], result["frozen"], result["model"], result["method"]
  trainable, task = state["trainable"], tasks.family(config).task
  batch = result["last_batch"]
  n_trainable = pj.tree.count(trainable)
  curves = logged(result["workdir"])
  speeds = sorted(v for step, v in curves.get("train/steps_per_second", {}).items() if step > config.log_every)
  steps_per_second = float(np.median(speeds)) if speeds else (result["final_step"] - result["start_step"]) / max(
      result["train_seconds"], 1e-9)
  size_folder = "merged" if method_cfg is None else "adapter"
  record = {
      "method": config.method, "seed": config.seed, "trainable": n_trainable,
      "all_params": n_trainable + pj.tree.count(frozen), "before": result["before"], "after": result["after"],
      "train_seconds": result["train_seconds"], "steps": result["final_step"],
      "tokens_per_second": steps_per_second * int(np.size(batch["input_ids"])) if batch is not None else None,
      "adapter_mib": folder_bytes(os.path.join(result["workdir"], size_folder)) / MIB,
      "curves": {tag: {str(k): v for k, v in values.items()} for tag, values in curves.items()
                 if tag == "train/loss" or tag.startswith("eval/")}}
  if spec["forgetting"]:
    record["forgetting_loss"] = forgetting_loss(config, model, result["tokenizer"], result["mesh"], method_cfg,
                                                trainable, frozen, spec["forgetting"])
  if spec["profile"] and batch is not None:
    record.update(compiled_memory(result["train_step"], state, frozen, batch))
    record.update(latency(model, task, method_cfg, trainable, frozen, batch, spec["latency_repeats"]))
  return record


def run_base(spec: dict) -> dict:
  """The untrained base model's held-out metrics and forgetting loss (no method, no training)."""
  config = ml_collections.ConfigDict(spec["config"])
  model, params, tokenizer = loop.load_model(config)
  mesh = loop.make_mesh(config)
  record = {"method": "base", "seed": config.seed, "trainable": 0, "all_params": pj.tree.count(params),
            "after": text_metrics(config, model, tokenizer, mesh, None, params, {})}
  record["forgetting_loss"] = forgetting_loss(config, model, tokenizer, mesh, None, params, {}, spec["forgetting"])
  return record


def write_json(path: str, value) -> None:
  """Writes `value` as JSON to `path` through a temporary name renamed into place."""
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def main(argv: list[str]) -> None:
  with open(argv[1]) as f:
    spec = json.load(f)
  try:
    record = run_base(spec) if spec["mode"] == "base" else run_trained(spec)
  except ValueError as e:
    sys.exit(f"error: {e}")
  record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  os.makedirs(spec["config"]["workdir"], exist_ok=True)
  write_json(os.path.join(spec["config"]["workdir"], RESULT), record)


if __name__ == "__main__":
  main(sys.argv)
