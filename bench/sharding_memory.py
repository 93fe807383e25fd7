"""Memory per device of a sharded LoRA setup on 8 simulated CPU devices, from the arrays' addressable shards.

A Llama-shaped model (hidden 256, 4 layers, vocab 32000: 19M parameters, 75 MiB in float32) is created
directly in its shardings (zeros under jit with out_shardings, so no device ever holds more than its share;
the values do not change the memory), with LoRA r=16 on every linear layer and AdamW state.  For each mesh
(data, fsdp, tensor) the table gives the bytes the fullest device holds of the frozen params (float32, and
bfloat16 as stored with a bf16 base), the adapters and the optimizer state, and whether that fits a per-device
budget of 16 MiB that the whole model does not.
Usage: python bench/sharding_memory.py [--budget-mib 16]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import collections  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import peftjax as pj  # noqa: E402
from peftjax import sharding  # noqa: E402
from peftjax.models import llama  # noqa: E402

CONFIG = llama.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4)
LORA = pj.LoraConfig(rank=16, alpha=32.0, targets="all-linear")
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)]


def max_device_bytes(tree) -> int:
  """Bytes on the fullest device: the sum over the leaves of each device's addressable shard."""
  per_device = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  return max(per_device.values())


def zeros(abstract, shardings, dtype=None):
  """Arrays of zeros shaped like `abstract`, created in `shardings`."""
  return jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, dtype or x.dtype), abstract),
                 out_shardings=shardings)()


def measure(mesh_shape, model, tx) -> dict:
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:1] if mesh_shape == (1, 1, 1) else None)
  abstract = jax.eval_shape(lambda: llama.init_params(model, jax.random.key(0)))
  params_shardings = sharding.param_shardings(sharding.model_logical_axes(model), abstract, mesh)
  params = zeros(abstract, params_shardings)
  frozen_bf16 = zeros(abstract, params_shardings, jnp.bfloat16)
  adapters_abstract = jax.eval_shape(lambda p: pj.init(LORA, jax.random.key(1), p), abstract)
  adapters_shardings = sharding.adapter_shardings(adapters_abstract, params_shardings)
  adapters = zeros(adapters_abstract, adapters_shardings)
  opt_state = jax.jit(tx.init, out_shardings=sharding.opt_state_shardings(tx, adapters_abstract,
                                                                          adapters_shardings))(adapters)
  row = {"params": max_device_bytes(params), "params_bf16": max_device_bytes(frozen_bf16),
         "adapters": max_device_bytes(adapters), "opt_state": max_device_bytes(opt_state)}
  return row, pj.count(abstract), pj.count(adapters_abstract)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget-mib", type=float, default=16.0, help="per-device memory budget to check against")
  args = parser.parse_args()
  budget = args.budget_mib * 2 ** 20
  model = llama.LlamaForCausalLM(CONFIG)
  tx = optax.adamw(1e-4)
  rows, start = [], time.perf_counter()
  for mesh_shape in MESHES:
    row, n_params, n_adapters = measure(mesh_shape, model, tx)
    rows.append((mesh_shape, row))
  mib = lambda b: f"{b / 2 ** 20:9.2f}"  # noqa: E731
  print(f"model: {n_params / 1e6:.1f}M params ({n_params * 4 / 2 ** 20:.0f} MiB fp32), LoRA r={LORA.rank} all-linear: "
        f"{n_adapters / 1e6:.2f}M adapter params; {jax.device_count()} simulated CPU devices; "
        f"{time.perf_counter() - start:.1f}s")
  print(f"MiB on the fullest device; fits = fp32 params + adapters + Adam state within {args.budget_mib:g} MiB")
  header = ("mesh (data,fsdp,tensor)", "params", "bf16 base", "adapters", "adam", "total")
  print(f"{header[0]:>24} " + " ".join(f"{h:>9}" for h in header[1:]) + "  fits")
  for mesh_shape, row in rows:
    total = row["params"] + row["adapters"] + row["opt_state"]
    print(f"{str(mesh_shape):>24} {mib(row['params'])} {mib(row['params_bf16'])} {mib(row['adapters'])} "
          f"{mib(row['opt_state'])} {mib(total)}  {'yes' if total <= budget else 'no'}")


if __name__ == "__main__":
  main()
