"""Creates a TPU VM (or a queued resource that becomes one), e.g. a v4-32 or v5litepod-16 pod slice.

  python tpu_scripts/create.py --name peft --zone us-central2-b --accelerator-type v4-32 [--spot] [--queued]
"""

from __future__ import annotations

import common

# Runtime images: v4 and older use the plain Ubuntu image, v5e ("v5litepod") and v5p their own.
RUNTIMES = {"v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"


def runtime(accelerator_type: str) -> str:
  """The TPU software version for an accelerator type such as v4-32 or v5litepod-16."""
  return RUNTIMES.get(accelerator_type.rsplit("-", 1)[0], DEFAULT_RUNTIME)


def commands(args) -> list[list[str]]:
  version = args.version or runtime(args.accelerator_type)
  spot = ["--spot"] if args.spot else []
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name, "--node-id", args.name,
             *common.scope(args), "--accelerator-type", args.accelerator_type, "--runtime-version", version, *spot]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *common.scope(args),
           "--accelerator-type", args.accelerator_type, "--version", version, *spot]]


def add_options(p) -> None:
  p.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5litepod-16")
  p.add_argument("--version", default="", help="TPU software version (default: chosen from the accelerator type)")
  p.add_argument("--spot", action="store_true", help="a preemptible (spot) TPU: cheaper, may be preempted")


if __name__ == "__main__":
  common.main(__doc__, commands, add_options)
