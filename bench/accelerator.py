"""One-command training benchmark for whatever JAX sees (GPU, TPU or CPU): a ~1B Llama shape in bf16.

LoRA r=16 (alpha 32) on all linear layers and full fine-tuning of a randomly initialised Llama-3.2-1B-shaped model
(hidden 2048, 16 layers, 32 heads / 8 key-value heads, MLP 8192, vocab 128256, tied embeddings; scanned layers
with rematerialisation), bf16 compute, next-token loss, AdamW.  LoRA keeps the frozen weights in bf16 and its
adapters and optimizer state in fp32; full fine-tuning keeps fp32 master weights and moments and computes in
bf16.  For each it prints the step time (median of --steps after two warm-up steps), tokens/s, MFU (model FLOPs
of the step, `step_flops`, over the device's peak bf16 FLOP/s from PEAK_FLOPS, else a measured bf16 matmul) and
peak memory (the device's peak bytes in use, else the compiled step's arguments + temporaries).  The batch
fills the device: --seq tokens per row and as many rows as `auto_batch` estimates fit in 60% of its memory
(override with --batch).  No downloads.  `--tiny` runs a toy shape in seconds on a CPU (tests use it).
Usage: python bench/accelerator.py [--tiny] [--batch B] [--seq S] [--steps N] [--modes lora full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import peftjax as pj
from peftjax.models import llama

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
RANK, ALPHA = 16, 32.0
# Dense bf16 peak FLOP/s per chip, by a substring of jax's device_kind (lower case); the first match wins.
PEAK_FLOPS = (("h200", 989e12), ("h100", 989e12), ("gh200", 989e12), ("a100", 312e12), ("l40s", 362e12),
              ("l4", 121e12), ("a10", 125e12), ("v100", 125e12), ("tpu v6", 918e12), ("tpu v5p", 459e12),
              ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v4", 275e12), ("tpu v3", 123e12))


def linear_params(c: llama.LlamaConfig) -> int:
  """Weights of the matmuls a token goes through: the layers' projections and the (tied) output head."""
  attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
  return c.num_hidden_layers * (attention + 3 * c.hidden_size * c.intermediate_size) + c.hidden_size * c.vocab_size


def lora_params(c: llama.LlamaConfig, rank: int = RANK) -> int:
  """LoRA parameters on every linear layer of the stack (q, k, v, o, gate, up, down; not the head)."""
  pairs = [(c.hidden_size, c.num_attention_heads * c.head_dim), (c.hidden_size, c.num_key_value_heads * c.head_dim),
           (c.hidden_size, c.num_key_value_heads * c.head_dim), (c.num_attention_heads * c.head_dim, c.hidden_size),
           (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
           (c.intermediate_size, c.hidden_size)]
  return c.num_hidden_layers * rank * sum(d_in + d_out for d_in, d_out in pairs)


def forward_flops(c: llama.LlamaConfig, batch: int, seq: int) -> float:
  """Matmul FLOPs of one forward pass (no causal saving in attention, as the model computes all scores)."""
  attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq  # scores and probs @ values
  return 2 * batch * seq * linear_params(c) + batch * seq * attention


def step_flops(c: llama.LlamaConfig, batch: int, seq: int, mode: str) -> float:
  """Model FLOPs of a training step (rematerialisation not counted): forward + backward to the activations
  (2x forward) + for full fine-tuning the weight gradients (2 x the linear FLOPs); LoRA adds its own 6 per
  adapter parameter per token."""
  tokens = batch * seq
  flops = 3 * forward_flops(c, batch, seq)
  if mode == "full":
    return flops + 2 * tokens * linear_params(c)
  return flops + 6 * tokens * lora_params(c)


def peak_flops(device, seconds: float = 0.5) -> tuple[float, str]:
  """(peak bf16 FLOP/s, where it came from): the PEAK_FLOPS entry of the device kind, else a measured bf16
  matmul with fp32 accumulation."""
  kind = device.device_kind.lower()
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops, f"table ({name})"
  n = 4096 if device.platform != "cpu" else 1024
  a = jnp.ones((n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(matmul(a, a))
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(matmul(a, a))
    count += 1
  return 2 * n ** 3 * count / (time.perf_counter() - start), f"measured {n}^3 bf16 matmul"


def auto_batch(c: llama.LlamaConfig, seq: int, mode: str, device) -> int:
  """Rows that fit in 60% of the device's memory (at least 1): per token the rematerialised layer inputs, one
  layer's activations and attention scores, and the fp32 logits and their gradient; minus weights and optimizer
  state.  CPU (no memory limit reported): 1."""
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if not limit:
    return 1
  weights = linear_params(c) + c.vocab_size * c.hidden_size * (not c.tie_word_embeddings)
  state = weights * (2 + 4 * 4) if mode == "full" else weights * 2 + lora_params(c) * 4 * 4
  per_token = (c.num_hidden_layers * c.hidden_size * 2 + 20 * c.intermediate_size * 2
               + 3 * c.num_attention_heads * seq * 4 + 3 * c.vocab_size * 4)
  return max(1, int((0.6 * limit - state) // (per_token * seq)))


def _loss(model, params, adapters, cfg, tokens):
  apply = model.apply if cfg is None else pj.apply(cfg, model.apply)
  args = ({"params": params},) if cfg is None else (params, adapters)
  logits = apply(*args, tokens[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_step(model, c: llama.LlamaConfig, mode: str, batch: int, seq: int):
  """(compiled step, state, tokens): step(state, tokens) -> (state, loss); state holds what it trains."""
  tx = optax.adamw(1e-4)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, c.vocab_size, jnp.int32)
  bf16 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)  # noqa: E731
  init = jax.jit(lambda rng: llama.init_params(model.clone(dtype=jnp.float32, param_dtype=jnp.float32), rng))
  params = init(jax.random.key(0))
  if mode == "full":
    def loss(trainable, frozen, tokens):
      return _loss(model, bf16(trainable), None, None, tokens)
    trainable, frozen = params, None
  else:
    cfg = pj.LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear")
    frozen = jax.jit(bf16)(params)
    del params
    trainable = pj.init(cfg, jax.random.key(2), frozen)

    def loss(trainable, frozen, tokens):
      return _loss(model, frozen, trainable, cfg, tokens)

  @jax.jit
  def step(state, tokens):
    trainable, opt_state, frozen = state
    value, grads = jax.value_and_grad(loss)(trainable, frozen, tokens)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return (optax.apply_updates(trainable, updates), opt_state, frozen), value

  state = (trainable, tx.init(trainable), frozen)
  compiled = jax.jit(step, donate_argnums=0).lower(state, tokens).compile()
  return compiled, state, tokens


def run(mode: str, shape: dict, batch: int | None, seq: int, steps: int, device) -> dict:
  """Step time, tokens/s, model FLOPs, peak memory and losses of `steps` timed steps of one mode."""
  c = llama.LlamaConfig(**shape)
  batch = batch or auto_batch(c, seq, mode, device)
  model = llama.LlamaForCausalLM(c, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True, remat=True)
  compiled, state, tokens = make_step(model, c, mode, batch, seq)
  losses, times = [], []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, loss = compiled(state, tokens)
    losses.append(float(loss))  # waits for the step
    if i >= 2:
      times.append(time.perf_counter() - start)
  stats = device.memory_stats() or {}
  memory = compiled.memory_analysis()
  peak = stats.get("peak_bytes_in_use") or (memory.argument_size_in_bytes + memory.temp_size_in_bytes)
  seconds = statistics.median(times)
  return dict(mode=mode, batch=batch, seq=seq, seconds=seconds, tokens_per_s=batch * seq / seconds,
              flops=step_flops(c, batch, seq, mode), peak_bytes=peak, losses=losses,
              trainable=lora_params(c) if mode == "lora" else None)


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="a toy shape (2 layers, hidden 64, seq 32, batch 2)")
  p.add_argument("--batch", type=int, default=0, help="rows per step (0: fill the device)")
  p.add_argument("--seq", type=int, default=0, help="tokens per row (default 2048; --tiny 32)")
  p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
  p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
  args = p.parse_args(argv)
  device = jax.devices()[0]
  shape = TINY if args.tiny else LLAMA_1B
  seq = args.seq or (32 if args.tiny else 2048)
  batch = args.batch or (2 if args.tiny else None)
  peak, source = peak_flops(device)
  results = [run(mode, shape, batch, seq, args.steps, device) for mode in args.modes]
  print(f"\n{'tiny' if args.tiny else 'Llama-3.2-1B'}-shaped Llama, bf16 compute, {len(jax.devices())} x "
        f"{device.device_kind} ({device.platform}), jax {jax.__version__}; peak {peak / 1e12:.1f} TFLOP/s from "
        f"{source}:")
  print("| mode | batch x seq | step s | tokens/s | model GFLOP/step | MFU | peak memory GiB | loss first -> last |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    mfu = r["flops"] / r["seconds"] / peak
    print(f"| {r['mode']} | {r['batch']} x {r['seq']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
          f"{r['flops'] / 1e9:.4g} | {mfu:.1%} | {r['peak_bytes'] / 2 ** 30:.2f} | "
          f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")
  return results


if __name__ == "__main__":
  main()
