"""Decoder sequence classifiers (GPT-2, Llama / Mistral / Qwen2) against transformers' *ForSequenceClassification:
logits on both padding sides, checkpoints both ways, a new score head, logical axes, LoRA + score vs HF peft."""

from __future__ import annotations

import json

import jax
import jax.flatten_util
import numpy as np
import peft
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import interop, sharding
from peftjax import tree as ptree
from peftjax.methods import modules_to_save
from peftjax.models import gpt2, llama

from tiny_models import perturb_torch, saved_checkpoints  # tests/ is on sys.path under pytest

PAD = 0
LABELS = ("negative", "neutral", "positive")
# kind -> (transformers class name, config arguments)
KINDS = {
    "gpt2": ("GPT2ForSequenceClassification", dict(
        vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)),
    "llama": ("LlamaForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    "mistral": ("MistralForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=4, bos_token_id=1, eos_token_id=2)),
    "qwen2": ("Qwen2ForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
}
LORA_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}  # HF peft's defaults for these families


def _torch_classifier(kind: str, pad_token_id: int | None = PAD):
  """Random transformers classifier (seed 0, 3 named labels) with uneven norms and weights that move the residual."""
  name, arguments = KINDS[kind]
  config = getattr(transformers, name.replace("ForSequenceClassification", "Config"))(
      **arguments, pad_token_id=pad_token_id, id2label=dict(enumerate(LABELS)))
  torch.manual_seed(0)
  return perturb_torch(getattr(transformers, name)(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{kind: folder written by transformers' save_pretrained}, created on first use."""
  return saved_checkpoints(tmp_path_factory, _torch_classifier)


def _batch(vocab: int, left: bool) -> dict:
  """Token lengths 9, 6, 3 and 1, padded with PAD on the left or the right."""
  rng = np.random.default_rng(0)
  input_ids = np.full((4, 9), PAD, np.int64)
  for i, n in enumerate([9, 6, 3, 1]):
    input_ids[i, slice(9 - n, 9) if left else slice(0, n)] = rng.integers(3, vocab, n)
  return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).astype(np.int64)}


def _torch_logits(model, batch: dict) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers_on_both_padding_sides(checkpoints, kind):
  model, params = pj.models.from_pretrained(checkpoints(kind))
  expected = gpt2.GPT2ForSequenceClassification if kind == "gpt2" else llama.LlamaForSequenceClassification
  assert isinstance(model, expected)
  assert (model.num_labels, model.config.id2label, model.config.pad_token_id) == (3, LABELS, PAD)
  torch_model = _torch_classifier(kind)
  scanned, scanned_params = pj.models.from_pretrained(checkpoints(kind), scan_layers=True, remat=True)
  for left in (False, True):
    batch = _batch(model.config.vocab_size, left)
    ours = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    assert ours.shape == (4, 3)
    assert _max_diff(ours, _torch_logits(torch_model, batch)) < 1e-4
    assert _max_diff(scanned.apply({"params": scanned_params}, batch["input_ids"], batch["attention_mask"]),
                     ours) < 1e-5
  if kind == "mistral":  # a padding query with no token in its window: transformers returns zeros, we do not
    return
  # inputs_embeds: like transformers, the last position is read (padding or not), so right-padded rows differ.
  batch = _batch(model.config.vocab_size, left=False)
  embeds = np.asarray(pj.methods.prompt_tuning.word_embeddings(params))[batch["input_ids"]]
  from_embeds = model.apply({"params": params}, inputs_embeds=embeds, attention_mask=batch["attention_mask"])
  with torch.no_grad():
    theirs = torch_model(inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(batch["attention_mask"]))
  assert _max_diff(from_embeds, theirs.logits.numpy()) < 1e-4
  ours = model.apply({"params": params}, **batch)
  assert _max_diff(from_embeds[0], ours[0]) < 1e-5 and _max_diff(from_embeds[1:], ours[1:]) > 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_save_pretrained_round_trips_through_transformers(checkpoints, kind, tmp_path):
  model, params = pj.models.from_pretrained(checkpoints(kind))
  module = gpt2 if kind == "gpt2" else llama
  module.save_pretrained(model, params, str(tmp_path / "ours"))
  with open(tmp_path / "ours" / "config.json") as f:
    hf = json.load(f)
  assert hf["architectures"] == [KINDS[kind][0]] and hf["id2label"] == {"0": "negative", "1": "neutral",
                                                                        "2": "positive"}
  torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ours")).eval()
  assert type(torch_model).__name__ == KINDS[kind][0]
  batch = _batch(model.config.vocab_size, left=False)
  assert _max_diff(_torch_logits(torch_model, batch), model.apply({"params": params}, **batch)) < 1e-4
  again, again_params = pj.models.from_pretrained(str(tmp_path / "ours"))
  assert again == model and _max_diff(jax.flatten_util.ravel_pytree(again_params)[0],
                                      jax.flatten_util.ravel_pytree(params)[0]) == 0.0


def test_causal_lm_checkpoint_gets_a_new_score_head(tmp_path):
  """A GPT2LMHeadModel folder loads as a classifier (score newly initialised, with a warning) and vice versa."""
  torch.manual_seed(0)
  lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(**KINDS["gpt2"][1], pad_token_id=PAD))
  lm.save_pretrained(str(tmp_path / "lm"))
  with pytest.warns(UserWarning, match=r"\['score.weight'\] are not in the checkpoint"):
    model, params = gpt2.from_pretrained(str(tmp_path / "lm"), task="sequence_classification", num_labels=5,
                                         rng=jax.random.key(3))
  assert isinstance(model, gpt2.GPT2ForSequenceClassification) and params["score"]["kernel"].shape == (32, 5)
  assert 0.01 < float(np.std(params["score"]["kernel"])) < 0.03  # transformers' normal(initializer_range)
  np.testing.assert_array_equal(params["transformer"]["wte"]["embedding"], lm.transformer.wte.weight.detach().numpy())
  causal, _ = gpt2.from_pretrained(str(tmp_path / "lm"))
  assert isinstance(causal, gpt2.GPT2LMHeadModel)
  with pytest.raises(ValueError, match=r"task='tagging' is not supported; valid: None \(config.json architectures\)"):
    gpt2.from_pretrained(str(tmp_path / "lm"), task="tagging")


def test_no_pad_token_reads_the_last_position_of_one_row_and_refuses_batches(tmp_path):
  torch_model = _torch_classifier("llama", pad_token_id=None)
  torch_model.save_pretrained(str(tmp_path))
  model, params = llama.from_pretrained(str(tmp_path))
  batch = _batch(model.config.vocab_size, left=True)
  one = {k: v[:1, 2:] for k, v in batch.items()}
  assert _max_diff(model.apply({"params": params}, **one), _torch_logits(torch_model, one)) < 1e-4
  with pytest.raises(ValueError, match="needs config.pad_token_id in a batch of 4 rows"):
    model.apply({"params": params}, **batch)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logical_axes_name_the_score_head(checkpoints, kind):
  model, _ = pj.models.from_pretrained(checkpoints(kind))
  axes = sharding.model_logical_axes(model)
  assert tuple(axes["score"]["kernel"]) == ("embed", "classes")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_and_saved_score_match_hf_peft_seq_cls(checkpoints, kind, tmp_path):
  """LoRA on peft's default targets + a trained score (modules_to_save, as peft's SEQ_CLS): the exported folder loads
  in PyTorch PEFT with the same logits, and peft trains as many parameters."""
  model, params = pj.models.from_pretrained(checkpoints(kind))
  cfgs = [pj.LoraConfig(rank=4, alpha=8, targets=LORA_TARGETS[kind]), modules_to_save.ModulesToSaveConfig(("score",))]
  adapters = pj.init(cfgs, jax.random.key(1), params)
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)  # B != 0
  interop.write_folder(str(tmp_path / "adapter"), *interop.adapter_files(cfgs, adapters, checkpoints(kind), "SEQ_CLS"))
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["modules_to_save"] == ["score"]
  torch_model = peft.PeftModel.from_pretrained(_torch_classifier(kind), str(tmp_path / "adapter")).eval()
  for left in (False, True):
    batch = _batch(model.config.vocab_size, left)
    ours = pj.apply(cfgs, model.apply)(params, adapters, **batch)
    assert _max_diff(ours, _torch_logits(torch_model, batch)) < 1e-4
    assert _max_diff(ours, model.apply({"params": params}, **batch)) > 1e-2
  fresh = peft.get_peft_model(_torch_classifier(kind), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                       target_modules=list(LORA_TARGETS[kind])))
  assert fresh.get_nb_trainable_parameters()[0] == ptree.count(adapters)
