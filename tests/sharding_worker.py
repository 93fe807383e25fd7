"""Runs LoRA training of a tiny Llama on simulated CPU devices and prints the numbers the sharding tests check.

Not a test file: tests/test_sharding.py and tests/test_distributed.py start it in subprocesses, because the
device count (XLA_FLAGS) and jax.distributed must be set before JAX starts.

  python tests/sharding_worker.py simulated OUT_DIR            # 8 devices in one process: meshes, restore, ...
  python tests/sharding_worker.py distributed OUT_DIR N I PORT  # process I of N (2 CPU devices each)

The last line of stdout is a JSON object with the results.
"""

from __future__ import annotations

import json
import os
import sys

MODE, OUT = sys.argv[1], sys.argv[2]
NUM_PROCESSES, PROCESS_ID, PORT = (int(a) for a in sys.argv[3:6]) if MODE == "distributed" else (1, 0, 0)
DEVICES_PER_PROCESS = 8 if MODE == "simulated" else 4 // NUM_PROCESSES
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import peftjax as pj  # noqa: E402
from peftjax import checkpoint, distributed, sharding  # noqa: E402
from peftjax.models import llama  # noqa: E402

if NUM_PROCESSES > 1:
  distributed.initialize(f"127.0.0.1:{PORT}", NUM_PROCESSES, PROCESS_ID, timeout_s=60)

CONFIG = llama.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LORA = pj.LoraConfig(rank=4, alpha=8.0, targets="all-linear")
ROWS, LENGTH, STEPS, BATCHES = 8, 16, 10, 2
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2))


def dataset(examples: int = ROWS * BATCHES) -> dict:
  """Random token rows with right padding of random length (labels -100 there), so token counts differ."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, CONFIG.vocab_size, (examples, LENGTH))
  lengths = rng.integers(4, LENGTH + 1, examples)
  mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
  return {"input_ids": ids.astype(np.int32), "attention_mask": mask,
          "labels": np.where(mask == 1, ids, -100).astype(np.int32)}


def make_loss(model):
  adapted = pj.apply(LORA, model.apply)

  def loss_fn(trainable, frozen, batch, rng):
    del rng
    logits = adapted(frozen, trainable, batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                             jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(valid)
  return loss_fn


class Run:
  """A model, its sharded frozen params and train state on one mesh, and a compiled step."""

  def __init__(self, mesh_shape, devices=None, micro_batches=1, compute_dtype=jnp.float32, frozen_dtype=None,
               remat=False):
    self.model = llama.LlamaForCausalLM(CONFIG)
    params = llama.init_params(self.model, jax.random.key(0))
    adapters = pj.init(LORA, jax.random.key(1), params)
    model = self.model.clone(dtype=compute_dtype)
    model = sharding.with_remat(model) if remat else model
    self.mesh = sharding.make_mesh(mesh_shape, devices=devices)
    self.params_shardings = sharding.param_shardings(sharding.model_logical_axes(self.model), params, self.mesh)
    adapters_shardings = sharding.adapter_shardings(adapters, self.params_shardings)
    self.state_shardings = sharding.state_shardings(TX, adapters, adapters_shardings)
    self.frozen = sharding.place(sharding.cast_floating(params, frozen_dtype) if frozen_dtype else params,
                                 self.params_shardings)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": adapters, "opt_state": TX.init(adapters)}
    self.state = sharding.place(state, self.state_shardings)
    self.step = sharding.make_train_step(make_loss(model), TX, self.state_shardings, self.params_shardings,
                                         micro_batches=micro_batches)
    self.data = dataset()

  def train(self, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
      start = int(self.state["step"]) % BATCHES * ROWS  # the same batches again and again: the loss must fall
      batch = distributed.load_local(self.data, np.arange(start, start + ROWS), sharding.batch_sharding(self.mesh))
      self.state, metrics = self.step(self.state, self.frozen, batch)
      losses.append(float(metrics["loss"]))
    return losses


def local_shape(x) -> list[int]:
  return list(x.addressable_shards[0].data.shape)


def layout(run: Run) -> dict:
  """Specs and per-device shard shapes of a kernel, its LoRA A and B, and A's first Adam moment."""
  q = ["model", "layers_0", "self_attn", "q_proj"]
  pick = lambda tree: tree[q[0]][q[1]][q[2]][q[3]]  # noqa: E731
  adapter = pick(run.state["trainable"])
  mu = pick(run.state["opt_state"][1][0].mu)["lora_A"]
  arrays = {"kernel": pick(run.frozen)["kernel"], "lora_A": adapter["lora_A"], "lora_B": adapter["lora_B"],
            "mu_A": mu}
  return {name: {"spec": [list(s) if isinstance(s, tuple) else s for s in x.sharding.spec],
                 "global": list(x.shape), "local": local_shape(x)} for name, x in arrays.items()}


def dtypes(run: Run) -> dict:
  leaves = lambda tree: sorted({str(x.dtype) for x in jax.tree.leaves(tree) if x.ndim})  # noqa: E731
  return {"frozen": leaves(run.frozen), "trainable": leaves(run.state["trainable"]),
          "opt_state": leaves(run.state["opt_state"])}


def export_error(run: Run, folder: str) -> float:
  """Max |logits| difference between the adapted model and the merged model exported and read back."""
  merged = sharding.merge(LORA, run.frozen, run.state["trainable"], run.params_shardings)
  assert jax.tree.leaves(merged)[0].sharding == jax.tree.leaves(run.params_shardings)[0]
  distributed.export_merged(llama.save_pretrained, run.model, merged, folder)
  model, params = llama.from_pretrained(folder)
  ids = dataset()["input_ids"][:2]
  host = lambda tree: jax.tree.map(distributed.to_host, tree)  # noqa: E731
  adapted = pj.apply(LORA, run.model.apply)(host(run.frozen), host(run.state["trainable"]), ids)
  return float(jnp.max(jnp.abs(model.apply({"params": params}, ids) - adapted)))


def simulated() -> dict:
  results = {"devices": jax.device_count(), "losses": {}}
  for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    run = Run(shape, devices=jax.devices()[:1] if shape == (1, 1, 1) else None)
    key = ",".join(map(str, shape))
    if shape == (2, 2, 2):  # checkpoint half-way, then restore it on another mesh
      first = run.train(STEPS // 2)
      manager = checkpoint.manager(os.path.join(OUT, "checkpoints"))
      checkpoint.save(manager, STEPS // 2, run.state)
      manager.wait_until_finished()
      results["losses"][key] = first + run.train(STEPS - STEPS // 2)
      results.setdefault("layout", {})[key] = layout(run)
      results["export_max_abs"] = export_error(run, os.path.join(OUT, "merged"))
      other = Run((1, 8, 1))
      target = sharding.abstract(other.state, other.state_shardings)
      other.state, _ = checkpoint.restore(manager, target, STEPS // 2)
      results["restored_mesh"] = dict(other.state["trainable"]["model"]["layers_0"]["mlp"]["up_proj"]["lora_A"]
                                      .sharding.mesh.shape)
      results["restored_losses"] = other.train(STEPS - STEPS // 2)
    else:
      results["losses"][key] = run.train(STEPS)
    if shape == (2, 4, 1):
      results.setdefault("layout", {})[key] = layout(run)
  results["accumulated_remat_losses"] = Run((2, 2, 2), micro_batches=2, remat=True).train(STEPS)
  mixed = Run((2, 2, 2), compute_dtype=jnp.bfloat16, frozen_dtype=jnp.bfloat16, remat=True)
  results["bf16_losses"] = mixed.train(STEPS)
  results["bf16_dtypes"] = dtypes(mixed)
  return results


def multi_process() -> dict:
  run = Run((2, -1, 1))
  losses = run.train(STEPS)
  manager = checkpoint.manager(os.path.join(OUT, "checkpoints"))
  checkpoint.save(manager, STEPS, run.state)
  manager.wait_until_finished()
  fresh = Run((2, -1, 1))
  restored, _ = checkpoint.restore(manager, sharding.abstract(fresh.state, fresh.state_shardings))
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored, run.state)
  return {"processes": jax.process_count(), "devices": jax.device_count(), "losses": losses,
          "restored_equal": all(jax.tree.leaves(same)),
          "export_max_abs": export_error(run, os.path.join(OUT, "merged")),
          "local_rows": [distributed.process_rows(sharding.batch_sharding(run.mesh), ROWS).start,
                         distributed.process_rows(sharding.batch_sharding(run.mesh), ROWS).stop]}


if __name__ == "__main__":
  print(json.dumps(simulated() if MODE == "simulated" else multi_process()), flush=True)
