"""RoBERTa encoders: BERT's modules (models/bert.py) with RoBERTa's config switches and classification head.

Differences from BERT, all driven by `RobertaConfig`: positions count only the non-padding tokens and
start at pad_token_id + 1 (padding sits at position pad_token_id), the encoder of task models lives
under ``roberta/``, and sequence classification uses ``classifier/{dense,out_proj}`` on the first
token's hidden state (no pooler).  Checkpoints usually have one token type and layer_norm_eps 1e-5.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.dropout import Dropout
from peftjax.models import bert
from peftjax.models.bert import (default_position_ids, init_params, logical_axes, save_pretrained,  # noqa: F401
                                 stack_layers, unstack_layers)


@dataclasses.dataclass(frozen=True)
class RobertaConfig(bert.BertConfig):
  """RoBERTa hyper-parameters under their Hugging Face names (transformers' RobertaConfig defaults)."""

  model_type: ClassVar[str] = "roberta"
  base_model_prefix: ClassVar[str] = "roberta"
  positions_skip_padding: ClassVar[bool] = True

  vocab_size: int = 50265
  pad_token_id: int | None = 1
  bos_token_id: int | None = 0
  eos_token_id: int | None = 2


class RobertaModel(bert.BertModel):
  """The RoBERTa encoder (BertModel with a RobertaConfig)."""


class RobertaClassificationHead(nn.Module):
  """out_proj(dropout(tanh(dense(dropout(first token's hidden state))))): logits (batch, num_labels)."""

  config: RobertaConfig
  num_labels: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, deterministic: bool):
    c = self.config
    x = Dropout(c.classifier_dropout_rate)(hidden[:, 0], deterministic=deterministic)
    dense = bert.dense_layer(c.hidden_size, ("embed", "mlp"), c, self.dtype, self.param_dtype, name="dense")
    x = jnp.tanh(dense(x))
    return bert.classifier(self, x, deterministic, name="out_proj")


class RobertaForSequenceClassification(nn.Module):
  """RobertaModel without pooler (under ``roberta/``) and the ``classifier`` head: logits (batch, num_labels)."""

  config: RobertaConfig
  num_labels: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, deterministic: bool = True,
               inputs_embeds=None, prefix_kv=None, position_ids=None):
    outputs = bert.base_model(self, add_pooling_layer=False)(input_ids, attention_mask, token_type_ids,
                                                              deterministic, inputs_embeds, prefix_kv, position_ids)
    head = RobertaClassificationHead(self.config, self.num_labels, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name="classifier")
    return head(outputs.last_hidden_state, deterministic)


class RobertaForTokenClassification(bert.BertForTokenClassification):
  """RobertaModel without pooler, dropout and a Dense ``classifier`` per token: logits (batch, length, num_labels)."""


ARCHITECTURES = {cls.__name__: cls for cls in (RobertaModel, RobertaForSequenceClassification,
                                               RobertaForTokenClassification)}


def from_pretrained(path_or_hub_id: str, dtype=None, task: str | None = None, num_labels: int | None = None,
                    scan_layers: bool = False, remat: bool = False,
                    rng: jax.Array | None = None) -> tuple[nn.Module, dict]:
  """(model, params) from a Hugging Face RoBERTa folder or hub id; options as `bert.from_pretrained`."""
  return bert.load(path_or_hub_id, RobertaConfig, ARCHITECTURES, dtype, task, num_labels, scan_layers, remat, rng)
