"""The PEFT methods on Gemma 2 / Gemma 3 against the real peft (0.21.2 on transformers 5.23.0): prompt tuning
through PEFT folders both ways (the real tokens carry Gemma's sqrt(hidden) embedding scale, the virtual tokens do
not), P-tuning, prefix tuning / P-tuning v2 (soft-capping, query scaling and a sliding window shorter than the
prefixes plus tokens), IA3 with peft's Gemma defaults, bf16 compute, and cached generation with prompt methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import peftjax as pj
from peftjax import interop
from peftjax import tree as ptree
from peftjax.methods import ia3, p_tuning, prefix_tuning, prompt_tuning
from peftjax.models import gemma

from test_gemma import LEFT, RIGHT, VARIANTS, _load_torch, _logits, _max_diff, _torch_logits, _torch_model

K = 4  # virtual tokens; with the 9-token rows they outgrow the 4-token sliding window of test_gemma's models


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{variant: folder} of test_gemma's tiny Gemma 2 and Gemma 3, written by transformers' save_pretrained."""
  saved = {}
  for variant in VARIANTS:
    saved[variant] = str(tmp_path_factory.mktemp(variant))
    _torch_model(variant).save_pretrained(saved[variant])
  return saved


def _adapted(cfg, model, params, adapters, batch) -> np.ndarray:
  return np.asarray(jax.jit(pj.apply(cfg, model.apply))(params, adapters, batch["input_ids"], batch["attention_mask"]))


def _peft_logits(torch_model, batch, virtual: int) -> np.ndarray:
  """peft's logits without the `virtual` positions it returns in front."""
  logits = _torch_logits(torch_model, batch)
  assert logits.shape[1] == batch["input_ids"].shape[1] + virtual
  return logits[:, virtual:]


def _copy_into_peft(torch_model, adapters: dict):
  """Our prompt-encoder weights (PEFT's module names; kernels transposed) into peft's prompt encoder."""
  encoder = torch_model.prompt_encoder["default"]
  state = {}
  for path, leaf in ptree.flatten(adapters).items():
    name, leaf = path.replace("/", "."), np.asarray(leaf)
    if name.endswith(".kernel"):
      name, leaf = name[:-len("kernel")] + "weight", leaf.T
    state["embedding.weight" if name == "embedding" else name] = torch.tensor(np.ascontiguousarray(leaf))
  encoder.load_state_dict(state)
  return torch_model.eval()


def test_prompt_tuning_folders_both_ways_with_peft(folders, tmp_path):
  """Gemma 3: our prompt (sampled from the vocabulary: rows of the scaled embedding, as peft's) -> PEFT folder ->
  PeftModel.from_pretrained, and PEFT's random prompt -> its folder -> ours, same logits on the real tokens."""
  cfg = prompt_tuning.PromptTuningConfig(K, init="sample_vocab")
  model, params = gemma.from_pretrained(folders["gemma3"])
  adapters = pj.init(cfg, jax.random.key(0), params)
  torch_model = _load_torch(folders["gemma3"], "gemma3")
  with torch.no_grad():  # transformers' Gemma3TextScaledWordEmbedding of every id: sqrt(hidden) * table
    scaled = torch_model.get_input_embeddings()(torch.arange(torch_model.config.vocab_size)).numpy()
  prompts = np.asarray(adapters["prompt_embeddings"])
  assert np.abs(prompts[:, None] - scaled[None]).max(-1).min(-1).max() < 1e-6
  ours = _adapted(cfg, model, params, adapters, RIGHT)
  real = RIGHT["attention_mask"]
  interop.save_adapter(str(tmp_path / "ours"), cfg, adapters, task_type="CAUSAL_LM")
  peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "ours")).eval()
  assert _max_diff(ours, _peft_logits(peft_model, RIGHT, K), real) < 1e-4

  theirs_model = peft.get_peft_model(_load_torch(folders["gemma3"], "gemma3"), peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=K)).eval()  # N(0, 1) rows: far from the scaled embeddings
  theirs_model.save_pretrained(str(tmp_path / "theirs"))
  their_cfg, their_adapters = interop.load_adapter(str(tmp_path / "theirs"), params)
  mine = _adapted(their_cfg, model, params, their_adapters, RIGHT)
  theirs = _peft_logits(theirs_model, RIGHT, K)
  assert _max_diff(mine, theirs, real) < 1e-4
  assert _max_diff(mine, ours, real) > 1e-2  # another prompt, other logits: not vacuous


def test_p_tuning_matches_peft_and_placeholders_equal_prepending(folders):
  """Gemma 2 (soft-capped): P-tuning's MLP prompts give peft's logits; the same virtual tokens written at
  placeholder ids in front of the rows give the prepended logits (they too enter unscaled)."""
  cfg = p_tuning.PTuningConfig(K, encoder_hidden_size=24)
  model, params = gemma.from_pretrained(folders["gemma2"])
  adapters = pj.init(cfg, jax.random.key(1), params)
  ours = _adapted(cfg, model, params, adapters, LEFT)
  peft_model = _copy_into_peft(peft.get_peft_model(_load_torch(folders["gemma2"], "gemma2"), peft.PromptEncoderConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=K, encoder_hidden_size=24)), adapters)
  assert _max_diff(ours, _peft_logits(peft_model, LEFT, K), LEFT["attention_mask"]) < 1e-4

  placeholders = dict(input_ids=np.concatenate([np.full((3, K), -1), RIGHT["input_ids"]], 1),
                      attention_mask=np.concatenate([np.ones((3, K), np.int64), RIGHT["attention_mask"]], 1))
  template = p_tuning.PTuningConfig(K, encoder_hidden_size=24, placeholder_token_id=-1)
  in_place = _adapted(template, model, params, adapters, placeholders)[:, K:]
  assert _max_diff(in_place, _adapted(cfg, model, params, adapters, RIGHT), RIGHT["attention_mask"]) < 1e-5


@pytest.mark.parametrize("variant,method", [("gemma2", "prefix"), ("gemma3", "p_v2")])
def test_prefix_tuning_matches_peft(folders, variant, method):
  """Prefix tuning (Gemma 2: attention soft-capping) and P-tuning v2 (Gemma 3: q/k norms) give peft's logits on
  left-padded rows; the sliding layers drop the prefixes for queries `sliding_window` positions past them, as
  transformers' window does with peft's past_key_values cache."""
  cfg = (prefix_tuning.PrefixTuningConfig(K, encoder_hidden_size=24) if method == "prefix"
         else prefix_tuning.PTuningV2Config(K))
  model, params = gemma.from_pretrained(folders[variant])
  adapters = pj.init(cfg, jax.random.key(2), params)
  peft_config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K, prefix_projection=cfg.projection,
                                        encoder_hidden_size=cfg.encoder_hidden_size)
  peft_model = _copy_into_peft(peft.get_peft_model(_load_torch(folders[variant], variant), peft_config), adapters)
  assert peft_model.get_nb_trainable_parameters()[0] == ptree.count(adapters)
  ours = _adapted(cfg, model, params, adapters, LEFT)
  real = LEFT["attention_mask"]
  assert _max_diff(ours, _torch_logits(peft_model, LEFT), real) < 1e-4
  assert _max_diff(ours, _logits(model, params, LEFT), real) > 1e-2


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_ia3_defaults_match_peft(folders, variant, tmp_path):
  """IA3Config.for_model(model_type) is peft's Gemma default (q_proj, v_proj, down_proj; down_proj feed-forward):
  the same modules as peft's IA3 adapter, and peft's (perturbed) folder loads with its logits within 1e-5."""
  model, params = gemma.from_pretrained(folders[variant])
  torch_model = _load_torch(folders[variant], variant)
  cfg = ia3.IA3Config.for_model(torch_model.config.model_type)
  peft_model = peft.get_peft_model(torch_model, peft.IA3Config(task_type="CAUSAL_LM"))
  assert set(peft_model.peft_config["default"].target_modules) == set(cfg.targets)
  assert set(peft_model.peft_config["default"].feedforward_modules) == set(cfg.feedforward)
  rng = np.random.default_rng(4)
  with torch.no_grad():
    for param in (p for p in peft_model.parameters() if p.requires_grad):
      param.add_(torch.tensor(rng.uniform(-0.5, 0.5, param.shape).astype(np.float32)))
  peft_model.save_pretrained(str(tmp_path))
  loaded_cfg, adapters = interop.load_adapter(str(tmp_path), params)
  ours_init = pj.init(cfg, jax.random.key(0), params)
  assert jax.tree.structure(ours_init) == jax.tree.structure(adapters)
  assert ptree.count(ours_init) == peft_model.get_nb_trainable_parameters()[0]
  mine = _adapted(loaded_cfg, model, params, adapters, RIGHT)
  theirs = _torch_logits(peft_model.eval(), RIGHT)
  assert _max_diff(mine, theirs, RIGHT["attention_mask"]) < 1e-5
  assert _max_diff(mine, _adapted(cfg, model, params, ours_init, RIGHT), RIGHT["attention_mask"]) > 1e-2


def test_bf16_logits_stay_close_and_a_lora_step_trains(folders):
  """Gemma 2 in compute dtype bfloat16 over float32 weights: logits within bf16 tolerance of float32 (soft-capped
  scores and logits, the scaled embedding rounded to bf16), and one LoRA SGD step lowers the bf16 loss."""
  model, params = gemma.from_pretrained(folders["gemma2"])
  low = model.clone(dtype=jnp.bfloat16)
  ids, mask = RIGHT["input_ids"], RIGHT["attention_mask"]
  reference = _logits(model, params, RIGHT).astype(np.float64)
  logits = jax.jit(lambda p: low.apply({"params": p}, ids, mask))(params)
  assert logits.dtype == jnp.bfloat16
  assert _max_diff(np.asarray(logits, np.float32), reference, mask) <= 0.03 * np.abs(reference).max()

  cfg = pj.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
  adapters = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape),
                          pj.init(cfg, jax.random.key(0), params))

  def loss_fn(adapters):
    out = pj.apply(cfg, low.apply)(params, adapters, ids, mask).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], ids[:, 1:])
    return jnp.sum(losses * mask[:, 1:]) / jnp.sum(mask[:, 1:])

  loss_and_grads = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = loss_and_grads(adapters)
  assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  stepped = jax.tree.map(lambda a, g: a - 0.5 * g, adapters, grads)
  assert float(loss_and_grads(stepped)[0]) < float(loss) - 1e-2


@pytest.mark.slow  # two generate compilations and six full forward passes
def test_cached_generation_equals_full_forward_passes(folders):
  """Gemma 3 (4-token window): greedy generate through the KV cache with prompt tuning (virtual tokens enter at the
  prefill) and P-tuning v2 (prefixes leave the window as the tokens advance) equals full forward passes over the
  growing rows.  The 9-token prompts are shorter than generate's bucket, whose extra left padding must not count in
  the window (`decoding.generate` keeps such prompts' length)."""
  model, params = gemma.from_pretrained(folders["gemma3"])
  ids, mask = LEFT["input_ids"], LEFT["attention_mask"]  # 9, 6 and 3 real tokens
  for cfg in (prompt_tuning.PromptTuningConfig(K), prefix_tuning.PTuningV2Config(K)):
    adapters = pj.init(cfg, jax.random.key(1), params)
    adapted = pj.apply(cfg, model.apply)
    tokens = np.asarray(gemma.generate(model, (params, adapters), ids, mask, max_new_tokens=3, eos_token_id=-1,
                                       apply_fn=lambda p, *a, **kw: adapted(p[0], p[1], *a, **kw)))
    rows, row_mask, expected = ids, mask, []
    for _ in range(3):
      positions = np.maximum(np.cumsum(row_mask, axis=1) - 1, 0)
      expected.append(np.argmax(np.asarray(adapted(params, adapters, rows, row_mask, positions))[:, -1], axis=-1))
      rows = np.concatenate([rows, expected[-1][:, None]], 1)
      row_mask = np.concatenate([row_mask, np.ones_like(row_mask[:, :1])], 1)
    np.testing.assert_array_equal(tokens, np.stack(expected, 1))
