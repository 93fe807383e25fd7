"""Adapter folders as users bring them: PEFT's own defaults (lm_head.base_layer, layers_to_transform) and hostile
files (bad fields, relabelled dtypes, truncated safetensors, pickles), including a property-based fuzz test."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import adapter_schema, interop
from peftjax.methods import lora

AdapterFormatError = interop.AdapterFormatError
LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, tie_word_embeddings=False)
TARGETS = ["q_proj", "v_proj", "lm_head"]


@pytest.fixture(scope="module")
def peft_folders(tmp_path_factory):
  """A tiny untied Llama (PyTorch and ours) and the LoRA folder PEFT writes with its defaults for lm_head + q/v in
  layer 1 only; returns (torch PEFT model, our model, our params, folder)."""
  root = tmp_path_factory.mktemp("peft")
  torch.manual_seed(0)
  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
  base.save_pretrained(root / "base")
  config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, layers_to_transform=[1], layers_pattern="layers",
                           init_lora_weights=False)  # random B: the adapter changes the logits
  peft_model = peft.get_peft_model(base, config).eval()
  peft_model.save_pretrained(root / "adapter")  # save_embedding_layers="auto": lm_head.base_layer.weight too
  model, params = pj.models.from_pretrained(str(root / "base"))
  return peft_model, model, params, str(root / "adapter")


def _ids() -> np.ndarray:
  return np.random.default_rng(0).integers(0, LLAMA["vocab_size"], (2, 6))


def _ours(model, cfg, params, adapters) -> np.ndarray:
  ids = _ids()
  return np.asarray(pj.apply(cfg, model.apply)(params, adapters, ids, np.ones_like(ids)))


def _theirs(peft_model) -> np.ndarray:
  with torch.no_grad():
    return peft_model(input_ids=torch.tensor(_ids())).logits.numpy()


def test_peft_default_folder_with_lm_head_and_layers_to_transform(peft_folders, tmp_path):
  peft_model, model, params, folder = peft_folders
  with open(os.path.join(folder, interop.ADAPTER_WEIGHTS), "rb") as f:
    assert b"base_model.model.lm_head.base_layer.weight" in f.read(4096)
  cfg, adapters = interop.load_adapter(folder, params)
  assert (cfg.layers_to_transform, cfg.layers_pattern) == ((1,), ("layers",))
  assert sorted(lora.adapter_modules(adapters)) == ["lm_head", "model/layers_1/self_attn/q_proj",
                                                    "model/layers_1/self_attn/v_proj"]
  assert sorted(cfg.target_paths(params)) == sorted(lora.adapter_modules(adapters))  # PEFT's layer semantics
  np.testing.assert_allclose(_ours(model, cfg, params, adapters), _theirs(peft_model), atol=1e-4, rtol=0)

  # Re-saved, the folder keeps layers_to_transform / layers_pattern, and PEFT loads it with the same logits.
  interop.save_adapter(str(tmp_path / "resaved"), cfg, adapters)
  saved = json.loads((tmp_path / "resaved" / interop.ADAPTER_CONFIG).read_text())
  assert (saved["layers_to_transform"], saved["layers_pattern"]) == ([1], "layers")
  torch.manual_seed(0)
  again = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)),
                                         str(tmp_path / "resaved")).eval()
  again.base_model.model.load_state_dict(peft_model.base_model.model.state_dict())
  np.testing.assert_allclose(_theirs(again), _theirs(peft_model), atol=1e-6, rtol=0)

  # The saved base weight is checked against ours; the user can take it instead.
  other = jax.tree.map(lambda x: x, params)
  other["lm_head"]["kernel"] = params["lm_head"]["kernel"] + 0.5
  with pytest.raises(AdapterFormatError, match=r"the base weight 'lm_head/kernel' saved with the adapter differs "
                                               r"from this model's by up to 0\.5; .*with_saved_base_layers"):
    interop.load_adapter(folder, other)
  taken = interop.with_saved_base_layers(folder, other)
  np.testing.assert_array_equal(taken["lm_head"]["kernel"], params["lm_head"]["kernel"])
  interop.load_adapter(folder, taken)
  interop.load_adapter(folder, jax.eval_shape(lambda: other))  # shapes only: nothing to compare


def _lora_folder(folder: str, params) -> None:
  cfg = pj.LoraConfig(rank=2, alpha=4, targets=("q_proj", "lm_head"))
  norm = {"model": {"norm": {"scale": np.ones(16, np.float32)}}}
  interop.save_adapter(folder, [cfg, pj.ModulesToSaveConfig(("model.norm",))],
                       (pj.init(cfg, jax.random.key(0), params), norm))


def _edit_config(folder: str, **changes) -> None:
  path = os.path.join(folder, interop.ADAPTER_CONFIG)
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump({**config, **changes}, f)


def _header(path: str) -> tuple[dict, bytes]:
  with open(path, "rb") as f:
    raw = f.read()
  size = struct.unpack("<Q", raw[:8])[0]
  return json.loads(raw[8:8 + size]), raw[8 + size:]


def _write_header(path: str, header: dict, body: bytes) -> None:
  encoded = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded + body)


def test_hostile_folders_raise_one_error_class_naming_the_problem(peft_folders, tmp_path):
  _, _, params, _ = peft_folders
  folder = str(tmp_path / "a")
  cases = {
      "rank_pattern": (7, "rank_pattern=7 is not valid; it must be an object mapping module names to integer ranks"),
      "modules_to_save": ([1, 2], "modules_to_save=[1, 2] is not valid; it must be null or a list of module names"),
      "target_modules": (7, "target_modules=7 is not valid; it must be null, a regex string or a list of module names"),
      "r": (True, "r=True is not valid; it must be an integer >= 1"),
      "lora_dropout": (1.5, "lora_dropout=1.5 is not valid; it must be a number in [0, 1)"),
      "layers_to_transform": ("1", "layers_to_transform='1' is not valid"),
  }
  for key, (value, message) in cases.items():
    _lora_folder(folder, params)
    _edit_config(folder, **{key: value})
    with pytest.raises(AdapterFormatError, match=rf"^'{folder}': adapter_config\.json " + message.replace(
        "[", r"\[").replace("(", r"\(").replace(")", r"\)")):
      interop.load_adapter(folder, params)
  _lora_folder(folder, params)
  _edit_config(folder, rank_pattern={"[": 2})  # the method config's own check, re-raised with the folder
  with pytest.raises(AdapterFormatError, match=r"does not make a valid config: LoraConfig\.rank_pattern key '\['"):
    interop.load_adapter(folder, params)

  weights = os.path.join(folder, interop.ADAPTER_WEIGHTS)
  _lora_folder(folder, params)
  header, body = _header(weights)
  name = next(k for k in header if k.endswith("q_proj.lora_A.weight"))
  header[name]["dtype"] = "I32"  # same byte size: it would load as integers around 1e9
  _write_header(weights, header, body)
  with pytest.raises(AdapterFormatError, match=rf"tensor '{name}' has dtype I32; adapter tensors must be floating"):
    interop.load_adapter(folder, params)

  _lora_folder(folder, params)
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) - 10)
  with pytest.raises(AdapterFormatError, match=rf"^'{weights}' is not a readable safetensors file \("):
    interop.load_adapter(folder, params)

  os.remove(weights)
  with pytest.raises(AdapterFormatError, match=r"holds no adapter_model\.safetensors\.$"):
    interop.load_adapter(folder, params)
  with open(os.path.join(folder, "adapter_model.bin"), "wb") as f:
    f.write(b"\x80\x04not really a pickle")
  with pytest.raises(AdapterFormatError, match=r"holds \['adapter_model\.bin'\] but no adapter_model\.safetensors; "
                                               r"peftjax refuses pickle files on purpose"):
    interop.load_adapter(folder, params)
  with open(os.path.join(folder, interop.ADAPTER_CONFIG), "w") as f:
    f.write("[1, 2")
  with pytest.raises(AdapterFormatError, match=r"adapter_config\.json' is not valid JSON"):
    interop.load_adapter(folder, params)
  with pytest.raises(AdapterFormatError, match=r"is not a folder"):
    interop.load_adapter(str(tmp_path / "missing"), params)
  assert issubclass(AdapterFormatError, ValueError)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=True) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
FIELDS = sorted({*adapter_schema.COMMON, *adapter_schema.SCHEMAS["LORA"], *adapter_schema.SCHEMAS["IA3"],
                 *adapter_schema.SCHEMAS["ADALORA"], *adapter_schema.SCHEMAS["PREFIX_TUNING"]} - {"peft_type"})
PEFT_TYPES = st.sampled_from(["LORA", "LORA", "ADALORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "LOHA",
                              3])


def _loads_or_refuses(folder: str, params) -> None:
  """load_adapter either returns float32 adapters or raises AdapterFormatError; anything else fails the test."""
  try:
    _, adapters = interop.load_adapter(folder, params)
  except AdapterFormatError:
    return
  assert all(np.asarray(leaf).dtype == np.float32 for leaf in jax.tree.leaves(adapters))


@pytest.fixture(scope="module")
def fuzz_base(peft_folders, tmp_path_factory):
  """Our tiny Llama's parameters and a valid LoRA + modules_to_save folder of them."""
  _, _, params, _ = peft_folders
  folder = str(tmp_path_factory.mktemp("fuzz") / "valid")
  _lora_folder(folder, params)
  return params, folder


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4), peft_type=PEFT_TYPES)
def test_fuzz_adapter_config(fuzz_base, changes, peft_type):
  params, valid = fuzz_base
  with tempfile.TemporaryDirectory() as root:
    folder = shutil.copytree(valid, os.path.join(root, "a"))
    _edit_config(folder, **{**changes, "peft_type": peft_type})
    _loads_or_refuses(folder, params)


HEADER_EDITS = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "BOOL", "U8", "XX"])),
    st.tuples(st.just("shape"), st.lists(st.integers(-1, 40), max_size=3)),
    st.tuples(st.just("data_offsets"), st.lists(st.integers(-5, 5000), min_size=0, max_size=3)),
    st.tuples(st.just("rename"), st.text(max_size=30)),
    st.tuples(st.just("truncate"), st.integers(0, 3000)),
    st.tuples(st.just("flip"), st.integers(0, 400)),
)


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(edit=HEADER_EDITS, which=st.integers(0, 100))
def test_fuzz_safetensors_header(fuzz_base, edit, which):
  params, valid = fuzz_base
  with tempfile.TemporaryDirectory() as root:
    folder = shutil.copytree(valid, os.path.join(root, "a"))
    weights = os.path.join(folder, interop.ADAPTER_WEIGHTS)
    header, body = _header(weights)
    names = sorted(k for k in header if k != "__metadata__")
    name, (kind, value) = names[which % len(names)], edit
    if kind in ("dtype", "shape", "data_offsets"):
      header[name][kind] = value
      _write_header(weights, header, body)
    elif kind == "rename":
      header[value] = header.pop(name)
      _write_header(weights, header, body)
    else:
      with open(weights, "rb") as f:
        raw = bytearray(f.read())
      if kind == "truncate":
        raw = raw[:value % len(raw)]
      else:
        raw[value % len(raw)] ^= 0xFF
      with open(weights, "wb") as f:
        f.write(bytes(raw))
    _loads_or_refuses(folder, params)
