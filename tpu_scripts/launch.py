"""Starts `python -m train` on every worker (in the background, one log per worker), or stops it.

Every worker runs the same command; PEFTJAX_DIST_INIT=1 makes train call jax.distributed.initialize(), which
finds the other workers of the pod slice itself.  The workdir must be shared storage (a gs:// bucket): the
workers write one Orbax checkpoint together, and re-launching with the same workdir resumes from its latest
checkpoint.

  python tpu_scripts/launch.py --name peft --zone us-central2-b --config configs/lora_t5.py \\
      --workdir gs://my-bucket/peft-run -- --config.steps=2000
  python tpu_scripts/launch.py --name peft --zone us-central2-b --logs     # last lines of every worker's log
  python tpu_scripts/launch.py --name peft --zone us-central2-b --stop
"""

from __future__ import annotations

import shlex

import common


def train_command(args) -> str:
  """The shell line each worker runs: stop a previous run, then start train in the background."""
  train = ["python3", "-m", "train", "--config", args.config, f"--config.workdir={args.workdir}", *args.overrides]
  return (f"cd ~/{common.REMOTE_DIR} && {stop_command()}; "
          f"PEFTJAX_DIST_INIT=1 nohup {shlex.join(train)} > ~/{common.LOG} 2>&1 & echo $! > ~/{common.PID}")


def stop_command() -> str:
  """Kills the training process that `launch` started (by its saved process id) and waits for the TPU to be free."""
  return (f"if [ -f ~/{common.PID} ]; then kill $(cat ~/{common.PID}) 2>/dev/null; "
          f"while kill -0 $(cat ~/{common.PID}) 2>/dev/null; do sleep 1; done; rm -f ~/{common.PID}; fi")


def commands(args) -> list[list[str]]:
  if args.stop:
    return [common.ssh_all(args, stop_command())]
  if args.logs:
    return [common.ssh_all(args, f"hostname; tail -n {args.logs} ~/{common.LOG}")]
  if not args.config or not args.workdir:
    raise SystemExit("launch needs --config and --workdir (or --stop / --logs N).")
  return [common.ssh_all(args, train_command(args))]


def add_options(p) -> None:
  p.add_argument("--config", default="", help="config file, relative to the project root, e.g. configs/lora_t5.py")
  p.add_argument("--workdir", default="", help="shared run folder, e.g. gs://bucket/run (same folder = resume)")
  p.add_argument("--stop", action="store_true", help="stop the training run on every worker")
  p.add_argument("--logs", type=int, default=0, metavar="N", help="print the last N lines of every worker's log")
  p.add_argument("overrides", nargs="*", help="config overrides after --, e.g. -- --config.steps=2000")


if __name__ == "__main__":
  common.main(__doc__, commands, add_options)
