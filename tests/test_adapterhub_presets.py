"""MAM and UniPELT against AdapterHub `adapters` 1.3.0: the hidden states it computed on tiny random BERT and
RoBERTa encoders with every adapter weight randomised (tests/reference/adapterhub_presets.py wrote them; it needs
an older transformers, so it ran once in its own venv), and its trainable parameter counts."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import peftjax as pj
from peftjax import interop
from peftjax import tree as ptree
from peftjax.methods import bottleneck_adapter as bn
from peftjax.methods import mam, prefix_tuning, unipelt

REFERENCE = pathlib.Path(__file__).with_name("reference") / "adapterhub"
with open(REFERENCE / "versions.json") as f:
  SUMMARY = json.load(f)
CASES = [(encoder, preset) for encoder in ("bert", "roberta") for preset in ("mam", "unipelt")]


def _config(preset: str):
  """Our preset with the reference's settings (everything else at the preset's defaults)."""
  s = SUMMARY["settings"][preset]
  if preset == "mam":
    return mam.mam_config(prefix_length=s["prefix_length"], prefix_hidden=s["bottleneck_size"],
                          reduction_factor=s["reduction_factor"])
  prefix = dataclasses.replace(unipelt.UniPeltConfig().prefix, num_virtual_tokens=s["prefix_length"],
                               encoder_hidden_size=s["bottleneck_size"])
  return unipelt.UniPeltConfig(lora=pj.LoraConfig(rank=s["r"], alpha=2.0, targets=("query", "value")),
                               adapter=bn.SeqBnConfig(reduction_factor=s["reduction_factor"]), prefix=prefix)


def _hub_name(path: str, name: str) -> str:
  """AdapterHub's parameter name of one of our leaves (`path` inside its part of the tree) for adapter `name`."""
  *module, leaf = path.split("/")
  torch_leaf = {"kernel": "weight"}.get(leaf, leaf)
  if path == "embedding" or module[:1] == ["transform"]:  # the prefix MLP, one pool shared by the layers
    pool = f"encoder.layer.0.attention.self.prefix_tuning.pool.prefix_tunings.{name}.self_prefix"
    return f"{pool}.wte.weight" if path == "embedding" else f"{pool}.control_trans.{module[1]}.{torch_leaf}"
  if leaf in ("lora_A", "lora_B"):
    return f"{ptree.hf_name('/'.join(module))}.loras.{name}.{leaf}"
  host, last = ptree.hf_name("/".join(module[:-1])), module[-1]
  return {bn.DOWN: f"{host}.adapters.{name}.adapter_down.0.{torch_leaf}",
          bn.UP: f"{host}.adapters.{name}.adapter_up.{torch_leaf}",
          "adapter_gate": f"{host}.adapters.{name}.gate.{torch_leaf}",
          "lora_gate": f"{host}.loras.{name}.gate.{torch_leaf}",
          "prefix_gate": f"{host}.prefix_tuning.prefix_gates.{name}.{torch_leaf}"}[last]


def _from_reference(tree, weights: dict, name: str):
  """`tree` (one part, or a list / dict of parts) with every leaf taken from AdapterHub's `weights`."""
  if isinstance(tree, (list, tuple)):
    return type(tree)(_from_reference(part, weights, name) for part in tree)
  if isinstance(tree, dict) and set(tree) <= {"lora", "adapter", "prefix", "prefix_gates"}:
    return {part: _from_reference(sub, weights, name) for part, sub in tree.items()}
  flat = {}
  for path, leaf in ptree.flatten(tree).items():
    value = weights.pop(f"weights/{_hub_name(path, name)}")
    flat[path] = value.T if value.ndim == 2 and path != "embedding" else value
    assert flat[path].shape == leaf.shape, path
  return ptree.unflatten(flat)


def _case(encoder: str, preset: str):
  model, params = pj.models.from_pretrained(str(REFERENCE / encoder))
  reference = load_file(str(REFERENCE / f"{encoder}_{preset}.safetensors"))
  inputs = {k.removeprefix("inputs/"): v for k, v in reference.items() if k.startswith("inputs/")}
  weights = {k: v for k, v in reference.items() if k.startswith("weights/")}
  cfg = _config(preset)
  adapters = _from_reference(pj.init(cfg, jax.random.key(0), params), weights, preset)
  assert not weights, f"AdapterHub weights with no place in ours: {sorted(weights)}"
  return model, params, cfg, adapters, inputs, reference["outputs/last_hidden_state"]


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("encoder,preset", CASES)
def test_hidden_states_and_counts_equal_adapterhub(encoder, preset):
  model, params, cfg, adapters, inputs, theirs = _case(encoder, preset)
  ours = pj.apply(cfg, model.apply)(params, adapters, **inputs).last_hidden_state
  assert _max_diff(ours, theirs) < 1e-5
  assert ptree.count(adapters) == SUMMARY["trainable"][f"{encoder}_{preset}"]
  assert _max_diff(model.apply({"params": params}, **inputs).last_hidden_state, theirs) > 1e-1


@pytest.mark.parametrize("encoder,preset", [("bert", "mam"), ("roberta", "unipelt")])
def test_peft_placement_shifts_positions_and_differs(encoder, preset):
  """Hugging Face PEFT's placement (positions shifted by the prefix length) is what AdapterHub does not do."""
  model, params, cfg, adapters, inputs, theirs = _case(encoder, preset)
  if preset == "mam":
    cfg = [dataclasses.replace(cfg[0], shift_positions=True), cfg[1]]
  else:
    cfg = dataclasses.replace(cfg, prefix=dataclasses.replace(cfg.prefix, shift_positions=True))
  shifted = pj.apply(cfg, model.apply)(params, adapters, **inputs).last_hidden_state
  assert _max_diff(shifted, theirs) > 1e-1


def test_unshared_prefix_gates_have_two_outputs_per_layer():
  """AdapterHub's shared_gating=False: a key and a value gate per layer, d + 1 more parameters per layer."""
  _, params = pj.models.from_pretrained(str(REFERENCE / "bert"))
  cfg = _config("unipelt")
  shared = ptree.count(pj.init(cfg, jax.random.key(0), params))
  unshared = pj.init(dataclasses.replace(cfg, shared_gating=False), jax.random.key(0), params)
  assert ptree.count(unshared) == shared + 2 * (32 + 1)
  assert unshared["prefix_gates"]["encoder"]["layer_0"]["attention"]["self"]["prefix_gate"]["kernel"].shape == (32, 2)


def test_preset_defaults_follow_adapterhub():
  assert unipelt.UniPeltConfig().shared_gating
  assert not unipelt.UniPeltConfig().prefix.shift_positions and not mam.mam_config()[0].shift_positions
  assert prefix_tuning.PrefixTuningConfig().shift_positions  # PEFT's prefix tuning keeps its placement
  assert prefix_tuning.PTuningV2Config().shift_positions


def test_adapterhub_placement_has_no_peft_file():
  _, params = pj.models.from_pretrained(str(REFERENCE / "bert"))
  # PEFT's stacks, AdapterHub's placement
  cfg = dataclasses.replace(unipelt.UniPeltConfig().prefix, stacks=("decoder",))
  with pytest.raises(interop.NoPeftFormatError, match=r"shift_positions=False \(AdapterHub's placement\) has no"):
    interop.adapter_files(cfg, pj.init(cfg, jax.random.key(0), params), task_type="FEATURE_EXTRACTION")
