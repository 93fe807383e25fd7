"""Step time of peftjax LoRA vs Hugging Face PEFT LoRA on T5, BERT, GPT-2 and Llama-family shapes.

For each family, in one run and on the same machine: one training step (forward, backward, AdamW update
of the adapters only) of peftjax LoRA on our Flax model and of HF peft LoRA on transformers' PyTorch
model, both built from the same Hugging Face config dict, on the same batch (default 8 x 128, fp32).
LoRA r=8, alpha=16 on the family's usual targets; T5 is a seq2seq LM (source --seq, target --target tokens),
BERT a sequence classifier (peft's SEQ_CLS also trains the classifier, so ours trains it through
modules_to_save), GPT-2 and Llama are causal LMs.
With --bf16 it also times peftjax with compute_dtype bfloat16 (bf16 operands, float32 accumulation; adapters and
optimizer state float32) against PEFT under torch.autocast("cpu", dtype=torch.bfloat16), and the last table
checks the issue's targets.  Usage: python bench/lora_zoo.py [--families t5 bert gpt2 llama] [--repeats 3]
[--batch 8] [--seq 128] [--target 32] [--layers N] [--bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import peftjax as pj
from peftjax.methods.modules_to_save import ModulesToSaveConfig
from peftjax.models.t5 import T5Config, shift_right

from common import interleaved_medians, jax_adamw_step, torch_adamw_step

RANK = 8


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: its shapes as a Hugging Face config dict and the keys of its layer counts; the config and
  model classes (one name each in peftjax.models.<module> and in transformers); LoRA targets; peft's task type."""

  shapes: str
  hf_config: dict
  layers_keys: tuple[str, ...]
  module: str
  config_class: str
  model_class: str
  targets: tuple[str, ...]
  task_type: str


FAMILIES = {
    "t5": Family("t5-small", T5Config.t5_small().to_hf(), ("num_layers", "num_decoder_layers"), "t5", "T5Config",
                 "T5ForConditionalGeneration", ("q", "v"), "SEQ_2_SEQ_LM"),
    "bert": Family("bert-base", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=512),
                   ("num_hidden_layers",), "bert", "BertConfig", "BertForSequenceClassification", ("query", "value"),
                   "SEQ_CLS"),
    "gpt2": Family("gpt2 small", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
                   ("n_layer",), "gpt2", "GPT2Config", "GPT2LMHeadModel", ("c_attn",), "CAUSAL_LM"),
    "llama": Family("SmolLM2-135M", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
                    ("num_hidden_layers",), "llama", "LlamaConfig", "LlamaForCausalLM", ("q_proj", "v_proj"),
                    "CAUSAL_LM"),
}


def make_batch(family: Family, hf_config: dict, batch: int, seq: int, target: int) -> dict:
  """Random token ids, an all-ones attention mask, and labels (one class per row, the ids for a causal LM, or
  `target` random target ids and their decoder inputs for a seq2seq LM)."""
  rng = np.random.default_rng(0)
  input_ids = rng.integers(3, hf_config["vocab_size"], (batch, seq))
  labels = rng.integers(0, 2, batch) if family.task_type == "SEQ_CLS" else input_ids
  out = {"input_ids": input_ids, "attention_mask": np.ones((batch, seq), np.int64), "labels": labels}
  if family.task_type == "SEQ_2_SEQ_LM":
    out["labels"] = rng.integers(3, hf_config["vocab_size"], (batch, target))
    out["decoder_input_ids"] = np.asarray(shift_right(out["labels"], hf_config["decoder_start_token_id"],
                                                      hf_config["pad_token_id"]))
  return out


def loss_fn(family: Family, logits, labels):
  """Hugging Face's training loss: cross entropy of the class or target token, or of the next token (shifted by
  one)."""
  if family.task_type == "CAUSAL_LM":
    logits, labels = logits[:, :-1], labels[:, 1:]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def jax_step(family: Family, hf_config: dict, batch: dict, dtype=jnp.float32):
  """(run one peftjax LoRA step, base parameter count, trainable parameter count); `dtype` is the compute dtype
  (the frozen base is stored in it, the adapters and optimizer state stay float32)."""
  module = importlib.import_module(f"peftjax.models.{family.module}")
  model = getattr(module, family.model_class)(getattr(module, family.config_class).from_hf(hf_config))
  params = module.init_params(model, jax.random.key(0))
  if dtype != jnp.float32:
    model = model.clone(dtype=dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
  cfg = [pj.LoraConfig(rank=RANK, alpha=2 * RANK, targets=family.targets)]
  if family.task_type == "SEQ_CLS":  # as peft's SEQ_CLS, which trains the new head in full
    cfg.append(ModulesToSaveConfig(("classifier",)))
  adapters = pj.init(cfg, jax.random.key(1), params)
  apply = pj.apply(cfg, model.apply)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  inputs = ("input_ids", "attention_mask") + (("decoder_input_ids",) if "decoder_input_ids" in batch else ())

  def loss(adapters, params, batch):
    return loss_fn(family, apply(params, adapters, *(batch[k] for k in inputs)), batch["labels"])

  run, _ = jax_adamw_step(loss, adapters, params, batch)
  return run, pj.count(params), pj.count(adapters)


def torch_step(family: Family, hf_config: dict, batch: dict, autocast: bool = False):
  """(run one HF peft LoRA step, device, base parameter count, trainable parameter count), under bf16 autocast
  when asked."""
  import peft
  import torch
  import transformers

  torch.manual_seed(0)
  model = getattr(transformers, family.model_class)(getattr(transformers, family.config_class)(**hf_config))
  n_params = sum(p.numel() for p in model.parameters())
  lora = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(family.targets), lora_dropout=0.0,
                         task_type=family.task_type, fan_in_fan_out=family.module == "gpt2")
  model = peft.get_peft_model(model, lora)
  n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  run, device = torch_adamw_step(model, batch, autocast)
  return run, device, n_params, n_trainable


TARGETS = (("jax", "torch", 1.0, "jax fp32 / torch fp32"), ("jax bf16", "torch bf16", 1.0, "jax bf16 / autocast"),
           ("jax bf16", "torch", 0.4, "jax bf16 / torch fp32"))


def print_table(rows: list, bf16: bool):
  """Per family its median ms per step and the issue's target ratios, each with met / not met."""
  columns = list(rows[0][1])
  targets = [t for t in TARGETS if t[0] in columns and t[1] in columns]
  print(f"{'family':<8}" + "".join(f"{c + ' ms':>13}" for c in columns)
        + "".join(f"{name:>28}" for *_, name in targets))
  for name, medians in rows:
    line = f"{name:<8}" + "".join(f"{medians[c] * 1e3:>13.1f}" for c in columns)
    for ours, theirs, bound, _ in targets:
      ratio = medians[ours] / medians[theirs]
      line += f"{ratio:>10.3f} <= {bound:.1f} {'met' if ratio <= bound else 'not met':>9}"
    print(line)
  print("ratios: peftjax / torch (targets: jax fp32 <= 1.0x torch fp32; jax bf16 <= 1.0x torch bf16 autocast and "
        "<= 0.4x torch fp32)" if bf16 else "ratio: peftjax / torch, fp32 (target <= 1.0)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128, help="tokens per row (T5: source tokens)")
  parser.add_argument("--target", type=int, default=32, help="T5's target tokens per row")
  parser.add_argument("--layers", type=int, default=None, help="layer count of every family (default: its own)")
  parser.add_argument("--bf16", action="store_true", help="also peftjax bf16 compute vs PEFT under bf16 autocast")
  args = parser.parse_args()
  rows = []
  for name in args.families:
    family = FAMILIES[name]
    hf_config = dict(family.hf_config)
    if args.layers is not None:
      hf_config.update({key: args.layers for key in family.layers_keys})
    positions = hf_config.get("max_position_embeddings", hf_config.get("n_positions"))
    if positions is not None and args.seq > positions:
      raise SystemExit(f"--seq={args.seq} is longer than {name}'s {positions} positions; use --seq <= {positions}.")
    batch = make_batch(family, hf_config, args.batch, args.seq, args.target)
    run_jax, n_params, n_trainable = jax_step(family, hf_config, batch)
    run_torch, device, torch_params, torch_trainable = torch_step(family, hf_config, batch)
    print(f"{name}: {family.shapes} shapes, {hf_config[family.layers_keys[0]]} layers, LoRA r={RANK} on "
          f"{','.join(family.targets)}; params {n_params:,d} (torch {torch_params:,d}), trainable {n_trainable:,d} "
          f"(peft {torch_trainable:,d})", flush=True)
    if (n_params, n_trainable) != (torch_params, torch_trainable):
      raise SystemExit(f"{name}: the parameter counts differ from the torch model's, so the step times are not "
                       "comparable.")
    steps = {"jax": run_jax, "torch": run_torch}
    if args.bf16:
      steps["jax bf16"] = jax_step(family, hf_config, batch, jnp.bfloat16)[0]
      steps["torch bf16"] = torch_step(family, hf_config, batch, autocast=True)[0]
    rows.append((name, interleaved_medians(steps, args.repeats)))
    print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in rows[-1][1].items()), flush=True)
    del run_jax, run_torch, steps  # free this family's models before building the next
  print(f"jax on {jax.devices()[0].device_kind}, torch on {device}; batch {args.batch}, seq {args.seq} (T5: source "
        f"{args.seq}, target {args.target}), one AdamW step of the adapters, median of 3x{args.repeats} steps taking "
        "turns (torch bf16: autocast)")
  print_table(rows, args.bf16)


if __name__ == "__main__":
  main()
