"""Prompt tuning (Lester et al. 2021): k trained virtual-token embeddings in front of the input embeddings.

The adapter tree is ``{"prompt_embeddings": (rows, hidden)}``, the tensor Hugging Face PEFT saves.  As in
PEFT, an encoder-decoder (T5) gets rows = 2k (PEFT's num_transformer_submodules=2) of which the encoder
reads the first k; other models get rows = k.  Initialisations (PEFT's PromptTuningInit): "random"
(N(0, 1), torch's Embedding init), "sample_vocab" (rows of the word embeddings at random token ids) and
"text" (the word embeddings of `init_text` tokenised by `tokenizer`, ids repeated or cut to the rows).
On Gemma, as PEFT on transformers' Gemma (whose embedding module scales by sqrt(hidden_size)), the real tokens
and the sampled / text rows carry that scale while the trained virtual tokens enter the layers as they are.

Where the virtual tokens go (shared with P-tuning, `peftjax.methods.p_tuning`):
- `placeholder_token_id` None (PEFT): k positions are prepended to every sequence, in front of any
  padding; the attention mask gets k ones in front, BERT's token_type_ids k zeros, given position_ids
  0..k-1 in front and a shift by k (default positions simply count the longer sequence, as in PEFT).
  Per-token outputs (decoder logits, BERT token logits and hidden states) come back without the k
  virtual positions, aligned with the inputs; pooled outputs read the first virtual token, as in PEFT.
  Generation works through the model's `generate` with `apply_fn` (the virtual tokens enter the key/value
  cache at the prefill: a `decode` call whose cache is as long as its attention mask); the tokens'
  positions count real tokens only, after the k virtual ones, so left padding does not change a row's
  result (PEFT's generate drops position_ids for prompt methods, so its left-padded positions count the
  padding) -- except on Gemma's sliding-window layers, whose window counts padding slots between the virtual
  tokens and the row, as transformers' does (`peftjax.models.gemma.attention_masks`).  T5's encoder gets the
  virtual tokens; `decode` / `decode_step` see the extended encoder mask.
- `placeholder_token_id` set (P-tuning templates): the caller writes that id at the places where virtual
  tokens go, and the j-th placeholder of a row gets virtual token j; each row holds exactly k
  placeholders (or none, e.g. decoder inputs and generated tokens).  The id needs no vocabulary entry
  (-1 works) and the sequence keeps its length, mask and positions.

Hugging Face names: `num_virtual_tokens`, `prompt_tuning_init` is `init`, `prompt_tuning_init_text` is
`init_text`, `tokenizer_name_or_path` is `tokenizer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree as ptree
from peftjax.models import bert, gemma, gpt2, llama, t5

COLLECTION = "prompt_tuning"
INITS = ("random", "sample_vocab", "text")
# The module names of the word embeddings (T5, GPT-2, Llama, BERT/RoBERTa).
WORD_EMBEDDINGS = ("shared", "wte", "embed_tokens", "word_embeddings")
DECODERS = (gpt2.GPT2LMHeadModel, llama.LlamaForCausalLM, gemma.GemmaForCausalLM)
# Models whose word embeddings are scaled by sqrt(hidden_size) inside the embedding (transformers' Gemma
# ScaledWordEmbedding): PEFT's word_embeddings(ids) includes the scale for the real tokens and the sampled /
# text initialisations, while the trained virtual tokens enter as they are.
SCALED_EMBEDDINGS = tuple(gemma.TASKS.values())


def check_virtual_tokens(name: str, num_virtual_tokens: int, num_transformer_submodules: int | None) -> None:
  """Raises on a non-positive token count or a submodule count other than None, 1 or 2."""
  if num_virtual_tokens < 1:
    raise ValueError(f"{name}.num_virtual_tokens must be at least 1, got {num_virtual_tokens}.")
  if num_transformer_submodules not in (None, 1, 2):
    raise ValueError(f"{name}.num_transformer_submodules={num_transformer_submodules!r} is not valid; valid: "
                     "None (2 for encoder-decoders, else 1, as Hugging Face PEFT), 1 or 2.")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
  """Prompt tuning settings (HF PEFT PromptTuningConfig); see the module docstring for placement."""

  num_virtual_tokens: int = 20
  init: str = "random"
  init_text: str | None = None
  tokenizer: str | None = None
  placeholder_token_id: int | None = None
  num_transformer_submodules: int | None = None

  def __post_init__(self):
    check_virtual_tokens("PromptTuningConfig", self.num_virtual_tokens, self.num_transformer_submodules)
    if self.init not in INITS:
      raise ValueError(f"PromptTuningConfig.init={self.init!r} is not valid; valid: {INITS}.")
    if self.init == "text" and (not self.init_text or not self.tokenizer):
      raise ValueError("PromptTuningConfig.init='text' needs init_text (the text) and tokenizer (a tokenizer "
                       "name or folder for transformers.AutoTokenizer).")


def word_embeddings(params: ptree.Tree) -> jax.Array:
  """The word-embedding table (vocab, hidden) of a zoo model's parameters."""
  flat = ptree.flatten(params)
  for path, leaf in flat.items():
    parts = path.split("/")
    if len(parts) >= 2 and parts[-1] == "embedding" and parts[-2] in WORD_EMBEDDINGS:
      return leaf
  raise ValueError(f"the parameters hold no word embeddings (a module named one of {WORD_EMBEDDINGS} with an "
                   f"'embedding' leaf); found e.g. {sorted(flat)[:3]}.")


def embedding_scale(params: ptree.Tree) -> float:
  """The factor the model's own embedding applies to the table rows: sqrt(hidden_size) for Gemma, else 1."""
  return float(word_embeddings(params).shape[1]) ** 0.5 if gemma.is_gemma(params) else 1.0


def is_encoder_decoder(params: ptree.Tree) -> bool:
  return "encoder" in params and "decoder" in params


def table_rows(num_virtual_tokens: int, num_transformer_submodules: int | None, params: ptree.Tree) -> int:
  """PEFT's total_virtual_tokens: k times the submodule count (default 2 for encoder-decoders, else 1)."""
  submodules = num_transformer_submodules or (2 if is_encoder_decoder(params) else 1)
  return num_virtual_tokens * submodules


def text_token_ids(text: str, tokenizer: str, rows: int) -> np.ndarray:
  """PEFT's TEXT init ids: the tokenised text (special tokens included), repeated or cut to `rows`."""
  import transformers  # only this initialisation needs a tokenizer
  ids = transformers.AutoTokenizer.from_pretrained(tokenizer)(text)["input_ids"]
  return np.asarray((ids * math.ceil(rows / len(ids)))[:rows])


def init(cfg: PromptTuningConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """{"prompt_embeddings": (rows, hidden)} float32, initialised as `cfg.init` says."""
  table = word_embeddings(params)
  rows = table_rows(cfg.num_virtual_tokens, cfg.num_transformer_submodules, params)
  if cfg.init == "random":
    prompts = jax.random.normal(rng, (rows, table.shape[1]), jnp.float32)
  else:
    ids = (jax.random.randint(rng, (rows,), 0, table.shape[0]) if cfg.init == "sample_vocab"
           else text_token_ids(cfg.init_text, cfg.tokenizer, rows))
    sampled = jnp.asarray(table)[ids]
    prompts = (sampled * jnp.asarray(embedding_scale(params), sampled.dtype)).astype(jnp.float32)
  return {"prompt_embeddings": prompts}


def top_level_interceptor(transform: Callable[..., Any]):
  """A linen interceptor that hands the outermost call of the top-level model to
  transform(module, method_name, arguments, call): arguments are the call's bound arguments by name and
  call(arguments) runs the method.  Nested calls (the model calling its own methods) pass through."""
  busy = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if busy or context.method_name == "setup" or module.scope is None or module.scope.parent is not None:
      return next_fun(*args, **kwargs)
    bound = inspect.signature(getattr(type(module), context.method_name)).bind(module, *args, **kwargs)
    arguments = dict(list(bound.arguments.items())[1:])  # without self
    busy.append(True)
    try:
      return transform(module, context.method_name, arguments, lambda a: next_fun(**a))
    finally:
      busy.pop()
  return interceptor


def _front(x: jax.Array, k: int, fill: jax.Array) -> jax.Array:
  """x (batch, length, ...) with `fill` (broadcast to (batch, k, ...)) in front."""
  return jnp.concatenate([jnp.broadcast_to(fill, (x.shape[0], k, *x.shape[2:])).astype(x.dtype), x], axis=1)


def _count_placeholders(ids: jax.Array, placeholder: int, k: int) -> None:
  if isinstance(ids, jax.core.Tracer):
    return
  counts = np.sum(np.asarray(ids) == placeholder, axis=1)
  bad = [int(n) for n in counts if n not in (0, k)]
  if bad:
    raise ValueError(f"a row of input_ids holds {bad[0]} placeholder ids ({placeholder}); each row needs exactly "
                     f"num_virtual_tokens={k} (or none).")


def _placeholder_interceptor(prompts: jax.Array, placeholder: int):
  """Replaces the word embedding of each placeholder id by the next virtual token of its row (on Gemma after
  the sqrt(hidden_size) scale, so that the virtual tokens enter unscaled as when they are prepended)."""
  k = prompts.shape[0]

  def interceptor(next_fun, args, kwargs, context):
    scaled = isinstance(context.module, gemma.GemmaModel) and context.method_name == "embed"
    if not scaled and (context.method_name != "__call__" or context.module.name not in WORD_EMBEDDINGS):
      return next_fun(*args, **kwargs)
    ids = args[0] if args else kwargs["inputs"]
    _count_placeholders(ids, placeholder, k)
    is_virtual = ids == placeholder
    tokens = next_fun(jnp.where(is_virtual, 0, ids))
    slot = jnp.clip(jnp.cumsum(is_virtual, axis=-1) - 1, 0, k - 1)
    return jnp.where(is_virtual[..., None], prompts[slot].astype(tokens.dtype), tokens)
  return interceptor


def _prepend(prompts: jax.Array, table: jax.Array, module, method: str, args: dict, call):
  """Runs a top-level model call with the virtual tokens prepended (see the module docstring)."""
  k = prompts.shape[0]

  def embeds(ids_name: str, embeds_name: str):
    tokens = args.get(embeds_name)
    if tokens is None:  # the model's own embedding: Gemma's scales the table rows by sqrt(hidden_size)
      ids = args[ids_name]
      tokens = module.model.embed(ids) if isinstance(module, SCALED_EMBEDDINGS) else table[ids]
    args[ids_name] = None
    args[embeds_name] = _front(tokens, k, prompts[None])

  def mask(name: str, fill: int = 1):
    if args.get(name) is not None:
      args[name] = _front(args[name], k, jnp.asarray(fill, args[name].dtype))

  if isinstance(module, t5.T5ForConditionalGeneration):
    if method in ("__call__", "encode"):
      embeds("input_ids", "inputs_embeds")
    if method in ("__call__", "encode", "decode", "decode_step"):
      mask("attention_mask")
    return call(args)
  if isinstance(module, DECODERS) and method == "decode":
    cache, slots = args["cache"], args["attention_mask"]
    mask("attention_mask")
    positions = args["position_ids"] + k
    if cache["key"].shape[2] == slots.shape[1]:  # prefill: make room for the virtual tokens in front
      args["cache"] = {name: jnp.pad(c, ((0, 0), (0, 0), (k, 0), (0, 0), (0, 0))) for name, c in cache.items()}
      positions = _front(positions, k, jnp.arange(k, dtype=positions.dtype)[None])
      embeds("input_ids", "inputs_embeds")
    else:
      args["cache_index"] = args["cache_index"] + k
    args["position_ids"] = positions
    return call(args)
  if method != "__call__":
    return call(args)
  embeds("input_ids", "inputs_embeds")
  mask("attention_mask")
  mask("token_type_ids", 0)
  if args.get("position_ids") is not None:
    positions = args["position_ids"]
    args["position_ids"] = _front(positions + k, k, jnp.arange(k, dtype=positions.dtype)[None])
  out = call(args)
  if isinstance(out, bert.EncoderOutput):
    return out._replace(last_hidden_state=out.last_hidden_state[:, k:])
  return out[:, k:] if out.ndim == 3 else out


def _no_embeds(module, method: str, args: dict, call):
  if args.get("inputs_embeds") is not None:
    raise ValueError("inputs_embeds bypass the word embeddings, so placeholder_token_id finds no placeholders; "
                     "pass input_ids.")
  return call(args)


def wrap_virtual_tokens(collection: str, prompts_fn: Callable[[Any], jax.Array], num_virtual_tokens: int,
                        placeholder_token_id: int | None, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` with the virtual tokens prompts_fn(variables[collection])[:num_virtual_tokens] inserted."""

  def adapted(variables, *args, **kwargs):
    variables = dict(variables)
    prompts = prompts_fn(variables.pop(collection))[:num_virtual_tokens]
    if placeholder_token_id is None:
      table = word_embeddings(variables["params"])
      interceptors = [top_level_interceptor(lambda *a: _prepend(prompts, table, *a))]
    else:
      interceptors = [top_level_interceptor(_no_embeds), _placeholder_interceptor(prompts, placeholder_token_id)]
    with contextlib.ExitStack() as stack:
      for interceptor in interceptors:
        stack.enter_context(nn.intercept_methods(interceptor))
      return apply_fn(variables, *args, **kwargs)
  return adapted


def wrap(cfg: PromptTuningConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with the virtual tokens of `variables["prompt_tuning"]` inserted."""
  return wrap_virtual_tokens(COLLECTION, lambda tree: tree["prompt_embeddings"], cfg.num_virtual_tokens,
                             cfg.placeholder_token_id, apply_fn)
