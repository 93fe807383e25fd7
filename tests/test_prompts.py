"""The soft-prompt family (prompt tuning, P-tuning, prefix tuning, P-tuning v2) against HF peft on BERT, T5,
GPT-2 and Llama: logits with the same prompt weights, trainable counts, generation, placement, training.

The reference is peft 0.21.2 on transformers 5.23.0 (constraints-test.txt). transformers 5.24.0 renamed the
`past_key_values` argument to `cache` (deprecated alias): peft 0.21.2 then refuses prefix tuning / P-tuning v2
on BERT and RoBERTa, and its cached generate for prompt tuning (GPT-2), P-tuning v2 (Llama) and prefix tuning
(T5) gives other tokens than its own uncached forward, which ours still equals."""

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
from peftjax.models import gpt2, llama, t5

from compare import assert_same_tokens  # tests/ is on sys.path under pytest
from tiny_models import perturb_torch, saved_checkpoints

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
    # Decoder classifiers read the last token; under prompt tuning (inputs_embeds) the last position, as in peft.
    "gpt2_seq": ("GPT2ForSequenceClassification", transformers.GPT2Config(
        vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, num_labels=3), "SEQ_CLS"),
    "llama_seq": ("LlamaForSequenceClassification", transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_labels=3), "SEQ_CLS"),
}
LEFT_PADDED = ("llama", "llama_seq")  # the other kinds get right padding


def _torch_model(kind: str):
  """Random transformers model (seed 0) with uneven norms, visible biases and weights that move the residual."""
  name, config, _ = KINDS[kind]
  torch.manual_seed(0)
  return perturb_torch(getattr(transformers, name)(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{kind: folder written by transformers' save_pretrained}, created on first use."""
  return saved_checkpoints(tmp_path_factory, _torch_model)


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
  head = ptree.count({k: params[k] for k in ("classifier", "score") if k in params})  # peft trains it too
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
    ("bert_tok", "prompt"), ("roberta_seq", "prompt"), ("roberta_seq", "prefix"), ("gpt2_seq", "prompt"),
    ("gpt2_seq", "prefix"), ("gpt2_seq", "p_mlp"), ("llama_seq", "prompt"), ("llama_seq", "p_v2")]


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
  assert_same_tokens(tokens, _greedy_without_cache(full, batch["input_ids"], batch["attention_mask"], 5),
                     "cached vs uncached greedy tokens")
  assert not np.array_equal(tokens, generate(batch["input_ids"], batch["attention_mask"], params, None))
  alone = batch["attention_mask"][2].astype(bool)
  assert_same_tokens(tokens[2:], generate(batch["input_ids"][2:, alone], batch["attention_mask"][2:, alone]),
                     "padded vs unpadded row 2")
  torch_model = _peft_model(kind, cfg, adapters)
  unpadded = np.random.default_rng(5).integers(3, KINDS[kind][1].vocab_size, (2, 6))
  with torch.no_grad():
    theirs = torch_model.generate(input_ids=torch.tensor(unpadded), attention_mask=torch.ones(2, 6, dtype=torch.long),
                                  max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
  assert_same_tokens(generate(unpadded, np.ones_like(unpadded)), theirs[:, -5:], "ours vs peft generate")


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
  assert_same_tokens(tokens, decoder_ids[:, 1:], "cached vs uncached greedy tokens")
  torch_model = _peft_model("t5", cfg, adapters)
  with torch.no_grad():
    theirs = torch_model.generate(input_ids=torch.tensor(batch["input_ids"]),
                                  attention_mask=torch.tensor(batch["attention_mask"]), max_new_tokens=5,
                                  do_sample=False, eos_token_id=None, min_new_tokens=5).numpy()
  assert_same_tokens(tokens, theirs[:, 1:], "ours vs peft generate")


@pytest.mark.parametrize("kind", ["bert_seq", "gpt2"])
def test_placeholders_at_the_front_equal_prepending_and_templates_insert_in_order(checkpoints, kind):
  """P-tuning templates: placeholder ids at the front (mask 1, token type 0) reproduce PEFT's prepending; in
  the middle of a template, placeholder j of a row gets virtual token j; rows need exactly k placeholders."""
  prepend = p_tuning.PTuningConfig(K, encoder_hidden_size=24)
  template = dataclasses.replace(prepend, placeholder_token_id=-1)
  model, params, adapters = _ours(kind, checkpoints, prepend)
  batch = _batch(kind)
  front = {name: np.concatenate([np.full((3, K), -1 if name == "input_ids" else int(name == "attention_mask")),
                                 value], 1) for name, value in batch.items()}
  expected = np.asarray(_adapted(prepend, model)(params, adapters, **batch))
  ours = np.asarray(_adapted(template, model)(params, adapters, **front))
  assert _max_diff(ours[:, K:] if kind == "gpt2" else ours, expected) < 1e-5

  ids = batch["input_ids"].copy()
  slots = np.array([[0, 2, 3, 5], [1, 2, 4, 5], [0, 1, 2, 7]])  # row 2 has 3 tokens: the rest pads, still placeholders
  np.put_along_axis(ids, slots, -1, 1)
  mask = batch["attention_mask"].copy()
  np.put_along_axis(mask, slots, 1, 1)
  prompts = np.asarray(p_tuning.virtual_tokens(prepend, adapters))
  table = np.asarray(prompt_tuning.word_embeddings(params))
  embeds = table[np.maximum(ids, 0)]
  embeds[np.arange(3)[:, None], slots] = prompts[None]
  inputs = {k: v for k, v in batch.items() if k != "input_ids"} | {"attention_mask": mask}
  expected = np.asarray(model.apply({"params": params}, **inputs, inputs_embeds=embeds))
  if kind.startswith("bert"):  # same positions from ids (RoBERTa would count padding differently from embeddings)
    ours = np.asarray(_adapted(template, model)(params, adapters, ids, **inputs))
  else:
    ours = np.asarray(_adapted(template, model)(params, adapters, ids, mask))
  assert _max_diff(ours, expected) < 1e-5
  ids[0, 0] = 5
  with pytest.raises(ValueError, match="holds 3 placeholder ids .* exactly num_virtual_tokens=4"):
    pj.apply(template, model.apply)(params, adapters, ids, mask)
  with pytest.raises(ValueError, match="pass input_ids"):
    pj.apply(template, model.apply)(params, adapters, inputs_embeds=embeds)


def test_placeholder_generation_matches_no_cache(checkpoints):
  cfg = p_tuning.PTuningConfig(K, encoder_type="lstm", encoder_hidden_size=12, placeholder_token_id=-1)
  model, params, adapters = _ours("gpt2", checkpoints, cfg)
  batch = _left_padded("gpt2")
  ids, mask = batch["input_ids"].copy(), batch["attention_mask"]
  ids[:, -7:-3] = np.where(mask[:, -7:-3] == 1, -1, ids[:, -7:-3])  # 4 placeholders inside the real tokens of rows 0, 1
  ids, mask = ids[:2], mask[:2]
  adapted = pj.apply(cfg, model.apply)
  tokens = np.asarray(gpt2.generate(model, (params, adapters), ids, mask, max_new_tokens=4, eos_token_id=-1,
                                    apply_fn=lambda p, *a, **kw: adapted(p[0], p[1], *a, **kw)))
  full = jax.jit(lambda i, m, positions: adapted(params, adapters, i, m, positions))
  assert_same_tokens(tokens, _greedy_without_cache(full, ids, mask, 4), "cached vs uncached greedy tokens")


def test_init_text_and_sample_vocab_match_peft(checkpoints, tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "great", "movie", "terrible", "plot"] + [
      f"w{i}" for i in range(90)]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab))
  transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "tok"))
  text = "great movie , terrible plot"
  model, params = pj.models.from_pretrained(checkpoints("bert_seq"))
  for k in (3, 11):  # cut and repeated
    cfg = prompt_tuning.PromptTuningConfig(k, init="text", init_text=text, tokenizer=str(tmp_path / "tok"))
    ours = pj.init(cfg, jax.random.key(0), params)["prompt_embeddings"]
    theirs = peft.get_peft_model(_torch_model("bert_seq"), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=k, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path / "tok"))).prompt_encoder["default"].embedding.weight
    assert _max_diff(ours, theirs.detach().numpy()) < 1e-6
  cfg = prompt_tuning.PromptTuningConfig(6, init="sample_vocab")
  sampled = np.asarray(pj.init(cfg, jax.random.key(0), params)["prompt_embeddings"])
  table = np.asarray(prompt_tuning.word_embeddings(params))
  assert all(np.any(np.all(table == row, axis=1)) for row in sampled)
  with pytest.raises(ValueError, match="init='text' needs init_text"):
    prompt_tuning.PromptTuningConfig(4, init="text")
  with pytest.raises(ValueError, match="init='vocab' is not valid"):
    prompt_tuning.PromptTuningConfig(4, init="vocab")


def test_config_errors():
  with pytest.raises(ValueError, match="num_virtual_tokens must be at least 1"):
    p_tuning.PTuningConfig(0)
  with pytest.raises(ValueError, match="encoder_type='gru' is not valid"):
    p_tuning.PTuningConfig(4, encoder_type="gru")
  with pytest.raises(ValueError, match="stacks=.*'cross'.* is not valid"):
    prefix_tuning.PrefixTuningConfig(4, stacks=("cross",))
  with pytest.raises(ValueError, match="PTuningV2Config.projection must be False"):
    prefix_tuning.PTuningV2Config(4, projection=True)
  with pytest.raises(ValueError, match="num_transformer_submodules=3 is not valid"):
    prompt_tuning.PromptTuningConfig(4, num_transformer_submodules=3)


@pytest.mark.parametrize("method", list(METHODS))
def test_short_training_lowers_the_loss(checkpoints, method):
  """A few Adam steps on the adapter tree alone (the base is never differentiated) teach GPT-2 a small task:
  predict token 7 after every token."""
  cfg = METHODS[method]
  model, params, adapters = _ours("gpt2", checkpoints, cfg)
  batch = _batch("gpt2")
  adapted = pj.apply(cfg, model.apply)

  def loss_fn(adapters):
    logits = adapted(params, adapters, batch["input_ids"], batch["attention_mask"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(logits.shape[:2], 7))
    weights = batch["attention_mask"]
    return jnp.sum(losses * weights) / jnp.sum(weights)

  tx = optax.adam(0.1)

  @jax.jit
  def step(adapters, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(adapters, updates), opt_state, loss

  opt_state, losses = tx.init(adapters), []
  for _ in range(10):
    adapters, opt_state, loss = step(adapters, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1  # a random tiny model: the prompts alone move it only so far


def test_t5_hooks(checkpoints):
  """inputs_embeds equal input_ids; empty prefixes change nothing; encoder prefixes move the encoder output."""
  model, params = pj.models.from_pretrained(checkpoints("t5"))
  batch = _batch("t5")
  plain = np.asarray(model.apply({"params": params}, **batch))
  embeds = np.asarray(params["shared"]["embedding"])[batch["input_ids"]]
  inputs = {k: v for k, v in batch.items() if k != "input_ids"}
  assert _max_diff(model.apply({"params": params}, **inputs, inputs_embeds=embeds), plain) < 1e-6
  empty = [(np.zeros((1, 0, 4, 8), np.float32),) * 2] * 2
  assert _max_diff(model.apply({"params": params}, **batch, encoder_prefix_kv=empty, decoder_prefix_kv=empty),
                   plain) == 0.0
  cfg = prefix_tuning.PTuningV2Config(K, stacks=("encoder", "decoder"))
  adapters = pj.init(cfg, jax.random.key(0), params)
  assert adapters["embedding"].shape == (K, 2 * 2 * 2 * 32)
  both = np.asarray(pj.apply(cfg, model.apply)(params, adapters, **batch))
  decoder_only = np.asarray(pj.apply(dataclasses.replace(cfg, stacks=("decoder",)), model.apply)(
      params, {"embedding": adapters["embedding"][:, 128:]}, **batch))
  assert _max_diff(both, decoder_only) > 1e-2
  with pytest.raises(ValueError, match="encoder prefix_kv has 1 .* the encoder has 2 blocks"):
    model.apply({"params": params}, **batch, encoder_prefix_kv=empty[:1])
