"""XLA:CPU's matmul libraries on one BERT-base layer: speed beside PyTorch, and whether each flag set computes right.

Why peftjax sets no XLA flag for fp32 on CPU: the fp32 gap to PyTorch at bert-base shapes is the matmul library.
For each flag set, a fresh process (XLA_FLAGS are read once per process) times one BERT-base layer's forward and
backward (our BertLayer, gradient of the input only, frozen weights, batch x seq tokens, fp32), and checks two
small products against numpy in float64: a dot scaled by a constant, (x @ W) * 2, and a LoRA path, (x @ A) @ B.
A flag set whose process dies (XLA's experimental oneDNN fusion aborts on some graphs) is reported as such.
PyTorch's BertLayer (transformers, eager, same shapes, its default threads) is timed the same way.  The processes
take turns for `--rounds`; the table gives medians of their median times.
Usage: python bench/xla_cpu_flags.py [--repeats 10] [--rounds 3] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

from lora_zoo import FAMILIES

FLAG_SETS = {  # the table's name of each flag set: its XLA_FLAGS
    "none (YNNPACK dots)": "",
    "--xla_cpu_use_onednn=true": "--xla_cpu_use_onednn=true",
    "... + --xla_cpu_experimental_onednn_fusion_type=dot (oneDNN dot fusion)":
        "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=false (Eigen dots)":
        "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=false",
}
BERT_BASE = {**FAMILIES["bert"].hf_config, "num_hidden_layers": 1}  # the four-shape table's bert-base, one layer


def _inputs(args) -> np.ndarray:
  """The layer's input: (batch, seq, hidden) standard normal values, the same on both sides."""
  return np.random.default_rng(0).standard_normal((args.batch, args.seq, BERT_BASE["hidden_size"]))


def _layer_seconds(args) -> float:
  """Median wall seconds of one BERT-base layer's forward and backward in JAX (this process's XLA_FLAGS)."""
  import jax
  import jax.numpy as jnp

  from common import median_seconds
  from peftjax.models import bert

  layer = bert.BertLayer(bert.BertConfig.from_hf(BERT_BASE))
  x = jnp.asarray(_inputs(args), jnp.float32)
  mask = jnp.ones((args.batch, 1, 1, args.seq), bool)
  params = layer.init(jax.random.key(0), x, mask, None, True)
  grad = jax.jit(jax.grad(lambda x, params: jnp.sum(layer.apply(params, x, mask, None, True)[0] ** 2)))
  return median_seconds(lambda: jax.block_until_ready(grad(x, params)), args.repeats)


def _torch_layer_seconds(args) -> float:
  """Median wall seconds of transformers' BertLayer forward and backward (gradient of the input only)."""
  import torch
  import transformers
  from transformers.models.bert.modeling_bert import BertLayer

  from common import median_seconds

  config = transformers.BertConfig(**BERT_BASE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   attn_implementation="sdpa")
  layer = BertLayer(config).train()
  for p in layer.parameters():
    p.requires_grad_(False)
  x = torch.tensor(_inputs(args), dtype=torch.float32, requires_grad=True)

  def step():
    x.grad = None
    out = layer(x)
    (out[0] if isinstance(out, tuple) else out).pow(2).sum().backward()
  return median_seconds(step, args.repeats)


def _check(kind: str) -> float:
  """Largest error of a jitted product relative to its largest float64 value: (x @ W) * 2 or (x @ A) @ B."""
  import jax

  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((1024, 768), np.float32), rng.standard_normal((768, 768), np.float32)
  a, b = rng.standard_normal((768, 8), np.float32), rng.standard_normal((8, 768), np.float32)
  if kind == "scaled":
    got, want = jax.jit(lambda x, w: (x @ w) * 2.0)(x, w), (x.astype(np.float64) @ w) * 2.0
  else:
    got, want = jax.jit(lambda x, a, b: (x @ a) @ b)(x, a, b), (x.astype(np.float64) @ a) @ b
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _worker(args) -> None:
  """One measurement in this process, printed as a JSON line."""
  if args.worker == "torch":
    value = _torch_layer_seconds(args)
  elif args.worker == "layer":
    value = _layer_seconds(args)
  else:
    value = _check(args.worker)
  print(json.dumps({"value": value}))


def _run(part: str, flags: str, args) -> float | str:
  """The worker's value, or why its process gave none (its exit status and last line of output)."""
  env = dict(os.environ, XLA_FLAGS=flags)
  command = [sys.executable, __file__, "--worker", part, "--repeats", str(args.repeats), "--batch", str(args.batch),
             "--seq", str(args.seq)]
  done = subprocess.run(command, env=env, capture_output=True, text=True)
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)["value"]
  last = (done.stderr.strip().splitlines() or ["no output"])[-1]
  return f"died (exit {done.returncode}: {last[:60]})"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--worker", choices=["layer", "torch", "scaled", "chain"], help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return _worker(args)

  times = {name: [] for name in [*FLAG_SETS, "torch"]}
  for _ in range(args.rounds):
    for name, flags in FLAG_SETS.items():
      times[name].append(_run("layer", flags, args))
    times["torch"].append(_run("torch", "", args))
  checks = {name: [_run(kind, flags, args) for kind in ("scaled", "chain")] for name, flags in FLAG_SETS.items()}

  def median(values):
    numbers = [v for v in values if isinstance(v, float)]
    return statistics.median(numbers) if numbers else None

  torch_s = median(times["torch"])
  print(f"\nOne BERT-base layer, forward + backward (input gradient), fp32, batch {args.batch} x {args.seq}; medians "
        f"of {args.rounds} processes x {args.repeats} steps; errors relative to float64:")
  print("| XLA flags | layer ms | vs torch | (x @ W) * 2 error | (x @ A) @ B error |")
  print("|---|---|---|---|---|")
  fmt = lambda v: f"{v:.1e}" if isinstance(v, float) else v  # noqa: E731
  for name in FLAG_SETS:
    ms = median(times[name])
    why = next((v for v in times[name] if isinstance(v, str)), "failed")
    line = f"{ms * 1e3:.1f} | {ms / torch_s:.2f}x" if ms and torch_s else f"{why} | -"
    print(f"| {name} | {line} | {fmt(checks[name][0])} | {fmt(checks[name][1])} |")
  print(f"| torch BertLayer | {torch_s * 1e3:.1f} | 1.00x | | |" if torch_s else "| torch BertLayer | failed | | | |")


if __name__ == "__main__":
  main()
