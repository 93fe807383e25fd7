"""Mixtral and Qwen3-MoE against transformers' PyTorch classes: top-k routed experts (stacked weights, no loop over
experts), logits (left and right padding, scanned where the layers are alike), greedy generation, checkpoints in
transformers' per-expert file layout both ways, and LoRA on the attention with the router trained through
modules_to_save, as Hugging Face PEFT folders both ways."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import interop, models
from peftjax.methods import lora, lora_experts, modules_to_save
from peftjax.models import hf_io, llama, moe

from compare import assert_same_tokens  # tests/ is on sys.path under pytest
from test_llama import LEFT, RIGHT, TINY, _greedy, _logits, _max_diff, _randomize, _torch_generate, _torch_logits

VARIANTS = {
    # 4 experts, 2 per token, every layer sparse, a 4-token sliding window, grouped-query keys.
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2,
                                sliding_window=4)),
    # layer 0 a dense MLP (decoder_sparse_step 2), layer 1 3-of-6 experts, probabilities not renormalised.
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=24,
                                   num_key_value_heads=2, decoder_sparse_step=2, norm_topk_prob=False)),
    # every layer sparse, renormalised top-2 of 4, biases on the attention, tied head.
    "qwen3_moe_norm": ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        norm_topk_prob=True, attention_bias=True, tie_word_embeddings=True)),
}


def _classes(variant: str):
  prefix = VARIANTS[variant][0]
  return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")


def _torch_model(variant: str):
  config_cls, model_cls = _classes(variant)
  torch.manual_seed(0)
  return _randomize(model_cls(config_cls(**TINY, **VARIANTS[variant][1])))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{variant: folder written by transformers' save_pretrained}."""
  folders = {}
  for variant in VARIANTS:
    folders[variant] = str(tmp_path_factory.mktemp(variant))
    _torch_model(variant).save_pretrained(folders[variant])
  return folders


def _load_torch(folder: str, variant: str):
  return _classes(variant)[1].from_pretrained(folder).eval()


def test_routing_weights_are_the_top_k_softmax():
  logits = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-probs, -1)[:, :2]
  expected = np.zeros_like(probs)
  np.put_along_axis(expected, top, np.take_along_axis(probs, top, -1), -1)
  np.testing.assert_allclose(moe.routing_weights(logits, 2, False), expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(moe.routing_weights(logits, 2, True), expected / expected.sum(-1, keepdims=True),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_generation_match_transformers(checkpoints, variant):
  torch_model = _load_torch(checkpoints[variant], variant)
  model, params = models.from_pretrained(checkpoints[variant])  # dispatch through FAMILIES
  c = model.config
  assert c.model_type == torch_model.config.model_type and c.num_local_experts == torch_model.config.num_experts
  experts = params["model"]["layers_1"]["mlp"]["experts"]
  assert experts["gate_up_proj"].shape == (c.num_local_experts, 2 * c.moe_intermediate_size, c.hidden_size)
  assert c.moe_layers == ((False, True) if variant == "qwen3_moe" else (True, True))
  for batch in (RIGHT, LEFT):
    expected = _torch_logits(torch_model, batch)
    assert np.abs(expected).max() > 1.0  # the random model is not trivially flat
    assert _max_diff(_logits(model, params, batch), expected, batch["attention_mask"]) < 1e-4
  ours = _greedy(model, params)
  assert ours.shape == (3, 16) and len(np.unique(ours)) > 4
  assert_same_tokens(ours, _torch_generate(torch_model, LEFT, 0, eos_token_id=2), "ours vs transformers generate")
  if variant == "qwen3_moe":  # a dense and a sparse layer cannot be scanned
    with pytest.raises(ValueError, match="scan_layers needs layers of one kind"):
      llama.from_pretrained(checkpoints[variant], scan_layers=True)
  if variant != "mixtral":
    return
  scanned, stacked = llama.from_pretrained(checkpoints[variant], scan_layers=True, remat=True)
  assert _max_diff(_logits(scanned, stacked, LEFT), expected, LEFT["attention_mask"]) < 1e-4
  np.testing.assert_array_equal(_greedy(scanned, stacked), ours)
  axes = llama.logical_axes(scanned)
  P = jax.sharding.PartitionSpec
  assert axes["model"]["layers"]["mlp"]["experts"]["gate_up_proj"] == P("layers", "expert", "mlp", "embed")
  assert axes["model"]["layers"]["mlp"]["gate"]["kernel"] == P("layers", "embed", "expert")


def test_routing_matters(checkpoints):
  """Routing to every expert (top_k = all, renormalised) changes the output: the top-k choice is tested."""
  model, params = llama.from_pretrained(checkpoints["mixtral"])
  every = model.clone(config=dataclasses.replace(model.config, num_experts_per_tok=4))
  assert _max_diff(_logits(model, params, RIGHT), _logits(every, params, RIGHT), RIGHT["attention_mask"]) > 1e-2


def test_load_balancing_loss_matches_transformers(checkpoints):
  """The auxiliary loss from the sown router logits equals transformers' aux_loss (padding left out), scanned too."""
  torch_model = _load_torch(checkpoints["mixtral"], "mixtral")
  with torch.no_grad():
    expected = float(torch_model(**{k: torch.tensor(v) for k, v in RIGHT.items()}, output_router_logits=True).aux_loss)
  for scan_layers in (False, True):
    model, params = llama.from_pretrained(checkpoints["mixtral"], scan_layers=scan_layers)
    _, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(
        {"params": params}, RIGHT["input_ids"], RIGHT["attention_mask"])
    router_logits = moe.sown_router_logits(state["intermediates"])
    assert len(router_logits) == (1 if scan_layers else 2)
    loss = float(moe.load_balancing_loss(router_logits, 2, RIGHT["attention_mask"]))
    assert abs(loss - expected) < 1e-5
  assert float(moe.load_balancing_loss(router_logits, 2)) != pytest.approx(loss)  # the mask matters


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe"])
def test_save_pretrained_writes_transformers_layout(checkpoints, variant, tmp_path):
  model, params = llama.from_pretrained(checkpoints[variant])
  folder = str(tmp_path / "ours")
  llama.save_pretrained(model, params, folder)
  assert sorted(hf_io.read_state_dict(folder)) == sorted(hf_io.read_state_dict(checkpoints[variant]))
  torch_model, info = _classes(variant)[1].from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  reference = _load_torch(checkpoints[variant], variant).config
  for key in ("num_experts", "num_experts_per_tok", "sliding_window", "model_type"):
    assert getattr(torch_model.config, key) == getattr(reference, key), key
  assert torch_model.model.layers[0].self_attn.head_dim == model.config.head_dim
  if variant == "qwen3_moe":
    for key in ("moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
      assert getattr(torch_model.config, key) == getattr(reference, key), key
  expected = _torch_logits(torch_model.eval(), RIGHT)
  assert _max_diff(_logits(model, params, RIGHT), expected, RIGHT["attention_mask"]) < 1e-4
  model2, params2 = llama.from_pretrained(folder)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe"])
def test_lora_and_trained_router_with_peft_both_ways(checkpoints, variant, tmp_path):
  folder = checkpoints[variant]
  targets = ("q_proj", "k_proj", "v_proj", "o_proj")
  cfgs = [lora.LoraConfig(rank=4, alpha=8, targets=targets), modules_to_save.ModulesToSaveConfig(("gate",))]
  model, params = llama.from_pretrained(folder)
  factors, copies = pj.init(cfgs, jax.random.key(0), params)
  assert sorted(pj.tree.flatten(copies)) == [f"model/layers_{i}/mlp/gate/kernel" for i in range(2)
                                             if model.config.moe_layers[i]]
  rng = np.random.default_rng(1)
  adapters = tuple(jax.tree.map(lambda x: np.asarray(x) + rng.uniform(-0.3, 0.3, x.shape).astype(np.float32), tree)
                   for tree in (factors, copies))
  ids, mask = RIGHT["input_ids"], RIGHT["attention_mask"]
  forward = lambda cfgs, adapters: np.asarray(jax.jit(pj.apply(cfgs, model.apply))(params, adapters, ids, mask))  # noqa
  ours = forward(cfgs, adapters)
  router_only = forward(cfgs, (jax.tree.map(np.zeros_like, adapters[0]), adapters[1]))
  assert _max_diff(router_only, _logits(model, params, RIGHT), mask) > 1e-2  # the trained router matters

  interop.save_adapter(str(tmp_path / "ours"), cfgs, adapters, task_type="CAUSAL_LM")
  peft_model = peft.PeftModel.from_pretrained(_load_torch(folder, variant), str(tmp_path / "ours")).eval()
  assert _max_diff(_torch_logits(peft_model, RIGHT), ours, mask) < 1e-4

  all_linear = peft.get_peft_model(_load_torch(folder, variant), peft.LoraConfig(target_modules="all-linear"))
  peft_all = {name.removeprefix("base_model.model.") for name, m in all_linear.named_modules() if hasattr(m, "lora_A")}
  our_all = {pj.tree.hf_name(p) for p in pj.tree.match_targets(params, "all-linear")}
  # PEFT's all-linear adapts the routers too (target_parameters gate.weight), and the stacked experts, which ours
  # leaves to ExpertLoraConfig; (ours also takes a dense layer's MLP, which peft 0.21.2 leaves out on Qwen3-MoE)
  assert {n for n in peft_all - our_all if ".mlp.experts" not in n} == set() and any(".mlp.gate" in n for n in our_all)

  peft_model = peft.get_peft_model(_load_torch(folder, variant), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=["gate"])).eval()
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if param.requires_grad:
        param.add_(torch.tensor(rng.uniform(-0.3, 0.3, param.shape).astype(np.float32)))
  peft_model.save_pretrained(str(tmp_path / "theirs"))
  their_cfgs, their_adapters = interop.load_adapter(str(tmp_path / "theirs"), params)
  theirs = _torch_logits(peft_model, RIGHT)
  assert _max_diff(forward(their_cfgs, their_adapters), theirs, mask) < 1e-4
  assert _max_diff(theirs, ours, mask) > 1e-2  # a different adapter: the comparison above is not vacuous


def test_expert_lora_matches_peft_target_parameters(checkpoints, tmp_path):
  """LoRA on the stacked experts (both projections, every expert its own pair) plus q_proj, against the real peft's
  target_parameters with randomised factors; merged, unmerged and scanned alike; PEFT folders both ways."""
  from peft.tuners.lora.layer import ParamWrapper
  folder = checkpoints["mixtral"]
  model, params = llama.from_pretrained(folder)
  experts = model.config.num_local_experts
  peft_model = peft.get_peft_model(_load_torch(folder, "mixtral"), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
  rng = np.random.default_rng(5)
  with torch.no_grad():
    for _, param in peft_model.named_parameters():
      if param.requires_grad:
        param.add_(torch.tensor(rng.uniform(-0.3, 0.3, param.shape).astype(np.float32)))
  peft_model.eval()
  cfgs = [lora.LoraConfig(rank=2, alpha=4, targets=("q_proj",)), lora_experts.ExpertLoraConfig(rank=2, alpha=4)]
  ours = [{}, {}]
  for name, module in peft_model.named_modules():
    if not isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) or "default" not in module.lora_A:
      continue
    layer = re.search(r"layers\.(\d+)\.", name).group(1)
    a, b = module.lora_A["default"].weight.detach().numpy(), module.lora_B["default"].weight.detach().numpy()
    if isinstance(module, ParamWrapper):  # PEFT nests one wrapper per parameter: experts, experts.base_layer
      path = f"model/layers_{layer}/mlp/experts/{module.parameter_name}"
      ours[1][f"{path}_lora_A"], ours[1][f"{path}_lora_B"] = lora_experts.from_peft(a, b, experts)
      for x, y in zip(lora_experts.to_peft(ours[1][f"{path}_lora_A"], ours[1][f"{path}_lora_B"]), (a, b)):
        np.testing.assert_array_equal(x, y)
    else:
      ours[0][f"model/layers_{layer}/self_attn/q_proj/lora_A"] = a.T
      ours[0][f"model/layers_{layer}/self_attn/q_proj/lora_B"] = b.T
  adapters = tuple(pj.tree.unflatten(t) for t in ours)
  init = pj.init(cfgs, jax.random.key(0), params)
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, adapters)
  assert init[1]["model"]["layers_0"]["mlp"]["experts"]["gate_up_proj_lora_A"].shape == (experts, 64, 2)

  ids, mask = RIGHT["input_ids"], RIGHT["attention_mask"]
  adapted = np.asarray(jax.jit(pj.apply(cfgs, model.apply))(params, adapters, ids, mask))
  theirs = _torch_logits(peft_model, RIGHT)
  assert _max_diff(adapted, theirs, mask) < 1e-5
  only_attention = np.asarray(jax.jit(pj.apply(cfgs[0], model.apply))(params, adapters[0], ids, mask))
  assert _max_diff(adapted, only_attention, mask) > 1e-2  # the experts' adapters matter
  merged = pj.merge(cfgs, params, adapters)
  assert _max_diff(_logits(model, merged, RIGHT), theirs, mask) < 1e-5
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), pj.unmerge(cfgs, merged, adapters), params)
  scanned, stacked = llama.from_pretrained(folder, scan_layers=True)
  scanned_logits = jax.jit(pj.apply(cfgs, scanned.apply))(stacked, tuple(llama.stack_layers(t) for t in adapters),
                                                           ids, mask)
  assert _max_diff(scanned_logits, adapted) < 1e-5

  # PEFT folders both ways: theirs loads as exactly the factors above; ours loads in PEFT to the same logits.
  peft_model.save_pretrained(str(tmp_path / "theirs"))
  their_cfgs, their_adapters = lora_experts.load_peft_adapter(str(tmp_path / "theirs"), params)
  assert [type(c) for c in their_cfgs] == [type(c) for c in cfgs] and their_cfgs[1] == cfgs[1]
  jax.tree.map(np.testing.assert_array_equal, their_adapters, adapters)
  lora_experts.save_peft_adapter(str(tmp_path / "ours"), cfgs, adapters, task_type="CAUSAL_LM")
  reloaded = peft.PeftModel.from_pretrained(_load_torch(folder, "mixtral"), str(tmp_path / "ours")).eval()
  assert _max_diff(_torch_logits(reloaded, RIGHT), adapted, mask) < 1e-5
  with pytest.raises(ValueError, match="one r / lora_alpha for target_modules and target_parameters"):
    lora_experts.save_peft_adapter(str(tmp_path / "bad"), [lora.LoraConfig(rank=4, targets=("q_proj",)), cfgs[1]],
                                   adapters)


def test_config_errors():
  with pytest.raises(ValueError, match="num_local_experts=0 does not fit model_type 'mixtral'"):
    llama.LlamaConfig(model_type="mixtral", **TINY)
  with pytest.raises(ValueError, match="match no stacked expert weight"):
    pj.init(lora_experts.ExpertLoraConfig(), jax.random.key(0), {"model": {"q_proj": {"kernel": np.zeros((2, 2))}}})
  with pytest.raises(ValueError, match="valid are 'gate_up_proj' and 'down_proj'"):
    lora_experts.ExpertLoraConfig(targets=("w1",))
  with pytest.raises(ValueError, match="num_experts_per_tok=5 must be between 1 and num_local_experts=4"):
    llama.LlamaConfig(model_type="mixtral", num_local_experts=4, num_experts_per_tok=5, **TINY)
  state = moe.split_experts({"model.layers.0.mlp.experts.down_proj": np.zeros((3, 4, 2), np.float32),
                             "model.layers.0.mlp.experts.gate_up_proj": np.zeros((3, 4, 4), np.float32)}, "mixtral")
  del state["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
  with pytest.raises(ValueError, match=r"3 experts in layer 0 but lacks the tensors \['model.layers.0.experts.1.w3'\]"):
    moe.fuse_experts(state)


@pytest.mark.slow
def test_mixtral_config_trains_and_its_folders_load_in_transformers(tmp_path):
  """`python -m train --config configs/lora_mixtral.py` shrunk: LoRA on the attention and trained routers lower the
  held-out loss, and transformers + peft load workdir/base and workdir/adapter to compute what the run's model does."""
  import train
  from test_train_zoo import adapted_logits, load_config
  config = load_config("lora_mixtral", tmp_path, steps=6, batch_size=4, max_length=24, eval_examples=8,
                       train_examples=48, log_every=3, checkpoint_every=6, **{"optimizer.warmup_steps": 1})
  result = train.main(config)
  assert result["after"]["loss"] < result["before"]["loss"]
  ids = np.random.default_rng(0).integers(3, 49152, (2, 10)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  torch_model = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter")).eval()
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
  assert saved == ["gate"]
  assert _max_diff(_torch_logits(peft_model, batch), adapted_logits(result, batch)) < 1e-4
