"""Mixtral ("llama" with experts) and Qwen3-MoE ("qwen3moe") GGUF files, written from tiny random transformers
checkpoints as llama.cpp's convert_hf_to_gguf.py writes them (per-expert weights stacked into ffn_*_exps, the
router as ffn_gate_inp, Q/K rows permuted for llama), load with the transformers model's logits and exactly the
safetensors folder's parameters; a tensor peftjax has no counterpart for is named in one sentence."""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers

from peftjax.models import gguf, llama

from test_llama import RIGHT, TINY, _llama_cpp_permute, _logits, _max_diff, _randomize, _torch_logits

VARIANTS = {
    # 4 experts, 2 per token in every layer, grouped-query keys (the K permutation uses the kv head count).
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)),
    # layer 0 dense (decoder_sparse_step 2), layer 1 3-of-6 experts 32 wide, head_dim 24; llama.cpp always
    # renormalises Qwen3-MoE's top-k (transformers' GGUF loader sets norm_topk_prob=True too).
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=24,
                       num_key_value_heads=2, decoder_sparse_step=2, norm_topk_prob=True)),
}
_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
            "block_sparse_moe.gate": "ffn_gate_inp"}
# the per-expert file names -> llama.cpp's stacked tensor (gguf-py's tensor_mapping: w1 gate, w3 up, w2 down)
_EXPERTS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps", "gate_proj": "ffn_gate_exps",
            "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
_EXPERT_FILE_KEY = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{variant: (folder written by transformers' save_pretrained, the model)}."""
  out = {}
  for variant, (config_cls, model_cls, extra) in VARIANTS.items():
    folder = str(tmp_path_factory.mktemp(variant))
    torch_model = _randomize(model_cls(config_cls(**TINY, **extra))).eval()
    torch_model.save_pretrained(folder)
    out[variant] = (folder, torch_model)
  return out


def _gguf_tensors(folder: str, config, arch: str) -> dict[str, np.ndarray]:
  """{llama.cpp name: array} from the saved per-expert file as convert_hf_to_gguf.py builds it: each layer's
  experts stacked on a new leading axis, Q/K rows permuted for "llama"."""
  state = safetensors.numpy.load_file(f"{folder}/model.safetensors")
  out, experts = {}, {}
  for name, w in state.items():
    match = _EXPERT_FILE_KEY.fullmatch(name)
    if match:
      layer, expert, leaf = match.groups()
      experts.setdefault(f"blk.{layer}.{_EXPERTS[leaf]}.weight", {})[int(expert)] = w
      continue
    if name == "lm_head.weight" and config.tie_word_embeddings:
      continue
    if arch == "llama" and ".q_proj." in name:
      w = _llama_cpp_permute(w, config.num_attention_heads)
    elif arch == "llama" and ".k_proj." in name:
      w = _llama_cpp_permute(w, config.num_key_value_heads)
    module, leaf = name.rsplit(".", 1)
    if module.startswith("model.layers."):
      _, _, i, rest = module.split(".", 3)
      out[f"blk.{i}.{_TO_GGUF[rest]}.{leaf}"] = w
    else:
      out[f"{_TO_GGUF[module]}.{leaf}"] = w
  for name, per_expert in experts.items():
    out[name] = np.stack([per_expert[e] for e in range(len(per_expert))])  # (experts, out, in)
  return out


def _write_gguf(folder: str, config, path: str, drop: str = "", extra: dict | None = None,
                quantize_experts: bool = False) -> None:
  """A float32 Mixtral ("llama") or "qwen3moe" GGUF file with llama.cpp's metadata keys (Keys.LLM.EXPERT_*);
  `drop` leaves out one tensor, `extra` adds some, `quantize_experts` stores the stacked experts as Q8_0."""
  from gguf import GGMLQuantizationType, GGUFWriter
  from gguf.quants import quantize
  arch = "llama" if config.model_type == "mixtral" else "qwen3moe"
  writer = GGUFWriter(path, arch)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_vocab_size(config.vocab_size)
  writer.add_bos_token_id(config.bos_token_id)
  writer.add_eos_token_id(config.eos_token_id)
  if arch == "llama":
    writer.add_rope_dimension_count(config.head_dim or config.hidden_size // config.num_attention_heads)
    writer.add_expert_count(config.num_local_experts)
  else:
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
  writer.add_expert_used_count(config.num_experts_per_tok)
  tensors = {**_gguf_tensors(folder, config, arch), **(extra or {})}
  for name, w in tensors.items():
    w = np.ascontiguousarray(w, np.float32)
    if name == drop:
      continue
    if quantize_experts and name.endswith("_exps.weight"):
      writer.add_tensor(name, quantize(w, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_gguf_matches_transformers_and_the_folder(checkpoints, variant, tmp_path):
  folder, torch_model = checkpoints[variant]
  path = str(tmp_path / "tiny.gguf")
  _write_gguf(folder, torch_model.config, path)
  model, params = llama.from_pretrained(path)
  assert gguf.read_config(path) == gguf.read(path)[0]  # train/validate's weight-free read gives the same config
  c = model.config
  assert (c.model_type, c.num_local_experts, c.num_experts_per_tok) == (
      variant, *((4, 2) if variant == "mixtral" else (6, 3)))
  if variant == "qwen3_moe":
    assert (c.moe_intermediate_size, c.head_dim, c.moe_layers, c.normalize_top_k) == (32, 24, (False, True), True)
  expected = _torch_logits(torch_model, RIGHT)
  assert _max_diff(_logits(model, params, RIGHT), expected, RIGHT["attention_mask"]) < 1e-4
  if variant == "qwen3_moe":  # the file's conventions are transformers' too: its GGUF loader reads the same experts
    _assert_transformers_reads_the_experts(torch_model, path)
  # every tensor lands exactly where the safetensors folder puts it (experts stacked gate rows then up rows)
  _, folder_params = llama.from_pretrained(folder)
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  folder_flat = jax.tree_util.tree_flatten_with_path(folder_params)[0]
  assert set(flat) == {p for p, _ in folder_flat}
  for key, value in folder_flat:
    np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(value), err_msg=jax.tree_util.keystr(key))


def _assert_transformers_reads_the_experts(torch_model, path: str) -> None:
  """transformers' own GGUF loader (Qwen2MoeTensorProcessor) gives the router and stacked experts of `path` as
  `torch_model` holds them.  It is handed the config: its qwen3moe mapping drops expert_feed_forward_length, and
  it skips a dense layer's ffn_gate / ffn_up / ffn_down, so only the MoE tensors are compared."""
  folder, name = os.path.split(path)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=torch_model.config)
  ours, loaded = torch_model.state_dict(), theirs.state_dict()
  moe_keys = [k for k in ours if ".mlp.experts." in k or ".mlp.gate.weight" in k]
  assert moe_keys
  for key in moe_keys:
    np.testing.assert_array_equal(loaded[key].numpy(), ours[key].numpy(), err_msg=key)


def test_moe_gguf_bad_expert_tensors_are_named(checkpoints, tmp_path):
  folder, torch_model = checkpoints["qwen3_moe"]
  c = torch_model.config
  shared = str(tmp_path / "shared.gguf")  # Qwen2-MoE's shared-expert router: no Qwen3-MoE counterpart
  _write_gguf(folder, c, shared, extra={"blk.1.ffn_gate_inp_shexp.weight": np.zeros((1, c.hidden_size))})
  with pytest.raises(ValueError, match=r"GGUF tensor 'blk\.1\.ffn_gate_inp_shexp\.weight' has no Llama-family "
                                       r"counterpart; known names: .*ffn_gate_exps"):
    llama.from_pretrained(shared)
  no_up = str(tmp_path / "no_up.gguf")
  _write_gguf(folder, c, no_up, drop="blk.1.ffn_up_exps.weight")
  with pytest.raises(ValueError, match=r"'blk\.1\.ffn_gate_exps\.weight' \(6, 32, 64\) needs a "
                                       r"'blk\.1\.ffn_up_exps\.weight' of the same shape; the file has none"):
    llama.from_pretrained(no_up)
  assert gguf.hf_name("blk.3.ffn_down_exps.weight", "qwen3moe") == "model.layers.3.mlp.experts.down_proj.weight"


def test_moe_gguf_quantised_experts_dequantise(checkpoints, tmp_path):
  """Q8_0 stacked experts (3-D blocks) read as gguf-py's dequantisation of each, gate and up joined."""
  from gguf import GGMLQuantizationType
  from gguf.quants import dequantize, quantize
  folder, torch_model = checkpoints["mixtral"]
  path = str(tmp_path / "q8.gguf")
  _write_gguf(folder, torch_model.config, path, quantize_experts=True)
  _, state = gguf.read(path)
  stacked = _gguf_tensors(folder, torch_model.config, "llama")
  round_trip = {name: dequantize(quantize(stacked[f"blk.1.{name}.weight"], GGMLQuantizationType.Q8_0),
                                 GGMLQuantizationType.Q8_0) for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
  np.testing.assert_array_equal(state["model.layers.1.mlp.experts.gate_up_proj"],
                                np.concatenate([round_trip["ffn_gate_exps"], round_trip["ffn_up_exps"]], axis=1))
  np.testing.assert_array_equal(state["model.layers.1.mlp.experts.down_proj"], round_trip["ffn_down_exps"])
  assert 0 < np.abs(round_trip["ffn_down_exps"] - stacked["blk.1.ffn_down_exps.weight"]).max() < 0.05  # quantised
