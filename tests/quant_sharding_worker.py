"""QLoRA steps of a tiny Llama on 8 simulated CPU devices, on several meshes, for tests/test_quant_gguf.py.

Not a test file: the device count (XLA_FLAGS) must be set before JAX starts.  `python tests/quant_sharding_worker.py`
prints, as the last stdout line, a JSON object: the losses per base kind and mesh, and the local shape of a
quantised kernel's codes on each mesh.
"""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import peftjax as pj  # noqa: E402
from peftjax import distributed, quant, sharding  # noqa: E402
from peftjax.models import llama  # noqa: E402

CONFIG = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LORA = pj.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
TX = optax.adamw(3e-2)
ROWS, LENGTH, STEPS = 8, 16, 3
CODES = "model/layers_0/mlp/up_proj/kernel"


def quantized(kind: str, params: dict) -> dict:
  """`params` with every linear kernel but the head quantised to `kind` (a GGUF kind through gguf-py's quantize)."""
  if kind not in quant.GGUF_KINDS:
    return quant.quantize(quant.QuantConfig(kind=kind), params)
  flat = pj.tree.flatten(params)
  for path in pj.tree.match_targets(params, "all-linear"):
    flat[f"{path}/kernel"] = quant._gguf_requantized(kind, flat[f"{path}/kernel"])
  return pj.tree.unflatten(flat)


def run(kind: str, mesh_shape) -> tuple[list[float], list[int]]:
  model = llama.LlamaForCausalLM(CONFIG)
  params = llama.init_params(model, jax.random.key(0))
  adapters = pj.init(LORA, jax.random.key(1), params)
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:1] if mesh_shape == (1, 1, 1) else None)
  params_shardings = sharding.param_shardings(sharding.model_logical_axes(model), params, mesh)
  state_shardings = sharding.state_shardings(TX, adapters, sharding.adapter_shardings(adapters, params_shardings))
  frozen = quantized(kind, params)
  flat_shardings = pj.tree.flatten(params_shardings)
  frozen_shardings = pj.tree.unflatten({p: quant.weight_sharding(leaf, flat_shardings[p]) if quant.is_quantized(leaf)
                                        else flat_shardings[p] for p, leaf in pj.tree.flatten(frozen).items()})
  frozen = jax.device_put(frozen, frozen_shardings)
  state = sharding.place({"step": jnp.zeros((), jnp.int32), "trainable": adapters, "opt_state": TX.init(adapters)},
                         state_shardings)
  adapted = quant.apply(LORA, model.apply)

  def loss_fn(trainable, frozen, batch, rng):
    del rng
    logits = adapted(frozen, trainable, batch["input_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:])
    return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)
  step = sharding.make_train_step(loss_fn, TX, state_shardings, frozen_shardings)
  ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (ROWS, LENGTH)).astype(np.int32)
  batch = distributed.load_local({"input_ids": ids}, np.arange(ROWS), sharding.batch_sharding(mesh))
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  codes = pj.tree.flatten(frozen)[CODES].codes
  return losses, list(codes.addressable_shards[0].data.shape)


def main() -> dict:
  results = {"devices": jax.device_count(), "losses": {}, "codes_local_shape": {}}
  for kind in ("nf4", "gguf_q4_1"):  # int8 codes take the kernel's own spec
    for shape in [(1, 1, 1), (1, 2, 4)]:
      key = f"{kind}:{','.join(map(str, shape))}"
      results["losses"][key], results["codes_local_shape"][key] = run(kind, shape)
  return results


if __name__ == "__main__":
  print(json.dumps(main()))
