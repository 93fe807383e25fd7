"""Sharding: mesh shapes, logical-axis rules, the adapter placement policy, and LoRA training of a tiny Llama on
8 simulated CPU devices (tests/sharding_worker.py in a subprocess): equal losses on every mesh, really sharded
arrays, a checkpoint restored on another mesh, gradient accumulation, remat, bf16 compute, merged export."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

import peftjax as pj
from peftjax import sharding
from peftjax.methods.dora import DoraConfig
from peftjax.models import llama, t5

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESH = AbstractMesh((2, 4, 2), sharding.MESH_AXES)


def run_worker(args: list[str], timeout: int, script: str = "sharding_worker.py") -> dict:
  """Runs tests/`script` with `args`; returns the JSON object on its last stdout line."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  done = subprocess.run([sys.executable, str(ROOT / "tests" / script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
  return run_worker(["simulated", str(tmp_path_factory.mktemp("simulated"))], timeout=900)


def test_mesh_shape_fills_the_rest():
  assert sharding.mesh_shape((2, -1, 1), 8) == (2, 4, 1)
  assert sharding.mesh_shape((2, 2, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    sharding.mesh_shape((2, 2, 1), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape((-1, -1, 1), 8)
  with pytest.raises(ValueError, match="not a multiple of 3"):
    sharding.mesh_shape((3, -1, 1), 8)
  mesh = sharding.make_mesh((1, -1, 1))
  assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}


def test_rules_divisibility_and_axis_reuse():
  assert sharding.mesh_spec(("embed", "mlp"), (32, 64), MESH) == P("fsdp", "tensor")
  assert sharding.mesh_spec(("embed", "mlp"), (30, 63), MESH) == P(None, None)  # 4 and 2 do not divide
  assert sharding.mesh_spec(("layers", "embed", "joined_kv"), (2, 32, 16), MESH) == P(None, "fsdp", "tensor")
  rules = [("embed", "fsdp"), ("embed", "tensor"), ("vocab", ("data", "fsdp"))]
  assert sharding.mesh_spec(("embed", "embed"), (8, 8), MESH, rules) == P("fsdp", "tensor")  # next rule
  assert sharding.mesh_spec(("vocab", "embed"), (16, 8), MESH, rules) == P(("data", "fsdp"), "tensor")
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    sharding.mesh_spec(("embed",), (8,), MESH, [("embed", "model")])


def test_adapter_policy_follows_the_adapted_dimension():
  base = {"m/q/kernel": P("fsdp", "tensor"), "m/q/bias": P("tensor"),
          "layers/wo/kernel": P(None, "tensor", "fsdp")}
  assert sharding.adapter_spec("m/q/lora_A", 2, base) == P("fsdp", None)
  assert sharding.adapter_spec("m/q/lora_B", 2, base) == P(None, "tensor")
  assert sharding.adapter_spec("layers/wo/lora_A", 3, base) == P(None, "tensor", None)  # scanned: layer axis kept
  assert sharding.adapter_spec("layers/wo/lora_B", 3, base) == P(None, None, "fsdp")
  assert sharding.adapter_spec("m/q/ia3_out", 1, base) == P("tensor")
  assert sharding.adapter_spec("layers/wo/ia3_in", 2, base) == P(None, "tensor")
  assert sharding.adapter_spec("m/q/lora_magnitude_vector", 1, base) == P("tensor")
  assert sharding.adapter_spec("m/q/bias", 1, base) == P("tensor")  # BitFit / modules_to_save copies
  assert sharding.adapter_spec("prompt/embedding", 2, base) == P()  # anything else: replicated


def test_real_model_trees_get_shardings():
  """Every leaf of a scanned Llama, its LoRA and DoRA adapters and Adam state gets a spec of the right rank."""
  config = llama.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2)
  model = llama.LlamaForCausalLM(config, scan_layers=True)
  params = jax.eval_shape(lambda rng: llama.init_params(model, rng), jax.random.key(0))
  mesh = sharding.make_mesh((1, -1, 1))
  shardings = sharding.param_shardings(sharding.model_logical_axes(model), params, mesh)
  q = shardings["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.spec == P(None, "fsdp", "tensor")
  adapters = jax.eval_shape(lambda p: pj.init([pj.LoraConfig(targets=("q_proj",)), DoraConfig(targets=("v_proj",))],
                                              jax.random.key(1), p), params)
  adapter_shardings = sharding.adapter_shardings(adapters, shardings)
  dora = adapter_shardings[1]["model"]["layers"]["self_attn"]["v_proj"]
  assert dora["lora_magnitude_vector"].spec == P(None, "tensor")
  opt = sharding.opt_state_shardings(optax.adamw(1e-3), adapters[0], adapter_shardings[0])
  assert opt[0].mu["model"]["layers"]["self_attn"]["q_proj"]["lora_A"].spec == P(None, "fsdp", None)
  assert opt[0].count.spec == P()
  # UniPELT nests its LoRA under "lora/": those leaves still follow the weights they adapt.
  unipelt = pj.UniPeltConfig(lora=pj.LoraConfig(rank=2, targets=("q_proj",)), adapter=None, prefix=None)
  nested = sharding.adapter_shardings(jax.eval_shape(lambda p: pj.init(unipelt, jax.random.key(2), p), params),
                                      shardings)
  assert nested["lora"]["model"]["layers"]["self_attn"]["q_proj"]["lora_A"].spec == P(None, "fsdp", None)
  for tree, arrays in [(shardings, params), (adapter_shardings, adapters)]:
    for s, x in zip(jax.tree.leaves(tree), jax.tree.leaves(arrays)):
      assert isinstance(s, NamedSharding) and len(s.spec) <= x.ndim


def test_remat_switch_names_the_families():
  assert sharding.with_remat(llama.LlamaForCausalLM(llama.LlamaConfig())).remat
  assert sharding.with_remat(t5.T5ForConditionalGeneration(t5.T5Config())).remat
  with pytest.raises(ValueError, match="Dense has no remat option"):
    sharding.with_remat(nn.Dense(4))


def test_same_losses_on_every_mesh(simulated):
  assert simulated["devices"] == 8
  losses = simulated["losses"]
  reference = np.array(losses["1,1,1"])
  assert reference[-2] < reference[0] - 0.05  # the same batch again after 8 updates: it trained
  for mesh in ("8,1,1", "2,4,1", "2,2,2"):
    np.testing.assert_allclose(losses[mesh], reference, atol=1e-5, rtol=0, err_msg=mesh)


def test_arrays_are_sharded(simulated):
  """q_proj kernel (32, 32) on (embed, joined_kv) -> (fsdp, tensor); A (32, 4) and B (4, 32) follow it."""
  expected = {
      "2,2,2": {"kernel": (["fsdp", "tensor"], [16, 16]), "lora_A": (["fsdp", None], [16, 4]),
                "lora_B": ([None, "tensor"], [4, 16]), "mu_A": (["fsdp", None], [16, 4])},
      "2,4,1": {"kernel": (["fsdp", "tensor"], [8, 32]), "lora_A": (["fsdp", None], [8, 4]),
                "lora_B": ([None, "tensor"], [4, 32]), "mu_A": (["fsdp", None], [8, 4])},
  }
  for mesh, arrays in expected.items():
    for name, (spec, local) in arrays.items():
      got = simulated["layout"][mesh][name]
      assert (got["spec"], got["local"]) == (spec, local), (mesh, name, got)


def test_checkpoint_restores_on_another_mesh(simulated):
  """Saved after 5 steps on (2, 2, 2), restored on (1, 8, 1): the next 5 losses continue the run."""
  assert simulated["restored_mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  np.testing.assert_allclose(simulated["restored_losses"], simulated["losses"]["2,2,2"][5:], atol=1e-5, rtol=0)


def test_gradient_accumulation_with_remat_matches_full_batch(simulated):
  """2 micro-batches of unequal token counts, rematerialised layers: the same 10 losses as full batches."""
  np.testing.assert_allclose(simulated["accumulated_remat_losses"], simulated["losses"]["2,2,2"], atol=1e-5, rtol=0)


def test_bf16_compute_keeps_float32_adapters_and_optimizer_state(simulated):
  assert simulated["bf16_dtypes"] == {"frozen": ["bfloat16"], "trainable": ["float32"], "opt_state": ["float32"]}
  bf16, fp32 = np.array(simulated["bf16_losses"]), np.array(simulated["losses"]["2,2,2"])
  assert 0 < abs(bf16[0] - fp32[0]) < 2e-3  # same adapters, bfloat16 rounding only
  assert np.abs(bf16 - fp32).max() < 0.1  # Adam at lr 3e-2 amplifies the rounding over 10 steps (measured 0.04)
  assert bf16[-2] < bf16[0] - 0.05  # and it trains


def test_merged_export_from_sharded_params(simulated):
  """Merged under jit with the params' shardings, written tensor by tensor, read back: same logits as adapted."""
  assert simulated["export_max_abs"] < 1e-5
