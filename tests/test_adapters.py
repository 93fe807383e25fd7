"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on every model family, against a PyTorch re-computation.

The reference is independent of peftjax's code: forward hooks on transformers' PyTorch model add the adapter,
computed in torch from the same weights, at the places the papers (and AdapterHub) put it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import tree
from peftjax.methods import bottleneck_adapter as bn
from peftjax.models import bert, gpt2, llama, t5

VOCAB = 97
FAMILIES = {
    "bert": lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40), add_pooling_layer=False),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=40, bos_token_id=1, eos_token_id=2)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu")),
}
# family -> configs checked against the reference (T5 also gets cross-attention adapters)
CONFIGS = {
    "houlsby": lambda family: bn.DoubleSeqBnConfig(cross_adapter=family == "t5"),
    "pfeiffer": lambda family: bn.SeqBnConfig(mh_adapter=family in ("t5", "bert"), cross_adapter=family == "t5",
                                              non_linearity="gelu"),
    "parallel": lambda family: bn.ParBnConfig(mh_adapter=True, non_linearity="tanh", reduction_factor=4),
}
TORCH_ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh,
                     "swish": torch.nn.functional.silu, "silu": torch.nn.functional.silu}


def _torch_model(family: str):
  torch.manual_seed(0)
  model = FAMILIES[family]()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name.lower() and name.endswith("weight"):
        param.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        param.normal_(0.0, 0.1)
      elif "embed" not in name and name not in ("shared.weight", "transformer.wte.weight"):
        param.normal_(0.0, 0.15)
  return model.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  """{family: (torch model, our model, our params)}: the same random weights in both."""
  loaded = {}
  for family in FAMILIES:
    torch_model = _torch_model(family)
    folder = str(tmp_path_factory.mktemp(family))
    torch_model.save_pretrained(folder)
    loaded[family] = (torch_model, *pj.models.from_pretrained(folder))
  return loaded


def _batch(family: str) -> dict:
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB, (2, 7))
  mask = np.ones((2, 7), np.int64)
  mask[1, 5:] = 0
  batch = dict(input_ids=ids, attention_mask=mask)
  if family == "t5":
    batch.update(decoder_input_ids=rng.integers(3, VOCAB, (2, 5)), decoder_attention_mask=np.ones((2, 5), np.int64))
  return batch


def _apply(cfg, model):
  """fn(params, adapters, batch dict) -> logits (BERT: last hidden state), jitted."""
  fn = pj.apply(cfg, model.apply)

  def run(params, adapters, *args):
    out = fn(params, adapters, *args)
    return out.last_hidden_state if isinstance(out, bert.EncoderOutput) else out
  jitted = jax.jit(run)
  return lambda params, adapters, batch: jitted(params, adapters, *batch.values())


def _torch_out(model, batch) -> np.ndarray:
  with torch.no_grad():
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})
  return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).numpy()


def _random_adapters(adapters, seed: int = 1):
  """Adapter weights far from their init, so that every adapter visibly changes the output."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])


def _torch_adapter(cfg, leaves: dict):
  """a(x) = s * (f(x W_down + b_down) W_up + b_up), written in torch from one module's adapter leaves."""
  w = {k: torch.tensor(np.asarray(v)) for k, v in tree.flatten(leaves).items()}
  act = TORCH_ACTIVATIONS[cfg.non_linearity]
  return lambda x: cfg.scaling * (act(x @ w["adapter_down/kernel"] + w["adapter_down/bias"]) @ w["adapter_up/kernel"]
                                  + w["adapter_up/bias"])


def _replace_first(out, fn):
  return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def _first_input(args, kwargs):
  return args[0] if args else kwargs["hidden_states"]


def _add_reference_hooks(cfg, torch_model, adapters) -> list:
  """Hooks that put each adapter where the papers do; returns the handles."""
  handles = []
  modules = dict(torch_model.named_modules())
  for host, leaves in bn.adapter_modules(adapters).items():
    a = _torch_adapter(cfg, leaves)
    module = modules[tree.hf_name(host)]
    post_ln = type(module).__name__ in ("BertSelfOutput", "BertOutput")
    if post_ln and cfg.original_ln_before:  # LN(z + a(LN(z))), z = dense output + residual
      ln = module.LayerNorm
      handles.append(ln.register_forward_hook(lambda m, inp, out, a=a: torch.nn.functional.layer_norm(
          inp[0] + a(out), m.normalized_shape, m.weight, m.bias, m.eps)))
    elif post_ln and cfg.is_parallel:  # the sub-layer's input, captured where the sub-layer starts
      start = modules[tree.hf_name(host).replace("attention.output", "attention.self").replace(
          "output", "intermediate")]
      seen = {}
      handles.append(start.register_forward_pre_hook(
          lambda m, args, kwargs, seen=seen: seen.update(x=_first_input(args, kwargs)), with_kwargs=True))
      handles.append(module.dense.register_forward_hook(lambda m, inp, out, a=a, seen=seen: out + a(seen["x"])))
    elif post_ln:
      handles.append(module.dense.register_forward_hook(lambda m, inp, out, a=a: out + a(out)))
    elif cfg.is_parallel:
      handles.append(module.register_forward_hook(
          lambda m, args, kwargs, out, a=a: _replace_first(out, lambda y: y + a(_first_input(args, kwargs))),
          with_kwargs=True))
    else:  # the sub-layer output, or with original_ln_before the residual stream after the sub-layer
      handles.append(module.register_forward_hook(lambda m, inp, out, a=a: _replace_first(out, lambda y: y + a(y))))
  return handles


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_pytorch_reference(zoo, family):
  torch_model, model, params = zoo[family]
  batch = _batch(family)
  base = _torch_out(torch_model, batch)
  for name, make in CONFIGS.items():
    cfg = make(family)
    adapters = _random_adapters(pj.init(cfg, jax.random.key(0), params))
    handles = _add_reference_hooks(cfg, torch_model, adapters)
    try:
      expected = _torch_out(torch_model, batch)
    finally:
      for handle in handles:
        handle.remove()
    ours = np.asarray(_apply(cfg, model)(params, adapters, batch))
    assert np.max(np.abs(expected - base)) > 1e-2, (family, name)  # the adapters matter
    assert np.max(np.abs(ours - expected)) < 1e-4, (family, name)
