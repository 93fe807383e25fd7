"""Installs this project on every worker: a tarball of the git-tracked files, then pip install with jax[tpu].

  python tpu_scripts/setup.py --name peft --zone us-central2-b
"""

from __future__ import annotations

import os

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = "/tmp/peftjax.tar.gz"


def commands(args) -> list[list[str]]:
  install = (f"mkdir -p ~/{common.REMOTE_DIR} && tar -xzf ~/peftjax.tar.gz -C ~/{common.REMOTE_DIR} && "
             f"cd ~/{common.REMOTE_DIR} && python3 -m pip install -q -U pip && "
             f"python3 -m pip install -q \"jax[tpu]=={args.jax_version}\" -e .")
  return [["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", ARCHIVE, "HEAD"],
          ["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{args.name}:~/peftjax.tar.gz",
           *common.scope(args), "--worker=all"],
          common.ssh_all(args, install)]


def add_options(p) -> None:
  p.add_argument("--jax-version", default="0.10.2", help="jax version to install (with its TPU runtime)")


if __name__ == "__main__":
  common.main(__doc__, commands, add_options)
