"""Step time and memory of the soft-prompt family vs LoRA on the same GPT-2-shaped model and batch.

Methods: prompt tuning, P-tuning (MLP and LSTM encoders), prefix tuning (with its MLP reparameterisation),
P-tuning v2 and LoRA r=8 on c_attn.  Each step is forward, backward and an Adam update of the adapter tree
only (fp32) on a random-initialised GPT-2 of the chosen shape.  Reported per method: trainable parameters,
median step time, the step's compiled temporary memory (XLA's memory analysis) and the adapter bytes.
Usage: python bench/prompts.py [--tiny] [--repeats 5]  (--tiny: a seconds-long smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax as pj
from peftjax import tree as ptree
from peftjax.methods import p_tuning, prefix_tuning, prompt_tuning
from peftjax.models import gpt2

SHAPES = {"gpt2": dict(batch=8, length=128, config=gpt2.GPT2Config()),
          "tiny": dict(batch=2, length=16, config=gpt2.GPT2Config(vocab_size=128, n_positions=64, n_embd=32,
                                                                  n_layer=2, n_head=4))}


def methods(virtual_tokens: int) -> dict:
  return {
      "prompt tuning": prompt_tuning.PromptTuningConfig(virtual_tokens),
      "P-tuning (MLP)": p_tuning.PTuningConfig(virtual_tokens),
      "P-tuning (LSTM)": p_tuning.PTuningConfig(virtual_tokens, encoder_type="lstm"),
      "prefix tuning": prefix_tuning.PrefixTuningConfig(virtual_tokens),
      "P-tuning v2": prefix_tuning.PTuningV2Config(virtual_tokens),
      "LoRA r=8 c_attn": pj.LoraConfig(rank=8, alpha=16, targets=("c_attn",)),
  }


def measure(cfg, model, params, batch, repeats: int) -> tuple[int, float, int, int]:
  """(trainable parameters, median step seconds, compiled temporary bytes, adapter bytes)."""
  adapters = pj.init(cfg, jax.random.key(1), params)
  adapted = pj.apply(cfg, model.apply)
  tx = optax.adam(1e-3)

  def loss_fn(adapters, params, batch):
    logits = adapted(params, adapters, batch["input_ids"], batch["attention_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:]).mean()

  def step(adapters, opt_state, params, batch):  # params and batch are arguments, not compile-time constants
    grads = jax.grad(loss_fn)(adapters, params, batch)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(adapters, updates), opt_state

  opt_state = tx.init(adapters)
  compiled = jax.jit(step).lower(adapters, opt_state, params, batch).compile()
  memory = compiled.memory_analysis()
  temp = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0
  times = []
  for i in range(repeats + 1):
    start = time.perf_counter()
    adapters, opt_state = jax.block_until_ready(compiled(adapters, opt_state, params, batch))
    if i:  # the first run warms up
      times.append(time.perf_counter() - start)
  return ptree.count(adapters), statistics.median(times), temp, ptree.nbytes(adapters)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="a tiny model and batch (a smoke run)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--virtual-tokens", type=int, default=20)
  args = parser.parse_args()
  shape = SHAPES["tiny" if args.tiny else "gpt2"]
  model = gpt2.GPT2LMHeadModel(shape["config"])
  params = gpt2.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"input_ids": jnp.asarray(rng.integers(0, shape["config"].vocab_size, (shape["batch"], shape["length"]))),
           "attention_mask": jnp.ones((shape["batch"], shape["length"]), jnp.int32)}
  rows = []
  for name, cfg in methods(args.virtual_tokens).items():
    rows.append((name, *measure(cfg, model, params, batch, args.repeats)))
  lora_time = rows[-1][2]
  print(f"device: {jax.devices()[0].device_kind}; GPT-2 {'tiny' if args.tiny else '124M'} shapes, batch "
        f"{shape['batch']} x {shape['length']} tokens, {args.virtual_tokens} virtual tokens, fp32, Adam")
  print(f"{'method':<18} {'trainable':>12} {'step ms':>9} {'vs LoRA':>8} {'temp MiB':>9} {'adapter MiB':>12}")
  for name, count, seconds, temp, nbytes in rows:
    print(f"{name:<18} {count:>12,d} {1e3 * seconds:>9.2f} {seconds / lora_time:>8.2f} {temp / 2**20:>9.1f} "
          f"{nbytes / 2**20:>12.2f}")


if __name__ == "__main__":
  main()
