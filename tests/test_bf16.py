"""bf16 compute (a model cloned with dtype=bfloat16 over float32 parameters): every family's matmuls take bf16
operands and accumulate in float32, and its logits stay within bf16 tolerance of the float32 model's."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.models import bert, gpt2, layers, llama, t5

IDS = np.random.default_rng(0).integers(1, 97, (2, 12)).astype(np.int32)
FAMILIES = {
    "t5": lambda: t5.T5ForConditionalGeneration(t5.T5Config(vocab_size=97, d_model=64, d_kv=16, d_ff=128,
                                                            num_layers=2, num_heads=4)),
    "bert": lambda: bert.BertForSequenceClassification(bert.BertConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)),
    "gpt2": lambda: gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2,
                                                         n_head=4)),
    "llama": lambda: llama.LlamaForCausalLM(llama.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              num_key_value_heads=2, tie_word_embeddings=True)),
}


def _inputs(kind: str) -> tuple:
  return (IDS, np.ones_like(IDS), IDS[:, :5]) if kind == "t5" else (IDS,)


def _dot_generals(jaxpr) -> list:
  """Every dot_general equation of `jaxpr`, nested ones included."""
  found = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
  for sub in jax.extend.core.subjaxprs(jaxpr):
    found += _dot_generals(sub)
  return found


@pytest.mark.parametrize("kind", FAMILIES)
def test_bf16_matmuls_accumulate_in_fp32_and_logits_stay_close(kind):
  model = FAMILIES[kind]()
  init = t5.init_params if kind == "t5" else layers.init_params
  params = init(model, jax.random.key(0))
  low = model.clone(dtype=jnp.bfloat16)
  inputs = _inputs(kind)
  ours = np.asarray(jax.jit(lambda p: low.apply({"params": p}, *inputs))(params), np.float32)
  reference = np.asarray(jax.jit(lambda p: model.apply({"params": p}, *inputs))(params), np.float64)
  scale = np.abs(reference).max()
  assert np.abs(ours - reference).max() <= 0.03 * scale, (np.abs(ours - reference).max(), scale)

  dots = _dot_generals(jax.make_jaxpr(lambda p: low.apply({"params": p}, *inputs))(params).jaxpr)
  assert all(v.aval.dtype == jnp.bfloat16 for eqn in dots for v in eqn.invars)
  plain = [eqn for eqn in dots if eqn.params["preferred_element_type"] != jnp.float32]
  # all accumulate in float32, a tied output head (layers.attend, not flax's bf16 -> bf16 nn.Embed.attend) included
  assert not plain and len(dots) >= 8


def test_bf16_dense_gradients_are_bf16_matmuls_accumulating_in_fp32():
  """The backward matmuls of a bf16 Dense take bf16 operands (JAX's own rule for a float32-accumulating dot
  multiplies a float32 cotangent by a float32 copy of the kernel) and give the same gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 16)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (16, 8)).astype(jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))

  def loss(dot, x, w):
    return jnp.sum(dot(x, w, dims).astype(jnp.float32) ** 2)

  def plain(x, w, dims):
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(x.dtype)

  grad = jax.grad(loss, argnums=(1, 2))
  ours, reference = grad(layers.accumulating_dot_general, x, w), grad(plain, x, w)
  for a, b in zip(ours, reference):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)
  dots = _dot_generals(jax.make_jaxpr(lambda x, w: grad(layers.accumulating_dot_general, x, w))(x, w).jaxpr)
  assert len(dots) == 3  # forward, d x, d w
  assert all(v.aval.dtype == jnp.bfloat16 for eqn in dots for v in eqn.invars)
  assert all(eqn.params["preferred_element_type"] == jnp.float32 for eqn in dots)
