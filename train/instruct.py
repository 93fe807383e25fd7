"""Instruction and chat examples for a causal LM -> token arrays whose labels are the completion tokens only.

A `train.data_files.Completion` is the prompt (tokenised with the tokenizer's special tokens, e.g. BOS) followed by
the completion and EOS; a `train.data_files.Chat` is rendered with the chat template turn by turn, so the text each
assistant turn adds (its content and end-of-turn marker) is known exactly.  Each piece is tokenised on its own and
the ids concatenated, so the prompt's tokens are exactly the tokens of the prompt alone.  Labels are -100 on prompt
positions (and padding) unless config.data.completion_only_loss is False; rows are cut at config.max_length.
"""

from __future__ import annotations

import numpy as np

from train import data_files
from train.data import IGNORE


def template(tokenizer, cfg) -> str:
  """The chat template to render with: config.data.chat_template, else the tokenizer's; raises if neither exists."""
  chosen = cfg.chat_template or getattr(tokenizer, "chat_template", None)
  if not chosen:
    raise ValueError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so the "
                     f"messages column {cfg.messages_column!r} cannot be rendered; set config.data.chat_template "
                     "(a Jinja template).")
  return chosen


def _render(tokenizer, messages, chat_template: str, generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(list(messages), chat_template=chat_template, tokenize=False,
                                       add_generation_prompt=generation_prompt)


def chat_prompt(tokenizer, messages, chat_template: str) -> str:
  """The text a model continues to answer `messages`: the conversation with the assistant's generation prompt."""
  return _render(tokenizer, messages, chat_template, True)


def segments(tokenizer, example, chat_template: str | None) -> list[tuple[str, bool]]:
  """(text, is completion) pieces of an instruction or chat example, in order."""
  if isinstance(example, data_files.Completion):
    return [(example.prompt, False), (example.completion, True)]
  pieces, done = [], ""
  messages = example.messages
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    prompt, full = chat_prompt(tokenizer, messages[:i], chat_template), _render(tokenizer, messages[:i + 1],
                                                                                chat_template, False)
    if not (prompt.startswith(done) and full.startswith(prompt)):
      raise ValueError("the chat template does not render a conversation as the text of its turns in order, so the "
                       "assistant tokens cannot be told apart; use another config.data.chat_template.")
    pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
    done = full
  rest = _render(tokenizer, messages, chat_template, False)[len(done):]
  return [(text, target) for text, target in pieces + [(rest, False)] if text]


def token_ids(tokenizer, pieces: list[tuple[str, bool]], completion_eos: bool) -> tuple[list[int], list[bool]]:
  """(ids, is target) of the pieces; the first piece gets the tokenizer's special tokens when `completion_eos` (a
  prompt/completion pair, which then ends with EOS), chat pieces get none (the template writes them)."""
  ids, targets = [], []
  for index, (text, target) in enumerate(pieces):
    piece = tokenizer(text, add_special_tokens=completion_eos and index == 0)["input_ids"]
    ids += piece
    targets += [target] * len(piece)
  if completion_eos and tokenizer.eos_token_id is not None:
    ids.append(tokenizer.eos_token_id)
    targets.append(True)
  return ids, targets


def tokenize(tokenizer, examples, config) -> dict:
  """{'input_ids', 'attention_mask', 'labels'} (right-padded to config.max_length) of Completion / Chat examples."""
  cfg = data_files.settings(config)
  chat_template = template(tokenizer, cfg) if isinstance(examples[0], data_files.Chat) else None
  length = config.max_length
  out = {"input_ids": np.full((len(examples), length), tokenizer.pad_token_id, np.int32),
         "attention_mask": np.zeros((len(examples), length), np.int32),
         "labels": np.full((len(examples), length), IGNORE, np.int32)}
  for row, example in enumerate(examples):
    ids, targets = token_ids(tokenizer, segments(tokenizer, example, chat_template),
                             isinstance(example, data_files.Completion))
    ids, targets = np.asarray(ids[:length], np.int32), np.asarray(targets[:length], bool)
    out["input_ids"][row, :len(ids)] = ids
    out["attention_mask"][row, :len(ids)] = 1
    out["labels"][row, :len(ids)] = np.where(targets | (not cfg.completion_only_loss), ids, IGNORE)
  return out
