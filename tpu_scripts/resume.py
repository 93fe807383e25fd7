"""Resumes a run after preemption: recreates the TPU if it is gone or preempted, sets it up, launches again.

The relaunch uses the same --workdir, so train continues from the latest checkpoint there.  When the TPU is
still healthy only the launch is repeated.  Takes the options of create.py, setup.py and launch.py.

  python tpu_scripts/resume.py --name peft --zone us-central2-b --accelerator-type v4-32 --spot \\
      --config configs/lora_t5.py --workdir gs://my-bucket/peft-run
"""

from __future__ import annotations

import shlex
import subprocess
import time

import common
import create
import delete
import launch
import setup

HEALTHY = {False: "READY", True: "ACTIVE"}  # tpu-vm state / queued-resource state when usable


def describe(args) -> list[str]:
  """gcloud command printing the TPU's state (READY, PREEMPTED, ...) or its queued resource's (ACTIVE, ...)."""
  kind, field = (["queued-resources"], "state.state") if args.queued else (["tpu-vm"], "state")
  return ["gcloud", "compute", "tpus", *kind, "describe", args.name, *common.scope(args), f"--format=value({field})"]


def state(args) -> str:
  done = subprocess.run(describe(args), capture_output=True, text=True)
  return done.stdout.strip() if done.returncode == 0 else "NOT_FOUND"


def wait_until_healthy(args, poll_s: int = 30) -> None:
  while (current := state(args)) != HEALTHY[args.queued]:
    print(f"TPU {args.name} is {current}; waiting for {HEALTHY[args.queued]}", flush=True)
    time.sleep(poll_s)


def main(args) -> None:
  relaunch = [launch.commands(args)[0]]
  recreate = delete.commands(args) + create.commands(args)
  if args.dry_run:
    print(shlex.join(describe(args)))
    print(f"# if the state is not {HEALTHY[args.queued]} (preempted or gone):")
    common.run(recreate, dry_run=True)
    print(f"# wait until the state is {HEALTHY[args.queued]}, then:")
    common.run(setup.commands(args), dry_run=True)
    common.run(relaunch, dry_run=True)
    return
  current = state(args)
  if current != HEALTHY[args.queued]:
    print(f"TPU {args.name} is {current}: recreating it", flush=True)
    if current != "NOT_FOUND":
      common.run(delete.commands(args), dry_run=False)
    common.run(create.commands(args), dry_run=False)
    wait_until_healthy(args)
    common.run(setup.commands(args), dry_run=False)
  common.run(relaunch, dry_run=False)


if __name__ == "__main__":
  parser = common.parser(__doc__)
  create.add_options(parser)
  setup.add_options(parser)
  launch.add_options(parser)
  main(parser.parse_args())
