"""`main(config)`: fine-tune a model of any family (T5, BERT/RoBERTa, GPT-2, Llama) with any method, resumably.

config.family picks the model module and its task adapter (`train.tasks`: sequence-to-sequence LM,
sequence classification, causal LM; config.task_type="sequence_classification" gives GPT-2 / Llama a classifier
head); config.method picks the method (`train.methods`).

workdir layout: run.json (the run's settings, label names and finished step: `train.run_record`),
checkpoints/<step>/ (Orbax: train state + data position), tensorboard/ (event files), merged/ (the model with the
method folded in + tokenizer, a Hugging Face folder, written when config.export_merged is on or for full
fine-tuning; not for bottleneck adapters and prompt / prefix methods, which do not fold into the weights;
`python -m train.merge` writes it later), adapter/ (a Hugging Face PEFT folder, modules_to_save included, for every
method PEFT has: LoRA, DoRA, AdaLoRA, IA3 and the prompt family; an Orbax tree of the trained leaves for the
others) and, for a randomly initialised model, base/ (the frozen base the adapter applies to).

Scale (config.scale): the same run goes from one CPU to a TPU pod.  `main` first joins a multi-process job
when asked (`peftjax.distributed.initialize`), builds the (data, fsdp, tensor) device mesh, places the
frozen weights (optionally in bfloat16) and the train state sharded by the logical-axis rules, feeds each
process only its rows of every batch, and accumulates gradients over micro-batches.  Checkpoints are
written by every process together (Orbax); TensorBoard and the exported files by process 0.  The workdir
may be a gs:// path: checkpoints go there directly, exports are written locally and copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorboardX
import tqdm
import transformers
from etils import epath

import peftjax as pj
from peftjax import assets, checkpoint, distributed, interop, quant, sharding
from peftjax.models import gguf, hf_io

from train import data_files, divergence, methods, packing, preemption, quantize, run_record, steps, tasks, validate

RANDOM_MODELS = ("", "random")
ASSET = "asset:"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.scale settings and their defaults (a config file without a scale section runs on every device, FSDP).
SCALE_DEFAULTS = dict(
    mesh_shape=(1, -1, 1),       # devices per mesh axis (data, fsdp, tensor); -1 takes the rest: FSDP over all
    logical_axis_rules=(),       # ((logical axis, mesh axis / tuple of them / None), ...); (): DEFAULT_RULES
    micro_batches=1,             # gradient accumulation: batch_size splits into this many parts per update
    frozen_dtype="float32",      # or "bfloat16": frozen base weights stored in bf16 (adapters stay float32)
    remat=False,                 # recompute each layer's activations in the backward pass (less memory)
    # Multi-process jobs (or the env vars PEFTJAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID; on a TPU pod
    # PEFTJAX_DIST_INIT=1 finds the peers itself): "host:port" of process 0, process count, this process.
    coordinator_address="", num_processes=0, process_id=-1)


def resolve(spec: str) -> str:
  """A model or tokenizer location: "asset:<package>/<path>" (a file inside an asset package), a local path, or a
  hub id (downloaded when online)."""
  if spec.startswith(ASSET):
    package, _, relative = spec[len(ASSET):].partition("/")
    return assets.asset_path(package, *filter(None, relative.split("/")))
  return spec if os.path.exists(spec) else hf_io.resolve(spec)


def base_model_name(spec: str) -> str:
  """What an adapter names as its base model (base_model_name_or_path), resolvable on another machine: the hub id
  an asset model came from (else the "asset:" spec itself), or the path / hub id as the user gave it."""
  if spec.startswith(ASSET):
    package, _, relative = spec[len(ASSET):].partition("/")
    return assets.hub_id(package, relative) or spec
  return spec


def scale_config(**overrides) -> ml_collections.ConfigDict:
  """A config.scale section: SCALE_DEFAULTS (documented there) with `overrides`."""
  return ml_collections.ConfigDict({**SCALE_DEFAULTS, **overrides})


def scale_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.scale with SCALE_DEFAULTS for the keys it leaves out."""
  return ml_collections.ConfigDict({**SCALE_DEFAULTS, **config.get("scale", ml_collections.ConfigDict()).to_dict()})


def make_mesh(config: ml_collections.ConfigDict):
  """The (data, fsdp, tensor) mesh of config.scale.mesh_shape over every device of the job; its batch must split."""
  scale = scale_settings(config)
  try:
    mesh = sharding.make_mesh(tuple(scale.mesh_shape))
  except ValueError as e:
    raise ValueError(f"config.scale.mesh_shape does not fit this job: {e}") from e
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % (scale.micro_batches * batch_devices):
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of config.scale.micro_batches="
                     f"{scale.micro_batches} times the mesh's data x fsdp size {batch_devices} (mesh "
                     f"{dict(mesh.shape)}); change one of batch_size, micro_batches or config.scale.mesh_shape.")
  return mesh


def load_tokenizer(path: str):
  """A transformers tokenizer from a folder / hub id, or the one stored in a GGUF file."""
  if path.endswith(".gguf"):
    return gguf.load_tokenizer(path)
  return transformers.AutoTokenizer.from_pretrained(path)


def load_model(config: ml_collections.ConfigDict, num_labels: int = 2):
  """(model, params, tokenizer): from a checkpoint (folder, GGUF file, hub id or asset), or a random model.

  The tokenizer is config.tokenizer, else the checkpoint's own, else the family's default.
  """
  family = tasks.family(config)
  if config.model in RANDOM_MODELS:
    model = family.random_model(config.model_shape.to_dict(), num_labels)
    params = family.module.init_params(model, jax.random.fold_in(jax.random.key(config.seed), 0))
    path = None
  else:
    path = resolve(config.model)
    model, params = family.pretrained(path, num_labels, jax.random.fold_in(jax.random.key(config.seed), 0))
  model = model.clone(dtype=DTYPES[config.compute_dtype])
  if scale_settings(config).remat:
    model = sharding.with_remat(model)
  own = validate.own_tokenizer(path)
  if not (config.tokenizer or own or family.default_tokenizer):
    raise ValueError(f"config.tokenizer is empty and the {config.family} model has no tokenizer of its own; "
                     "name a tokenizer folder or hub id.")
  tokenizer_path = resolve(config.tokenizer) if config.tokenizer else own or resolve(family.default_tokenizer)
  tokenizer = load_tokenizer(tokenizer_path)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  model = family.with_pad_token(model, tokenizer.pad_token_id)
  if len(tokenizer) > model.config.vocab_size:
    raise ValueError(f"the tokenizer at {tokenizer_path!r} has {len(tokenizer)} tokens but the model's vocab_size is "
                     f"{model.config.vocab_size}; use its own tokenizer or a larger config.model_shape.vocab_size.")
  return model, params, tokenizer


def trainable_and_frozen(config: ml_collections.ConfigDict, model, params: dict, tokenizer=None):
  """(method config(s) or None, trainable tree, frozen tree): new adapter leaves over frozen params, or all params.

  `tokenizer` (its folder or hub id) is what prompt tuning's "text" init tokenises config.prompt.init_text with.
  """
  method_cfg = methods.method_config(config, getattr(model.config, "model_type", config.family),
                                     getattr(tokenizer, "name_or_path", ""))
  if method_cfg is None:
    return None, params, {}
  return method_cfg, pj.init(method_cfg, jax.random.fold_in(jax.random.key(config.seed), 1), params), params


def shard(config: ml_collections.ConfigDict, model, params, trainable, frozen, tx, mesh, method_state=None):
  """(frozen, step-0 train state, shardings) placed on `mesh`; shardings is {'state', 'frozen'}.

  The parameters' shardings come from the model's logical axes and config.scale.logical_axis_rules (default
  `peftjax.sharding.DEFAULT_RULES`); adapters and their optimizer moments follow the weights they adapt;
  'method_state' (a method's own state, default empty) is replicated.  The frozen tree is stored in
  config.scale.frozen_dtype.  A restored state takes the same shardings, so both compile the same step.
  """
  scale = scale_settings(config)
  rules = tuple(tuple(r) for r in scale.logical_axis_rules) or sharding.DEFAULT_RULES
  params_shardings = sharding.param_shardings(sharding.model_logical_axes(model), params, mesh, rules)
  method_state = {} if method_state is None else method_state
  state_shardings = {**sharding.state_shardings(tx, trainable, sharding.adapter_shardings(trainable, params_shardings)),
                     "method_state": jax.tree.map(lambda _: sharding.replicated(mesh), method_state)}
  state = {"step": np.int32(0), "trainable": trainable, "opt_state": tx.init(trainable), "method_state": method_state}
  frozen_shardings = params_shardings if frozen else {}
  frozen = sharding.place(sharding.cast_floating(frozen, DTYPES[scale.frozen_dtype]), frozen_shardings)
  return frozen, sharding.place(state, state_shardings), {"state": state_shardings, "frozen": frozen_shardings}


def _host(tree):
  return jax.tree.map(distributed.to_host, tree)


def _remote(path: str) -> bool:
  return "://" in path


@contextlib.contextmanager
def output_folder(workdir: str, name: str):
  """A local path for workdir/name: that folder itself, or for a remote workdir (gs://...) a temporary local one
  whose files process 0 copies there afterwards."""
  if not _remote(workdir):
    yield os.path.join(workdir, name)
    return
  with tempfile.TemporaryDirectory() as local:
    yield os.path.join(local, name)
    if jax.process_index() == 0:
      for file in epath.Path(local).rglob("*"):
        if file.is_file():
          target = epath.Path(workdir) / file.relative_to(local)
          target.parent.mkdir(parents=True, exist_ok=True)
          target.write_bytes(file.read_bytes())


def _log(writer, prefix: str, step: int, values: dict) -> None:
  if writer is None:  # not process 0
    return
  for name, value in values.items():
    writer.add_scalar(f"{prefix}/{name}", value, step)
  writer.flush()


def _train_summary(metrics: list[dict], learning_rate: float, seconds: float) -> dict:
  """Mean loss (of the applied steps) and gradient norm, the last step's learning rate, skipped steps, speed."""
  applied = [m["loss"] for m in metrics if not m["skipped"]]
  return {"loss": float(np.mean(applied)) if applied else float("nan"),
          "grad_norm": float(np.mean([m["grad_norm"] for m in metrics])),
          "learning_rate": learning_rate,
          "skipped": int(sum(m["skipped"] for m in metrics)),
          "steps_per_second": len(metrics) / seconds}


def export(workdir: str, model, frozen, trainable, method_cfg, tokenizer, config, frozen_shardings,
           method_state=None) -> list[str]:
  """Writes, for a method with adapters, workdir/adapter (+ workdir/base for a random model) and, when
  config.export_merged is on (always for full fine-tuning), workdir/merged (+ tokenizer); returns the folder names
  written.  The adapter is a Hugging Face PEFT folder for every method PEFT has (with AdaLoRA's rank pattern from
  `method_state`), else an Orbax tree of the trained leaves.  A method that cannot be folded into the weights
  (bottleneck adapters, prompts) gets no merged folder.  Every process takes part in gathering the sharded trees;
  process 0 writes the files."""
  family = tasks.family(config)
  writer = jax.process_index() == 0
  written = []
  if method_cfg is not None:
    written.append("adapter")
    base_name = base_model_name(config.model)
    if config.model in RANDOM_MODELS:
      base_name = f"{workdir}/base"
      written.append("base")
      with output_folder(workdir, "base") as folder:
        distributed.export_merged(family.module.save_pretrained, model, quant.dequantize_tree(frozen), folder)
        if writer:
          tokenizer.save_pretrained(folder)
    try:  # every process gathers the trees and decides alike
      files = interop.adapter_files(method_cfg, _host(trainable), base_name, family.task.peft_task_type,
                                    _host(method_state) or None)
    except interop.NoPeftFormatError as e:  # Orbax: every process writes its shards (to a gs:// workdir too)
      if writer:
        print(f"{workdir}/adapter is an Orbax tree (checkpoint.load_adapters reads it): {e}")
      checkpoint.save_adapters(f"{workdir}/adapter", trainable)
    else:
      with output_folder(workdir, "adapter") as folder:
        if writer:
          interop.write_folder(folder, *files)
  if method_cfg is not None and not config.get("export_merged", False):
    if writer and methods.mergeable(method_cfg):
      print(f"no {workdir}/merged (config.export_merged is off); `python -m train.merge --workdir {workdir} "
            "--output DIR` writes the merged model")
    return written
  if not methods.mergeable(method_cfg):
    if writer:
      print(f"config.method={config.method!r} cannot be folded into the weights, so there is no {workdir}/merged; "
            f"run {base_name} with {workdir}/adapter.")
    return written
  if quantize.quant_config(config) is not None:
    merged = quantize.merged_for_export(config, method_cfg, frozen, trainable)
  else:
    merged = trainable if method_cfg is None else sharding.merge(method_cfg, frozen, trainable, frozen_shardings)
  with output_folder(workdir, "merged") as folder:
    distributed.export_merged(family.module.save_pretrained, model, merged, folder)
    if writer:
      tokenizer.save_pretrained(folder)
  return ["merged", *written]


def _metrics_line(step: int, metrics: dict) -> str:
  return f"step {step}: " + ", ".join(f"eval {name.replace('_', ' ')} {value:.4f}" for name, value in metrics.items())


def main(config: ml_collections.ConfigDict, allow_config_change: bool = False) -> dict:
  """Trains, evaluates before/after, checkpoints, exports; returns a summary with the final train state.

  A workdir holding a run of other settings is refused unless `allow_config_change`; a finished run rerun with
  no more steps returns {'finished': True, ...} and rewrites nothing (`train.run_record`).  A config with a
  config.sweep section trains its members together instead (`train.sweep_run`), one with config.multitask one
  adapter per task (`train.multitask_run`).
  """
  if "multitask" in config:
    from train import multitask_run  # it builds on this module
    return multitask_run.main(config, allow_config_change)
  if "sweep" in config:
    from train import sweep_run  # it builds on this module
    return sweep_run.main(config, allow_config_change)
  validate.check(config)
  scale = scale_settings(config)
  distributed.initialize(scale.coordinator_address, scale.num_processes, scale.process_id)  # before any JAX call
  mesh = make_mesh(config)
  workdir = config.workdir if _remote(config.workdir) else os.path.abspath(config.workdir)
  finished = run_record.check_rerun(config, workdir, allow_config_change)
  if finished is not None:
    print(f"the run in {workdir} finished at step {finished} and wrote its files there; nothing was rewritten "
          "(raise config.steps to train on).")
    return {"start_step": finished, "final_step": finished, "finished": True, "workdir": workdir, "config": config}
  task = tasks.family(config).task
  loaded = data_files.load(config, task.kind, workdir)
  train_set, held_out = loaded.train, loaded.held_out
  num_labels = loaded.num_labels() if task is tasks.SequenceClassification else 0
  model, params, tokenizer = load_model(config, num_labels)
  if loaded.label_names and hasattr(model.config, "id2label"):  # the exported config.json names the labels
    model = model.clone(config=dataclasses.replace(model.config, id2label=tuple(loaded.label_names)))
  train_data = task.tokenize(tokenizer, train_set, config)
  eval_data = task.tokenize(tokenizer, held_out, config)
  print(f"task {config.task}: {len(train_set)} training and {len(held_out)} held-out examples")

  method_cfg, trainable, frozen = trainable_and_frozen(config, model, params, tokenizer)
  trainable_line = pj.print_trainable_parameters(trainable, frozen)
  tx, schedule = steps.make_optimizer(config.optimizer, config.steps)
  hooks = methods.training_hooks(method_cfg, trainable)
  frozen, state, shardings = shard(config, model, params, trainable, frozen, tx, mesh, hooks.get("method_state"))
  del params, trainable  # the placed copies are used from here on
  frozen, shardings["frozen"] = quantize.quantize_frozen(config, frozen, shardings["frozen"])
  print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices in {jax.process_count()} process(es); "
        f"{scale.micro_batches} micro-batch(es) per step")
  forward = steps.make_forward(model, task, method_cfg,
                               quant.wrap(model.apply) if quantize.quant_config(config) is not None else None)
  train_step = steps.make_train_step(forward, task, tx, shardings, micro_batches=scale.micro_batches,
                                     seed=config.seed, extra_loss=hooks.get("extra_loss"),
                                     post_update=hooks.get("post_update"))
  batch_sharding = sharding.batch_sharding(mesh)
  put_batch = lambda rows: distributed.load_local(rows, np.arange(config.batch_size), batch_sharding)  # noqa: E731
  exact_match = (steps.make_exact_match(model, method_cfg, tokenizer, config.target_length)
                 if task is tasks.Seq2SeqLM else None)
  evaluate = steps.make_evaluate(forward, task, config.batch_size, put_batch, exact_match)
  position = {"epoch": 0, "index": 0}

  if jax.process_index() == 0:
    run_record.write(workdir, config, loaded.label_names, num_labels)  # creates the workdir
  manager = checkpoint.manager(f"{workdir}/checkpoints", max_to_keep=config.keep_checkpoints)
  restored = checkpoint.restore(manager, sharding.abstract(state, shardings["state"]))  # newest intact step
  if restored is not None:
    state, position = restored
  start_step = int(distributed.to_host(state["step"]))
  if start_step:
    print(f"resuming from step {start_step} (epoch {position['epoch']}, batch {position['index']}) in {workdir}")

  writer = tensorboardX.SummaryWriter(f"{workdir}/tensorboard") if jax.process_index() == 0 else None
  before = evaluate(state["trainable"], frozen, eval_data)
  print(_metrics_line(start_step, before))
  _log(writer, "eval", start_step, before)

  batches = packing.training_batches(config, task, train_data, position["epoch"], position["index"])
  pending, start_time, batch = [], time.perf_counter(), None
  last_log = start_time
  progress = tqdm.tqdm(total=config.steps, initial=min(start_step, config.steps), desc="train", unit="step")
  guard = divergence.Guard(config)
  with contextlib.closing(manager), preemption.Signals() as signals:
    for step in range(start_step + 1, config.steps + 1):
      rows, chosen, position = next(batches)
      batch = distributed.load_local(rows, chosen, batch_sharding)
      state, metrics = train_step(state, frozen, batch)
      if skipped := guard.observe(step, metrics):
        progress.write(skipped)
      pending.append(metrics)
      progress.update(1)
      if step % config.log_every == 0 or step == config.steps:
        now = time.perf_counter()
        summary = _train_summary(_host(pending), float(schedule(step - 1)), now - last_log)
        pending, last_log = [], now
        progress.set_postfix(loss=f"{summary['loss']:.4f}", lr=f"{summary['learning_rate']:.2e}")
        _log(writer, "train", step, summary)
      if config.eval_every and step % config.eval_every == 0 and step != config.steps:
        metrics = evaluate(state["trainable"], frozen, eval_data)
        progress.write(_metrics_line(step, metrics))
        _log(writer, "eval", step, metrics)
      if step % config.checkpoint_every == 0 or step == config.steps:
        checkpoint.save(manager, step, state, position)
      if signum := signals.received():
        progress.close()
        preemption.save_and_exit(manager, step, state, position, signum)
  progress.close()
  train_seconds = time.perf_counter() - start_time

  final_step = int(distributed.to_host(state["step"]))
  after = evaluate(state["trainable"], frozen, eval_data)
  print(_metrics_line(final_step, after))
  _log(writer, "eval", final_step, after)
  if writer is not None:
    writer.close()
  if config.method == "adalora":
    print(f"AdaLoRA keeps {methods.kept_ranks(state['method_state'])} singular values")
  written = export(workdir, model, frozen, state["trainable"], method_cfg, tokenizer, config, shardings["frozen"],
                   state["method_state"])
  print("wrote " + " and ".join(f"{workdir}/{name}" for name in written))
  if jax.process_index() == 0:
    run_record.write(workdir, config, loaded.label_names, num_labels, final_step)
  return {"start_step": start_step, "final_step": final_step, "before": before, "after": after,
          "trainable_parameters": trainable_line, "train_seconds": train_seconds, "state": state,
          "frozen": frozen, "model": model, "method": method_cfg, "config": config, "workdir": workdir,
          "mesh": mesh, "train_step": train_step, "last_batch": batch, "tokenizer": tokenizer}
