"""Gemma 2 / Gemma 3 text against transformers' PyTorch classes: logits (both padding sides, sequences longer than
the sliding window), greedy generation, scan/remat, save_pretrained, a classifier, and LoRA folders both ways with
the real peft (0.21.2 on transformers 5.23.0, constraints-test.txt)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import interop, models
from peftjax.models import gemma

from compare import assert_same_tokens  # tests/ is on sys.path under pytest
from tiny_models import perturb_torch

VOCAB = 96
WINDOW = 4  # shorter than the 9-token prompts and the 25 tokens of generation
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, query_pre_attn_scalar=24, sliding_window=WINDOW)
VARIANTS = {
    # transformers config and causal-LM classes, their arguments
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # sliding, full, sliding; both soft-caps small enough to bite
               dict(attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # q/k norms, local RoPE base, linear scaling on global
               dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_word_embeddings=False,
                    rope_parameters=dict(full_attention=dict(rope_type="linear", factor=4.0, rope_theta=10000.0),
                                         sliding_attention=dict(rope_type="default", rope_theta=50.0)))),
}


def _torch_model(variant: str):
  config_cls, model_cls, kwargs = VARIANTS[variant]
  torch.manual_seed(0)
  model = perturb_torch(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**TINY, **kwargs)))
  with torch.no_grad():
    model.model.embed_tokens.weight.normal_(0.0, 0.06)  # large enough that the tied head's logits exceed 1
  return model


def _load_torch(folder: str, variant: str):
  return getattr(transformers, VARIANTS[variant][1]).from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{variant: folder written by transformers' save_pretrained}."""
  folders = {}
  for variant in VARIANTS:
    folders[variant] = str(tmp_path_factory.mktemp(variant))
    _torch_model(variant).save_pretrained(folders[variant])
  return folders


def _padded(left: bool):
  """Token lengths 9, 6, 3 padded with id 0 on the left or the right."""
  rng = np.random.default_rng(0)
  input_ids = np.zeros((3, 9), np.int64)
  attention_mask = np.zeros((3, 9), np.int64)
  for i, n in enumerate([9, 6, 3]):
    span = slice(9 - n, 9) if left else slice(0, n)
    input_ids[i, span] = rng.integers(3, VOCAB, n)
    attention_mask[i, span] = 1
  return dict(input_ids=input_ids, attention_mask=attention_mask)


RIGHT, LEFT = _padded(left=False), _padded(left=True)


def _torch_logits(model, batch, **kwargs) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in batch.items()}, **kwargs).logits.numpy()


@functools.cache
def _jit_apply(model):
  return jax.jit(model.apply, static_argnames=("deterministic",))


def _logits(model, params, batch, **kwargs) -> np.ndarray:
  return np.asarray(_jit_apply(model)({"params": params}, batch["input_ids"], batch["attention_mask"], **kwargs))


def _max_diff(a, b, where=None) -> float:
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return float(np.max(diff if where is None else diff[np.asarray(where, bool)]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
  torch_model = _load_torch(checkpoints[variant], variant)
  model, params = gemma.from_pretrained(checkpoints[variant])
  assert model.config.sliding_layers == (True, False, True)
  assert ("lm_head" in params) == (not torch_model.config.tie_word_embeddings)
  for batch in (RIGHT, LEFT):
    expected = _torch_logits(torch_model, batch)
    assert np.abs(expected).max() > 1.0  # the random model is not trivially flat
    assert _max_diff(_logits(model, params, batch), expected, batch["attention_mask"]) < 1e-4
  position_ids = np.maximum(np.cumsum(LEFT["attention_mask"], -1) - 1, 0)  # as generate computes them
  expected = _torch_logits(torch_model, LEFT, position_ids=torch.tensor(position_ids))
  assert _max_diff(_logits(model, params, LEFT, position_ids=position_ids), expected, LEFT["attention_mask"]) < 1e-4
  model2, params2 = models.from_pretrained(checkpoints[variant])  # dispatch through FAMILIES
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  scanned, stacked = gemma.from_pretrained(checkpoints[variant], scan_layers=True)
  assert _max_diff(_logits(scanned, stacked, RIGHT), _logits(model, params, RIGHT)) < 1e-5


@pytest.mark.parametrize("global_rope", [dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
                                         dict(rope_type="dynamic", factor=2.0)])
def test_rope_types_of_the_global_layers_match_transformers(tmp_path, global_rope):
  """Gemma 3's global layers take any rope type (`peftjax.models.rope`); dynamic NTK crosses its max of 8 on the
  9-token prompts."""
  _, model_cls, kwargs = VARIANTS["gemma3"]
  rope_parameters = dict(kwargs["rope_parameters"], full_attention=dict(global_rope, rope_theta=10000.0))
  torch.manual_seed(0)
  config = transformers.Gemma3TextConfig(**{**TINY, **kwargs, "rope_parameters": rope_parameters,
                                            "max_position_embeddings": 8})
  perturb_torch(transformers.Gemma3ForCausalLM(config)).save_pretrained(tmp_path)
  torch_model = _load_torch(str(tmp_path), "gemma3")
  model, params = gemma.from_pretrained(str(tmp_path))
  assert dict(model.config.rope_scaling)["rope_type"] == global_rope["rope_type"]
  for batch in (RIGHT, LEFT):
    assert _max_diff(_logits(model, params, batch), _torch_logits(torch_model, batch), batch["attention_mask"]) < 1e-4


@pytest.mark.slow  # eight compilations: ~30 s on a loaded machine
def test_features_change_the_output(checkpoints):
  """Each Gemma feature matters on these inputs, so the comparisons above would catch it missing."""
  changes = {"gemma2": [dict(sliding_window=None), dict(attn_logit_softcapping=None),
                        dict(final_logit_softcapping=None), dict(query_pre_attn_scalar=16)],
             "gemma3": [dict(sliding_window=None), dict(rope_local_base_freq=10000.0), dict(rope_scaling=None),
                        dict(final_logit_softcapping=4.0), dict(attn_logit_softcapping=3.0)]}
  for variant, cases in changes.items():
    model, params = gemma.from_pretrained(checkpoints[variant])
    ours = _logits(model, params, RIGHT)
    for change in cases:
      other = model.clone(config=dataclasses.replace(model.config, **change))
      diff = _max_diff(ours, _logits(other, params, RIGHT), RIGHT["attention_mask"])
      ignored = variant == "gemma3" and "attn_logit_softcapping" in change  # as transformers' Gemma 3 ignores it
      assert (diff == 0.0) if ignored else (diff > 1e-3), change
  # the norms are (1 + w): zeroing w leaves a unit norm, not a zero one
  norm = gemma.GemmaRMSNorm(1e-6)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)), jnp.float32)
  y = norm.apply({"params": {"scale": jnp.zeros(8)}}, x)
  np.testing.assert_allclose(y, x / jnp.sqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6), rtol=1e-6)


def _greedy(model, params, batch=LEFT, **kwargs) -> np.ndarray:
  kwargs = {"max_new_tokens": 16, "eos_token_id": 2, "pad_token_id": 0, **kwargs}
  return np.asarray(gemma.generate(model, params, batch["input_ids"], batch["attention_mask"], **kwargs))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_transformers(checkpoints, variant):
  torch_model = _load_torch(checkpoints[variant], variant)
  model, params = gemma.from_pretrained(checkpoints[variant])
  ours = _greedy(model, params)
  assert ours.shape == (3, 16) and len(np.unique(ours)) > 4
  with torch.no_grad():
    out = torch_model.generate(torch.tensor(LEFT["input_ids"]), attention_mask=torch.tensor(LEFT["attention_mask"]),
                               max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=2).numpy()[:, 9:]
  theirs = np.pad(out, ((0, 0), (0, 16 - out.shape[1])))  # HF stops once every row hit EOS
  assert_same_tokens(ours, theirs, "ours vs transformers generate")
  scanned, stacked = gemma.from_pretrained(checkpoints[variant], scan_layers=True)
  np.testing.assert_array_equal(_greedy(scanned, stacked), ours)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_loads_in_transformers(checkpoints, variant, tmp_path):
  model, params = gemma.from_pretrained(checkpoints[variant], scan_layers=True)
  folder = str(tmp_path / "ours")
  gemma.save_pretrained(model, params, folder)
  torch_model, info = getattr(transformers, VARIANTS[variant][1]).from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  reference = _load_torch(checkpoints[variant], variant).config
  for key in ("rope_parameters", "sliding_window", "layer_types", "num_key_value_heads", "tie_word_embeddings",
              "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "head_dim"):
    assert getattr(torch_model.config, key) == getattr(reference, key), key
  expected = _torch_logits(torch_model.eval(), RIGHT)
  assert _max_diff(_logits(model, params, RIGHT), expected, RIGHT["attention_mask"]) < 1e-4
  model2, params2 = gemma.from_pretrained(folder, scan_layers=True)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sequence_classifier_matches_transformers(checkpoints, tmp_path):
  """A new score head on the Gemma 3 checkpoint, saved and read by transformers' Gemma3TextForSequenceClassification
  (and Gemma 2's class): the same logits at each row's last token, either padding side."""
  for variant in VARIANTS:
    model, params = gemma.from_pretrained(checkpoints[variant], task="sequence_classification", num_labels=3,
                                          rng=jax.random.key(0))
    folder = str(tmp_path / variant)
    gemma.save_pretrained(model, params, folder)
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(torch_model).__name__ == gemma.CLASSIFIERS[model.config.model_type]
    for batch in (RIGHT, LEFT):
      expected = _torch_logits(torch_model, batch)
      assert expected.shape == (3, 3)
      assert _max_diff(_logits(model, params, batch), expected) < 1e-4


def test_scan_and_remat_match_the_layer_loop(checkpoints):
  model, params = gemma.from_pretrained(checkpoints["gemma3"])

  def logits_and_grads(m, p):
    def loss(p):
      logits = m.apply({"params": p}, RIGHT["input_ids"], RIGHT["attention_mask"])
      return jnp.sum(logits ** 2) / logits.size, logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    return logits, grads

  expected, expected_grads = logits_and_grads(model, params)
  other = model.clone(scan_layers=True, remat=True)  # scanned alone: test_logits_match_transformers
  stacked = gemma.stack_layers(params)
  abstract = jax.eval_shape(functools.partial(gemma.init_params, other), jax.random.key(0))
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, abstract)
  logits, grads = logits_and_grads(other, stacked)
  assert _max_diff(logits, expected) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), gemma.unstack_layers(grads),
               expected_grads)
  P = jax.sharding.PartitionSpec
  axes = gemma.logical_axes(model.clone(scan_layers=True))["model"]
  assert axes["layers"]["self_attn"]["q_proj"]["kernel"] == P("layers", "embed", "joined_kv")
  assert axes["layers"]["self_attn"]["q_norm"]["scale"] == P("layers", "norm")
  assert axes["embed_tokens"]["embedding"] == P("vocab", "embed")
  assert gemma.logical_axes(model)["model"]["layers_1"]["mlp"]["down_proj"]["kernel"] == P("mlp", "embed")


def test_config_round_trip_and_errors(checkpoints):
  for variant in VARIANTS:
    config = gemma.from_pretrained(checkpoints[variant])[0].config
    assert gemma.GemmaConfig.from_hf({**config.to_hf(), "unknown_key": 1}) == config
  g3 = gemma.from_pretrained(checkpoints["gemma3"])[0].config
  assert (g3.rope_theta, g3.rope_local_base_freq, dict(g3.rope_scaling)) == (
      10000.0, 50.0, {"rope_type": "linear", "factor": 4.0})
  legacy = gemma.GemmaConfig.from_hf({**TINY, "model_type": "gemma3_text", "rope_theta": 1e6,
                                      "rope_local_base_freq": 1e4, "sliding_window_pattern": 2,
                                      "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  assert legacy.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
  assert (legacy.rope_theta, legacy.rope_local_base_freq, dict(legacy.rope_scaling)["factor"]) == (1e6, 1e4, 8.0)
  assert gemma.GemmaConfig(num_hidden_layers=12).local_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,)
  with pytest.raises(ValueError, match="model_type='gemma3' is the multimodal Gemma 3"):
    gemma.GemmaConfig.from_hf({"model_type": "gemma3", "text_config": {}})
  with pytest.raises(ValueError, match="use_bidirectional_attention=true .* is not supported"):
    gemma.GemmaConfig.from_hf({**TINY, "model_type": "gemma3_text", "use_bidirectional_attention": True})
  with pytest.raises(ValueError, match="rope_type='axial' is not supported"):
    gemma.GemmaConfig(rope_scaling={"rope_type": "axial", "factor": 2.0})
  with pytest.raises(ValueError, match="layer_types=.* must list one of"):
    gemma.GemmaConfig(num_hidden_layers=2, layer_types=("full_attention",))
  from train import validate
  from test_train import load_config
  for method in ("prompt_tuning", "p_tuning"):  # test_gemma_methods: they match peft on Gemma
    config = load_config("lora_gemma", method=method)
    config.prompt = ml_collections.ConfigDict(dict(num_virtual_tokens=4))
    validate.check_sections(config)


def test_lora_folders_both_ways_with_peft(checkpoints, tmp_path):
  """LoRA on every linear layer of Gemma 3: ours -> PeftModel.from_pretrained, PEFT's folder -> ours, same logits."""
  targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  cfg = pj.LoraConfig(rank=4, alpha=8, targets=targets)
  model, params = gemma.from_pretrained(checkpoints["gemma3"])
  adapters = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(1), a.shape) * 0.3,
                          pj.init(cfg, jax.random.key(0), params))
  ours = np.asarray(jax.jit(pj.apply(cfg, model.apply))(params, adapters, RIGHT["input_ids"], RIGHT["attention_mask"]))
  assert _max_diff(ours, _logits(model, params, RIGHT), RIGHT["attention_mask"]) > 1e-2  # the adapter matters
  interop.save_adapter(str(tmp_path / "ours"), cfg, adapters, task_type="CAUSAL_LM")
  peft_model = peft.PeftModel.from_pretrained(_load_torch(checkpoints["gemma3"], "gemma3"), str(tmp_path / "ours"))
  assert _max_diff(ours, _torch_logits(peft_model.eval(), RIGHT), RIGHT["attention_mask"]) < 1e-4

  peft_model = peft.get_peft_model(_load_torch(checkpoints["gemma3"], "gemma3"),
                                   peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                   target_modules=list(targets)))
  rng = np.random.default_rng(3)
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if param.requires_grad:
        param.add_(torch.tensor(rng.uniform(-0.3, 0.3, param.shape).astype(np.float32)))
  peft_model.save_pretrained(str(tmp_path / "theirs"))
  their_cfg, their_adapters = interop.load_adapter(str(tmp_path / "theirs"), params)
  theirs = _torch_logits(peft_model.eval(), RIGHT)
  mine = jax.jit(pj.apply(their_cfg, model.apply))(params, their_adapters, RIGHT["input_ids"], RIGHT["attention_mask"])
  assert _max_diff(mine, theirs, RIGHT["attention_mask"]) < 1e-4
  assert _max_diff(theirs, ours, RIGHT["attention_mask"]) > 1e-2  # a different adapter: not vacuous
  merged = pj.merge(their_cfg, params, their_adapters)
  assert _max_diff(_logits(model, merged, RIGHT), mine) < 1e-4  # merged weights round differently


@pytest.mark.slow  # a whole python -m train run (data, tokenizer, eval, checkpoint, PEFT export)
def test_lora_gemma_config_trains_and_exports(tmp_path):
  """configs/lora_gemma.py (shrunk to a tiny random Gemma 3 of its family) passes validate.check and trains; its PEFT
  folder loads on transformers' model built from the exported base with the run's logits."""
  import train
  from train import validate
  from test_train import load_config, override
  config = load_config("lora_gemma")
  assert config.family == "gemma" and config.model_shape.num_hidden_layers == 18  # the 270M's shape
  shape = {f"model_shape.{k}": v for k, v in dict(vocab_size=49152, hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                                                    query_pre_attn_scalar=16, sliding_window=4).items()}
  config = override(config, {"model": "random", "workdir": str(tmp_path), "steps": 2, "batch_size": 2,
                             "max_length": 8, "eval_examples": 2, "train_examples": 4, "checkpoint_every": 2, **shape})
  validate.check(config)
  result = train.main(config)
  assert result["final_step"] == 2 and np.isfinite(result["after"]["loss"])
  torch_model = peft.PeftModel.from_pretrained(transformers.Gemma3ForCausalLM.from_pretrained(str(tmp_path / "base")),
                                               str(tmp_path / "adapter")).eval()
  model, lora_cfg, adapters = result["model"], result["method"], result["state"]["trainable"]
  ids = np.random.default_rng(0).integers(3, 49152, (2, 8))
  ours = jax.jit(pj.apply(lora_cfg, model.apply))(result["frozen"], adapters, ids)
  assert _max_diff(ours, _torch_logits(torch_model, dict(input_ids=ids))) < 1e-4
