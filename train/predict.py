"""Run a trained model on new text: `python -m train.predict --workdir W --input FILE [--output FILE]`.

The model is a training workdir, a Hugging Face PEFT folder, a merged model folder or a hub id (`train.inference`;
`--model` instead of `--workdir`).  The input is any file `datasets` reads (.csv/.tsv/.json/.jsonl/.parquet, a saved
folder); its column is the one the run trained on (config.data: text, source, messages or prompt), or `--column`.
Each input row gives one JSONL line of the output: {"label", "label_id", "probabilities", "logits"} for a classifier,
{"generated"} for a seq2seq or causal LM (greedy, or sampling with --temperature / --top_k / --top_p; at most
--max_new_tokens tokens, stopping at EOS; decoders batch left-padded prompts through their KV cache).  A chat row's
trailing assistant turns are dropped and the rest rendered with the chat template's generation prompt.
`predict(loaded, inputs)` is the same in Python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np

from peftjax.models import t5

from train import data_files, inference, instruct, tasks

PAD_MULTIPLE = 32  # prompts are padded to a multiple of this, so a few shapes compile


def read_inputs(loaded: inference.Loaded, path: str, column: str = "") -> list:
  """The input of every row of `path`: text, or chat messages; a bad row raises one sentence naming it."""
  column = column or data_files.input_column(loaded.task.kind, loaded.data)
  with tempfile.TemporaryDirectory() as cache:  # datasets' cache never goes beside the user's file
    dataset = data_files.read(path, cache, "--input")
    if column not in dataset.column_names:
      raise ValueError(f"{path} has no column {column!r}; its columns: {dataset.column_names} (choose one with "
                       "--column).")
    values = dataset[column]
  chat = loaded.task is tasks.CausalLM and any(isinstance(v, (list, tuple)) for v in values)
  out = []
  for row, value in enumerate(values, start=1):
    where = f"{path} row {row}, column {column!r}"
    if chat:
      messages = list(data_files.chat_messages(value, where, need_assistant=False))
      while messages and messages[-1]["role"] == "assistant":
        messages.pop()
      out.append(data_files.Chat(tuple(messages)))
    else:
      out.append(data_files.text_value(value, where))
  if not out:
    raise ValueError(f"{path} has no rows.")
  return out


def prompt_ids(loaded: inference.Loaded, example) -> list[int]:
  """The token ids the model reads for one input, as training tokenised it (cut at the run's input length)."""
  tokenizer = loaded.tokenizer
  if isinstance(example, data_files.Chat):
    text = instruct.chat_prompt(tokenizer, example.messages, instruct.template(tokenizer, loaded.data))
    return tokenizer(text, add_special_tokens=False)["input_ids"]
  limit = loaded.lengths.get("source_length" if loaded.task is tasks.Seq2SeqLM else "max_length")
  if not limit or loaded.task is tasks.CausalLM:  # a prompt to continue: whole
    return tokenizer(example)["input_ids"]
  return tokenizer(example, max_length=limit, truncation=True)["input_ids"]


def pad(rows: list[list[int]], pad_id: int, left: bool, length: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(ids, attention mask) int32 arrays of `rows` padded (on the left for decoders) to `length`, else to the longest
  row rounded up to PAD_MULTIPLE."""
  length = length or -(-max(len(r) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
  ids, mask = np.full((len(rows), length), pad_id, np.int32), np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    span = slice(length - len(row), length) if left else slice(0, len(row))
    ids[i, span], mask[i, span] = row, 1
  return ids, mask


def _classify(loaded: inference.Loaded, ids, mask) -> list[dict]:
  trainable, frozen = (loaded.params, {}) if loaded.method_cfg is None else (loaded.adapters, loaded.params)
  logits = np.asarray(loaded.forward(trainable, frozen, {"input_ids": ids, "attention_mask": mask}), np.float64)
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities /= probabilities.sum(-1, keepdims=True)
  names = loaded.label_names or [str(i) for i in range(logits.shape[-1])]
  return [{"label": names[int(np.argmax(p))], "label_id": int(np.argmax(p)),
           "probabilities": dict(zip(names, map(float, p))), "logits": [float(x) for x in z]}
          for p, z in zip(probabilities, logits)]


def _generate(loaded: inference.Loaded, ids, mask, rng, options: dict) -> list[dict]:
  tokenizer = loaded.tokenizer
  eos = tokenizer.eos_token_id
  apply_fn = loaded.apply_fn if loaded.method_cfg is not None else None
  if loaded.task is tasks.Seq2SeqLM:
    tokens = t5.generate(loaded.model, loaded.params_for_apply, ids, mask, rng=rng, apply_fn=apply_fn, **options)
  else:
    tokens = loaded.family.module.generate(loaded.model, loaded.params_for_apply, ids, mask, rng=rng,
                                           eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, apply_fn=apply_fn,
                                           **options)
  out = []
  for row in np.asarray(tokens).tolist():
    if eos is not None and eos in row:
      row = row[:row.index(eos)]
    out.append({"generated": tokenizer.decode(row, skip_special_tokens=True)})
  return out


def predict(loaded: inference.Loaded, inputs: list, *, batch_size: int = 8, max_new_tokens: int = 0,
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
  """One record per input (text, or `train.data_files.Chat` messages): a classifier's label, label_id,
  probabilities and logits; a seq2seq / causal LM's generated text (see the module doc)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be a positive integer.")
  new_tokens = max_new_tokens or (loaded.lengths.get("target_length", 32) if loaded.task is tasks.Seq2SeqLM else 32)
  options = dict(max_new_tokens=new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  rows = [prompt_ids(loaded, example) for example in inputs]
  classify = loaded.task is tasks.SequenceClassification
  records = []
  for start in range(0, len(rows), batch_size):
    chosen = rows[start:start + batch_size]
    real = len(chosen)
    chosen = chosen + [chosen[0]] * (batch_size - real)  # a full batch: one compiled shape
    ids, mask = pad(chosen, loaded.tokenizer.pad_token_id, left=loaded.task is tasks.CausalLM,
                    length=loaded.lengths.get("max_length", 0) if classify else 0)
    if classify:
      records += _classify(loaded, ids, mask)[:real]
    else:
      rng = jax.random.fold_in(jax.random.key(seed), start) if temperature > 0 else None
      records += _generate(loaded, ids, mask, rng, options)[:real]
  return records


def write_jsonl(path: str, records: list[dict]) -> None:
  """Writes one JSON line per record, atomically (a temporary file beside `path`, then a rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".predictions-", dir=folder)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


def parser() -> argparse.ArgumentParser:
  """The command line of `python -m train.predict`."""
  p = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__.split("\n\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="training workdir (holds run.json) whose model runs")
  source.add_argument("--model", help="a PEFT adapter folder, a model folder (e.g. a merged one) or a hub id")
  p.add_argument("--input", required=True, help="rows to predict: a .csv/.tsv/.json/.jsonl/.parquet file or folder")
  p.add_argument("--output", help="the JSONL file to write (default: <workdir>/predictions.jsonl)")
  p.add_argument("--column", default="", help="the input column (default: the one the run trained on, else 'text')")
  p.add_argument("--batch_size", type=int, default=8, help="rows per forward pass / generate call")
  p.add_argument("--max_new_tokens", type=int, default=0, help="tokens to generate (0: target_length for T5, else 32)")
  p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; above 0 samples")
  p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
  p.add_argument("--top_p", type=float, default=1.0, help="sample from the smallest set with this much probability")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  return p


def main(argv: list[str] | None = None) -> None:
  args = parser().parse_args(argv)
  output = args.output or os.path.join(args.workdir or ".", "predictions.jsonl")
  try:
    loaded = inference.load(args.workdir or args.model)
    records = predict(loaded, read_inputs(loaded, args.input, args.column), batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed)
  except ValueError as e:
    sys.exit(f"error: {e}")
  write_jsonl(output, records)
  print(f"wrote {len(records)} predictions to {output}")


if __name__ == "__main__":
  main()
