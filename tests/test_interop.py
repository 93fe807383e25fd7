"""Hugging Face PEFT folders both ways for (IA)³, modules_to_save and the soft-prompt family (LoRA, DoRA and
AdaLoRA folders are tested in test_lora*.py / test_adalora.py): our folder loads in `PeftModel.from_pretrained`
with the same logits, PEFT's folder loads in `load_adapter` with the same logits, and save -> load is exact.
The reference is peft 0.21.2 on transformers 5.23.0 (constraints-test.txt; see tests/test_prompts.py)."""

from __future__ import annotations

import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import interop
from peftjax import tree as ptree
from peftjax.methods import bottleneck_adapter, ia3, lora, modules_to_save, p_tuning, prefix_tuning, prompt_tuning
# The tiny random models (bert_seq, gpt2, llama with grouped-query keys, t5), their checkpoint folders and PEFT's
# prompt configs are test_prompts'; K is its number of virtual tokens.
from test_prompts import K, KINDS, _max_diff, _peft_config, _torch_model, checkpoints  # noqa: F401 (a fixture)

T5 = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)


def _batch(kind: str) -> dict:
  vocab = KINDS[kind][1].vocab_size
  rng = np.random.default_rng(0)
  batch = dict(input_ids=rng.integers(3, vocab, (2, 7)), attention_mask=np.ones((2, 7), np.int64))
  if kind == "t5":
    batch["decoder_input_ids"] = np.concatenate([np.zeros((2, 1), np.int64), rng.integers(3, vocab, (2, 4))], 1)
  return batch


def _peft_logits(peft_model, kind: str, batch: dict) -> np.ndarray:
  """PEFT's logits, without the virtual positions its prompt models put in front of a decoder's outputs."""
  with torch.no_grad():
    logits = peft_model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  n = batch["input_ids"].shape[1]
  return logits[:, -n:] if logits.ndim == 3 and kind != "t5" else logits


def _ours(kind: str, checkpoints, cfg, adapters, batch: dict) -> np.ndarray:
  model, params = pj.models.from_pretrained(checkpoints(kind))
  return np.asarray(jax.jit(pj.apply(cfg, model.apply))(params, adapters, **batch))


def _moved(tree, seed: int, low: float, high: float):
  """`tree` plus uniform(low, high) noise (float32 numpy leaves)."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [np.asarray(l, np.float32) + rng.uniform(low, high, np.shape(l)).astype(np.float32)
                                      for l in leaves])


def _assert_trees_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- (IA)³ and LoRA with modules_to_save ------------------------------------------------------------------

WEIGHT_CASES = {
    "bert_seq-ia3": ("bert_seq", ia3.IA3Config.for_model("bert"), ("classifier",)),
    "gpt2-ia3": ("gpt2", ia3.IA3Config.for_model("gpt2"), ("ln_f",)),  # Conv1D layers
    "bert_seq-lora": ("bert_seq", lora.LoraConfig(rank=4, alpha=8, targets=("query", "value")), ("classifier",)),
}


def _peft_weight_config(cfg, saved: tuple[str, ...], task_type: str | None):
  if isinstance(cfg, ia3.IA3Config):
    return peft.IA3Config(task_type=task_type, target_modules=list(cfg.targets),
                          feedforward_modules=list(cfg.feedforward), modules_to_save=list(saved),
                          fan_in_fan_out="c_attn" in cfg.targets)  # GPT-2's Conv1D
  return peft.LoraConfig(task_type=task_type, r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
                         modules_to_save=list(saved))


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weight_methods_with_modules_to_save_both_ways(checkpoints, case, tmp_path):
  kind, cfg, saved = WEIGHT_CASES[case]
  task_type = KINDS[kind][2] if kind == "bert_seq" else None
  cfgs = [cfg, modules_to_save.ModulesToSaveConfig(saved)]
  model, params = pj.models.from_pretrained(checkpoints(kind))
  vectors, copies = pj.init(cfgs, jax.random.key(0), params)
  low = 0.0 if isinstance(cfg, lora.LoraConfig) else -0.5  # IA3 vectors 0.5..1.5 (from ones), LoRA factors moved
  adapters = (_moved(vectors, 1, low, 0.5), _moved(copies, 2, -0.5, 0.5))
  batch = _batch(kind)
  ours = _ours(kind, checkpoints, cfgs, adapters, batch)
  assert _max_diff(ours, model.apply({"params": params}, **batch)) > 1e-2

  # (a) ours -> PEFT
  interop.save_adapter(str(tmp_path / "ours"), cfgs, adapters, task_type=task_type)
  config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
  assert config["modules_to_save"] == list(saved) and config["inference_mode"] is True
  torch_base = getattr(transformers, KINDS[kind][0]).from_pretrained(checkpoints(kind)).eval()
  theirs = _peft_logits(peft.PeftModel.from_pretrained(torch_base, str(tmp_path / "ours")), kind, batch)
  assert _max_diff(ours, theirs) < 1e-4

  # (c) save -> load is exact
  loaded_cfgs, loaded = interop.load_adapter(str(tmp_path / "ours"), params)
  _assert_trees_equal(loaded, adapters)
  assert sorted(loaded_cfgs[0].targets) == sorted(cfg.targets) and loaded_cfgs[1] == cfgs[1]

  # (b) PEFT -> ours, with randomised adapter weights and module copies
  peft_model = peft.get_peft_model(_torch_model(kind), _peft_weight_config(cfg, saved, task_type)).eval()
  rng = np.random.default_rng(3)
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if param.requires_grad:
        param.add_(torch.tensor(rng.uniform(-0.5, 0.5, param.shape).astype(np.float32)))
  peft_model.save_pretrained(str(tmp_path / "theirs"))
  their_cfgs, their_adapters = interop.load_adapter(str(tmp_path / "theirs"), params)
  assert type(their_cfgs[0]) is type(cfg) and set(saved) <= set(their_cfgs[1].modules)
  theirs = _peft_logits(peft_model, kind, batch)
  assert _max_diff(_ours(kind, checkpoints, their_cfgs, their_adapters, batch), theirs) < 1e-4
  assert _max_diff(theirs, ours) > 1e-2  # a different adapter: the comparison above is not vacuous


def test_ia3_shapes_and_t5_gated_names(tmp_path):
  """PEFT's (out, 1) / (1, in) vectors; T5 v1.1's wi_1 keeps its PyTorch name both ways (mT5's default target)."""
  torch.manual_seed(0)
  torch_model = transformers.T5ForConditionalGeneration(
      transformers.T5Config(**T5, feed_forward_proj="gated-gelu")).eval()
  torch_model.save_pretrained(str(tmp_path / "base"))
  _, params = pj.models.from_pretrained(str(tmp_path / "base"))
  cfg = ia3.IA3Config(targets=("k", "wi_1", "wo"), feedforward=("wo",))
  adapters = _moved(pj.init(cfg, jax.random.key(0), params), 0, -0.5, 0.5)
  interop.save_adapter(str(tmp_path / "ours"), cfg, adapters, task_type="SEQ_2_SEQ_LM")
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "ours"))
  vectors = {n: p for n, p in peft_model.named_parameters() if ".ia3_l." in n}
  assert len(vectors) == 6 + 4 + 4  # k of 6 attentions; wi_1 and wo of 4 blocks
  block = adapters["decoder"]["block_1"]["layer_2"]["DenseReluDense"]
  np.testing.assert_array_equal(
      vectors["base_model.model.decoder.block.1.layer.2.DenseReluDense.wi_1.ia3_l.default"].detach().numpy(),
      np.asarray(block["wi_1"]["ia3_out"])[:, None])  # (d_ff, 1)
  np.testing.assert_array_equal(
      vectors["base_model.model.decoder.block.1.layer.2.DenseReluDense.wo.ia3_l.default"].detach().numpy(),
      np.asarray(block["wo"]["ia3_in"])[None, :])  # (1, d_ff)
  _assert_trees_equal(interop.load_adapter(str(tmp_path / "ours"), params)[1], adapters)


# --- the soft-prompt family ------------------------------------------------------------------------------

PROMPT_CASES = {
    "gpt2-prompt": ("gpt2", prompt_tuning.PromptTuningConfig(K)),
    "gpt2-p_mlp": ("gpt2", p_tuning.PTuningConfig(K, encoder_hidden_size=24)),
    "t5-p_lstm": ("t5", p_tuning.PTuningConfig(K, encoder_type="lstm", encoder_hidden_size=12)),  # 2 submodules
    "t5-prefix": ("t5", prefix_tuning.PrefixTuningConfig(K, encoder_hidden_size=24)),
    "llama-prefix": ("llama", prefix_tuning.PrefixTuningConfig(K, encoder_hidden_size=24)),  # grouped-query keys
    "bert_seq-p_v2": ("bert_seq", prefix_tuning.PTuningV2Config(K)),  # with the classifier (modules_to_save)
}


def _folded(cfg, adapters):
  module = pj.api.method_module(cfg)
  return module.fold(cfg, adapters) if hasattr(module, "fold") else (cfg, adapters)


@pytest.mark.parametrize("case", list(PROMPT_CASES))
def test_soft_prompts_both_ways(checkpoints, case, tmp_path):
  kind, cfg = PROMPT_CASES[case]
  task_type = KINDS[kind][2]
  model, params = pj.models.from_pretrained(checkpoints(kind))
  cfgs, adapters = cfg, pj.init(cfg, jax.random.key(1), params)
  if kind == "bert_seq":  # PEFT trains (and saves) the classification head with the prompts
    cfgs = [cfg, modules_to_save.ModulesToSaveConfig(("classifier",))]
    adapters = (adapters, _moved(pj.init(cfgs[1], jax.random.key(0), params), 2, -0.5, 0.5))
  batch = _batch(kind)
  ours = _ours(kind, checkpoints, cfgs, adapters, batch)
  assert _max_diff(ours, model.apply({"params": params}, **batch)) > 1e-2

  # (a) ours -> PEFT: the folded table
  interop.save_adapter(str(tmp_path / "ours"), cfgs, adapters, task_type=task_type)
  torch_base = getattr(transformers, KINDS[kind][0]).from_pretrained(checkpoints(kind)).eval()
  theirs = _peft_logits(peft.PeftModel.from_pretrained(torch_base, str(tmp_path / "ours")), kind, batch)
  assert _max_diff(ours, theirs) < 1e-4

  # (c) save -> load gives the folded config and table exactly
  loaded_cfgs, loaded = interop.load_adapter(str(tmp_path / "ours"), params)
  folded_cfg, folded = _folded(cfg, adapters[0] if kind == "bert_seq" else adapters)
  if kind == "bert_seq":
    assert loaded_cfgs == [folded_cfg, cfgs[1]]
    _assert_trees_equal(loaded, (jax.device_get(folded), adapters[1]))
  else:
    assert loaded_cfgs == folded_cfg
    _assert_trees_equal(loaded, jax.device_get(folded))

  # (b) PEFT -> ours: PEFT's randomly initialised encoder (seed 5), and a moved head, saved folded by PEFT
  torch.manual_seed(5)
  peft_model = peft.get_peft_model(_torch_model(kind), _peft_config(cfg, task_type)).eval()
  if kind == "bert_seq":
    with torch.no_grad():
      peft_model.base_model.classifier.modules_to_save["default"].weight.add_(0.3)
  peft_model.save_pretrained(str(tmp_path / "theirs"))
  their_cfgs, their_adapters = interop.load_adapter(str(tmp_path / "theirs"), params)
  theirs = _peft_logits(peft_model, kind, batch)
  assert _max_diff(_ours(kind, checkpoints, their_cfgs, their_adapters, batch), theirs) < 1e-4
  assert _max_diff(theirs, ours) > 1e-2


# --- errors ----------------------------------------------------------------------------------------------

def test_errors(checkpoints, tmp_path):
  _, params = pj.models.from_pretrained(checkpoints("gpt2"))
  cfg = ia3.IA3Config.for_model("gpt2")
  adapters = pj.init(cfg, jax.random.key(0), params)
  folder = str(tmp_path / "ia3")
  interop.save_adapter(folder, cfg, adapters)
  file = tmp_path / "ia3" / "adapter_config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), "peft_type": "LOHA"}))
  with pytest.raises(ValueError, match=r"peft_type='LOHA' is not supported; valid: \['LORA', 'ADALORA', 'IA3', "):
    interop.load_adapter(folder, params)
  bn = bottleneck_adapter.BnConfig()
  with pytest.raises(ValueError, match=r"BnConfig has no Hugging Face PEFT format; save_adapter writes"):
    interop.save_adapter(folder, bn, {})
  with pytest.raises(ValueError, match=r"task_type='LM' is not a Hugging Face PEFT task type"):
    interop.save_adapter(folder, cfg, adapters, task_type="LM")
  prompts = prompt_tuning.PromptTuningConfig(K)
  table = pj.init(prompts, jax.random.key(0), params)
  with pytest.raises(ValueError, match=r"saving a PromptTuningConfig needs task_type"):
    interop.save_adapter(folder, prompts, table)
  with pytest.raises(ValueError, match=r"placeholder_token_id=-1 has no Hugging Face PEFT equivalent"):
    interop.save_adapter(folder, prompt_tuning.PromptTuningConfig(K, placeholder_token_id=-1), table,
                         task_type="CAUSAL_LM")
  with pytest.raises(ValueError, match=r"takes one method config, optionally listed with one ModulesToSaveConfig"):
    interop.save_adapter(folder, [modules_to_save.ModulesToSaveConfig(("ln_f",))], ({},))
  prefixes = prefix_tuning.PTuningV2Config(K)
  interop.save_adapter(folder, prefixes, pj.init(prefixes, jax.random.key(0), params), task_type="CAUSAL_LM")
  assert ptree.count(interop.load_adapter(folder, params)[1]) == K * 2 * 2 * 32
  _, llama_params = pj.models.from_pretrained(checkpoints("llama"))  # 2 of 4 heads for keys: width 16
  with pytest.raises(ValueError, match=rf"'prompt_embeddings' has shape \({K}, 128\) but this model and "
                                       rf"num_virtual_tokens={K} need \({K}, 64\)"):
    interop.load_adapter(folder, llama_params)
