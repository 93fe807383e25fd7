"""Shared pieces of the TPU scripts: the command-line options every script takes and running gcloud commands.

Every script builds its gcloud commands as argument lists first; `--dry-run` prints them (one shell line each)
instead of running them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

REMOTE_DIR = "peftjax"            # the project folder in each worker's home directory
LOG = "peftjax-train.log"         # each worker's training log, in its home directory
PID = "peftjax-train.pid"         # the training process id, for `stop`


def parser(description: str) -> argparse.ArgumentParser:
  """An argparse parser with the options every TPU script shares."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--name", required=True, help="TPU VM name (also the queued resource name with --queued)")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4) or us-west4-a (v5e)")
  p.add_argument("--project", default="", help="Google Cloud project (default: gcloud's configured project)")
  p.add_argument("--queued", action="store_true", help="the TPU is (or should be) a queued resource")
  p.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead of running them")
  return p


def scope(args: argparse.Namespace) -> list[str]:
  """--zone (and --project) flags for a gcloud command."""
  return ["--zone", args.zone] + (["--project", args.project] if args.project else [])


def ssh_all(args: argparse.Namespace, command: str) -> list[str]:
  """gcloud command that runs a shell `command` on every worker of the TPU VM."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *scope(args), "--worker=all", "--command", command]


def run(commands: list[list[str]], dry_run: bool) -> None:
  """Runs the commands in order (stopping at the first failure), or prints them with dry_run."""
  for command in commands:
    print(shlex.join(command), flush=True)
    if not dry_run:
      done = subprocess.run(command)
      if done.returncode:
        sys.exit(f"command failed with exit status {done.returncode}: {shlex.join(command)}")


def main(doc: str, commands, *option_adders) -> None:
  """A script's entry point: parse the shared options plus those `option_adders` add, run `commands(args)`."""
  p = parser(doc)
  for add in option_adders:
    add(p)
  args = p.parse_args()
  run(commands(args), args.dry_run)
