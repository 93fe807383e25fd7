"""Fold a trained adapter into its base: `python -m train.merge --workdir W --output DIR` (or `--adapter FOLDER`).

The Hugging Face PEFT `merge_and_unload` + `save_pretrained`: the output folder is the base model's class with the
method folded into the weights (`pj.merge`), plus the tokenizer (and a classifier's label names); transformers and
`python -m train.predict --model DIR` load it.  The source is a training workdir or any PEFT adapter folder
(`train.inference.load`); bottleneck adapters and prompt methods do not fold into the weights and are refused.
"""

from __future__ import annotations

import argparse
import sys

import peftjax as pj
from peftjax.models import hf_io

from train import inference, methods


def merge(source: str, output: str) -> None:
  """Writes the merged model of `source` (a workdir or PEFT folder) and its tokenizer to `output`, atomically."""
  loaded = inference.load(source)
  if loaded.method_cfg is None:
    raise ValueError(f"{source!r} holds no adapter (a model folder, or a run with config.method='full'); there is "
                     "nothing to merge.")
  if not methods.mergeable(loaded.method_cfg):
    raise ValueError(f"{source!r}: the adapter's method does not fold into the weights (bottleneck adapters and "
                     "prompt methods); run it with python -m train.predict instead.")
  merged = pj.merge(loaded.method_cfg, loaded.params, loaded.adapters)
  with hf_io.replacing_folder(output) as tmp:
    loaded.family.module.save_pretrained(loaded.model, merged, tmp)
    loaded.tokenizer.save_pretrained(tmp)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m train.merge", description=__doc__.split("\n\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training workdir whose adapter is merged")
  source.add_argument("--adapter", help="a Hugging Face PEFT adapter folder or hub id")
  p.add_argument("--output", required=True, help="the folder to write (replaced if it exists)")
  args = p.parse_args(argv)
  try:
    merge(args.workdir or args.adapter, args.output)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
