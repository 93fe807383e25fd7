"""Qwen3 (dense) against transformers' PyTorch classes: logits (left and right padding, scanned and not), greedy
generation, save_pretrained both ways, the sequence classifier, LoRA folders with the real peft both ways, and a
GGUF file written as llama.cpp's converter writes one."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import interop, models
from peftjax.methods import lora, modules_to_save
from peftjax.models import llama

from compare import assert_same_tokens  # tests/ is on sys.path under pytest
from test_llama import LEFT, RIGHT, TINY, _greedy, _logits, _max_diff, _randomize, _torch_generate, _torch_logits

VARIANTS = {
    # head_dim 24 is not hidden_size / heads = 16; grouped-query keys; untied head.
    "qwen3": dict(num_key_value_heads=2, head_dim=24, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    # biases on all four projections, a tied head, the second layer attending through a 4-token window.
    "qwen3_bias_window": dict(num_key_value_heads=1, head_dim=16, attention_bias=True, tie_word_embeddings=True,
                              use_sliding_window=True, sliding_window=4, max_window_layers=1),
}


def _torch_model(variant: str, cls=transformers.Qwen3ForCausalLM, **extra):
  torch.manual_seed(0)
  return _randomize(cls(transformers.Qwen3Config(**TINY, **VARIANTS[variant], **extra)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{variant: folder written by transformers' save_pretrained}."""
  folders = {}
  for variant in VARIANTS:
    folders[variant] = str(tmp_path_factory.mktemp(variant))
    _torch_model(variant).save_pretrained(folders[variant])
  return folders


def _load_torch(folder: str):
  return transformers.Qwen3ForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_generation_match_transformers(checkpoints, variant):
  torch_model = _load_torch(checkpoints[variant])
  model, params = models.from_pretrained(checkpoints[variant])  # dispatch through FAMILIES
  c = model.config
  assert c.model_type == "qwen3" and c.qk_norm and c.head_dim == VARIANTS[variant]["head_dim"]
  assert params["model"]["layers_0"]["self_attn"]["q_norm"]["scale"].shape == (c.head_dim,)
  assert ("bias" in params["model"]["layers_0"]["self_attn"]["o_proj"]) == c.attention_bias
  assert c.sliding_layers == ((False, True) if variant == "qwen3_bias_window" else (False, False))
  scanned, stacked = llama.from_pretrained(checkpoints[variant], scan_layers=True)
  for batch in (RIGHT, LEFT):
    expected = _torch_logits(torch_model, batch)
    assert np.abs(expected).max() > 1.0  # the random model is not trivially flat
    assert _max_diff(_logits(model, params, batch), expected, batch["attention_mask"]) < 1e-4
    assert _max_diff(_logits(scanned, stacked, batch), expected, batch["attention_mask"]) < 1e-4
  ours = _greedy(model, params)
  assert ours.shape == (3, 16) and len(np.unique(ours)) > 4
  assert_same_tokens(ours, _torch_generate(torch_model, LEFT, 0, eos_token_id=2), "ours vs transformers generate")
  np.testing.assert_array_equal(_greedy(scanned, stacked), ours)


def test_norms_and_window_change_the_output(checkpoints):
  """The per-head norms and the sliding window each matter on these inputs (so the 1e-4 matches above test them)."""
  model, params = llama.from_pretrained(checkpoints["qwen3_bias_window"])
  no_window = model.clone(config=dataclasses.replace(model.config, use_sliding_window=False, layer_types=None))
  assert _max_diff(_logits(model, params, RIGHT), _logits(no_window, params, RIGHT), RIGHT["attention_mask"]) > 1e-3
  unit = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones_like(x) if "q_norm" in jax.tree_util.keystr(path) else x, params)
  assert _max_diff(_logits(model, params, RIGHT), _logits(model, unit, RIGHT), RIGHT["attention_mask"]) > 1e-3
  default = llama.LlamaConfig(model_type="qwen3", **TINY)
  assert not default.attention_bias and not default.qkv_bias and default.sliding_window is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_loads_in_transformers(checkpoints, variant, tmp_path):
  model, params = llama.from_pretrained(checkpoints[variant])
  folder = str(tmp_path / "ours")
  llama.save_pretrained(model, params, folder)
  torch_model, info = transformers.Qwen3ForCausalLM.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  reference = _load_torch(checkpoints[variant]).config
  for key in ("rope_parameters", "sliding_window", "layer_types", "num_key_value_heads", "tie_word_embeddings",
              "head_dim", "attention_bias", "use_sliding_window", "model_type"):
    assert getattr(torch_model.config, key) == getattr(reference, key), key
  expected = _torch_logits(torch_model.eval(), RIGHT)
  assert _max_diff(_logits(model, params, RIGHT), expected, RIGHT["attention_mask"]) < 1e-4
  model2, params2 = llama.from_pretrained(folder)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  assert llama.LlamaConfig.from_hf(model.config.to_hf()) == model.config


def test_sequence_classifier_matches_transformers(tmp_path):
  torch_model = _torch_model("qwen3_bias_window", transformers.Qwen3ForSequenceClassification, num_labels=3,
                             pad_token_id=0)
  torch_model.save_pretrained(str(tmp_path / "theirs"))
  model, params = llama.from_pretrained(str(tmp_path / "theirs"))
  assert isinstance(model, llama.LlamaForSequenceClassification) and model.num_labels == 3
  for batch in (RIGHT, LEFT):
    expected = _torch_logits(torch_model, batch)
    assert _max_diff(_logits(model, params, batch), expected) < 1e-4
  llama.save_pretrained(model, params, str(tmp_path / "ours"))
  assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == \
      ["Qwen3ForSequenceClassification"]


def test_lora_folders_with_peft_both_ways(checkpoints, tmp_path):
  """LoRA on every attention and MLP projection plus a trained lm_head, through Hugging Face PEFT folders."""
  folder = checkpoints["qwen3"]
  targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  cfgs = [lora.LoraConfig(rank=4, alpha=8, targets=targets), modules_to_save.ModulesToSaveConfig(("lm_head",))]
  model, params = llama.from_pretrained(folder)
  factors, copies = pj.init(cfgs, jax.random.key(0), params)
  rng = np.random.default_rng(1)
  adapters = tuple(jax.tree.map(lambda x: np.asarray(x) + rng.uniform(-0.3, 0.3, x.shape).astype(np.float32), tree)
                   for tree in (factors, copies))
  ids, mask = RIGHT["input_ids"], RIGHT["attention_mask"]
  forward = lambda cfgs, adapters: np.asarray(jax.jit(pj.apply(cfgs, model.apply))(params, adapters, ids, mask))  # noqa
  ours = forward(cfgs, adapters)
  assert _max_diff(ours, _logits(model, params, RIGHT), mask) > 1e-2  # the adapter matters

  # ours -> PEFT
  interop.save_adapter(str(tmp_path / "ours"), cfgs, adapters, task_type="CAUSAL_LM")
  peft_model = peft.PeftModel.from_pretrained(_load_torch(folder), str(tmp_path / "ours")).eval()
  assert _max_diff(_torch_logits(peft_model, RIGHT), ours, mask) < 1e-4

  # PEFT -> ours, with randomised factors and head copy
  peft_model = peft.get_peft_model(_load_torch(folder), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=["lm_head"])).eval()
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if param.requires_grad:
        param.add_(torch.tensor(rng.uniform(-0.3, 0.3, param.shape).astype(np.float32)))
  peft_model.save_pretrained(str(tmp_path / "theirs"))
  their_cfgs, their_adapters = interop.load_adapter(str(tmp_path / "theirs"), params)
  theirs = _torch_logits(peft_model, RIGHT)
  assert _max_diff(forward(their_cfgs, their_adapters), theirs, mask) < 1e-4
  assert _max_diff(theirs, ours, mask) > 1e-2  # a different adapter: the comparison above is not vacuous


_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_gguf(torch_model, path: str) -> None:
  """A float32 "qwen3" GGUF file as llama.cpp's convert_hf_to_gguf.py writes it (no Q/K permutation: NEOX RoPE)."""
  from gguf import GGUFWriter
  c = torch_model.config
  writer = GGUFWriter(path, "qwen3")
  writer.add_block_count(c.num_hidden_layers)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_vocab_size(c.vocab_size)
  writer.add_bos_token_id(c.bos_token_id)
  writer.add_eos_token_id(c.eos_token_id)
  for name, tensor in torch_model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    module, leaf = name.rsplit(".", 1)
    if module.startswith("model.layers."):
      _, _, i, rest = module.split(".", 3)
      gguf_name = f"blk.{i}.{_TO_GGUF[rest]}.{leaf}"
    else:
      gguf_name = f"{_TO_GGUF[module]}.{leaf}"
    writer.add_tensor(gguf_name, np.ascontiguousarray(tensor.numpy()))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_written_like_llama_cpp_loads(checkpoints, tmp_path):
  torch_model = _load_torch(checkpoints["qwen3"])
  path = str(tmp_path / "tiny.gguf")
  _write_gguf(torch_model, path)
  model, params = llama.from_pretrained(path)
  assert model.config.model_type == "qwen3" and model.config.head_dim == 24
  expected = _torch_logits(torch_model, RIGHT)
  assert _max_diff(_logits(model, params, RIGHT), expected, RIGHT["attention_mask"]) < 1e-4
  with pytest.raises(ValueError, match="'blk.0.attn_q_norm.weight' has no Llama-family counterpart"):
    pj.models.gguf.hf_name("blk.0.attn_q_norm.weight", "llama")  # only qwen3 files carry per-head norms


def test_config_passes_validation(tmp_path):
  """configs/lora_qwen3.py builds a Qwen3 (abstractly) that its LoRA targets fit (tests/test_moe.py trains its
  Mixtral sibling end to end)."""
  from test_train_zoo import load_config
  from train import validate
  config = load_config("lora_qwen3", tmp_path)
  validate.check(config)
  assert llama.LlamaConfig(**config.model_shape).qk_norm
  with pytest.raises(ValueError, match="config.model_shape does not make a llama model"):
    validate.check(load_config("lora_qwen3", tmp_path, **{"model_shape.num_key_value_heads": 3}))
