"""Test settings: CPU only, no hub access."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pinned_versions() -> dict[str, str]:
  """{package: version} from constraints-test.txt, the stack the suite is known to pass with."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "constraints-test.txt")
  pins = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      name, sep, version = line.split("#")[0].strip().partition("==")
      if sep:
        pins[name.lower().replace("_", "-")] = version
  return pins


def pytest_report_header(config):
  """The reference libraries' versions, and a warning for each that differs from constraints-test.txt."""
  del config
  from importlib import metadata
  pins = _pinned_versions()
  lines, moved = [], []
  for name in ("jax", "flax", "transformers", "peft", "torch", "datasets"):
    try:
      version = metadata.version(name)
    except metadata.PackageNotFoundError:
      version = "not installed"
    lines.append(f"{name} {version}")
    if name in pins and version.split("+")[0] != pins[name]:
      moved.append(f"{name} {version} (constraints-test.txt: {pins[name]})")
  header = ["reference stack: " + ", ".join(lines)]
  if moved:
    header.append("WARNING: not the pinned stack, comparisons may fail for the reference's reasons: " + "; ".join(moved)
                  + '. Install with pip install -e ".[test]" -c constraints-test.txt.')
  return header
