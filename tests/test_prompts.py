"""The soft-prompt family (prompt tuning, P-tuning, prefix tuning, P-tuning v2) against HF peft on BERT, T5,
GPT-2 and Llama: logits with the same prompt weights, trainable counts, generation, placement, training."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import peftjax as pj
from peftjax import tree as ptree
from peftjax.methods import p_tuning, prefix_tuning, prompt_tuning
from peftjax.models import bert, gpt2, llama, t5

K = 4  # virtual tokens
# kind -> (transformers class, config, peft task type)
KINDS = {
    "bert_seq": ("BertForSequenceClassification", transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40, num_labels=3), "SEQ_CLS"),
    "bert_tok": ("BertForTokenClassification", transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=40, num_labels=5), "TOKEN_CLS"),
    "roberta_seq": ("RobertaForSequenceClassification", transformers.RobertaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=42, num_labels=3, type_vocab_size=1), "SEQ_CLS"),
    "t5": ("T5ForConditionalGeneration", transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
           "SEQ_2_SEQ_LM"),
    "gpt2": ("GPT2LMHeadModel", transformers.GPT2Config(
        vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2),
             "CAUSAL_LM"),
    "llama": ("LlamaForCausalLM", transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2), "CAUSAL_LM"),
}
LEFT_PADDED = ("llama",)  # the other kinds get right padding


def _torch_model(kind: str):
  """Random transformers model (seed 0) with uneven norms, visible biases and weights that move the residual."""
  name, config, _ = KINDS[kind]
  torch.manual_seed(0)
  model = getattr(transformers, name)(config)
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if "norm" in param_name.lower() or ".ln_" in param_name:
        param.uniform_(0.5, 1.5)
      elif param_name.endswith("bias"):
        param.normal_(0.0, 0.1)
      elif "embed" not in param_name and "wte" not in param_name and "wpe" not in param_name and \
          "shared" not in param_name:
        param.normal_(0.0, 0.15)
  return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{kind: folder written by transformers' save_pretrained}, created on first use."""
  folders = {}

  def folder(kind: str) -> str:
    if kind not in folders:
      folders[kind] = str(tmp_path_factory.mktemp(kind))
      _torch_model(kind).save_pretrained(folders[kind])
    return folders[kind]
  return folder


def _batch(kind: str) -> dict:
  """Token lengths 9, 6, 3 (padded on the left for LEFT_PADDED kinds); T5 adds decoder inputs, BERT token types."""
  vocab = KINDS[kind][1].vocab_size
  pad = KINDS[kind][1].pad_token_id or 0
  rng = np.random.default_rng(0)
  input_ids = np.full((3, 9), pad, np.int64)
  attention_mask = np.zeros((3, 9), np.int64)
  for i, n in enumerate([9, 6, 3]):
    span = slice(9 - n, 9) if kind in LEFT_PADDED else slice(0, n)
    input_ids[i, span] = rng.integers(3, vocab, n)
    attention_mask[i, span] = 1
  batch = dict(input_ids=input_ids, attention_mask=attention_mask)
  if kind.startswith("bert"):
    batch["token_type_ids"] = (np.arange(9)[None] >= 4) * attention_mask
  if kind == "t5":
    batch["decoder_input_ids"] = np.concatenate([np.zeros((3, 1), np.int64), rng.integers(3, vocab, (3, 5))], 1)
  return batch


def _peft_config(cfg, task_type: str):
  """The HF peft config equivalent to one of ours."""
  common = dict(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
  if isinstance(cfg, prompt_tuning.PromptTuningConfig):
    return peft.PromptTuningConfig(**common)
  if isinstance(cfg, p_tuning.PTuningConfig):
    return peft.PromptEncoderConfig(**common, encoder_reparameterization_type=cfg.encoder_type.upper(),
                                    encoder_hidden_size=cfg.encoder_hidden_size, encoder_num_layers=cfg.encoder_num_layers)
  return peft.PrefixTuningConfig(**common, prefix_projection=cfg.projection, encoder_hidden_size=cfg.encoder_hidden_size)


def _peft_model(kind: str, cfg, adapters: dict):
  """HF peft's model for `cfg` with our adapter weights copied into its prompt encoder."""
  torch_model = peft.get_peft_model(_torch_model(kind), _peft_config(cfg, KINDS[kind][2]))
  encoder = torch_model.prompt_encoder["default"]
  state = {}
  for path, leaf in ptree.flatten(adapters).items():
    name = "embedding.weight" if path == "prompt_embeddings" else path.replace("/", ".")
    leaf = np.asarray(leaf)
    if name.endswith(".kernel"):
      name, leaf = name[:-len("kernel")] + "weight", leaf.T
    elif path == "embedding":
      name = "embedding.weight"
    state[name] = torch.tensor(np.ascontiguousarray(leaf))
  assert set(state) == set(encoder.state_dict())
  encoder.load_state_dict(state)
  return torch_model.eval()


def _torch_outputs(torch_model, batch: dict) -> np.ndarray:
  with torch.no_grad():
    return torch_model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


def _ours(kind: str, checkpoints, cfg, seed: int = 1):
  model, params = pj.models.from_pretrained(checkpoints(kind))
  adapters = pj.init(cfg, jax.random.key(seed), params)
  return model, params, adapters


@functools.cache
def _adapted(cfg, model):
  return jax.jit(pj.apply(cfg, model.apply))


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _compare(kind: str, checkpoints, cfg) -> tuple[float, np.ndarray, np.ndarray]:
  """(max |ours - peft| over the real tokens, ours, plain model's) for `cfg` on `kind`.

  Also checks the trainable parameter count against peft's, and that the folded prompt (what peft saves)
  equals peft's and gives the same outputs.
  """
  model, params, adapters = _ours(kind, checkpoints, cfg)
  batch = _batch(kind)
  ours = np.asarray(_adapted(cfg, model)(params, adapters, **batch))
  torch_model = _peft_model(kind, cfg, adapters)
  theirs = _torch_outputs(torch_model, batch)
  plain = np.asarray(model.apply({"params": params}, **batch))
  head = ptree.count(params.get("classifier", {})) if kind.endswith("_seq") else 0  # peft trains the head too
  assert torch_model.get_nb_trainable_parameters()[0] == ptree.count(adapters) + head
  if hasattr(pj.api.method_module(cfg), "fold"):
    plain_cfg, folded = pj.api.method_module(cfg).fold(cfg, adapters)
    saved = torch_model.get_prompt_embedding_to_save("default").numpy()
    assert _max_diff(jax.tree.leaves(folded)[0], saved) < 1e-5
    assert _max_diff(_adapted(plain_cfg, model)(params, folded, **batch), ours) < 1e-5
  if kind in ("gpt2", "llama", "bert_tok"):
    if not isinstance(cfg, prefix_tuning.PrefixTuningConfig):  # peft returns the virtual positions too
      assert theirs.shape[1] == ours.shape[1] + cfg.num_virtual_tokens
      theirs = theirs[:, cfg.num_virtual_tokens:]
    real = batch["attention_mask"].astype(bool)
    return _max_diff(ours[real], theirs[real]), ours, plain
  return _max_diff(ours, theirs), ours, plain


METHODS = {
    "prompt": prompt_tuning.PromptTuningConfig(K),
    "p_mlp": p_tuning.PTuningConfig(K, encoder_hidden_size=24),
    "p_lstm": p_tuning.PTuningConfig(K, encoder_type="lstm", encoder_hidden_size=12),
    "prefix": prefix_tuning.PrefixTuningConfig(K, encoder_hidden_size=24),
    "p_v2": prefix_tuning.PTuningV2Config(K),
}


CASES = [(kind, method) for kind in ("bert_seq", "t5", "gpt2", "llama") for method in ("prompt", "prefix", "p_v2")] + [
    ("bert_seq", "p_mlp"), ("llama", "p_mlp"), ("t5", "p_lstm"), ("gpt2", "p_lstm"), ("bert_tok", "p_v2"),
    ("bert_tok", "prompt"), ("roberta_seq", "prompt"), ("roberta_seq", "prefix")]


@pytest.mark.parametrize("kind,method", CASES)
def test_logits_match_hf_peft(checkpoints, kind, method):
  """Same prompt weights, same logits (peft's extra virtual positions dropped); trainable counts equal peft's;
  the folded prompt equals what peft saves and gives the same logits."""
  cfg = METHODS[method]
  diff, ours, plain = _compare(kind, checkpoints, cfg)
  assert diff < 1e-4
  assert _max_diff(ours, plain) > 1e-2  # the prompts change the outputs


def _greedy_without_cache(apply, input_ids, attention_mask, steps: int) -> np.ndarray:
  """Greedy tokens from full forward passes over the growing (left-padded) sequence, positions counting real tokens."""
  ids, mask, new = np.asarray(input_ids), np.asarray(attention_mask), []
  for _ in range(steps):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    token = np.argmax(np.asarray(apply(ids, mask, positions))[:, -1], axis=-1)
    new.append(token)
    ids, mask = np.concatenate([ids, token[:, None]], 1), np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
  return np.stack(new, 1)


def _left_padded(kind: str) -> dict:
  batch = _batch("llama" if kind == "llama" else kind)
  if kind == "gpt2":  # move the padding to the left
    order = np.argsort(batch["attention_mask"], axis=1, kind="stable")
    batch = {k: np.take_along_axis(v, order, 1) for k, v in batch.items()}
  return batch


@pytest.mark.parametrize("kind,method", [("gpt2", "prompt"), ("llama", "p_v2")])
def test_decoder_generation_with_cache_matches_no_cache_and_peft(checkpoints, kind, method):
  """Left-padded generation through the KV cache equals full forward passes, does not depend on the padding,
  and equals peft's generate where peft's positions agree (peft drops position_ids for prompt-style methods,
  so with left padding its positions count the padding; ours count only real tokens, as HF generate does)."""
  cfg = METHODS[method]
  model, params, adapters = _ours(kind, checkpoints, cfg)
  family = gpt2 if kind == "gpt2" else llama
  batch = _left_padded(kind)
  adapted = pj.apply(cfg, model.apply)
  apply_fn = lambda p, *a, **kw: adapted(p[0], p[1], *a, **kw)  # noqa: E731

  def generate(ids, mask, adapted_params=(params, adapters), fn=apply_fn):
    return np.asarray(family.generate(model, adapted_params, ids, mask, max_new_tokens=5, eos_token_id=-1,
                                      apply_fn=fn))

  tokens = generate(batch["input_ids"], batch["attention_mask"])
  full = jax.jit(lambda ids, mask, positions: adapted(params, adapters, ids, mask, positions))
  assert np.array_equal(tokens, _greedy_without_cache(full, batch["input_ids"], batch["attention_mask"], 5))
  assert not np.array_equal(tokens, generate(batch["input_ids"], batch["attention_mask"], params, None))
  alone = batch["attention_mask"][2].astype(bool)
  assert np.array_equal(tokens[2:], generate(batch["input_ids"][2:, alone], batch["attention_mask"][2:, alone]))
  torch_model = _peft_model(kind, cfg, adapters)
  unpadded = np.random.default_rng(5).integers(3, KINDS[kind][1].vocab_size, (2, 6))
  with torch.no_grad():
    theirs = torch_model.generate(input_ids=torch.tensor(unpadded), attention_mask=torch.ones(2, 6, dtype=torch.long),
                                  max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
  assert np.array_equal(generate(unpadded, np.ones_like(unpadded)), theirs[:, -5:])


@pytest.mark.parametrize("method", ["p_lstm", "prefix"])
def test_t5_generation_matches_peft_and_no_cache(checkpoints, method):
  cfg = METHODS[method]
  model, params, adapters = _ours("t5", checkpoints, cfg)
  batch = _batch("t5")
  adapted = pj.apply(cfg, model.apply)
  apply_fn = lambda p, *a, **kw: adapted(p[0], p[1], *a, **kw)  # noqa: E731
  tokens = np.asarray(t5.generate(model, (params, adapters), batch["input_ids"], batch["attention_mask"],
                                  max_new_tokens=5, eos_token_id=-1, apply_fn=apply_fn))
  decoder_ids = np.zeros((3, 1), np.int64)
  full = jax.jit(lambda d: adapted(params, adapters, batch["input_ids"], batch["attention_mask"], d))
  for _ in range(5):
    decoder_ids = np.concatenate([decoder_ids, np.argmax(np.asarray(full(decoder_ids))[:, -1], -1)[:, None]], 1)
  assert np.array_equal(tokens, decoder_ids[:, 1:])
  torch_model = _peft_model("t5", cfg, adapters)
  with torch.no_grad():
    theirs = torch_model.generate(input_ids=torch.tensor(batch["input_ids"]),
                                  attention_mask=torch.tensor(batch["attention_mask"]), max_new_tokens=5,
                                  do_sample=False, eos_token_id=None, min_new_tokens=5).numpy()
  assert np.array_equal(tokens, theirs[:, 1:])
