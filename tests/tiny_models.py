"""Tiny Flax models with Transformer-like module names, and helpers, shared by the method and model tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np


class Block(nn.Module):
  """Norm, a gated attention-like mix (bias-free projection `attention`, v, o) and a feed-forward (wi, wo)."""

  width: int
  attention: str = "q"
  general_wo: bool = True  # wo as a DenseGeneral (else a Dense)

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm")(x)
    a = nn.Dense(self.width, use_bias=False, name=self.attention)(h)
    v = nn.Dense(self.width, name="v")(h)
    x = x + nn.Dense(self.width, name="o")(nn.tanh(a) * v)
    wo = nn.DenseGeneral if self.general_wo else nn.Dense
    return x + wo(self.width, name="wo")(nn.relu(nn.Dense(2 * self.width, name="wi")(x)))


class TinyModel(nn.Module):
  """embed, `depth` Blocks block_0 ..., lm_head (5 outputs)."""

  width: int = 16
  depth: int = 3
  attention: str = "q"
  general_wo: bool = True
  head_bias: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="embed")(x)
    for i in range(self.depth):
      x = Block(self.width, self.attention, self.general_wo, name=f"block_{i}")(x)
    return nn.Dense(5, use_bias=self.head_bias, name="lm_head")(x)


class ScannedModel(nn.Module):
  """TinyModel with its blocks scanned into one stacked 'layers' module; `collection` is stacked along."""

  width: int = 16
  depth: int = 3
  attention: str = "q"
  collection: str = "lora"

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="embed")(x)
    layers = nn.scan(lambda block, carry, _: (block(carry), None), variable_axes={"params": 0, self.collection: 0},
                     split_rngs={"params": True}, length=self.depth)
    x, _ = layers(Block(self.width, self.attention, name="layers"), x, None)
    return nn.Dense(5, name="lm_head")(x)


def perturbed(adapters, seed=3, scale=0.3):
  """`adapters` plus scale * N(0, 1) noise on every leaf."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [l + scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def perturb_torch(model):
  """A random transformers `model` made visible (in place, returned in eval mode): uneven norms, biases N(0, 0.1),
  every other weight but the embeddings N(0, 0.15) so that it moves the residual stream."""
  import torch  # only the PyTorch reference tests need it
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name.lower() or ".ln_" in name:
        param.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        param.normal_(0.0, 0.1)
      elif not any(e in name for e in ("embed", "wte", "wpe", "shared")):
        param.normal_(0.0, 0.15)
  return model.eval()


def saved_checkpoints(tmp_path_factory, make_model):
  """folder(kind): a folder written by `make_model(kind).save_pretrained`, created on first use."""
  folders = {}

  def folder(kind: str) -> str:
    if kind not in folders:
      folders[kind] = str(tmp_path_factory.mktemp(kind))
      make_model(kind).save_pretrained(folders[kind])
    return folders[kind]
  return folder
