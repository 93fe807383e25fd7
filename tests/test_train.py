"""The training entry point on the real assets: end to end, resume, frozen tree, non-finite steps, config errors."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
import ml_collections
import numpy as np
import pytest

import peftjax as pj
from peftjax import checkpoint, interop
from peftjax import tree as ptree
from peftjax.models import t5

import train
from train import data, loop, steps, tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "configs" / "lora_t5.py"
TINY_SHAPE = dict(d_model=32, d_kv=8, d_ff=48, num_heads=2, num_layers=1, num_decoder_layers=1)


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """The runs below compile identical programs; a persistent cache compiles each once."""
  old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  compilation_cache.reset_cache()  # JAX decides once per process whether the cache is on
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  compilation_cache.reset_cache()


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """`config` with dotted-key overrides applied ({"optimizer.learning_rate": 1e-2})."""
  for key, value in overrides.items():
    node, *path, leaf = [config, *key.split(".")]
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def load_config(name: str, arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(arg) with dotted-key overrides."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return override(module.get_config() if arg is None else module.get_config(arg), overrides)


def tiny_config(workdir, **overrides) -> ml_collections.ConfigDict:
  """configs/lora_t5.py with a tiny model, LoRA dropout on, and a small slice of Rotten Tomatoes.

  All tests share these shapes and settings, so the compiled programs are shared through the cache.
  """
  config = load_config("lora_t5")
  config.model_shape.update(TINY_SHAPE)
  config.lora.update(dict(rank=4, dropout=0.1))
  config.update(dict(workdir=str(workdir), batch_size=8, source_length=24, target_length=3, eval_examples=16,
                     train_examples=40, steps=12, log_every=2, eval_every=0, checkpoint_every=3, keep_checkpoints=2))
  config.optimizer.update(dict(learning_rate=1e-2, warmup_steps=2, decay_steps=12))
  return override(config, overrides)


def test_end_to_end_run_trains_checkpoints_and_exports(tmp_path):
  result = train.main(tiny_config(tmp_path, export_merged=True))
  assert result["start_step"] == 0 and result["final_step"] == 12
  assert result["after"]["loss"] < result["before"]["loss"] - 0.5
  assert 0.0 <= result["after"]["exact_match"] <= 1.0
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["9", "12"]  # keep_checkpoints=2
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))

  # The exported merged model computes what the base model plus adapters computes.
  merged_model, merged_params = t5.from_pretrained(str(tmp_path / "merged"))
  model, lora_cfg, adapters, base = result["model"], result["method"], result["state"]["trainable"], result["frozen"]
  rng = np.random.default_rng(0)
  ids, decoder_ids = rng.integers(2, 1000, (2, 10)), rng.integers(2, 1000, (2, 4))
  mask = np.ones_like(ids)
  lora_logits = pj.apply(lora_cfg, model.apply)(base, adapters, ids, mask, decoder_ids)
  merged_logits = merged_model.apply({"params": merged_params}, ids, mask, decoder_ids)
  np.testing.assert_allclose(merged_logits, lora_logits, atol=1e-5, rtol=0)
  assert os.path.exists(tmp_path / "merged" / "tokenizer.json")

  # The Hugging Face PEFT adapter folder holds the trained factors.
  _, loaded = interop.load_lora_adapter(str(tmp_path / "adapter"), base)
  for path, value in ptree.flatten(adapters).items():
    np.testing.assert_array_equal(ptree.flatten(loaded)[path], value)


def test_resume_continues_the_same_run(tmp_path):
  # 40 examples / batch 8 = 5 batches per epoch: the 12 steps cross two epoch boundaries.  LoRA dropout
  # is on, so the resumed steps must also draw the same dropout masks.
  first = train.main(tiny_config(tmp_path / "resumed", steps=6))
  assert first["final_step"] == 6
  resumed = train.main(tiny_config(tmp_path / "resumed", steps=12))
  assert resumed["start_step"] == 6 and resumed["final_step"] == 12
  straight = train.main(tiny_config(tmp_path / "straight", steps=12))
  assert straight["start_step"] == 0
  for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(straight["state"])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  manager = checkpoint.manager(str(tmp_path / "resumed" / "checkpoints"))
  assert manager.latest_step() == 12
  _, position = checkpoint.restore(manager, straight["state"])
  assert position == {"epoch": 2, "index": 2}
  manager.close()


def _tiny_parts(method: str = "lora"):
  """The pieces train.main builds for tiny_config (on a one-device mesh), and one batch of its shapes."""
  config = tiny_config("unused", method=method)
  model, params, _ = loop.load_model(config)
  method_cfg, trainable, frozen = loop.trainable_and_frozen(config, model, params)
  tx, _ = steps.make_optimizer(config.optimizer, config.steps)
  frozen, state, shardings = loop.shard(config, model, params, trainable, frozen, tx, loop.make_mesh(config))
  forward = steps.make_forward(model, tasks.Seq2SeqLM, method_cfg)
  train_step = steps.make_train_step(forward, tasks.Seq2SeqLM, tx, shardings, seed=config.seed)
  grad_fn = jax.grad(lambda *args: steps.make_loss(forward, tasks.Seq2SeqLM)(*args)[0])
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.source_length)
  batch = {"input_ids": rng.integers(2, 32000, shape).astype(np.int32), "attention_mask": np.ones(shape, np.int32),
           "labels": rng.integers(2, 32000, (config.batch_size, config.target_length)).astype(np.int32)}
  return params, frozen, state, batch, train_step, grad_fn


def _computed_shapes(jaxpr) -> set[tuple[int, ...]]:
  """Shapes of every value computed anywhere in a jaxpr, sub-jaxprs included."""
  shapes = set()
  for eqn in jaxpr.eqns:
    shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          shapes |= _computed_shapes(sub)
  return shapes


def test_train_step_differentiates_only_the_adapters():
  params, frozen, state, batch, train_step, grad_fn = _tiny_parts()
  adapters = state["trainable"]
  grads = jax.eval_shape(grad_fn, adapters, frozen, batch, jax.random.key(0))
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert ptree.count(grads) == ptree.count(adapters) < ptree.count(params) // 10
  # AdamW keeps two moments per adapter leaf and a few scalar counters, nothing for the frozen tree.
  opt_leaves = jax.tree.leaves(state["opt_state"])
  assert sum(np.ndim(x) > 0 for x in opt_leaves) == 2 * len(jax.tree.leaves(adapters))
  assert ptree.nbytes(state["opt_state"]) <= 2 * ptree.nbytes(adapters) + 64

  # No value of a frozen weight's shape (a weight gradient) is computed anywhere in the compiled step.
  frozen_shapes = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim == 2}
  computed = _computed_shapes(jax.make_jaxpr(train_step)(state, frozen, batch).jaxpr)
  assert not frozen_shapes & computed
  # Control: full fine-tuning does compute them.
  _, full_frozen, full_state, _, full_step, _ = _tiny_parts(method="full")
  assert frozen_shapes <= _computed_shapes(jax.make_jaxpr(full_step)(full_state, full_frozen, batch).jaxpr)


def test_non_finite_loss_leaves_the_state_unchanged(tmp_path):
  params, frozen, state, batch, train_step, _ = _tiny_parts()
  state, metrics = train_step(state, frozen, batch)  # one good step: moments are non-zero
  assert int(metrics["skipped"]) == 0
  before = jax.tree.map(np.array, state)
  poisoned = jax.tree.map(lambda x: x, frozen)
  poisoned["lm_head"]["kernel"] = poisoned["lm_head"]["kernel"].at[0, 0].set(jnp.nan)
  after, metrics = train_step(state, poisoned, batch)
  assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 1
  assert int(after["step"]) == int(before["step"]) + 1
  for a, b in zip(jax.tree.leaves(after["trainable"]) + jax.tree.leaves(after["opt_state"]),
                  jax.tree.leaves(before["trainable"]) + jax.tree.leaves(before["opt_state"])):
    np.testing.assert_array_equal(a, b)

  # Checkpoints refuse NaN: the last good one stays the latest.
  manager = checkpoint.manager(str(tmp_path / "ckpt"), max_to_keep=2)
  checkpoint.save(manager, 1, after, {"epoch": 0, "index": 1})
  bad = {**after, "trainable": jax.tree.map(lambda x: x * jnp.nan, after["trainable"])}
  with pytest.raises(ValueError, match="NaN or inf"):
    checkpoint.save(manager, 2, bad)
  manager.wait_until_finished()
  assert manager.all_steps() == [1]
  restored, position = checkpoint.restore(manager, after)
  assert position == {"epoch": 0, "index": 1} and checkpoint.all_finite(restored)
  manager.close()
  checkpoint.save_adapters(str(tmp_path / "adapters"), after["trainable"])
  for a, b in zip(jax.tree.leaves(checkpoint.load_adapters(str(tmp_path / "adapters"), after["trainable"])),
                  jax.tree.leaves(after["trainable"])):
    np.testing.assert_array_equal(a, b)


def test_bad_config_values_give_one_clear_sentence(tmp_path):
  valid_tasks = r"valid: \['bbc_headlines', 'rotten_tomatoes'\]"
  with pytest.raises(ValueError, match=r"config\.task='imdb' is not a known task for a seq2seq_lm model; "
                                       + valid_tasks):
    train.main(tiny_config(tmp_path, task="imdb"))
  with pytest.raises(ValueError, match=r"config\.optimizer\.decay='step' .* valid: \['cosine', 'linear'\]"):
    train.main(tiny_config(tmp_path, **{"optimizer.decay": "step"}))
  with pytest.raises(ValueError, match=r"config\.batch_size=0 must be a positive integer"):
    train.main(tiny_config(tmp_path, batch_size=0))
  with pytest.raises(ValueError, match=r"eval_examples=9000 must be between 1 and 8529"):
    data.split(data.load_task("seq2seq_lm", "rotten_tomatoes"), 9000)
  # On the command line, an unknown key names the valid ones (and nothing is trained).
  run = subprocess.run([sys.executable, "-m", "train", "--config", str(CONFIG_FILE), "--config.lora.rnk=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert run.returncode != 0
  assert "config.lora has no key 'rnk'; valid keys: ['alpha', 'dropout', 'rank', 'targets']" in run.stderr


def test_data_order_resumes_mid_epoch():
  straight = data.batch_indices(10, 3, seed=5)
  seen = [next(straight) for _ in range(7)]  # 3 batches per epoch
  _, position = seen[3]
  resumed = data.batch_indices(10, 3, seed=5, **position)
  for chosen, _ in seen[4:]:
    np.testing.assert_array_equal(next(resumed)[0], chosen)
  assert [p for _, p in seen][:4] == [{"epoch": 0, "index": 1}, {"epoch": 0, "index": 2}, {"epoch": 0, "index": 3},
                                      {"epoch": 1, "index": 1}]
