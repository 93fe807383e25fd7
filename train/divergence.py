"""What a run does about a non-finite step: config.on_nonfinite and config.max_consecutive_skips.

The compiled step never applies an update whose loss, gradients or resulting parameters hold NaN or inf
(`peftjax.sharding.make_train_step` keeps the old state and sets metrics['nonfinite']).  Here the run decides:
'skip' (the default) counts the step, prints one line and goes on, but stops after max_consecutive_skips skipped
steps in a row (0: never); 'stop' ends the run at the first one.  Stopping raises `Diverged`, naming the step and
what was non-finite; no file holding NaN or inf is written either way (`peftjax.finite`).
"""

from __future__ import annotations

import ml_collections

from peftjax import distributed, sharding

POLICIES = ("skip", "stop")
DEFAULTS = dict(on_nonfinite="skip", max_consecutive_skips=20)


class Diverged(ValueError):
  """The run stopped on non-finite steps (config.on_nonfinite / config.max_consecutive_skips)."""


def settings(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """(config.on_nonfinite, config.max_consecutive_skips), with DEFAULTS for a config that has neither."""
  return (config.get("on_nonfinite", DEFAULTS["on_nonfinite"]),
          config.get("max_consecutive_skips", DEFAULTS["max_consecutive_skips"]))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one sentence) for a bad config.on_nonfinite or config.max_consecutive_skips."""
  policy, limit = settings(config)
  if policy not in POLICIES:
    raise ValueError(f"config.on_nonfinite={policy!r} is not a known policy; valid: {list(POLICIES)}.")
  if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
    raise ValueError(f"config.max_consecutive_skips={limit!r} must be 0 (never stop) or a positive integer.")


class Guard:
  """Watches each step's metrics; `observe` returns a line for a skipped step or raises Diverged."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.policy, self.limit = settings(config)
    self.learning_rate = config.optimizer.learning_rate
    self.in_a_row = self.total = 0

  def observe(self, step: int, metrics: dict) -> str | None:
    """None for an applied step; for a skipped one the line to print, or Diverged when the run must stop."""
    flags = int(distributed.to_host(metrics["nonfinite"]))
    if not flags:
      self.in_a_row = 0
      return None
    self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
    what = ", ".join(sharding.nonfinite_names(flags))
    advice = f"lower config.optimizer.learning_rate (now {self.learning_rate:g}) or check the data"
    if self.policy == "stop":
      raise Diverged(f"step {step}: non-finite {what} and config.on_nonfinite='stop'; the update was not applied and "
                     f"no checkpoint or export holds it; {advice}.")
    if self.limit and self.in_a_row >= self.limit:
      raise Diverged(f"steps {step - self.in_a_row + 1}-{step}: {self.in_a_row} steps in a row were skipped (last: "
                     f"non-finite {what}), config.max_consecutive_skips={self.limit}; the run diverged, {advice}.")
    return f"step {step} skipped: non-finite {what} ({self.in_a_row} in a row, {self.total} in all)"
