"""`train.main` with every method beyond LoRA / DoRA / (IA)³ / BitFit: AdaLoRA (its rank budget and regulariser inside
the step), bottleneck adapters, prompt tuning, P-tuning, prefix tuning, P-tuning v2 and the combinations MAM and UniPELT
on a tiny GPT-2, and their exported adapters; the causal-LM loss of prompt tuning against Hugging Face PEFT's; every
new config file end to end with tiny overrides; the errors."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import peft
import pytest
import torch
import transformers

from peftjax import checkpoint, interop
from peftjax import tree as ptree
from peftjax.methods import adalora
from peftjax.models import gpt2

import train
from train import data, inference, loop, methods, predict, steps, tasks

import test_train  # tests/ is on sys.path under pytest
import test_train_scale
import test_train_zoo

STEPS = 8
# test_train_zoo's tiny GPT-2 (tied head, large embeddings) for 8 steps on one batch of 8 (so the losses of the steps
# compare), every step logged, and small method sections.
TINY = {**test_train_zoo.TINY_GPT2, "steps": STEPS, "max_length": 16, "eval_examples": 8, "train_examples": 8,
        "log_every": 1, "checkpoint_every": STEPS, "prompt.num_virtual_tokens": 4, "prompt.encoder_hidden_size": 16}
SECTIONS = {"adalora": dict(init_r=4, target_r=2, alpha=8.0, targets="c_attn,c_fc", tinit=1, tfinal=3, delta_t=2),
            "adapter": dict(reduction_factor=4.0),
            "mam": dict(prefix_length=4, prefix_hidden=16, reduction_factor=4.0, scaling=4.0),
            "unipelt": dict(parts="lora,adapter,prefix", lora_rank=4, lora_targets="c_attn", reduction_factor=4.0,
                            prefix_length=4, prefix_hidden=16)}
LEARNING_RATES = {"adalora": 3e-2, "houlsby": 3e-2, "pfeiffer": 3e-2, "parallel": 3e-2, "prompt_tuning": 0.1,
                  "p_tuning": 1e-2, "prefix_tuning": 1e-2, "p_tuning_v2": 0.1, "mam": 1e-2, "unipelt": 1e-2}
MERGEABLE = ("adalora",)
# Methods whose workdir `train.predict` also generates from (the prompt methods and the prefix + adapter combination).
GENERATED = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "mam")
# Methods Hugging Face PEFT has: exported as a PEFT folder of this peft_type (the others as an Orbax tree).
PEFT_TYPES = {"adalora": "ADALORA", "prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING",
              "prefix_tuning": "PREFIX_TUNING", "p_tuning_v2": "PREFIX_TUNING"}


def tiny_config(workdir, method: str, **overrides) -> ml_collections.ConfigDict:
  """configs/prefix_tuning_gpt2.py (it holds config.prompt) shrunk to TINY, with the other method sections."""
  config = test_train_zoo.load_config("prefix_tuning_gpt2", workdir, method=method,
                                      **{**TINY, "optimizer.learning_rate": LEARNING_RATES[method]})
  for name, section in SECTIONS.items():
    config[name] = ml_collections.ConfigDict(section)
  return test_train.override(config, overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{method: train.main's result}, each run once on first use."""
  results = {}

  def run(method: str) -> dict:
    if method not in results:
      results[method] = train.main(tiny_config(tmp_path_factory.mktemp(method), method))
    return results[method]
  return run


@pytest.mark.parametrize("method", list(LEARNING_RATES))
def test_every_new_method_trains_and_exports(runs, method):
  result = runs(method)
  workdir = result["workdir"]
  losses = test_train_scale.logged(workdir, "train/loss")
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses[STEPS] < losses[1] - 0.2, losses
  trainable, frozen = result["state"]["trainable"], result["frozen"]
  assert 0 < ptree.count(trainable) < ptree.count(frozen) // 10

  # The adapter reads back: a PEFT folder (prompts folded, as PEFT saves them) computes the trained model's logits,
  # an Orbax tree holds the trained leaves.  Only mergeable methods write a merged model.
  ids = np.random.default_rng(1).integers(1000, 20000, (2, 10)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
  adapter = os.path.join(workdir, "adapter")
  if method in PEFT_TYPES:
    with open(os.path.join(adapter, "adapter_config.json")) as f:
      assert json.load(f)["peft_type"] == PEFT_TYPES[method]
    cfg, loaded = interop.load_adapter(adapter, jax.device_get(frozen))
    np.testing.assert_allclose(steps.make_forward(result["model"], tasks.CausalLM, cfg)(loaded, frozen, batch),
                               test_train_zoo.adapted_logits(result, batch), atol=1e-4, rtol=0)
  else:
    restored = checkpoint.load_adapters(adapter, jax.tree.map(np.asarray, trainable))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), restored, trainable)
  assert os.path.isdir(os.path.join(workdir, "base"))
  assert os.path.isdir(os.path.join(workdir, "merged")) == (method in MERGEABLE)
  if method in MERGEABLE:
    model, params = gpt2.from_pretrained(os.path.join(workdir, "merged"))
    np.testing.assert_allclose(model.apply({"params": params}, ids, batch["attention_mask"]),
                               test_train_zoo.adapted_logits(result, batch), atol=1e-4, rtol=0)


  if method in GENERATED:
    loaded = inference.load(workdir)
    text = "a quiet film about"
    generated = predict.predict(loaded, [text], batch_size=2, max_new_tokens=4)[0]["generated"]
    expected = greedy_without_cache(result, predict.prompt_ids(loaded, text), 4)
    assert generated == loaded.tokenizer.decode(expected, skip_special_tokens=True), (generated, expected)


def greedy_without_cache(result: dict, prompt: list[int], new_tokens: int) -> list[int]:
  """Greedy continuation of one unpadded prompt by the trained model's whole forward pass, token by token."""
  forward = jax.jit(steps.make_forward(result["model"], tasks.CausalLM, result["method"]))
  length, ids = len(prompt) + new_tokens, list(prompt)
  for _ in range(new_tokens):
    row = np.zeros((1, length), np.int32)
    row[0, :len(ids)] = ids
    batch = {"input_ids": row, "attention_mask": (np.arange(length) < len(ids)).astype(np.int32)[None]}
    logits = np.asarray(forward(result["state"]["trainable"], result["frozen"], batch))
    ids.append(int(np.argmax(logits[0, logits.shape[1] - length + len(ids) - 1])))  # past any virtual positions
  return ids[len(prompt):]


def test_adalora_prunes_to_the_budget_inside_training(runs):
  result = runs("adalora")
  cfg = result["method"]
  masks = ptree.flatten(result["state"]["method_state"]["mask"])
  n_modules = adalora.num_modules(result["state"]["trainable"])
  assert n_modules == 4 and cfg.total_step == STEPS  # c_attn and c_fc of 2 layers; total_step is config.steps
  kept = methods.kept_ranks(result["state"]["method_state"])
  # The last step (index STEPS - 1) is in the final phase: the budget is target_r per layer, and the mask holds it.
  assert kept == int(adalora.budget_schedule(cfg, n_modules, STEPS - 1)[0]) == cfg.target_r * n_modules
  # Pruned singular values are zero in the trained (and exported) adapters; kept ones have moved from their 0 init.
  e = np.concatenate([np.asarray(ptree.flatten(result["state"]["trainable"])[p]).ravel() for p in masks])
  kept_mask = np.concatenate([np.asarray(m).ravel() for m in masks.values()])
  assert np.all(e[~kept_mask] == 0.0) and np.all(e[kept_mask] != 0.0)


def test_adalora_regulariser_is_in_the_training_loss(runs):
  """The logged loss of step 1 is the cross-entropy of the first batch at the initial adapters plus the regulariser."""
  result = runs("adalora")
  config = result["config"]
  model, params, tokenizer = loop.load_model(config)
  method_cfg, trainable, frozen = loop.trainable_and_frozen(config, model, params, tokenizer)
  train_set, _ = data.split(data.load_task("causal_lm", config.task), config.eval_examples, config.train_examples)
  rows = tasks.CausalLM.tokenize(tokenizer, train_set, config)
  chosen, _ = next(data.batch_indices(len(rows["labels"]), config.batch_size, config.seed))
  batch = {k: v[chosen] for k, v in rows.items()}
  total, count = steps.make_loss(steps.make_forward(model, tasks.CausalLM, method_cfg), tasks.CausalLM)(
      trainable, frozen, batch, None)
  regulariser = float(adalora.orthogonal_regularization(method_cfg, trainable))
  assert regulariser > 0.5  # A^T A and B B^T start far from I
  first = test_train_scale.logged(result["workdir"], "train/loss")[1]
  np.testing.assert_allclose(first, float(total / count) + regulariser, rtol=1e-5)


def test_prompt_tuning_causal_lm_loss_matches_peft(tmp_path):
  """The virtual positions take ignored labels, and the last one predicts the first token, as in Hugging Face PEFT."""
  torch.manual_seed(0)
  reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=32,
                                                                   n_layer=2, n_head=4)).eval()
  reference.save_pretrained(tmp_path)
  reference = peft.get_peft_model(reference, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
  ids = np.random.default_rng(0).integers(3, 101, (3, 9)).astype(np.int32)
  mask = (np.arange(9)[None] < np.array([[9], [6], [2]])).astype(np.int32)  # right padding
  labels = np.where(mask == 1, ids, data.IGNORE).astype(np.int32)
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                         labels=torch.tensor(labels, dtype=torch.long)).loss.item()

  config = tiny_config(tmp_path, "prompt_tuning", model=str(tmp_path), **{"prompt.num_virtual_tokens": 5})
  model, params = gpt2.from_pretrained(str(tmp_path))
  method_cfg, _, frozen = loop.trainable_and_frozen(config, model, params)
  prompts = reference.prompt_encoder["default"].embedding.weight.detach().numpy()
  forward = steps.make_forward(model, tasks.CausalLM, method_cfg)
  total, count = steps.make_loss(forward, tasks.CausalLM)({"prompt_embeddings": prompts}, frozen,
                                                          {"input_ids": ids, "attention_mask": mask, "labels": labels},
                                                          None)
  assert forward({"prompt_embeddings": prompts}, frozen, {"input_ids": ids, "attention_mask": mask}).shape[1] == 5 + 9
  assert int(count) == mask.sum()  # every real token, the first one predicted from the last virtual position
  np.testing.assert_allclose(float(total / count), expected, rtol=1e-5)


T5_TINY = {f"model_shape.{k}": v for k, v in test_train.TINY_SHAPE.items()}
QUICK = {"steps": 2, "batch_size": 4, "eval_examples": 4, "train_examples": 8, "log_every": 1, "checkpoint_every": 2}
# config file (with its argument) -> overrides for a quick run; the BERT ones keep the real all-MiniLM-L6-v2.
CONFIG_RUNS = {
    ("adalora_bert_sentiment", None): {**QUICK, "max_length": 16, "adalora.tinit": 0, "adalora.tfinal": 1},
    ("adapter_bert_sentiment", "pfeiffer"): {**QUICK, "max_length": 16},
    ("p_tuning_v2_bert_sentiment", None): {**QUICK, "max_length": 16},
    ("mam_bert_sentiment", None): {**QUICK, "max_length": 16, "mam.prefix_length": 4, "mam.prefix_hidden": 32},
    ("unipelt_bert_sentiment", None): {**QUICK, "max_length": 16, "unipelt.prefix_hidden": 32},
    ("ia3_t5", None): {**QUICK, **T5_TINY, "source_length": 16, "target_length": 3},
    ("prompt_tuning_t5", None): {**QUICK, **T5_TINY, "source_length": 16, "target_length": 3},
    ("prefix_tuning_gpt2", None): {**QUICK, "max_length": 16, "model_shape.n_embd": 32, "model_shape.n_head": 2,
                                   "model_shape.vocab_size": 49152},
}


@pytest.mark.parametrize("name,arg", list(CONFIG_RUNS))
def test_config_files_run_end_to_end(tmp_path, name, arg):
  config = test_train_zoo.load_config(name, tmp_path, arg, export_merged=True, **CONFIG_RUNS[name, arg])
  result = train.main(config)
  assert result["final_step"] == 2 and np.isfinite(result["after"]["loss"])
  assert os.path.isdir(tmp_path / "adapter")
  assert os.path.isdir(tmp_path / "merged") == methods.mergeable(result["method"])
  if name == "prompt_tuning_t5":  # initialised from the label words' embeddings
    ids = transformers.AutoTokenizer.from_pretrained(loop.resolve(tasks.FAMILIES["t5"].default_tokenizer))(
        "positive negative")["input_ids"]
    table = np.asarray(ptree.flatten(result["frozen"])["shared/embedding"])
    initial = loop.trainable_and_frozen(config, result["model"], result["frozen"],
                                        loop.load_model(config)[2])[1]["prompt_embeddings"]
    np.testing.assert_array_equal(np.asarray(initial)[:len(ids)], table[ids])
  if name.endswith("bert_sentiment"):  # modules_to_save composes with the method: the head trains
    assert isinstance(result["method"], list) and result["method"][-1].modules == ("classifier", "pooler")


def test_adapter_config_options():
  values = {arg: test_train_zoo.load_config("adapter_bert_sentiment", "w", arg) for arg in ("houlsby", "pfeiffer",
                                                                                            "parallel")}
  assert test_train_zoo.load_config("adapter_bert_sentiment", "w").method == "houlsby"
  assert {a: (c.method, c.adapter.scaling) for a, c in values.items()} == {
      "houlsby": ("houlsby", 1.0), "pfeiffer": ("pfeiffer", 1.0), "parallel": ("parallel", 4.0)}
  with pytest.raises(ValueError, match=r"config argument 'mam' is not an adapter arrangement; valid: \['houlsby', "):
    test_train_zoo.load_config("adapter_bert_sentiment", "w", "mam")


def test_bad_method_sections_give_one_clear_sentence(tmp_path):
  def error(method: str, **overrides) -> str:
    with pytest.raises(ValueError) as info:
      methods.method_config(tiny_config(tmp_path, method, **overrides), "gpt2")
    return str(info.value)

  config = test_train_zoo.load_config("lora_gpt2", tmp_path, method="houlsby")
  with pytest.raises(ValueError, match=r"config\.method='houlsby' reads its settings from config\.adapter, which "
                                       r"this config file does not define; add that section\."):
    train.main(config)
  assert error("parallel", **{"adapter.non_linearity": "sigmoid"}).startswith(
      "config.adapter.non_linearity='sigmoid' is not supported; valid: ['gelu', 'gelu_new', 'relu', ")
  assert error("p_tuning", **{"prompt.encoder_type": "gru"}) == (
      "config.prompt.encoder_type='gru' is not valid; valid: ('mlp', 'lstm').")
  assert error("prompt_tuning", **{"prompt.init": "text", "prompt.init_text": "hi"}).startswith(
      "config.prompt.init='text' tokenises config.prompt.init_text with the model's tokenizer")
  assert error("prefix_tuning", **{"prompt.num_virtual_tokens": 0}) == (
      "config.prompt.num_virtual_tokens must be at least 1, got 0.")
  assert error("adalora", **{"adalora.tinit": 6}) == (
      "config.adalora.tinit=6 must be below config.steps - tfinal = 5 so that the budget has steps to decrease in.")
  assert error("adalora", steps=0).startswith("config.steps must be a positive integer")
  assert error("mam", **{"mam.prefix_length": 0}) == "config.mam.prefix_length must be at least 1, got 0."
  assert error("unipelt", **{"unipelt.reduction_factor": 0.0}) == (
      "config.unipelt.reduction_factor must be positive, got 0.0.")
  assert error("unipelt", **{"unipelt.lora_rank": 0}) == "config.unipelt.lora_rank must be a positive integer, got 0."
  assert error("unipelt", **{"unipelt.parts": "lora,prompt"}) == (
      "config.unipelt.parts='lora,prompt' is not valid; list some of ['lora', 'adapter', 'prefix'] (separated by "
      "commas, each once).")
  unipelt_cfg = methods.method_config(tiny_config(tmp_path, "unipelt", **{"unipelt.parts": "adapter,prefix"}), "gpt2")
  assert unipelt_cfg.lora is None and unipelt_cfg.adapter.reduction_factor == 4.0
  assert (unipelt_cfg.prefix.num_virtual_tokens, unipelt_cfg.prefix.encoder_hidden_size) == (4, 16)
  config = tiny_config(tmp_path, "houlsby")
  config.adapter.reduction = 4.0
  with pytest.raises(ValueError, match=r"config\.adapter has the unknown key 'reduction'; valid: \['reduction_factor'"):
    methods.method_config(config, "gpt2")
