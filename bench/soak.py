"""Soak test: a long run of a tiny model killed with SIGKILL again and again, and one damaged step, must end equal
to the same run left alone.

`python bench/soak.py` trains configs/lora_t5.py with a tiny T5 (d_model 32, one layer each side) for --steps
steps, checkpointing every --checkpoint-every steps, in a child process that it kills with SIGKILL --cycles
times: most kills at a random moment of the training (some of those land inside a checkpoint write), every
fourth one inside a checkpoint write on purpose (the child stops itself at a `peftjax.checkpoint.WRITE_HOOK`
phase, "written" or "sealed", and is killed there).  After the kill of cycle --damage-cycle the newest step's
data file gets 32 flipped bytes, and the next start must report it and resume from the step before.  Then the
run is finished and its adapter (adapter/adapter_model.safetensors) is compared bit for bit with an
uninterrupted run's.  Prints one line per cycle and a summary; exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_SHAPE = dict(d_model=32, d_kv=8, d_ff=48, num_heads=2, num_layers=1, num_decoder_layers=1)


def config(workdir: str, steps: int, checkpoint_every: int):
  """configs/lora_t5.py with the tiny model, LoRA dropout on, 40 training examples (an epoch is 5 steps)."""
  spec = importlib.util.spec_from_file_location("lora_t5", ROOT / "configs" / "lora_t5.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.model_shape.update(TINY_SHAPE)
  cfg.lora.update(dict(rank=4, dropout=0.1))
  cfg.update(dict(workdir=workdir, batch_size=8, source_length=24, target_length=3, eval_examples=8,
                  train_examples=40, steps=steps, log_every=100, eval_every=0, checkpoint_every=checkpoint_every,
                  keep_checkpoints=2))
  cfg.optimizer.update(dict(learning_rate=1e-3, warmup_steps=10))
  return cfg


def child(args) -> None:
  """One training process; with --pause-phase it stops itself (SIGSTOP) in its first checkpoint write."""
  sys.path.insert(0, str(ROOT))
  from peftjax import checkpoint
  import train

  if args.pause_phase:
    def pause(step, phase):
      if phase == args.pause_phase:
        print(f"paused in the write of step {step} ({phase})", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    checkpoint.WRITE_HOOK = pause
  train.main(config(args.workdir, args.steps, args.checkpoint_every))


def steps_on_disk(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def start(args, workdir: pathlib.Path, log, pause_phase: str = "") -> subprocess.Popen:
  command = [sys.executable, __file__, "--child", "--workdir", str(workdir), "--steps", str(args.steps),
             "--checkpoint-every", str(args.checkpoint_every)] + (["--pause-phase", pause_phase] if pause_phase else [])
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
         "JAX_COMPILATION_CACHE_DIR": str(args.cache), "TOKENIZERS_PARALLELISM": "false"}
  return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)


def flip_32_bytes(step_dir: pathlib.Path) -> pathlib.Path:
  file = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)
  raw = bytearray(file.read_bytes())
  for i in range(len(raw) // 2, len(raw) // 2 + 32):
    raw[i] ^= 0x5A
  file.write_bytes(bytes(raw))
  return file


def adapter(workdir: pathlib.Path) -> dict:
  from safetensors.numpy import load_file
  return load_file(str(workdir / "adapter" / "adapter_model.safetensors"))


def soak(args) -> int:
  rng = random.Random(args.seed)
  root = pathlib.Path(args.workdir)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  args.cache = root / "jax_cache"
  log = open(root / "children.log", "w")
  run, straight = root / "soak", root / "straight"

  began = time.perf_counter()
  if start(args, straight, log).wait():
    raise SystemExit("the uninterrupted run failed; see children.log")
  straight_seconds = time.perf_counter() - began
  print(f"uninterrupted run: {args.steps} steps in {straight_seconds:.0f} s", flush=True)

  kills = in_write = damaged_reported = 0
  seconds_per_cycle = straight_seconds / (args.cycles + 4)  # so that the kills spread over the whole run
  for cycle in range(1, args.cycles + 1):
    before = steps_on_disk(run)
    phase = rng.choice(["written", "sealed"]) if cycle % 4 == 0 else ""
    proc = start(args, run, log, phase)
    lines = []
    for line in proc.stdout:  # read until training starts (the step-N eval line), or the paused write
      lines.append(line.rstrip())
      if line.startswith("step ") or line.startswith("paused in the write"):
        break
    if phase:
      _, status = os.waitpid(proc.pid, os.WUNTRACED)
      stopped = os.WIFSTOPPED(status)
    else:
      time.sleep(rng.uniform(0.2, 1.5) * seconds_per_cycle)
      stopped = proc.poll() is None
    if not stopped:
      print(f"cycle {cycle}: the run ended before the kill (rc {proc.wait()})", flush=True)
      break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kills += 1
    folder = run / "checkpoints"
    tmp = [p.name for p in folder.iterdir() if ".orbax-checkpoint-tmp" in p.name] if folder.exists() else []
    in_write += bool(tmp)
    damaged = any("is damaged" in line for line in lines)
    damaged_reported += damaged
    resumed = next((line for line in lines if line.startswith("resuming")), "started at step 0")
    after = steps_on_disk(run)
    where = (f"paused in the {phase!r} phase of a write" if phase else f"inside an Orbax write {tmp}" if tmp
             else "at a random moment")
    print(f"cycle {cycle}: {resumed.split(' (')[0]}; killed {where}; steps on disk {before} -> {after}"
          f"{'; reported a damaged step' if damaged else ''}", flush=True)
    if cycle == args.damage_cycle and after:
      file = flip_32_bytes(run / "checkpoints" / str(after[-1]))
      print(f"  injected damage: 32 flipped bytes in step {after[-1]} ({file.relative_to(run)})", flush=True)
  if start(args, run, log).wait():
    raise SystemExit("the final resumed run failed; see children.log")
  ours, reference = adapter(run), adapter(straight)
  equal = ours.keys() == reference.keys() and all(np.array_equal(ours[k], reference[k]) for k in ours)
  print(f"soak: {args.steps} steps, {kills} SIGKILLs survived ({in_write} inside checkpoint writes), "
        f"{damaged_reported} damaged step(s) reported and skipped, set aside: "
        f"{sorted(p.name for p in (run / 'checkpoints' / 'damaged').iterdir()) if (run / 'checkpoints' / 'damaged').exists() else []}; "  # noqa: E501
        f"adapter bit-identical to the uninterrupted run: {equal} ({len(ours)} tensors); "
        f"{time.perf_counter() - began:.0f} s in all", flush=True)
  return 0 if equal and damaged_reported else 1


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10_000)
  parser.add_argument("--cycles", type=int, default=24)
  parser.add_argument("--checkpoint-every", type=int, default=100)
  parser.add_argument("--damage-cycle", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/peftjax_soak")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--pause-phase", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
  else:
    sys.exit(soak(args))


if __name__ == "__main__":
  main()
