"""`python -m train.compare --config configs/compare_bert_sentiment.py`: every method on one model, data, step budget
and seeds, and a table and a picture of what each costs and gives.

config.compare (checked by `train.validate.check_compare`) holds the methods (names separated by commas; "": every
method peftjax has that fits the model, plus full fine-tuning), the seeds, per-method learning rates, and for a causal
LM a second held-out text for forgetting.  Each method and seed is one `python -m train` run (`train.main`, in its own
process started by `train.compare_run`, so that its peak RSS is its own) in config.workdir/<method>/seed_<seed>/;
config.workdir gets comparison.md, .csv, .json and .png (`train.compare_report`).  Rerunning the command skips the
runs whose run.json says finished and whose measurements are written; a method whose settings do not fit the model
(e.g. BitFit on a model without biases) or whose run fails gets its one-sentence error in its row, and the others go on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import ml_collections
import tqdm
from absl import app
from ml_collections import config_flags

from train import cli, compare_report, compare_run, methods, run_record, tasks, validate

FORGETTING_NOTE = {
    "causal_lm": "forgetting: the change of the held-out LM loss on {task} (not trained on) from the base model's; "
                 "positive is worse.",
    "other": "forgetting does not apply: the classifier head (or the text-to-text target) is new, so the base model "
             "has no score on this task to lose, and the base's own skill (its pre-training objective) has no head "
             "in the fine-tuned model to measure it with."}


def run_config(config: ml_collections.ConfigDict, method: str, seed: int) -> ml_collections.ConfigDict:
  """The `python -m train` config of one method and seed: config without its compare section, that method's learning
  rate (config.compare.learning_rates, else config.optimizer's), its own workdir, no merged export."""
  run = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items() if k != "compare"})
  run.method, run.seed = method, seed
  if method in config.compare.learning_rates:
    run.optimizer.learning_rate = config.compare.learning_rates[method]
  run.workdir = os.path.join(os.path.abspath(config.workdir), method, f"seed_{seed}")
  run.export_merged = False
  return run


def method_list(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(methods to run, notes on the methods left out): config.compare.methods, or every method that fits."""
  names = [n for n in config.compare.methods.split(",") if n]
  if names:
    return names, []
  fits, notes = [], []
  for name in methods.METHODS:
    try:
      validate.check(run_config(config, name, config.compare.seeds[0]))
      fits.append(name)
    except ValueError as e:
      notes.append(f"left out (does not fit this model): {name}: {e}")
  return fits, notes


def _error_line(log: str, returncode: int) -> str:
  """The run's one-sentence error: its `error: ...` line, else the last line of its log."""
  lines = [line.strip() for line in open(log, errors="replace").read().splitlines() if line.strip()]
  errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
  if errors:
    return errors[-1]
  return f"the run stopped with exit status {returncode} ({lines[-1] if lines else 'no output'}); see {log}."


def _wait(process: subprocess.Popen) -> int:
  """The run's exit status.  Ctrl-C reaches the run too (one process group) and a SIGTERM sent to this process is
  passed on: the run saves its step and exits (`train.preemption`), then KeyboardInterrupt stops the comparison."""
  stopped = []

  def forward(signum, frame):
    stopped.append(signum)
    process.send_signal(signum)
  previous = signal.signal(signal.SIGTERM, forward)
  try:
    returncode = process.wait()
  except KeyboardInterrupt:
    process.wait()
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
  if stopped:
    raise KeyboardInterrupt
  return returncode


def run_one(spec: dict, progress) -> dict | str:
  """Runs `spec` (see `train.compare_run`) in a new process, its output into <workdir>/compare.log; its record, or
  its error sentence."""
  workdir = spec["config"]["workdir"]
  os.makedirs(workdir, exist_ok=True)
  spec_path, log = os.path.join(workdir, "compare_spec.json"), os.path.join(workdir, "compare.log")
  compare_run.write_json(spec_path, spec)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
  with open(log, "w") as out:
    process = subprocess.Popen([sys.executable, "-m", "train.compare_run", spec_path], stdout=out,
                               stderr=subprocess.STDOUT, env=env)
    returncode = _wait(process)
  if returncode:
    error = _error_line(log, returncode)
    progress.write(f"  failed: {error}")
    return error
  with open(os.path.join(workdir, compare_run.RESULT)) as f:
    return json.load(f)


def _finished(config: ml_collections.ConfigDict) -> dict | None:
  """The stored record of a run whose run.json says finished with these settings, else None (a finished run
  without its record is removed, to be rerun)."""
  path = os.path.join(config.workdir, compare_run.RESULT)
  if run_record.check_rerun(config, config.workdir) is None:
    return None
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  shutil.rmtree(config.workdir)
  return None


def run_seeds(config: ml_collections.ConfigDict, method: str, spec: dict, progress) -> list:
  """One method's runs over config.compare.seeds, one after another: each seed's record, or its error sentence.

  Not one sweep step (`train.sweep_run`): a comparison seed sets everything random (data order, head, dropout), while
  sweep members share the data order and train without dropout, so a sweep would measure another method's spread."""
  outcome = []
  for index, seed in enumerate(config.compare.seeds):
    run = run_config(config, method, seed)
    progress.set_description(f"{method} seed {seed}")
    try:
      validate.check(run)
      stored = _finished(run)
    except ValueError as e:
      progress.write(f"{method} seed {seed}: {e}")
      outcome.append(str(e))
      progress.update(1)
      continue
    if stored is not None:
      progress.write(f"{method} seed {seed}: finished before, not rerun ({run.workdir})")
      outcome.append(stored)
    else:
      progress.write(f"{method} seed {seed}: running ({run.workdir}/compare.log)")
      outcome.append(run_one({**spec, "config": run.to_dict(), "profile": index == 0}, progress))
    progress.update(1)
  return outcome


def run_base(config: ml_collections.ConfigDict, spec: dict, progress) -> dict | None:
  """The base model's record (held-out metrics, forgetting loss), computed once into config.workdir/base."""
  run = run_config(config, "full", config.compare.seeds[0])
  run.workdir = os.path.join(os.path.abspath(config.workdir), "base")
  path = os.path.join(run.workdir, compare_run.RESULT)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored.get("config") == json.loads(json.dumps(run.to_dict())):
      return stored
  progress.set_description("base model")
  record = run_one({**spec, "mode": "base", "config": run.to_dict()}, progress)
  if isinstance(record, str):
    return None
  record["config"] = json.loads(json.dumps(run.to_dict()))
  compare_run.write_json(path, record)
  return record


def settings(config: ml_collections.ConfigDict) -> dict:
  """What every method shared, for the table's heading."""
  return {"model": config.model, "family": config.family, "task": config.task, "steps": config.steps,
          "batch_size": config.batch_size, "max_length": config.get("max_length"),
          "seeds": list(config.compare.seeds), "forgetting_task": config.compare.forgetting_task}


def main(config: ml_collections.ConfigDict) -> list[dict]:
  """Runs the comparison (see the module docstring) and returns the table's rows."""
  validate.check_compare(config)
  validate.check_workdir(config.workdir)
  workdir = os.path.abspath(config.workdir)
  names, notes = method_list(config)
  compare = config.compare
  forgetting = {"task": compare.forgetting_task, "examples": compare.forgetting_examples} \
      if compare.forgetting_task else None
  spec = {"mode": "train", "forgetting": forgetting, "latency_repeats": compare.latency_repeats}
  os.makedirs(workdir, exist_ok=True)
  progress = tqdm.tqdm(total=len(names) * len(compare.seeds), desc="compare", unit="run")
  base = run_base(config, spec, progress) if forgetting else None
  outcomes = {name: run_seeds(config, name, spec, progress) for name in names}
  progress.close()
  kind = tasks.family(config).task.kind
  notes.append(FORGETTING_NOTE["causal_lm" if kind == "causal_lm" else "other"].format(task=compare.forgetting_task))
  if kind == "causal_lm" and not forgetting:
    notes[-1] = "forgetting was not measured: config.compare.forgetting_task is empty."
  notes.append("compiled memory and latency are measured on each method's first seed; latency is one forward of a "
               "training batch; tokens/s counts the padded positions of a batch at the median logged step rate.")
  rows = compare_report.write(workdir, outcomes, base, settings(config), notes)
  print(compare_report.markdown(rows, compare_report.metric_name(
      [r for o in outcomes.values() for r in o if isinstance(r, dict)])[0], settings(config), notes))
  print("wrote " + ", ".join(os.path.join(workdir, f) for f in compare_report.FILES))
  return rows


def _main(argv: list[str]) -> None:
  cli.start(argv)
  try:
    main(_CONFIG.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    sys.exit("interrupted: the same command resumes (finished runs are kept, the interrupted one resumes from its "
             "newest checkpoint).")


if __name__ == "__main__":  # the flag only for the command (train/__main__.py defines its own --config)
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "a comparison config, e.g. configs/compare_bert_sentiment.py.", lock_config=True)
  app.run(_main, flags_parser=cli.parse_flags)
