"""Two local CPU processes joined by jax.distributed (gloo, 127.0.0.1) train a tiny Llama with LoRA on a (2, 2, 1)
mesh spanning both, each reading only its rows: same losses as one process, an Orbax checkpoint written and
restored by both, a merged export gathered across them.  Also the single-process helpers."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from peftjax import distributed, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(out: pathlib.Path, *args) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.Popen([sys.executable, str(ROOT / "tests" / "sharding_worker.py"), "distributed", str(out),
                           *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(process: subprocess.Popen) -> dict:
  try:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert process.returncode == 0, stderr[-3000:]
  return json.loads(stdout.strip().splitlines()[-1])


def test_two_processes_match_one(tmp_path):
  port = free_port()
  (tmp_path / "one").mkdir()
  (tmp_path / "two").mkdir()
  processes = [start(tmp_path / "one", 1, 0, 0)] + [start(tmp_path / "two", 2, i, port) for i in range(2)]
  try:
    one, *two = [finish(p) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  assert (one["processes"], one["devices"]) == (1, 4)
  assert [(r["processes"], r["devices"]) for r in two] == [(2, 4), (2, 4)]
  assert [r["local_rows"] for r in two] == [[0, 4], [4, 8]]  # each process fed only its half of the batch
  for result in two:
    np.testing.assert_allclose(result["losses"], one["losses"], atol=1e-5, rtol=0)
    assert result["restored_equal"]
    assert result["export_max_abs"] < 1e-5
  assert one["losses"][-2] < one["losses"][0] - 0.05


def test_single_process_helpers(monkeypatch):
  for name in (distributed.ENV_AUTO, distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False  # nothing asked for: stays a single process
  with pytest.raises(ValueError, match="needs num_processes >= 1 and 0 <= process_id < num_processes"):
    distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
  mesh = sharding.make_mesh((1, -1, 1))
  assert distributed.process_rows(sharding.batch_sharding(mesh), 8) == slice(0, 8)
  data = {"x": np.arange(20).reshape(10, 2)}
  batch = distributed.load_local(data, np.array([9, 0, 3, 4, 5, 6, 7, 8]), sharding.batch_sharding(mesh))
  np.testing.assert_array_equal(distributed.to_host(batch["x"]), data["x"][[9, 0, 3, 4, 5, 6, 7, 8]])


def dry_run(script: str, *args: str) -> list[str]:
  done = subprocess.run([sys.executable, str(ROOT / "tpu_scripts" / script), "--dry-run", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  return done.stdout.strip().splitlines()


def test_tpu_scripts_dry_run_commands():
  v4 = ["--name", "peft", "--zone", "us-central2-b"]
  assert dry_run("create.py", *v4, "--accelerator-type", "v4-32") == [
      "gcloud compute tpus tpu-vm create peft --zone us-central2-b --accelerator-type v4-32 "
      "--version tpu-ubuntu2204-base"]
  v5e = ["--name", "q", "--zone", "us-west4-a", "--project", "proj", "--queued"]
  assert dry_run("create.py", *v5e, "--accelerator-type", "v5litepod-16", "--spot") == [
      "gcloud compute tpus queued-resources create q --node-id q --zone us-west4-a --project proj "
      "--accelerator-type v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --spot"]
  assert dry_run("delete.py", *v5e) == [
      "gcloud compute tpus queued-resources delete q --zone us-west4-a --project proj --force --quiet"]
  archive, scp, install = dry_run("setup.py", *v4)
  assert archive == f"git -C {ROOT} archive --format=tar.gz -o /tmp/peftjax.tar.gz HEAD"
  assert scp == ("gcloud compute tpus tpu-vm scp /tmp/peftjax.tar.gz 'peft:~/peftjax.tar.gz' --zone us-central2-b "
                 "--worker=all")
  assert install.startswith("gcloud compute tpus tpu-vm ssh peft --zone us-central2-b --worker=all --command '")
  assert 'python3 -m pip install -q "jax[tpu]==0.10.2" -e .' in install
  (launch,) = dry_run("launch.py", *v4, "--config", "configs/lora_t5.py", "--workdir", "gs://b/run", "--",
                      "--config.steps=2000")
  assert launch.startswith("gcloud compute tpus tpu-vm ssh peft --zone us-central2-b --worker=all "
                           "--command 'cd ~/peftjax")
  assert launch.endswith("PEFTJAX_DIST_INIT=1 nohup python3 -m train --config configs/lora_t5.py "
                         "--config.workdir=gs://b/run --config.steps=2000 > ~/peftjax-train.log 2>&1 & "
                         "echo $! > ~/peftjax-train.pid'")
  resume = dry_run("resume.py", *v4, "--accelerator-type", "v4-32", "--spot", "--config", "configs/lora_t5.py",
                   "--workdir", "gs://b/run")
  assert resume[0] == "gcloud compute tpus tpu-vm describe peft --zone us-central2-b '--format=value(state)'"
  assert resume[2:4] == ["gcloud compute tpus tpu-vm delete peft --zone us-central2-b --quiet",
                         "gcloud compute tpus tpu-vm create peft --zone us-central2-b --accelerator-type v4-32 "
                         "--version tpu-ubuntu2204-base --spot"]
  assert resume[5:8] == [archive, scp, install]
  assert resume[8] == launch.replace(" --config.steps=2000", "")
