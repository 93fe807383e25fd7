"""Hugging Face PEFT folders for the soft-prompt family (used by `peftjax.interop.save_adapter` / `load_adapter`).

PEFT saves one tensor, ``prompt_embeddings``: what its prompt encoder outputs for the virtual tokens, so a
P-tuning MLP/LSTM or a prefix-tuning projection is evaluated once and saved folded, and
`PeftModel.from_pretrained` (inference mode) uses the table as it is.

- PROMPT_TUNING and P_TUNING: (k * num_transformer_submodules, token_dim), num_transformer_submodules 2 for
  encoder-decoders (T5; the encoder reads the first k rows), else 1.  Both load back as a PromptTuningConfig.
- PREFIX_TUNING: (k, num_layers * 2 * token_dim), layer i's keys in column block 2i and its values in 2i + 1
  (token_dim = the key width, kv heads * head_dim); num_transformer_submodules 2 for SEQ_2_SEQ_LM, where PEFT
  puts the prefixes in T5's decoder.  It loads back as a PrefixTuningConfig with projection=False (what
  `prefix_tuning.fold` gives) when the file says prefix_projection, else as a PTuningV2Config.

PEFT picks the model class that inserts the prompts by `task_type`, so saving needs one.  num_layers,
num_attention_heads and, for prefix tuning, token_dim are written as null: PEFT fills them from the base
model's config when it loads the folder, as it does when it creates the adapter (including its grouped-query
adjustment), so they always agree with the model.  Placeholder templates (`placeholder_token_id`) and
encoder prefixes (`stacks` with "encoder") have no PEFT equivalent.
"""

from __future__ import annotations

import jax
import numpy as np

from peftjax.adapter_schema import AdapterFormatError
from peftjax.methods import p_tuning, prefix_tuning, prompt_tuning

PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
CONFIGS = (prompt_tuning.PromptTuningConfig, p_tuning.PTuningConfig, prefix_tuning.PrefixTuningConfig)
KEY = "prompt_embeddings"


class NoPeftFormatError(ValueError):
  """The method (or this setting of it) has no Hugging Face PEFT adapter format; save it with Orbax instead."""


def files(cfg, adapters: dict, task_type: str | None) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json entries, {"prompt_embeddings": folded table}) for a soft-prompt config."""
  name = type(cfg).__name__
  if task_type is None:
    raise ValueError(f"saving a {name} needs task_type (PEFT picks the model class that inserts the prompts by it), "
                     "e.g. 'CAUSAL_LM', 'SEQ_2_SEQ_LM', 'SEQ_CLS' or 'TOKEN_CLS'.")
  if getattr(cfg, "placeholder_token_id", None) is not None:
    raise NoPeftFormatError(f"{name}.placeholder_token_id={cfg.placeholder_token_id} has no Hugging Face PEFT "
                            "equivalent (PEFT prepends the virtual tokens); save with placeholder_token_id=None.")
  k = cfg.num_virtual_tokens
  config = {"num_virtual_tokens": k, "num_layers": None, "num_attention_heads": None}
  if isinstance(cfg, prefix_tuning.PrefixTuningConfig):
    if cfg.stacks != ("decoder",):
      raise NoPeftFormatError(f"{name}.stacks={cfg.stacks!r} has no Hugging Face PEFT equivalent (PEFT puts prefixes "
                              "in the decoder of encoder-decoders); valid: ('decoder',).")
    if not cfg.shift_positions:
      raise NoPeftFormatError(f"{name}.shift_positions=False (AdapterHub's placement) has no Hugging Face PEFT "
                              "equivalent (PEFT shifts the tokens' positions by the prefix length); valid: True.")
    table = prefix_tuning.prefix_table(cfg, adapters)
    config |= {"peft_type": "PREFIX_TUNING", "prefix_projection": cfg.projection, "token_dim": None,
               "encoder_hidden_size": cfg.encoder_hidden_size, "init_weights": None,
               "num_transformer_submodules": 2 if task_type == "SEQ_2_SEQ_LM" else 1}
  elif isinstance(cfg, p_tuning.PTuningConfig):
    table = p_tuning.virtual_tokens(cfg, adapters)
    config |= {"peft_type": "P_TUNING", "encoder_reparameterization_type": cfg.encoder_type.upper(),
               "encoder_hidden_size": cfg.encoder_hidden_size, "encoder_num_layers": cfg.encoder_num_layers,
               "encoder_dropout": 0.0}
  else:
    table = adapters[KEY]
    config |= {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": cfg.init.upper(),
               "prompt_tuning_init_text": cfg.init_text, "tokenizer_name_or_path": cfg.tokenizer,
               "tokenizer_kwargs": None}
  table = np.asarray(jax.device_get(table), np.float32)
  if config["peft_type"] != "PREFIX_TUNING":
    config |= {"num_transformer_submodules": table.shape[0] // k, "token_dim": table.shape[1]}
  return config, {KEY: np.ascontiguousarray(table)}


def _prompt_config(config: dict, params) -> prompt_tuning.PromptTuningConfig:
  """Our prompt-tuning config for PEFT's PROMPT_TUNING / P_TUNING entries (submodules None when the default)."""
  submodules = config.get("num_transformer_submodules")
  default = 2 if prompt_tuning.is_encoder_decoder(params) else 1
  init = str(config.get("prompt_tuning_init") or "random").lower()
  text, tokenizer = config.get("prompt_tuning_init_text"), config.get("tokenizer_name_or_path")
  if init not in prompt_tuning.INITS or (init == "text" and not (text and tokenizer)):
    init = "random"  # only informative for a trained table
  return prompt_tuning.PromptTuningConfig(
      int(config["num_virtual_tokens"]), init=init, init_text=text if init == "text" else None,
      tokenizer=tokenizer if init == "text" else None,
      num_transformer_submodules=None if submodules in (None, default) else int(submodules))


def read(folder: str, config: dict, tensors: dict[str, np.ndarray], params) -> tuple[object, dict]:
  """(our folded config, adapter tree) from a soft-prompt folder's config and tensors, checked against `params`."""
  peft_type = config["peft_type"]
  if set(tensors) != {KEY}:
    raise AdapterFormatError(f"{folder!r}: a {peft_type} adapter file holds the one tensor {KEY!r} (and "
                             f"modules_to_save); found {sorted(tensors)}.")
  table = tensors[KEY]
  if peft_type == "PREFIX_TUNING":
    k = int(config["num_virtual_tokens"])
    if config.get("prefix_projection"):
      cfg = prefix_tuning.PrefixTuningConfig(k, projection=False, encoder_hidden_size=config.get("encoder_hidden_size"))
    else:
      cfg = prefix_tuning.PTuningV2Config(k)
    stacks, width = prefix_tuning.layers_and_width(cfg, params)
    expected, name = (k, sum(n for _, n in stacks) * 2 * width), "embedding"
  else:
    cfg = _prompt_config(config, params)
    rows = prompt_tuning.table_rows(cfg.num_virtual_tokens, cfg.num_transformer_submodules, params)
    expected, name = (rows, prompt_tuning.word_embeddings(params).shape[1]), KEY
  if table.shape != expected:
    raise AdapterFormatError(f"{folder!r}: tensor {KEY!r} has shape {table.shape} but this model and "
                             f"num_virtual_tokens={cfg.num_virtual_tokens} need {expected}.")
  return cfg, {name: jax.numpy.asarray(table, np.float32)}
