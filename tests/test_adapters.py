"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on every model family, against a PyTorch re-computation.

The reference is independent of peftjax's code: forward hooks on transformers' PyTorch model add the adapter,
computed in torch from the same weights, at the places the papers (and AdapterHub) put it.
"""

from __future__ import annotations


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
from peftjax.models import bert, gpt2, llama

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
    loaded[family] = (torch_model, *pj.models.from_pretrained(folder), folder)
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
  """fn(params, adapters, batch dict) -> logits (BERT: last hidden state); eager (one call each is cheaper)."""
  fn = pj.apply(cfg, model.apply)

  def run(params, adapters, *args):
    out = fn(params, adapters, *args)
    return out.last_hidden_state if isinstance(out, bert.EncoderOutput) else out
  return lambda params, adapters, batch: run(params, adapters, *batch.values())


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
    elif post_ln:  # after the block's dropout, before the residual add and LayerNorm
      handles.append(module.dropout.register_forward_hook(lambda m, inp, out, a=a: out + a(out)))
    elif cfg.is_parallel:
      handles.append(module.register_forward_hook(
          lambda m, args, kwargs, out, a=a: _replace_first(out, lambda y: y + a(_first_input(args, kwargs))),
          with_kwargs=True))
    else:  # the sub-layer output, or with original_ln_before the residual stream after the sub-layer
      handles.append(module.register_forward_hook(lambda m, inp, out, a=a: _replace_first(out, lambda y: y + a(y))))
  return handles


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_pytorch_reference(zoo, family):
  torch_model, model, params, _ = zoo[family]
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


def test_config_errors(zoo):
  _, _, gpt2_params, _ = zoo["gpt2"]
  with pytest.raises(ValueError, match=r"BnConfig.non_linearity='softmax' is not supported; valid: \['gelu', "
                                       r"'gelu_new', 'relu', 'silu', 'swish', 'tanh'\]"):
    bn.BnConfig(non_linearity="softmax")
  with pytest.raises(ValueError, match=r"ParBnConfig.init_weights='zeros' is not supported; valid: "
                                       r"\['bert', 'houlsby', 'mam_adapter'\]"):
    bn.ParBnConfig(init_weights="zeros")
  with pytest.raises(ValueError, match=r"BnConfig places no adapter; set at least one of \['mh_adapter', "
                                       r"'cross_adapter', 'output_adapter'\] to True"):
    bn.BnConfig(output_adapter=False)
  with pytest.raises(ValueError, match=r"ParBnConfig.original_ln_before=True applies to serial adapters only"):
    bn.ParBnConfig(original_ln_before=True)
  with pytest.raises(ValueError, match=r"BnConfig.reduction_factor must be positive, got 0"):
    bn.BnConfig(reduction_factor=0)
  with pytest.raises(ValueError, match=r"DoubleSeqBnConfig.cross_adapter=True, but the parameter tree has no such "
                                       r"sub-layer \(valid modules: \['EncDecAttention/o'\]\)"):
    pj.init(bn.DoubleSeqBnConfig(cross_adapter=True), jax.random.key(0), gpt2_params)
  with pytest.raises(ValueError, match=r"SeqBnConfig.original_ln_before=True puts both the attention and the FFN "
                                       r"adapter on 'transformer/h_0'"):
    pj.init(bn.SeqBnConfig(mh_adapter=True), jax.random.key(0), gpt2_params)
  with pytest.raises(ValueError, match=r"BnConfig.leave_out=\(0, 1\) leaves out every layer"):
    pj.init(bn.BnConfig(leave_out=[0, 1]), jax.random.key(0), gpt2_params)
  no_ffn = {"embed": {"kernel": jnp.ones((4, 8))}, "block_0": {"mlp": {"fc": {"kernel": jnp.ones((8, 8))}}}}
  with pytest.raises(ValueError, match=r"BnConfig.output_adapter=True, but the parameter tree has no such sub-layer "
                                       r"\(valid modules: \['DenseReluDense/wo', 'mlp/c_proj', 'mlp/down_proj', "
                                       r"'output/dense'\]\)"):
    pj.init(bn.BnConfig(), jax.random.key(0), no_ffn)
  adapters = pj.init(bn.BnConfig(), jax.random.key(0), gpt2_params)
  with pytest.raises(ValueError, match=r"BnConfig cannot be merged into the weights"):
    pj.merge(bn.BnConfig(), gpt2_params, adapters)


@pytest.mark.parametrize("family", ["t5", "bert"])
def test_identity_at_init_and_parameter_counts(zoo, family):
  _, model, params, _ = zoo[family]
  batch = _batch(family)
  base = np.asarray(_apply(bn.BnConfig(), model)(params, {}, batch))
  d = 32
  for cfg, sites in [(bn.DoubleSeqBnConfig(init_weights="mam_adapter", cross_adapter=family == "t5"), (4, 10)),
                     (bn.SeqBnConfig(init_weights="mam_adapter", bottleneck_size=5), (2, 4)),
                     (bn.ParBnConfig(), (2, 4))]:
    adapters = pj.init(cfg, jax.random.key(0), params)
    m = cfg.bottleneck_size or int(d // cfg.reduction_factor)
    n_sites = sites[family == "t5"]  # BERT: 2 layers; T5: 2 encoder + 2 decoder blocks
    assert tree.count(adapters) == n_sites * (d * m + m + m * d + d)
    assert len(bn.adapter_modules(adapters)) == n_sites
    np.testing.assert_array_equal(_apply(cfg, model)(params, adapters, batch), base)
  for init, bound in [("bert", 0.15), ("houlsby", 0.02)]:  # small weights: close to the base model
    adapters = pj.init(bn.DoubleSeqBnConfig(init_weights=init), jax.random.key(0), params)
    kernels = [v for p, v in tree.flatten(adapters).items() if p.endswith("kernel")]
    assert 0 < max(float(jnp.max(jnp.abs(k))) for k in kernels) <= bound
    assert all(not jnp.any(v) for p, v in tree.flatten(adapters).items() if p.endswith("bias"))


def test_t5_placement_and_leave_out(zoo):
  _, _, params, _ = zoo["t5"]
  hosts = bn.adapter_hosts(bn.DoubleSeqBnConfig(cross_adapter=True, leave_out=(1, 2)), params)
  assert sorted(hosts) == ["decoder/block_1/layer_0/SelfAttention", "decoder/block_1/layer_1/EncDecAttention",
                           "decoder/block_1/layer_2/DenseReluDense", "encoder/block_0/layer_0/SelfAttention",
                           "encoder/block_0/layer_1/DenseReluDense"]
  hosts = bn.adapter_hosts(bn.SeqBnConfig(mh_adapter=True), params)  # the residual stream: on the T5 layers
  assert sorted(hosts) == [f"{stack}/block_{i}/layer_{k}" for stack, ks in [("decoder", (0, 2)), ("encoder", (0, 1))]
                           for i in range(2) for k in ks]


def _lm_loss(cfg, model):
  fn = pj.apply(cfg, model.apply)

  def loss(adapters, params, ids, rng):
    logits = fn(params, adapters, ids, rngs={"dropout": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
  return loss


def test_training_lowers_the_loss_and_differentiates_only_adapters(zoo):
  _, model, params, _ = zoo["llama"]
  ids = jnp.asarray(_batch("llama")["input_ids"])
  cfg = bn.DoubleSeqBnConfig(dropout=0.1)
  adapters = pj.init(cfg, jax.random.key(0), params)
  loss_fn = _lm_loss(cfg, model)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(adapters, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params, ids, rng)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(adapters, updates), opt_state, loss, grads

  opt_state, losses = tx.init(adapters), []
  for i, rng in enumerate(jax.random.split(jax.random.key(2), 20)):
    adapters, opt_state, loss, grads = step(adapters, opt_state, rng)
    losses.append(float(loss))
    if i == 0:  # gradients of the adapter leaves only (value_and_grad over argument 0), none of them zero
      assert jax.tree.structure(grads) == jax.tree.structure(adapters)
      assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
  assert losses[-1] < 0.7 * losses[0]


def test_dropout_only_with_a_dropout_rng(zoo):
  _, model, params, _ = zoo["gpt2"]
  ids = jnp.asarray(_batch("gpt2")["input_ids"])
  cfg = bn.ParBnConfig(dropout=0.5)
  adapters = _random_adapters(pj.init(cfg, jax.random.key(0), params))
  fn = pj.apply(cfg, model.apply)
  plain = fn(params, adapters, ids)
  np.testing.assert_array_equal(fn(params, adapters, ids), plain)
  assert float(jnp.max(jnp.abs(fn(params, adapters, ids, rngs={"dropout": jax.random.key(0)}) - plain))) > 1e-3


@pytest.mark.parametrize("family,module,cfg", [("gpt2", gpt2, bn.DoubleSeqBnConfig()),
                                               ("llama", llama, bn.ParBnConfig()),
                                               ("bert", bert, bn.SeqBnConfig(mh_adapter=True))])
def test_scanned_models(zoo, family, module, cfg):
  _, model, params, folder = zoo[family]
  scanned, stacked = pj.models.from_pretrained(folder, scan_layers=True)
  batch = _batch(family)
  adapters = _random_adapters(pj.init(cfg, jax.random.key(0), params))
  stacked_adapters = pj.init(cfg, jax.random.key(0), stacked)
  assert jax.tree.map(jnp.shape, stacked_adapters) == jax.tree.map(jnp.shape, module.stack_layers(adapters))
  expected = _apply(cfg, model)(params, adapters, batch)
  ours = _apply(cfg, scanned)(stacked, module.stack_layers(adapters), batch)
  assert float(jnp.max(jnp.abs(ours - expected))) < 1e-5
  with pytest.raises(ValueError, match=r"BnConfig.leave_out=\(1,\) needs per-layer parameters"):
    pj.init(bn.BnConfig(leave_out=(1,)), jax.random.key(0), stacked)


def test_composes_with_lora(zoo):
  """LoRA + Houlsby adapters in one call (in either order) equal the adapters alone on the LoRA-merged weights."""
  _, model, params, _ = zoo["bert"]
  batch = _batch("bert")
  lora_cfg, bn_cfg = pj.LoraConfig(rank=2, targets=("query", "value", "dense")), bn.DoubleSeqBnConfig()
  lora_adapters = _random_adapters(pj.init(lora_cfg, jax.random.key(0), params), seed=4)
  bn_adapters = _random_adapters(pj.init(bn_cfg, jax.random.key(1), params))
  merged = _apply(bn_cfg, model)(pj.merge(lora_cfg, params, lora_adapters), bn_adapters, batch)
  assert float(jnp.max(jnp.abs(merged - _apply(bn_cfg, model)(params, bn_adapters, batch)))) > 1e-2
  both = _apply([lora_cfg, bn_cfg], model)(params, (lora_adapters, bn_adapters), batch)
  assert float(jnp.max(jnp.abs(both - merged))) < 1e-4
  both = _apply([bn_cfg, lora_cfg], model)(params, (bn_adapters, lora_adapters), batch)  # either order
  assert float(jnp.max(jnp.abs(both - merged))) < 1e-4
