"""QLoRA (NF4 + double quantisation base, peftjax.quant) vs LoRA over a bf16 base on a Llama-shaped model.

Measures, in one run: stored bytes of the quantised linear weights and of the whole model vs bf16; the compiled
memory analysis (arguments, temp, peak = arguments + outputs + temp - aliased) of one AdamW step of LoRA r=8 on
all linear layers over the NF4 base vs over the bf16 base, both with fp32 compute; the median step time
(interleaved rounds); and, from abstract shapes only (nothing allocated), the compiled peak of the QLoRA step
for larger Llama shapes (scan over layers) against a 16 GiB budget.

`--qwix` runs Qwix (`pip install qwix`, a benchmark-only dependency; 0.1.8 imports with jax 0.10.2 / flax 0.12.8:
`python3 -m venv /work/venvs/qwix && pip install -e . -c constraints-test.txt && pip install qwix`) on the same
model, weights and batch in the same run: `qwix.LoraProvider(rank=8, alpha=16, weight_qtype="nf4", tile_size=64)`
(QLoRA: the bf16 weights quantised with `qwix.quantize_params`) and the same provider without `weight_qtype`
(LoRA over the bf16 base), applied to our linen Llama with `qwix.apply_lora_to_model`; their stored bytes,
compiled memory and step times sit next to ours (all four steps interleaved).

  python bench/quant.py                      # SmolLM2-shaped, 8 layers, batch 4 x 128
  python bench/quant.py --layers 2 --seq 32 --repeats 2 --shapes --qwix   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
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
  """Bytes of the arrays of `tree`, sub-byte dtypes (Qwix's uint4) counted at their bit width."""
  return sum(int(np.prod(x.shape)) * jnp.iinfo(x.dtype).bits // 8 if jnp.issubdtype(x.dtype, jnp.integer)
             and jnp.iinfo(x.dtype).bits < 8 else int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _qwix_setups(model, bf16, ids, tx) -> dict:
  """{'qwix lora (bf16 base)', 'qwix qlora (nf4 base)'}: (step, args, base) of Qwix's LoRA r=8 on the same linear
  layers over the same bf16 weights, or over those weights quantised to NF4 in tiles of 64 (`qwix.quantize_params`)."""
  import qwix
  from flax import traverse_util
  targets = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
  out = {}
  for name, extra in (("qwix lora (bf16 base)", {}), ("qwix qlora (nf4 base)", dict(weight_qtype="nf4", tile_size=64))):
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=targets, rank=8, alpha=16.0, **extra))
    variables = nn.unbox(qmodel.init(jax.random.key(1), ids)["params"])
    base = qwix.quantize_params(bf16, variables, allow_extra_params=True) if extra else bf16
    adapters = {k: v for k, v in traverse_util.flatten_dict(variables).items() if k[-1].endswith(("_lora_a", "_lora_b"))}

    def apply_fn(base, adapters, ids, qmodel=qmodel):
      return qmodel.apply({"params": traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **adapters})}, ids)
    out[name] = (_step(qmodel, None, apply_fn, tx), (adapters, tx.init(adapters), base, ids))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--shapes", action="store_true", help="also the abstract peak of larger Llama shapes")
  parser.add_argument("--qwix", action="store_true", help="also Qwix's QLoRA and LoRA steps (needs qwix installed)")
  args = parser.parse_args()
  shape = {**SMOLLM2, "num_hidden_layers": args.layers}
  model, params, setups = _setups(shape, False, False, args.batch, args.seq)
  nf4 = setups["qlora (nf4 base)"][1][2]
  bf16 = setups["lora (bf16 base)"][1][2]
  linear_paths = {p for p, leaf in pj.tree.flatten(nf4).items() if quant.is_quantized(leaf)}
  linear_bf16 = sum(_nbytes(leaf) for p, leaf in pj.tree.flatten(bf16).items() if p in linear_paths)
  linear_count = linear_bf16 // 2
  libraries = {"peftjax": ("qlora (nf4 base)", "lora (bf16 base)")}
  linear_bytes = {"peftjax": quant.stored_bytes(nf4, quantized_only=True)}
  if args.qwix:
    ids = setups["lora (bf16 base)"][1][3]
    qwix_setups = _qwix_setups(model, bf16, ids, optax.adamw(1e-4))
    setups.update(qwix_setups)
    libraries["qwix"] = ("qwix qlora (nf4 base)", "qwix lora (bf16 base)")
    qwix_base = pj.tree.flatten(qwix_setups["qwix qlora (nf4 base)"][1][2])  # codes / scales leaves under the kernel
    linear_bytes["qwix"] = sum(_nbytes(leaf) for p, leaf in qwix_base.items()
                               if any(p.startswith(k + "/") or p == k for k in linear_paths))
  rows = []
  for lib, nbytes in linear_bytes.items():
    rows += [(f"{lib}: quantised linears: bytes", f"{nbytes:,}", f"{linear_bf16:,}", f"{nbytes / linear_bf16:.3f}x"),
             (f"{lib}: quantised linears: bits / weight", f"{8 * nbytes / linear_count:.3f}", "16", "")]
  rows.append(("peftjax: whole model: bytes (embeddings, norms bf16)", f"{quant.stored_bytes(nf4):,}",
               f"{_nbytes(bf16):,}", f"{quant.stored_bytes(nf4) / _nbytes(bf16):.3f}x"))
  memories = {name: _memory(step.lower(*step_args).compile()) for name, (step, step_args) in setups.items()}
  runs = {name: (lambda s=step, a=step_args: jax.block_until_ready(s(*a))) for name, (step, step_args) in setups.items()}
  times = common.interleaved_medians(runs, args.repeats, args.rounds)
  for lib, (q, lo) in libraries.items():
    for key in ("arguments", "temp", "peak"):
      rows.append((f"{lib}: step {key} MiB", f"{memories[q][key] / 2**20:,.1f}", f"{memories[lo][key] / 2**20:,.1f}",
                   f"{memories[q][key] / memories[lo][key]:.3f}x"))
    rows.append((f"{lib}: step time ms (median)", f"{1e3 * times[q]:.1f}", f"{1e3 * times[lo]:.1f}",
                 f"{times[q] / times[lo]:.3f}x"))
  if args.shapes:
    for name, larger in LARGER.items():
      _, _, abstract = _setups(larger, True, True, 1, 512)
      for label, (step, step_args) in abstract.items():
        peak = _memory(step.lower(*step_args).compile())["peak"]
        rows.append((f"{name} (scan, batch 1 x 512) {label} peak GiB", f"{peak / GIB:.2f}",
                     "fits" if peak <= 16 * GIB else "over", "16 GiB budget"))
  print(f"\nLlama shape {shape}, batch {args.batch} x {args.seq}, LoRA r=8 all linear, fp32 compute, AdamW, unscanned; "
        f"{jax.devices()[0].platform}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  header = ("", "qlora (nf4 base)", "lora (bf16 base)", "ratio")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
  for row in [header, *rows]:
    print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
  main()
