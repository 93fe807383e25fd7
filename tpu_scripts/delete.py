"""Deletes the TPU VM (or its queued resource); checkpoints in the gs:// workdir stay.

  python tpu_scripts/delete.py --name peft --zone us-central2-b [--queued]
"""

from __future__ import annotations

import common


def commands(args) -> list[list[str]]:
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *common.scope(args),
             "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *common.scope(args), "--quiet"]]


if __name__ == "__main__":
  common.main(__doc__, commands)
