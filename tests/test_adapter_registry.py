"""`peftjax.adapter_registry` against the real peft library (0.21.2): a multi-adapter folder peft saved loads with
each adapter's logits equal to peft's within 1e-5, and what the registry saves (default at the root, the others
in subfolders) loads in `PeftModel.from_pretrained` / `load_adapter` with the same logits."""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import interop
from peftjax.adapter_registry import AdapterRegistry
from test_prompts import KINDS, _batch, _torch_model, checkpoints  # noqa: F401 (a fixture)

KIND = "bert_seq"


def _logits(torch_model, batch) -> np.ndarray:
  with torch.no_grad():
    return torch_model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


def _randomised(torch_model):
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for name, param in torch_model.named_parameters():
      if "lora_" in name:
        param.copy_(torch.tensor(rng.normal(0, 0.3, param.shape).astype(np.float32)))
  return torch_model.eval()


def test_registry_reads_and_writes_peft_multi_adapter_layout(checkpoints, tmp_path):
  torch_model = peft.get_peft_model(_torch_model(KIND), peft.LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["query", "value"]))
  torch_model.add_adapter("wide", peft.LoraConfig(r=6, lora_alpha=3, target_modules=["key", "dense"],
                                                  use_rslora=True))
  torch_model.add_adapter("scaled", peft.LoraConfig(r=2, lora_alpha=5, target_modules=["intermediate.dense"]))
  torch_model = _randomised(torch_model)
  torch_model.save_pretrained(str(tmp_path / "theirs"), selected_adapters=["default", "wide", "scaled"])
  assert (tmp_path / "theirs" / "adapter_config.json").exists() and (tmp_path / "theirs" / "wide").is_dir()
  batch = _batch(KIND)
  expected = {}
  for name in ("default", "wide", "scaled"):
    torch_model.set_adapter(name)
    expected[name] = _logits(torch_model, batch)
  with torch_model.disable_adapter():
    expected[None] = _logits(torch_model, batch)

  model, params = pj.models.from_pretrained(checkpoints(KIND))
  registry = AdapterRegistry(params)
  assert registry.load_all(str(tmp_path / "theirs")) == ["default", "scaled", "wide"]
  assert registry.active == "default"
  assert isinstance(registry.list()["wide"], pj.LoraConfig) and registry.list()["wide"].use_rslora
  assert registry.list()["scaled"].rank == 2
  for name in ("default", "wide", "scaled"):
    registry.set_active(name)
    np.testing.assert_allclose(registry.apply(model.apply)(params, **batch), expected[name], atol=1e-5)
    with registry.disabled():
      np.testing.assert_allclose(registry.apply(model.apply)(params, **batch), expected[None], atol=1e-5)
  assert min(np.max(np.abs(expected[n] - expected[None])) for n in ("default", "wide", "scaled")) > 1e-2

  # ours -> peft: the default at the root, the others in subfolders named after them
  registry.add("copy", *registry.get("wide"))
  registry.delete("wide")
  assert registry.active == "scaled" and list(registry.list()) == ["default", "scaled", "copy"]
  with pytest.raises(KeyError, match="no adapter named 'wide'; registered: \\['copy', 'default', 'scaled'\\]"):
    registry.set_active("wide")
  registry.save(str(tmp_path / "ours"))
  assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
      "adapter_config.json", "adapter_model.safetensors", "copy", "scaled"]
  loaded = peft.PeftModel.from_pretrained(
      getattr(transformers, KINDS[KIND][0]).from_pretrained(checkpoints(KIND)), str(tmp_path / "ours")).eval()
  loaded.load_adapter(str(tmp_path / "ours"), adapter_name="copy", subfolder="copy")
  loaded.load_adapter(str(tmp_path / "ours" / "scaled"), adapter_name="scaled")
  for ours, theirs in (("default", "default"), ("copy", "wide"), ("scaled", "scaled")):
    loaded.set_adapter(ours)
    np.testing.assert_allclose(_logits(loaded, batch), expected[theirs], atol=1e-5)


def test_registry_mistakes_are_one_sentence(checkpoints, tmp_path):
  model, params = pj.models.from_pretrained(checkpoints(KIND))
  registry = AdapterRegistry(params)
  cfg = pj.LoraConfig(rank=2, targets=("query",))
  registry.add("one", cfg, pj.init(cfg, jax.random.key(0), params))
  with pytest.raises(ValueError, match="adapter name 'one' is already registered"):
    registry.add("one", cfg, pj.init(cfg, jax.random.key(0), params))
  with pytest.raises(ValueError, match="adapter name 'a/b' is not valid"):
    registry.add("a/b", cfg, pj.init(cfg, jax.random.key(0), params))
  with pytest.raises(interop.AdapterFormatError, match="holds no adapter_config.json, at its root or in a subfolder"):
    registry.load_all(str(tmp_path))
  bad = pj.PfeifferConfig()
  registry.add("bottleneck", bad, pj.init(bad, jax.random.key(0), params))
  with pytest.raises(ValueError, match="has no Hugging Face PEFT format"):
    registry.save(str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
