"""Many adapters on one base, all-MiniLM-L6-v2 shapes (`--family minilm`: BERT, 6 layers, hidden 384) or t5-small
shapes (`--family t5`: 6 + 6 layers, d_model 512, the encoder reading `--seq` tokens and the decoder 16), random
weights, LoRA r=8 on the attention's query and value, fp32:

1. mixed batch: forward tokens/s of a batch whose rows use 8 different adapters (`peftjax.stacked_lora`; DoRA
   adapters with `peftjax.stacked_dora`) vs the same batch with one adapter (`pj.apply`), beside Hugging Face
   PEFT's `adapter_names=` forward on PyTorch with the same mix vs its single-adapter forward;
2. sweep: K=8 members (other seeds and learning rates) trained in one compiled step (`train.sweep`; all 8 members
   in one pass over the base, and one member per pass, `members_per_pass=1`) vs the same 8 single-adapter steps one
   after another, per-member batch 1 / 4 / 16: aggregate training tokens/s (wall and per CPU-second) and the
   compiled step's peak memory (XLA's memory analysis); `--profile` adds each step's op time per kind (dots,
   elementwise / reduce, copies / transposes) from a jax.profiler trace;
3. hotswap: putting another adapter into a compiled forward's slot and running it vs a fresh compilation.

`python bench/many_adapters.py` (`--family minilm|t5 --seq 128 --repeats 5 --rounds 3 --batches 1,4,16
--parts mixed,sweep,hotswap --profile`; needs the `[test]` extra; on a shared machine pin it to one core,
`taskset -c 1`).  Every step runs once untimed, then `rounds` interleaved rounds of `repeats` timed calls (medians).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import peftjax as pj  # noqa: E402
from peftjax import stacked_dora, stacked_lora  # noqa: E402
from peftjax.models import bert, t5  # noqa: E402
from train import sweep  # noqa: E402

from common import median_times  # noqa: E402

K = 8
DECODER_SEQ = 16  # t5: decoder tokens per row (the encoder reads --seq)
FAMILIES = {
    "minilm": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=512, num_labels=2),
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
               feed_forward_proj="relu", tie_word_embeddings=True),
}
TARGETS = {"minilm": ("query", "value"), "t5": ("q", "v")}


def _models(folder: str, family: str):
  import transformers
  if family == "t5":
    torch_model = transformers.T5ForConditionalGeneration(transformers.T5Config(**FAMILIES[family])).eval()
  else:
    torch_model = transformers.BertForSequenceClassification(transformers.BertConfig(**FAMILIES[family])).eval()
  torch_model.save_pretrained(folder)
  model, params = (t5 if family == "t5" else bert).from_pretrained(folder)
  return torch_model, model, params


def _batch(family: str, rows: int, seq: int) -> dict[str, np.ndarray]:
  """Random model inputs of `rows` x `seq` tokens and labels (a class per row; t5: DECODER_SEQ target tokens)."""
  rng = np.random.default_rng(0)
  batch = dict(input_ids=rng.integers(1000, 2000, (rows, seq)), attention_mask=np.ones((rows, seq), np.int64))
  if family == "t5":
    labels = rng.integers(1000, 2000, (rows, DECODER_SEQ))
    return dict(batch, decoder_input_ids=np.asarray(t5.shift_right(labels)), labels=labels)
  return dict(batch, labels=rng.integers(0, 2, rows))


def _inputs(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k != "labels"}


def _times(steps: dict, repeats: int, rounds: int) -> dict[str, tuple[float, float]]:
  """Per step, the median over `rounds` interleaved rounds of its median (wall, CPU) seconds of `repeats` calls,
  after one untimed call each."""
  for step in steps.values():
    step()
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      times[name].append(median_times(step, repeats, warmup=0))
  return {name: (float(np.median([w for w, _ in t])), float(np.median([c for _, c in t]))) for name, t in times.items()}


def _adapters(params, targets, dora: bool = False):
  cfg = (pj.DoraConfig if dora else pj.LoraConfig)(rank=8, alpha=16, targets=targets)
  trees = [jax.tree.map(lambda x, k=k: x + 0.01 * (k + 1), pj.init(cfg, jax.random.key(k), params)) for k in range(K)]
  return cfg, trees


def mixed_batch(torch_model, model, params, family: str, rows: int, seq: int, repeats: int, rounds: int
                ) -> dict[str, float]:
  import peft
  import torch
  targets = TARGETS[family]
  cfg, trees = _adapters(params, targets)
  dora_cfg, dora_trees = _adapters(params, targets, dora=True)
  ids = np.arange(rows) % K
  inputs = _inputs(_batch(family, rows, seq))
  single = jax.jit(pj.apply(cfg, model.apply))
  mixed = jax.jit(stacked_lora.apply(model.apply))
  stacked = stacked_lora.stack([cfg] * K, trees)
  dora_single = jax.jit(pj.apply(dora_cfg, model.apply))
  dora_mixed = jax.jit(stacked_dora.apply(model.apply))
  dora_stacked = stacked_dora.stack([dora_cfg] * K, dora_trees, params)
  peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(targets)),
                                   adapter_name="a0")
  for k in range(1, K):
    peft_model.add_adapter(f"a{k}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(targets)))
  peft_model.eval()
  torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()}
  names = [f"a{i}" for i in ids]

  def torch_single():
    with torch.no_grad():
      peft_model(**torch_inputs)

  def torch_mixed():
    with torch.no_grad():
      peft_model(**torch_inputs, adapter_names=names)
  steps = {
      "peftjax one adapter": lambda: jax.block_until_ready(single(params, trees[0], **inputs)),
      "peftjax 8-adapter mix": lambda: jax.block_until_ready(mixed(params, stacked, ids, **inputs)),
      "peftjax one DoRA adapter": lambda: jax.block_until_ready(dora_single(params, dora_trees[0], **inputs)),
      "peftjax 8-DoRA-adapter mix": lambda: jax.block_until_ready(dora_mixed(params, dora_stacked, ids, **inputs)),
      "PEFT one adapter": torch_single,
      "PEFT 8-adapter mix (adapter_names=)": torch_mixed,
  }
  return {name: rows * seq / wall for name, (wall, _) in _times(steps, repeats, rounds).items()}


PASSES = {"sweep, 8 members per pass": None, "sweep, 1 member per pass": 1}


def sweep_vs_sequential(model, params, family: str, per_member: int, seq: int, repeats: int, rounds: int,
                        profile: bool = False) -> dict[str, tuple[float, float, float]]:
  """{name: (aggregate training tokens/s by wall time, by process CPU time, compiled peak MiB)} of the K-member
  step (all members in one pass, and one member per pass) vs K single steps; with `profile`, also prints where
  the time goes (see `op_profile`)."""
  cfg = pj.LoraConfig(rank=8, alpha=16, targets=TARGETS[family])
  members = [sweep.Member(seed=k, learning_rate=1e-4 * (k + 1)) for k in range(K)]
  batch = _batch(family, per_member, seq)
  row_losses = lambda logits, b: optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).reshape(
      b["labels"].shape[0], -1).mean(-1)
  inputs = _inputs

  state = sweep.init(cfg, members, params)
  tx, opt_state = sweep.init_optimizer(optax.adamw, state, members)
  steps, compiled = {}, {}
  for name, per_pass in PASSES.items():
    step = sweep.make_step(model.apply, row_losses, tx, inputs, members_per_pass=per_pass)
    together = [state, opt_state]

    def run_sweep(step=step, together=together):
      together[0], together[1], losses = step(together[0], together[1], params, batch)
      jax.block_until_ready(losses)
    steps[name] = run_sweep
    compiled[name] = step.lower(state, opt_state, params, batch).compile()

  adapted = pj.apply(cfg, model.apply)
  single_tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-4)
  single_states = []
  for m in members:
    adapters = pj.init(cfg, jax.random.key(m.seed), params)
    opt = single_tx.init(adapters)
    opt.hyperparams["learning_rate"] = np.float32(m.learning_rate)
    single_states.append([adapters, opt])

  @jax.jit
  def one(params, adapters, opt, b):
    loss, grads = jax.value_and_grad(lambda a: row_losses(adapted(params, a, **inputs(b)), b).mean())(adapters)
    updates, opt = single_tx.update(grads, opt, adapters)
    return optax.apply_updates(adapters, updates), opt, loss

  def run_sequential():
    for s in single_states:
      s[0], s[1], loss = one(params, s[0], s[1], batch)
    jax.block_until_ready(loss)
  steps[f"{K} single steps"] = run_sequential
  compiled[f"{K} single steps"] = one.lower(params, *single_states[0][:2], batch).compile()
  if profile:
    for name, run in steps.items():
      op_profile(name, run, compiled[name].as_text())
  times = _times(steps, repeats, rounds)
  tokens = K * per_member * seq
  return {name: (tokens / wall, tokens / cpu, peak_mib(compiled[name])) for name, (wall, cpu) in times.items()}


def peak_mib(compiled) -> float:
  """A compiled step's peak: arguments + outputs + temporaries - donated aliases (XLA's memory analysis), MiB."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20


def _op_kinds(hlo: str) -> dict[str, str]:
  """{HLO instruction name: 'dot' (a fusion or op with a dot), 'copy/transpose' or 'elementwise/reduce'}."""
  bodies, current, kinds = {}, None, {}
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      bodies[current] = ""
    elif current:
      bodies[current] += line + "\n"
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ ([a-z-]+)\(", line)
    if m:
      called = re.search(r"calls=%([^,\s]+)", line)
      ops = set(re.findall(r"= \S+ ([a-z-]+)\(", bodies.get(called.group(1), "") if called else "")) | {m.group(2)}
      kinds[m.group(1)] = ("dot" if ops & {"dot", "convolution"} else
                           "copy/transpose" if ops & {"copy", "transpose"} and not ops & {"add", "multiply", "reduce"}
                           else "elementwise/reduce")
  return kinds


def op_profile(name: str, run, hlo: str, calls: int = 2) -> None:
  """Traces `calls` runs (jax.profiler) and prints (to stderr, beside the tables) the summed duration of the
  compiled step's HLO ops per kind."""
  import collections
  import glob
  import tempfile
  kinds = _op_kinds(hlo)
  run()
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder)
    for _ in range(calls):
      run()
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    per_kind = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          if event.name in kinds:
            per_kind[kinds[event.name]] += event.duration_ns / calls / 1e6
  print(f"  profile, {name}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in per_kind.most_common()),
        file=sys.stderr, flush=True)


def hotswap(model, params, family: str, seq: int) -> dict[str, float]:
  cfg, trees = _adapters(params, TARGETS[family])
  inputs = _inputs(_batch(family, 4, seq))
  ids = np.zeros(4, np.int32)
  forward = jax.jit(stacked_lora.apply(model.apply))
  slot = stacked_lora.stack([cfg], [trees[0]], max_rank=16)
  jax.block_until_ready(forward(params, slot, ids, **inputs))
  start = time.perf_counter()
  for tree in trees[1:]:
    slot = stacked_lora.put(slot, 0, cfg, tree)
    jax.block_until_ready(forward(params, slot, ids, **inputs))
  swap = (time.perf_counter() - start) / (K - 1)
  other = pj.LoraConfig(rank=12, alpha=16, targets=TARGETS[family])
  start = time.perf_counter()
  jax.block_until_ready(jax.jit(pj.apply(other, model.apply))(params, pj.init(other, jax.random.key(1), params),
                                                             **inputs))
  return {"hotswap (put + forward)": swap, "fresh compile + forward": time.perf_counter() - start}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--family", default="minilm", choices=sorted(FAMILIES))
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--batches", default="1,4,16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--parts", default="mixed,sweep,hotswap", help="which of the three benchmarks to run")
  parser.add_argument("--profile", action="store_true", help="per sweep batch, where the compiled steps' op time goes")
  args = parser.parse_args()
  parts = args.parts.split(",")
  import tempfile
  with tempfile.TemporaryDirectory() as folder:
    torch_model, model, params = _models(folder, args.family)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; PyTorch on cpu; {args.family} shapes, seq {args.seq}, "
        f"fp32; "
        f"frozen base {pj.tree.nbytes(params) / 2**20:.0f} MiB (one copy for the sweep, one per process for "
        f"{K} separate runs)")
  if "mixed" in parts:
    mixed = mixed_batch(torch_model, model, params, args.family, args.rows, args.seq, args.repeats, args.rounds)
    print(f"\nmixed batch, {args.rows} rows x {args.seq} tokens, forward tokens/s (median of interleaved runs):")
    print("| | tokens/s | vs one adapter |\n|---|---|---|")
    for name, tps in mixed.items():
      one = mixed["PEFT one adapter" if name.startswith("PEFT") else
                  "peftjax one DoRA adapter" if "DoRA" in name else "peftjax one adapter"]
      print(f"| {name} | {tps:,.0f} | {tps / one:.2f}x |", flush=True)
  if "sweep" in parts:
    print(f"\nK={K} sweep in one step vs {K} single steps one after another, training tokens/s (all members; "
          "wall and per process CPU-second), compiled peak MiB (arguments + outputs + temporaries; the sweep holds "
          "one base, each single run its own)")
    print("| per-member batch | | tokens/s | vs single steps | tokens/CPU-s | vs single steps | peak MiB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for b in map(int, args.batches.split(",")):
      r = sweep_vs_sequential(model, params, args.family, b, args.seq, args.repeats, args.rounds, args.profile)
      base = r[f"{K} single steps"]
      for name, (w, c, p) in r.items():
        print(f"| {b} | {name} | {w:,.0f} | {w / base[0]:.2f}x | {c:,.0f} | {c / base[1]:.2f}x | {p:.0f} |", flush=True)
  if "hotswap" in parts:
    swap = hotswap(model, params, args.family, args.seq)
    print("\nhotswap, batch 4:\n| | seconds |\n|---|---|")
    for name, s in swap.items():
      print(f"| {name} | {s:.3f} |")


if __name__ == "__main__":
  main()
