"""The named combinations: MAM adapter (prefix tuning + parallel FFN adapter) and UniPELT (gated LoRA, adapter, prefix).

Tiny random transformers checkpoints (hidden 32, 2 layers) loaded with our `from_pretrained`.  UniPELT's gates are
checked where their effect is exact: open (sigmoid = 1) equals the ungated list composition, half open (0.5)
equals that composition with every contribution halved, closed (0) equals the base model with k zero keys and
values in front of every layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import tree as ptree
from peftjax.methods import bottleneck_adapter as bn
from peftjax.methods import mam, prefix_tuning, unipelt
from peftjax.models import gpt2

K = 3  # prefix positions
KINDS = {
    "bert": (transformers.BertForSequenceClassification, transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40, num_labels=3)),
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    "t5": (transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)),
}
LORA_TARGETS = {"bert": ("query", "value"), "gpt2": ("c_attn",), "llama": ("q_proj", "v_proj"), "t5": ("q", "v")}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  """{kind: (model, params)}, loaded on first use from a transformers checkpoint with random weights."""
  loaded = {}

  def get(kind: str):
    if kind not in loaded:
      torch.manual_seed(0)
      folder = str(tmp_path_factory.mktemp(kind))
      cls, config = KINDS[kind]
      torch_model = cls(config).eval()
      with torch.no_grad():  # weights that move the outputs visibly
        for name, param in torch_model.named_parameters():
          if name.endswith("bias"):
            param.normal_(0.0, 0.1)
          elif "norm" not in name.lower() and ".ln_" not in name and param.ndim == 2:
            param.normal_(0.0, 0.15)
      torch_model.save_pretrained(folder)
      loaded[kind] = pj.models.from_pretrained(folder)
    return loaded[kind]
  return get


def _batch(kind: str) -> dict:
  rng = np.random.default_rng(0)
  input_ids = rng.integers(3, KINDS[kind][1].vocab_size, (3, 7))
  attention_mask = np.ones((3, 7), np.int64)
  attention_mask[1, 5:] = attention_mask[2, 3:] = 0
  batch = dict(input_ids=input_ids, attention_mask=attention_mask)
  if kind == "t5":
    batch["decoder_input_ids"] = np.concatenate([np.zeros((3, 1), np.int64), rng.integers(3, 100, (3, 4))], 1)
  return batch


def _loss(kind: str, logits: jax.Array, batch: dict) -> jax.Array:
  """Cross-entropy for a small task: labels 0, 1, 2 (BERT), else token 7 at every (real) position."""
  if kind == "bert":
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(3)).mean()
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(logits.shape[:2], 7))
  weights = jnp.ones(logits.shape[:2]) if kind == "t5" else batch["attention_mask"]
  return jnp.sum(losses * weights) / jnp.sum(weights)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _unipelt(kind: str, **changes) -> unipelt.UniPeltConfig:
  cfg = unipelt.UniPeltConfig(
      lora=pj.LoraConfig(rank=2, alpha=2.0, targets=LORA_TARGETS[kind]),
      adapter=bn.SeqBnConfig(reduction_factor=4),
      prefix=prefix_tuning.PrefixTuningConfig(K, encoder_hidden_size=16, stacks=("encoder", "decoder"),
                                              shift_positions=False))
  return dataclasses.replace(cfg, **changes)


def _set_gates(tree: dict, bias: float) -> dict:
  """`tree` with every gate's kernel 0 and bias `bias` (gate value sigmoid(bias) for any input)."""
  flat = ptree.flatten(tree)
  return ptree.unflatten({path: (jnp.full_like(v, bias if path.endswith("bias") else 0.0) if "_gate/" in path else v)
                          for path, v in flat.items()})


def _without_gates(tree: dict, factor: float = 1.0) -> dict:
  """The sub-tree's ungated leaves, LoRA B and the adapter's up projection times `factor`."""
  return ptree.unflatten({path: v * factor if ("lora_B" in path or f"/{bn.UP}/" in path) else v
                          for path, v in ptree.flatten(tree).items() if "_gate/" not in path})


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5"])
def test_unipelt_gates_open_half_and_closed(zoo, kind):
  """Gate 1: the ungated list [LoRA (scaling 1), SeqBn, prefix]; gate 0.5: the same with every contribution
  halved (prefix keys and values halved); gate 0: the base model with k zero prefix keys and values."""
  model, params = zoo(kind)
  batch = _batch(kind)
  cfg = _unipelt(kind)
  tree = pj.init(cfg, jax.random.key(0), params)
  tree["lora"] = ptree.unflatten({p: v + 0.3 * (p.endswith("lora_B")) * jax.random.normal(jax.random.key(1), v.shape)
                                  for p, v in ptree.flatten(tree["lora"]).items()})  # B != 0: LoRA acts
  gated = jax.jit(pj.apply(cfg, model.apply))
  plain_prefix = prefix_tuning.PTuningV2Config(K, stacks=cfg.prefix.stacks, shift_positions=False)
  ungated_cfgs = [cfg.lora, cfg.adapter, plain_prefix]
  ungated = jax.jit(pj.apply(ungated_cfgs, model.apply))
  table = prefix_tuning.prefix_table(cfg.prefix, tree["prefix"])
  base = model.apply({"params": params}, **batch)

  opened = gated(params, _set_gates(tree, 50.0), **batch)
  expected = ungated(params, (_without_gates(tree["lora"]), _without_gates(tree["adapter"]), {"embedding": table}),
                     **batch)
  assert _max_diff(opened, expected) < 1e-5
  assert _max_diff(opened, base) > 1e-2

  half = gated(params, _set_gates(tree, 0.0), **batch)
  halved = (_without_gates(tree["lora"], 0.5), _without_gates(tree["adapter"], 0.5), {"embedding": 0.5 * table})
  assert _max_diff(half, ungated(params, halved, **batch)) < 1e-5
  assert _max_diff(half, opened) > 1e-3

  closed = gated(params, _set_gates(tree, -50.0), **batch)
  expected = pj.apply(plain_prefix, model.apply)(params, {"embedding": jnp.zeros_like(table)}, **batch)
  assert _max_diff(closed, expected) < 1e-5
  assert _max_diff(closed, base) > 1e-3  # zero keys and values still take attention weight


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_unipelt_gates_are_per_example(zoo, kind):
  """With random gates each example gets its own gate values: two rows together (a batch size other than K and the
  head count) give what each row gives alone."""
  model, params = zoo(kind)
  batch = {name: value[:2] for name, value in _batch(kind).items()}
  cfg = _unipelt(kind)
  tree = pj.init(cfg, jax.random.key(0), params)
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  tree = jax.tree.unflatten(treedef, [v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])
  adapted = pj.apply(cfg, model.apply)
  together = adapted(params, tree, **batch)
  for row in range(2):
    alone = adapted(params, tree, **{name: value[row:row + 1] for name, value in batch.items()})
    assert _max_diff(together[row:row + 1], alone) < 1e-5


def test_unipelt_on_layer_stacked_gpt2(zoo):
  """A scanned GPT-2 with the stacked tree (random gates, so each example gets its own gate values) gives the
  unrolled model's outputs; init on the stacked parameters gives the stacked tree's shapes."""
  model, params = zoo("gpt2")
  batch = _batch("gpt2")
  cfg = _unipelt("gpt2")
  tree = pj.init(cfg, jax.random.key(0), params)
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  tree = jax.tree.unflatten(treedef, [v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])
  stacked = {part: sub if part == "prefix" else gpt2.stack_layers(sub) for part, sub in tree.items()}
  scanned_model, scanned_params = model.clone(scan_layers=True), gpt2.stack_layers(params)
  unrolled = pj.apply(cfg, model.apply)(params, tree, **batch)
  scanned = pj.apply(cfg, scanned_model.apply)(scanned_params, stacked, **batch)
  assert _max_diff(unrolled, scanned) < 1e-5
  assert _max_diff(unrolled, model.apply({"params": params}, **batch)) > 1e-2
  shapes = lambda t: jax.tree.map(np.shape, t)  # noqa: E731
  assert shapes(pj.init(cfg, jax.random.key(0), scanned_params)) == shapes(stacked)


def test_unipelt_tree_and_counts_by_hand(zoo):
  """BERT (d 32, 2 layers, 4 heads): every submodule's leaves and gates, counted from the shapes."""
  _, params = zoo("bert")
  cfg = _unipelt("bert")
  tree = pj.init(cfg, jax.random.key(0), params)
  flat = ptree.flatten(tree)
  layer = "bert/encoder/layer_0"
  assert flat[f"lora/{layer}/attention/self/query/lora_gate/kernel"].shape == (32, 1)
  assert flat[f"adapter/{layer}/output/adapter_gate/kernel"].shape == (32, 1)
  assert flat[f"prefix_gates/{layer}/attention/self/prefix_gate/kernel"].shape == (32, 1)  # AdapterHub's shared gate
  unshared = ptree.flatten(pj.init(_unipelt("bert", shared_gating=False), jax.random.key(0), params))
  assert unshared[f"prefix_gates/{layer}/attention/self/prefix_gate/kernel"].shape == (32, 2)
  assert not np.any(np.asarray(flat[f"adapter/{layer}/output/adapter_gate/bias"]))  # bert init: bias 0
  lora = 2 * 2 * (32 * 2 + 2 * 32 + 32 + 1)  # 2 layers x (query, value): A, B, gate kernel and bias
  adapter = 2 * (32 * 8 + 8 + 8 * 32 + 32 + 32 + 1)  # m = 32 // 4 = 8, plus the gate
  prefix = K * 32 + (32 * 16 + 16) + (16 * 2 * 2 * 32 + 2 * 2 * 32) + 2 * (32 + 1)
  assert ptree.count(tree["lora"]) == lora and ptree.count(tree["adapter"]) == adapter
  assert ptree.count(tree["prefix"]) + ptree.count(tree["prefix_gates"]) == prefix
  assert ptree.count(tree) == lora + adapter + prefix
  # AdapterHub's defaults: LoRA r 8 on q, v; SeqBn rf 16 (m 2); prefix 10 through an MLP of width 512
  _, llama = zoo("llama")
  full = pj.init(unipelt.UniPeltConfig(lora=pj.LoraConfig(rank=8, alpha=2, targets=("q_proj", "v_proj"))),
                 jax.random.key(0), llama)
  lora = 2 * ((32 * 8 + 8 * 32 + 32 + 1) + (32 * 8 + 8 * 16 + 32 + 1))  # v_proj: 2 kv heads x 8 = 16 outputs
  prefix = 10 * 16 + (16 * 512 + 512) + (512 * 2 * 2 * 16 + 2 * 2 * 16) + 2 * (32 + 1)
  assert ptree.count(full) == lora + 2 * (32 * 2 + 2 + 2 * 32 + 32 + 33) + prefix


@pytest.mark.parametrize("method,kind", [("unipelt", "bert"), ("unipelt", "llama"), ("mam", "bert"),
                                         ("mam", "gpt2"), ("mam", "t5")])
def test_short_training_lowers_the_loss(zoo, method, kind):
  """Adam on the adapter trees alone lowers the loss and moves every leaf, gates included."""
  model, params = zoo(kind)
  batch = _batch(kind)
  cfg = _unipelt(kind) if method == "unipelt" else mam.mam_config(prefix_length=K, prefix_hidden=16)
  adapters = pj.init(cfg, jax.random.key(0), params)
  adapted = pj.apply(cfg, model.apply)
  loss_fn = lambda a: _loss(kind, adapted(params, a, **batch), batch)  # noqa: E731
  start = adapters
  tx = optax.adam(0.02)

  @jax.jit
  def step(adapters, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(adapters, updates), opt_state, loss

  opt_state, losses = tx.init(adapters), []
  for _ in range(12):
    adapters, opt_state, loss = step(adapters, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1
  assert all(_max_diff(a, b) > 0 for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(start)))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5"])
def test_mam_is_prefix_tuning_at_init_and_counts_by_hand(zoo, kind):
  """The parallel adapter starts at W_up = 0, so MAM at init is its prefix tuning alone; the parallel
  adapter sits on the FFN only.  Counts: prefix embedding + MLP, and d * m + m + m * d + d per FFN, m = d // 2."""
  model, params = zoo(kind)
  batch = _batch(kind)
  cfgs = mam.mam_config(prefix_length=K, prefix_hidden=16)
  prefix_tree, adapter_tree = pj.init(cfgs, jax.random.key(0), params)
  mixed = pj.apply(cfgs, model.apply)(params, (prefix_tree, adapter_tree), **batch)
  prefix_only = pj.apply(cfgs[0], model.apply)(params, prefix_tree, **batch)
  np.testing.assert_array_equal(mixed, prefix_only)
  assert _max_diff(mixed, model.apply({"params": params}, **batch)) > 1e-3  # prefixes act from the start
  ffn = {"bert": "output", "gpt2": "mlp", "llama": "mlp", "t5": "DenseReluDense"}[kind]
  hosts = bn.adapter_hosts(cfgs[1], params)
  assert len(hosts) == (4 if kind == "t5" else 2) and all(h.endswith(ffn) for h in hosts)
  width = 16 if kind == "llama" else 32  # key width (kv heads x head_dim)
  layers = 4 if kind == "t5" else 2  # T5: prefixes in the encoder's and the decoder's layers
  assert ptree.count(prefix_tree) == K * width + (width * 16 + 16) + (16 * layers * 2 * width + layers * 2 * width)
  assert ptree.count(adapter_tree) == len(hosts) * (32 * 16 + 16 + 16 * 32 + 32)
  # AdapterHub's MAM on BERT: 30 prefix positions through an MLP of width 800, parallel adapter of width d // 2
  if kind == "bert":
    prefix_tree, adapter_tree = pj.init(mam.mam_config(), jax.random.key(0), params)
    assert adapter_tree["bert"]["encoder"]["layer_0"]["output"][bn.UP]["kernel"].shape == (16, 32)
    assert ptree.count(prefix_tree) == 30 * 32 + (32 * 800 + 800) + (800 * 2 * 2 * 32 + 2 * 2 * 32)


def test_merge_and_config_errors(zoo):
  _, params = zoo("bert")
  cfgs = mam.mam_config(prefix_length=K, prefix_hidden=16)
  with pytest.raises(ValueError, match="PrefixTuningConfig cannot be merged into the weights"):
    pj.merge(cfgs, params, pj.init(cfgs, jax.random.key(0), params))
  cfg = _unipelt("bert")
  with pytest.raises(ValueError, match="UniPeltConfig cannot be merged into the weights"):
    pj.merge(cfg, params, pj.init(cfg, jax.random.key(0), params))
  with pytest.raises(ValueError, match=r"UniPeltConfig has no submodule; set at least one of \['lora', 'adapter', "
                                       r"'prefix'\]"):
    unipelt.UniPeltConfig(lora=None, adapter=None, prefix=None)
  with pytest.raises(ValueError, match="UniPeltConfig.adapter must be a BnConfig .* got LoraConfig"):
    unipelt.UniPeltConfig(adapter=pj.LoraConfig())
  no_attention = {"embed": {"embedding": jnp.zeros((5, 8))}, "dense": {"kernel": jnp.zeros((8, 8))}}
  with pytest.raises(ValueError, match="the parameters hold no attention key projection"):
    pj.init(unipelt.UniPeltConfig(lora=None, adapter=None), jax.random.key(0), no_attention)
