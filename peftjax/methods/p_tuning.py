"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a trained prompt encoder.

A table of virtual-token embeddings goes through Hugging Face PEFT's PromptEncoder reparameterisation:
"mlp" (Linear(d, h), ReLU, Linear(h, h), ReLU, Linear(h, d)) or "lstm" (a bidirectional LSTM of
`encoder_num_layers` layers with hidden size h over the table, then Linear(2h, 2h), ReLU, Linear(2h, d)),
h = `encoder_hidden_size` (default: the model's hidden size d).  The encoder's outputs are the virtual
tokens, placed as prompt tuning places them (`peftjax.methods.prompt_tuning`): prepended (PEFT), or at
the placeholder ids of a template (`placeholder_token_id`), e.g. "[P][P] The capital of X is [P] Y".

The adapter tree mirrors PEFT's module names: ``embedding`` (rows, d), ``mlp_head/{0,2,4}/{kernel,bias}``
(kernels (in, out)) and, for "lstm", ``lstm_head/{weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0,
..._reverse, ...}`` in PyTorch's layout (gates i, f, g, o; weights (4h, in)).  The LSTM has no dropout
between layers (PEFT's default encoder_dropout=0).  As in PEFT, T5 gets rows = 2k and the encoder runs
over all rows; the model's encoder reads the first k outputs.  `fold` turns the trained encoder into the
plain virtual tokens (what PEFT saves as ``prompt_embeddings``): a prompt-tuning config and tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from peftjax import tree as ptree
from peftjax.methods import prompt_tuning

COLLECTION = "p_tuning"
ENCODERS = ("mlp", "lstm")


@dataclasses.dataclass(frozen=True)
class PTuningConfig:
  """P-tuning settings (HF PEFT PromptEncoderConfig: encoder_reparameterization_type is `encoder_type`)."""

  num_virtual_tokens: int = 20
  encoder_type: str = "mlp"
  encoder_hidden_size: int | None = None
  encoder_num_layers: int = 2
  placeholder_token_id: int | None = None
  num_transformer_submodules: int | None = None

  def __post_init__(self):
    prompt_tuning.check_virtual_tokens("PTuningConfig", self.num_virtual_tokens, self.num_transformer_submodules)
    if self.encoder_type not in ENCODERS:
      raise ValueError(f"PTuningConfig.encoder_type={self.encoder_type!r} is not valid; valid: {ENCODERS}.")
    if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
      raise ValueError(f"PTuningConfig.encoder_hidden_size must be positive (or None), got {self.encoder_hidden_size}.")
    if self.encoder_num_layers < 1:
      raise ValueError(f"PTuningConfig.encoder_num_layers must be at least 1, got {self.encoder_num_layers}.")


def torch_uniform(rng: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Linear and LSTM initialisation."""
  bound = fan_in ** -0.5
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def linear_init(rng: jax.Array, d_in: int, d_out: int) -> dict:
  """{"kernel": (d_in, d_out), "bias": (d_out,)} initialised as torch.nn.Linear."""
  k1, k2 = jax.random.split(rng)
  return {"kernel": torch_uniform(k1, (d_in, d_out), d_in), "bias": torch_uniform(k2, (d_out,), d_in)}


def mlp(layers: dict, x: jax.Array, activation: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Linear layers named "0", "2", ... (PyTorch Sequential indices) with `activation` between them."""
  names = sorted(layers, key=int)
  for i, name in enumerate(names):
    x = x @ layers[name]["kernel"] + layers[name]["bias"]
    if i < len(names) - 1:
      x = activation(x)
  return x


def _lstm_init(rng: jax.Array, d: int, hidden: int, num_layers: int) -> dict:
  lstm = {}
  keys = iter(jax.random.split(rng, 8 * num_layers))
  for layer in range(num_layers):
    d_in = d if layer == 0 else 2 * hidden
    for suffix in ("", "_reverse"):
      for name, shape in (("weight_ih", (4 * hidden, d_in)), ("weight_hh", (4 * hidden, hidden)),
                          ("bias_ih", (4 * hidden,)), ("bias_hh", (4 * hidden,))):
        lstm[f"{name}_l{layer}{suffix}"] = torch_uniform(next(keys), shape, hidden)
  return lstm


def _lstm_direction(lstm: dict, name: str, x: jax.Array) -> jax.Array:
  """One direction of one layer over x (length, in): the hidden states (length, hidden), as torch.nn.LSTM."""
  w_ih, w_hh = lstm[f"weight_ih_{name}"], lstm[f"weight_hh_{name}"]
  inputs = x @ w_ih.T + lstm[f"bias_ih_{name}"] + lstm[f"bias_hh_{name}"]
  hidden = w_hh.shape[1]

  def step(carry, gates_x):
    h, c = carry
    i, f, g, o = jnp.split(gates_x + h @ w_hh.T, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((hidden,), x.dtype)
  return jax.lax.scan(step, (zeros, zeros), inputs)[1]


def bidirectional_lstm(lstm: dict, x: jax.Array, num_layers: int) -> jax.Array:
  """torch.nn.LSTM(bidirectional=True) over x (length, d) with no batch: outputs (length, 2 * hidden)."""
  for layer in range(num_layers):
    forward = _lstm_direction(lstm, f"l{layer}", x)
    backward = _lstm_direction(lstm, f"l{layer}_reverse", x[::-1])[::-1]
    x = jnp.concatenate([forward, backward], axis=-1)
  return x


def init(cfg: PTuningConfig, rng: jax.Array, params: ptree.Tree) -> dict:
  """Embedding table N(0, 1) and the prompt encoder with PyTorch's default initialisation."""
  d = prompt_tuning.word_embeddings(params).shape[1]
  rows = prompt_tuning.table_rows(cfg.num_virtual_tokens, cfg.num_transformer_submodules, params)
  hidden = cfg.encoder_hidden_size or d
  keys = jax.random.split(rng, 5)
  adapters = {"embedding": jax.random.normal(keys[0], (rows, d), jnp.float32)}
  if cfg.encoder_type == "mlp":
    sizes = [(d, hidden), (hidden, hidden), (hidden, d)]
  else:
    adapters["lstm_head"] = _lstm_init(keys[4], d, hidden, cfg.encoder_num_layers)
    sizes = [(2 * hidden, 2 * hidden), (2 * hidden, d)]
  adapters["mlp_head"] = {str(2 * i): linear_init(k, *size) for i, (k, size) in enumerate(zip(keys[1:], sizes))}
  return adapters


def virtual_tokens(cfg: PTuningConfig, adapters: dict) -> jax.Array:
  """The prompt encoder's output for every table row: (rows, d)."""
  x = adapters["embedding"]
  if cfg.encoder_type == "lstm":
    x = bidirectional_lstm(adapters["lstm_head"], x, cfg.encoder_num_layers)
  return mlp(adapters["mlp_head"], x, jax.nn.relu)


def fold(cfg: PTuningConfig, adapters: dict) -> tuple[prompt_tuning.PromptTuningConfig, dict]:
  """The trained encoder's virtual tokens as prompt tuning: (config, {"prompt_embeddings": (rows, d)})."""
  plain = prompt_tuning.PromptTuningConfig(cfg.num_virtual_tokens, placeholder_token_id=cfg.placeholder_token_id,
                                           num_transformer_submodules=cfg.num_transformer_submodules)
  return plain, {"prompt_embeddings": virtual_tokens(cfg, adapters)}


def wrap(cfg: PTuningConfig, apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` (model.apply's signature) with the encoded virtual tokens of `variables["p_tuning"]` inserted."""
  return prompt_tuning.wrap_virtual_tokens(COLLECTION, lambda tree: virtual_tokens(cfg, tree), cfg.num_virtual_tokens,
                                           cfg.placeholder_token_id, apply_fn)
