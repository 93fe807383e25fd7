"""QLoRA (NF4 + double quantisation base, peftjax.quant) vs LoRA over a bf16 base on a Llama-shaped model.

Measures, in one run: stored bytes of the quantised linear weights and of the whole model vs bf16; the compiled
memory analysis (arguments, temp, peak = arguments + outputs + temp - aliased) of one AdamW step of LoRA r=8 on
all linear layers over the NF4 base vs over the bf16 base, both with fp32 compute; the median step time
(interleaved rounds); and, from abstract shapes only (nothing allocated), the compiled peak of the QLoRA step
for larger Llama shapes (scan over layers) against a 16 GiB budget.

  python bench/quant.py                      # SmolLM2-shaped, 8 layers, batch 4 x 128
  python bench/quant.py --layers 2 --seq 32 --repeats 2 --shapes   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peftjax as pj  # noqa: E402
from peftjax import quant  # noqa: E402
from peftjax.models import llama  # noqa: E402

from bench import common  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               tie_word_embeddings=True)
LARGER = {"llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
          "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32)}
GIB = 2 ** 30


def _step(model, cfg, apply_fn, tx):
  def loss(trainable, frozen, ids):
    logits = apply_fn(frozen, trainable, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  @jax.jit
  def step(trainable, opt_state, frozen, ids):
    value, grads = jax.value_and_grad(loss)(trainable, frozen, ids)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value
  return step


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return {"arguments": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes, "peak": peak}


def _setups(shape: dict, scan: bool, abstract: bool, batch: int, seq: int):
  """{'lora (bf16 base)', 'qlora (nf4 base)'}: (step, args) with args concrete or ShapeDtypeStructs."""
  config = llama.LlamaConfig(**shape)
  model = llama.LlamaForCausalLM(config=config, scan_layers=scan)
  init = lambda: llama.init_params(model, jax.random.key(0))  # noqa: E731
  params = jax.eval_shape(init) if abstract else init()
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if not abstract else jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                      params)
  qcfg = quant.QuantConfig()
  nf4 = jax.eval_shape(lambda p: quant.quantize(qcfg, p), bf16) if abstract else quant.quantize(qcfg, bf16)
  lcfg = pj.LoraConfig(rank=8, alpha=16, targets="all-linear")
  adapters = jax.eval_shape(lambda p: pj.init(lcfg, jax.random.key(1), p), params) if abstract else \
      pj.init(lcfg, jax.random.key(1), params)
  tx = optax.adamw(1e-4)
  opt_state = jax.eval_shape(tx.init, adapters) if abstract else tx.init(adapters)
  ids = (jax.ShapeDtypeStruct((batch, seq), jnp.int32) if abstract
         else jax.random.randint(jax.random.key(2), (batch, seq), 0, config.vocab_size))
  return model, params, {
      "lora (bf16 base)": (_step(model, lcfg, pj.apply(lcfg, model.apply), tx), (adapters, opt_state, bf16, ids)),
      "qlora (nf4 base)": (_step(model, lcfg, quant.apply(lcfg, model.apply), tx), (adapters, opt_state, nf4, ids))}


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--shapes", action="store_true", help="also the abstract peak of larger Llama shapes")
  args = parser.parse_args()
  shape = {**SMOLLM2, "num_hidden_layers": args.layers}
  model, params, setups = _setups(shape, False, False, args.batch, args.seq)
  nf4 = setups["qlora (nf4 base)"][1][2]
  bf16 = setups["lora (bf16 base)"][1][2]
  linear_paths = {p for p, leaf in pj.tree.flatten(nf4).items() if quant.is_quantized(leaf)}
  linear_bf16 = sum(_nbytes(leaf) for p, leaf in pj.tree.flatten(bf16).items() if p in linear_paths)
  linear_nf4 = quant.stored_bytes(nf4, quantized_only=True)
  linear_count = linear_bf16 // 2
  rows = [("quantised linears: bytes", f"{linear_nf4:,}", f"{linear_bf16:,}", f"{linear_nf4 / linear_bf16:.3f}x"),
          ("quantised linears: bits / weight", f"{8 * linear_nf4 / linear_count:.3f}", "16", ""),
          ("whole model: bytes (embeddings, norms bf16)", f"{quant.stored_bytes(nf4):,}", f"{_nbytes(bf16):,}",
           f"{quant.stored_bytes(nf4) / _nbytes(bf16):.3f}x")]
  memories = {}
  for name, (step, step_args) in setups.items():
    memories[name] = _memory(step.lower(*step_args).compile())
  lora, qlora = memories["lora (bf16 base)"], memories["qlora (nf4 base)"]
  for key in ("arguments", "temp", "peak"):
    rows.append((f"step {key} MiB", f"{qlora[key] / 2**20:,.1f}", f"{lora[key] / 2**20:,.1f}",
                 f"{qlora[key] / lora[key]:.3f}x"))
  runs = {name: (lambda s=step, a=step_args: jax.block_until_ready(s(*a))) for name, (step, step_args) in setups.items()}
  times = common.interleaved_medians(runs, args.repeats, args.rounds)
  rows.append(("step time ms (median)", f"{1e3 * times['qlora (nf4 base)']:.1f}",
               f"{1e3 * times['lora (bf16 base)']:.1f}", f"{times['qlora (nf4 base)'] / times['lora (bf16 base)']:.3f}x"))
  if args.shapes:
    for name, larger in LARGER.items():
      _, _, abstract = _setups(larger, True, True, 1, 512)
      for label, (step, step_args) in abstract.items():
        peak = _memory(step.lower(*step_args).compile())["peak"]
        rows.append((f"{name} (scan, batch 1 x 512) {label} peak GiB", f"{peak / GIB:.2f}",
                     "fits" if peak <= 16 * GIB else "over", "16 GiB budget"))
  print(f"\nLlama shape {shape}, batch {args.batch} x {args.seq}, LoRA r=8 all linear, fp32 compute, AdamW; "
        f"{jax.devices()[0].platform}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  widths = [max(len(r[i]) for r in rows + [("", "qlora nf4", "lora bf16", "ratio")]) for i in range(4)]
  for row in [("", "qlora nf4", "lora bf16", "ratio"), *rows]:
    print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
  main()
