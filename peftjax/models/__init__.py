"""Flax Transformer models with Hugging Face parameter names, and loading/saving their checkpoints."""

from __future__ import annotations

import importlib

from peftjax.models import hf_io

# config.json "model_type" -> the module that implements the family.
FAMILIES = {
    "t5": "peftjax.models.t5",
    "gpt2": "peftjax.models.gpt2",
    "bert": "peftjax.models.bert",
    "roberta": "peftjax.models.roberta",
    "llama": "peftjax.models.llama",
    "mistral": "peftjax.models.llama",
    "qwen2": "peftjax.models.llama",
    "qwen3": "peftjax.models.llama",
    "mixtral": "peftjax.models.llama",
    "qwen3_moe": "peftjax.models.llama",
    "gemma2": "peftjax.models.gemma",
    "gemma3_text": "peftjax.models.gemma",
}


def from_pretrained(path_or_hub_id: str, **kwargs):
  """(model, params) from a Hugging Face folder or hub id; the family comes from config.json's model_type."""
  folder = hf_io.resolve(path_or_hub_id)
  model_type = hf_io.read_config(folder).get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"config.json model_type={model_type!r} is not supported; valid: {sorted(FAMILIES)}.")
  return importlib.import_module(FAMILIES[model_type]).from_pretrained(folder, **kwargs)
