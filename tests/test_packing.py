"""Packing for causal LMs: documents in one row attend, get positions and lose exactly as run alone; resumable."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import peftjax as pj
import train
from peftjax.methods import prefix_tuning
from peftjax.models import gpt2, llama
from train import data, packing, steps, tasks
from train.data import IGNORE

import test_data_files  # tests/ is on sys.path under pytest
import test_train
import test_train_zoo

VOCAB = 97
ROW = 12          # the width documents are tokenised to
MAX_LENGTH = 24   # the packed rows' length
MODELS = {
    "gpt2": lambda: gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                                         n_head=4, initializer_range=0.2)),
    "llama": lambda: llama.LlamaForCausalLM(llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              num_key_value_heads=2, initializer_range=0.2)),
}


def _documents(rng) -> tuple[list[np.ndarray], dict]:
  """Nine documents (token ids) and their tokenised rows: plain text (every token a label) and instruction rows
  (a prompt of -100 labels); right padding but for one left-padded row."""
  lengths = [5, 9, 3, 12, 7, 4, 11, 2, 6]
  docs = [rng.integers(3, VOCAB, n).astype(np.int32) for n in lengths]
  rows = {"input_ids": np.zeros((len(docs), ROW), np.int32), "attention_mask": np.zeros((len(docs), ROW), np.int32),
          "labels": np.full((len(docs), ROW), IGNORE, np.int32)}
  for i, doc in enumerate(docs):
    span = slice(ROW - len(doc), ROW) if i == 4 else slice(0, len(doc))
    labels = doc.copy()
    if i % 2:  # an instruction row: its prompt is not a target
      labels[:len(doc) // 2] = IGNORE
    rows["input_ids"][i, span], rows["attention_mask"][i, span], rows["labels"][i, span] = doc, 1, labels
  return docs, rows


@functools.cache
def _base(kind: str):
  """(model, params): a tiny random model of `kind`, shared by the method cases."""
  model = MODELS[kind]()
  return model, jax.jit(functools.partial({"gpt2": gpt2, "llama": llama}[kind].init_params, model))(jax.random.key(0))


def _adapted(kind: str, method: str):
  """(forward, trainable, frozen): a tiny random model with random LoRA (B not zero) or prefix tuning."""
  model, params = _base(kind)
  if method == "lora":
    cfg = pj.LoraConfig(rank=4, alpha=8.0, targets=pj.tree.ALL_LINEAR)
    adapters = pj.init(cfg, jax.random.key(1), params)
    rng = np.random.default_rng(2)
    adapters = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), adapters)
  else:
    cfg = prefix_tuning.PrefixTuningConfig(3, encoder_hidden_size=16)
    adapters = pj.init(cfg, jax.random.key(1), params)
  return jax.jit(steps.make_forward(model, tasks.CausalLM, cfg)), adapters, params


@pytest.mark.parametrize("kind,method", [("gpt2", "lora"), ("llama", "lora"), ("gpt2", "prefix"),
                                         ("llama", "prefix")])
def test_packed_documents_compute_as_run_alone(kind, method):
  docs, rows = _documents(np.random.default_rng(0))
  packed_rows = packing.epoch_rows(packing.document_lengths(rows), MAX_LENGTH, seed=3, epoch=0)
  assert sorted(sum(packed_rows, [])) == list(range(len(docs))) and len(packed_rows) < len(docs)
  batch = packing.pack(rows, packed_rows, MAX_LENGTH)
  forward, trainable, frozen = _adapted(kind, method)
  # One call (one compilation): the packed rows; the same rows with 0/1 masks and positions 0, 1, ... (no segments);
  # each document run alone, unpacked, in a right-padded row of its own (padding after a token does not change it).
  alone = np.zeros((len(docs), MAX_LENGTH), np.int32)
  for d, doc in enumerate(docs):
    alone[d, :len(doc)] = doc
  n = len(packed_rows)
  both = {"input_ids": np.concatenate([batch["input_ids"], batch["input_ids"], alone]),
          "attention_mask": np.concatenate([batch["attention_mask"], (batch["attention_mask"] > 0) * 1, alone > 0]),
          "position_ids": np.concatenate([batch["position_ids"]] + [np.arange(MAX_LENGTH)[None].repeat(
              n + len(docs), 0)])}
  out = np.asarray(forward(trainable, frozen, {k: v.astype(np.int32) for k, v in both.items()}))
  logits, unsegmented, alone_logits = out[:n], out[n:2 * n], out[2 * n:]
  for r, documents in enumerate(packed_rows):
    start, total, count = 0, 0.0, 0
    for segment, d in enumerate(documents, start=1):
      doc = docs[d]
      span = slice(start, start + len(doc))
      np.testing.assert_array_equal(batch["input_ids"][r, span], doc)
      assert (batch["attention_mask"][r, span] == segment).all()
      np.testing.assert_array_equal(batch["position_ids"][r, span], np.arange(len(doc)))
      alone_labels = rows["labels"][d][rows["attention_mask"][d] != 0][None]
      own = alone_logits[d:d + 1, :len(doc)]
      np.testing.assert_allclose(logits[r, span], own[0], atol=1e-5, rtol=0)
      if segment > 1:  # the same tokens without segment ids attend the documents in front: other logits
        assert np.abs(unsegmented[r, span] - own[0]).max() > 1e-2
      doc_total, doc_count, _ = steps.cross_entropy(*tasks.CausalLM.aligned(own, alone_labels))
      total, count, start = total + float(doc_total), count + int(doc_count), start + len(doc)
    assert (batch["attention_mask"][r, start:] == 0).all() and (batch["labels"][r, start:] == IGNORE).all()
    row_total, row_count, _ = steps.cross_entropy(*tasks.CausalLM.aligned(logits[r:r + 1], batch["labels"][r:r + 1]))
    assert int(row_count) == count  # each document's own targets, no target across a boundary
    np.testing.assert_allclose(float(row_total) / int(row_count), total / count, rtol=1e-6)


def test_packed_batches_fill_rows_and_resume_mid_epoch():
  lengths = np.random.default_rng(4).integers(1, 25, 301)
  order = packing.epoch_rows(lengths, 32, seed=5, epoch=0)
  assert sorted(sum(order, [])) == list(range(301))
  assert all(lengths[row].sum() <= 32 for row in order)
  assert all(lengths[a].sum() + lengths[b[0]] > 32 for a, b in zip(order, order[1:]))  # a row closes when full
  assert packing.epoch_rows(lengths, 32, seed=5, epoch=1) != order  # each epoch packs anew
  per_epoch = len(order) // 8
  straight = packing.batches(lengths, 32, 8, seed=5)
  seen = [next(straight) for _ in range(per_epoch + 5)]  # into the second epoch
  assert [r for r in seen[0][0]] == order[:8] and seen[per_epoch][1] == {"epoch": 1, "index": 1}
  resumed = packing.batches(lengths, 32, 8, seed=5, **seen[per_epoch - 2][1])
  for chosen, where in seen[per_epoch - 1:]:
    assert next(resumed) == (chosen, where)
  with pytest.raises(ValueError, match=r"config\.batch_size=8 is larger than the 2 packed rows the 3 training "
                                       r"examples fill at config\.max_length=32"):
    next(packing.batches(np.array([20, 20, 5]), 32, 8, seed=0))


def test_bad_packing_gives_one_clear_sentence(tmp_path):
  gpt2_config = lambda **kw: test_train_zoo.load_config("lora_gpt2", tmp_path, **kw)  # noqa: E731
  cases = [
      (test_train.tiny_config(tmp_path, packing=True), r"config\.packing=True packs documents for causal LMs only, "
       r"but this run trains a seq2seq_lm model \(config\.family='t5'"),
      (test_train.tiny_config(tmp_path, packing="yes"), r"config\.packing='yes' must be True or False"),
      (gpt2_config(packing=True, buckets=(8,)), r"config\.packing=True fills every row to config\.max_length, so "
       r"config\.buckets=\(8,\) must be \(\) with it"),
      (test_train_zoo.load_config("prefix_tuning_gpt2", tmp_path, packing=True, method="prompt_tuning"), r"config\.packing=True cannot be used with "
       r"config\.method='prompt_tuning': its virtual tokens are input positions"),
  ]
  for config, message in cases:
    with pytest.raises(ValueError, match=message):
      train.main(config)


@pytest.mark.slow
def test_kill_and_resume_with_packing_is_bit_identical(tmp_path):
  # A tiny GPT-2 (LoRA dropout on) on a CSV of 112 Rotten Tomatoes sentences (about 25 tokens each), packed into
  # rows of 48 tokens: the 96 training sentences fill about 52 rows, 6 batches of 8 an epoch, so the 10 steps cross
  # an epoch.  The resumed run must train the same packed batches with the same dropout masks.
  path = test_data_files.write_csv(tmp_path / "sentences.csv", [{"text": text} for text, _ in
                                                                data.rotten_tomatoes_labels()[:112]])
  settings = {**test_train_zoo.TINY_GPT2, "task": path, "max_length": 48, "packing": True, "export_merged": False,
              "train_examples": 96, "lora.dropout": 0.1, "checkpoint_every": 5, "steps": 10,
              "optimizer.decay_steps": 10}
  run = lambda folder, **kw: train.main(test_train_zoo.load_config("lora_gpt2", tmp_path / folder,  # noqa: E731
                                                                   **{**settings, **kw}))
  assert run("resumed", steps=5)["final_step"] == 5
  resumed = run("resumed")
  assert resumed["start_step"] == 5
  straight = run("straight")
  for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(straight["state"])):
    np.testing.assert_array_equal(a, b)
  assert straight["after"]["loss"] < straight["before"]["loss"]
  unpacked = run("unpacked", packing=False)  # packing changed the run: other batches
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(unpacked["state"]["trainable"]),
                                                      jax.tree.leaves(straight["state"]["trainable"])))
