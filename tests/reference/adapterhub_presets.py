"""Reference outputs of AdapterHub's MAM and UniPELT on tiny random BERT and RoBERTa encoders.

`adapters` needs an older transformers than peftjax's test stack, so this script runs once in its own venv and
writes small files that tests/test_adapterhub_presets.py compares peftjax with:

  python3 -m venv /work/venv-adapters
  /work/venv-adapters/bin/pip install "adapters==1.3.0" "transformers==4.57.6" torch==2.13.0 numpy safetensors
  /work/venv-adapters/bin/python tests/reference/adapterhub_presets.py

For each encoder (bert, roberta) it writes tests/reference/adapterhub/<encoder>/ (config.json + model.safetensors
of the random base model, from transformers' save_pretrained) and, for each preset (mam, unipelt),
<encoder>_<preset>.safetensors: every adapter weight under AdapterHub's parameter name (each one randomised, so no
part is an identity), the padded inputs and AdapterHub's last hidden states; versions.json names the library
versions, the settings and the trainable parameter counts.
"""

from __future__ import annotations

import json
import pathlib

import adapters
import numpy as np
import safetensors.torch
import torch
import transformers

OUT = pathlib.Path(__file__).with_name("adapterhub")
ENCODER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
ENCODERS = {
    "bert": (transformers.BertConfig(**ENCODER, max_position_embeddings=40), transformers.BertModel),
    "roberta": (transformers.RobertaConfig(**ENCODER, max_position_embeddings=42, type_vocab_size=1, pad_token_id=1),
                transformers.RobertaModel),
}
# Small versions of AdapterHub's presets (their structure unchanged; UniPELTConfig turns every part's gating on).
SETTINGS = {
    "mam": dict(prefix_length=4, bottleneck_size=16, reduction_factor=4),
    "unipelt": dict(prefix_length=4, bottleneck_size=16, reduction_factor=4, r=2),
}


def preset(name: str):
  s = SETTINGS[name]
  prefix = adapters.PrefixTuningConfig(prefix_length=s["prefix_length"], bottleneck_size=s["bottleneck_size"])
  if name == "mam":
    return adapters.MAMConfig(prefix, adapters.ParBnConfig(reduction_factor=s["reduction_factor"]))
  return adapters.UniPELTConfig(prefix, adapters.SeqBnConfig(reduction_factor=s["reduction_factor"]),
                                adapters.LoRAConfig(r=s["r"], alpha=2))


def inputs(config) -> dict:
  """Token lengths 9, 6, 3, right-padded with the pad id; BERT also gets two token types."""
  rng = np.random.default_rng(0)
  pad = config.pad_token_id or 0
  input_ids = np.full((3, 9), pad, np.int64)
  for i, n in enumerate([9, 6, 3]):
    input_ids[i, :n] = rng.integers(3, config.vocab_size, n)
  batch = {"input_ids": input_ids, "attention_mask": (input_ids != pad).astype(np.int64)}
  if config.type_vocab_size > 1:
    batch["token_type_ids"] = (np.arange(9)[None] >= 4) * batch["attention_mask"]
  return batch


def main() -> None:
  summary = {"versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                          "torch": torch.__version__}, "settings": SETTINGS, "trainable": {}}
  for encoder, (config, model_cls) in ENCODERS.items():
    torch.manual_seed(0)
    base = model_cls(config).eval()
    with torch.no_grad():  # uneven norms and visible biases
      for name, param in base.named_parameters():
        if "LayerNorm" in name and name.endswith("weight"):
          param.uniform_(0.5, 1.5)
        elif name.endswith("bias"):
          param.normal_(0.0, 0.1)
    base.save_pretrained(OUT / encoder)
    for name in SETTINGS:
      model = model_cls.from_pretrained(OUT / encoder).eval()
      adapters.init(model)
      model.add_adapter(name, config=preset(name))
      model.train_adapter(name)
      trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
      generator = torch.Generator().manual_seed(1)
      with torch.no_grad():
        for param in trained.values():
          param.copy_(0.3 * torch.randn(param.shape, generator=generator))
      model.eval()
      batch = inputs(config)
      with torch.no_grad():
        hidden = model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
      tensors = {f"weights/{n}": p.detach().contiguous() for n, p in trained.items()}
      tensors.update({f"inputs/{k}": torch.tensor(v) for k, v in batch.items()})
      tensors["outputs/last_hidden_state"] = hidden.contiguous()
      safetensors.torch.save_file(tensors, OUT / f"{encoder}_{name}.safetensors")
      summary["trainable"][f"{encoder}_{name}"] = sum(p.numel() for p in trained.values())
  with open(OUT / "versions.json", "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)


if __name__ == "__main__":
  main()
