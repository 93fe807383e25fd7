"""The comparison's table (Markdown, CSV, JSON) and picture (PNG) from the runs' records (`train.compare_run`).

One row per method: Hugging Face PEFT method_comparison's columns and the articles' (trainable parameters and %,
the held-out metric as mean ± std over seeds, forgetting, compiled and process peak memory, training time, tokens/s,
adapter file size, inference latency unmerged vs merged), or the one-sentence error of a method that failed.
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

# The held-out metric a row reports: the first of these the task's evaluation gives (and whether higher is better).
METRICS = (("accuracy", True), ("exact_match", True), ("perplexity", False), ("loss", False))
PNG_SIZE = (1500, 450)  # pixels (width, height) of comparison.png
DPI = 100
FILES = ("comparison.md", "comparison.csv", "comparison.json", "comparison.png")
# (row key, column title, format) of the table, in order.
COLUMNS = (
    ("method", "method", "{}"), ("trainable", "trainable params", "{:,d}"), ("trainable_pct", "trainable %", "{:.4f}"),
    ("metric", "held-out {metric}", "{}"), ("forgetting", "forgetting (Δ loss on {forgetting})", "{:+.4f}"),
    ("compiled_peak_mib", "compiled step peak MiB", "{:.1f}"), ("compiled_temp_mib", "compiled temp MiB", "{:.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("train_seconds", "train s", "{:.1f}"),
    ("tokens_per_second", "tokens/s", "{:,.0f}"), ("adapter_mib", "adapter MiB", "{:.3f}"),
    ("latency_unmerged_ms", "latency unmerged ms", "{:.2f}"), ("latency_merged_ms", "latency merged ms", "{:.2f}"),
    ("seeds", "seeds", "{}"), ("error", "error", "{}"))
MEANS = ("train_seconds", "tokens_per_second", "adapter_mib")
PROFILED = ("compiled_peak_mib", "compiled_temp_mib", "latency_unmerged_ms", "latency_merged_ms")


def metric_name(records: list[dict]) -> tuple[str, bool]:
  """(the metric the table reports, whether higher is better), from the records' held-out metrics."""
  keys = set().union(*(r["after"] for r in records)) if records else set()
  return next(((name, higher) for name, higher in METRICS if name in keys), METRICS[-1])


def _mean(values: list) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def row(method: str, outcome: list, metric: str, base: dict | None) -> dict:
  """The table row of one method: `outcome` holds its seeds' records, or an error sentence (str) for a failure."""
  records = [r for r in outcome if isinstance(r, dict)]
  errors = [r for r in outcome if isinstance(r, str)]
  result = {"method": method, "error": "; ".join(dict.fromkeys(errors)) or None,
            "seeds": ",".join(str(r["seed"]) for r in records)}
  if not records:
    return result
  values = [r["after"][metric] for r in records]
  first = records[0]
  result.update({
      "trainable": first["trainable"], "trainable_pct": 100 * first["trainable"] / first["all_params"],
      "metric_mean": float(np.mean(values)), "metric_std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
      "metric_values": values, "peak_rss_mib": max(r["peak_rss_mib"] for r in records),
      **{key: _mean([r.get(key) for r in records]) for key in MEANS + PROFILED}})
  losses = [r["forgetting_loss"] for r in records if "forgetting_loss" in r]
  result["forgetting"] = (float(np.mean(losses)) - base["forgetting_loss"]) if losses and base else None
  return result


def _metric_text(row: dict, metric: str) -> str:
  scale, digits = (100, 2) if metric in ("accuracy", "exact_match") else (1, 4)
  mean = f"{scale * row['metric_mean']:.{digits}f}"
  return mean if row["metric_std"] is None else f"{mean} ± {scale * row['metric_std']:.{digits}f}"


def cells(row: dict, metric: str) -> list[str]:
  """The row's table cells as text ('' for what was not measured or does not apply)."""
  out = []
  for key, _, fmt in COLUMNS:
    if key == "metric":
      out.append(_metric_text(row, metric) if "metric_mean" in row else "")
    else:
      value = row.get(key)
      out.append("" if value is None else fmt.format(value))
  return out


def titles(metric: str, forgetting: str) -> list[str]:
  units = " (%)" if metric in ("accuracy", "exact_match") else ""
  return [title.format(metric=metric + units, forgetting=forgetting or "other text") for _, title, _ in COLUMNS]


def markdown(rows: list[dict], metric: str, settings: dict, notes: list[str]) -> str:
  """The Markdown page: what was run, the table, and the notes."""
  head = titles(metric, settings.get("forgetting_task", ""))
  lines = ["# peftjax method comparison", "",
           ", ".join(f"{key}: {value}" for key, value in settings.items()), "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r, metric)) + " |" for r in rows]
  return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def csv_text(rows: list[dict], metric: str, forgetting: str) -> str:
  """The table as CSV: the same columns, the metric as mean and std in two columns, raw numbers."""
  buffer = io.StringIO()
  keys = [key for key, _, _ in COLUMNS]
  head = titles(metric, forgetting)
  index = keys.index("metric")
  writer = csv.writer(buffer)
  writer.writerow(head[:index] + [f"{head[index]} mean", f"{head[index]} std"] + head[index + 1:])
  for r in rows:
    values = [r.get(key) for key in keys]
    values[index:index + 1] = [r.get("metric_mean"), r.get("metric_std")]
    writer.writerow(["" if v is None else v for v in values])
  return buffer.getvalue()


def write_text(path: str, text: str | bytes) -> None:
  """Writes `text` to `path` through a temporary name renamed into place."""
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
  with open(tmp, "wb") as f:
    f.write(text.encode() if isinstance(text, str) else text)
  os.replace(tmp, path)


def _curve(records: list[dict], tag: str) -> tuple[list[int], list[float]]:
  """Steps and the seed-mean of a logged scalar over the steps every seed logged."""
  curves = [r["curves"].get(tag, {}) for r in records]
  common = sorted(set.intersection(*(set(c) for c in curves)), key=int) if curves else []
  return [int(s) for s in common], [float(np.mean([c[s] for c in curves])) for s in common]


def plot(outcomes: dict[str, list], rows: list[dict], metric: str, higher: bool) -> bytes:
  """PNG bytes (PNG_SIZE): the training loss and held-out metric curves per method (seed means) and a bar chart of
  the metric against trainable %."""
  try:
    import matplotlib  # noqa: PLC0415 (optional: the compare extra)
  except ImportError:
    raise ValueError("the comparison's picture needs matplotlib: pip install 'peftjax[compare]'.") from None
  matplotlib.use("Agg")
  from matplotlib import pyplot  # noqa: PLC0415
  figure, (losses, evals, bars) = pyplot.subplots(1, 3, figsize=(PNG_SIZE[0] / DPI, PNG_SIZE[1] / DPI), dpi=DPI)
  colours = pyplot.get_cmap("tab20").colors  # 20 colours, and a second line style past them: every method its own
  for i, (method, outcome) in enumerate(outcomes.items()):
    records = [r for r in outcome if isinstance(r, dict)]
    style = {"color": colours[i % len(colours)], "linestyle": "-" if i < len(colours) else "--", "label": method}
    if records:
      losses.plot(*_curve(records, "train/loss"), **style)
      evals.plot(*_curve(records, f"eval/{metric}"), marker="o", **style)
  losses.set(title="training loss (mean over seeds)", xlabel="step", ylabel="loss")
  evals.set(title=f"held-out {metric}", xlabel="step", ylabel=metric)
  losses.legend(fontsize=7)
  done = sorted((r for r in rows if "metric_mean" in r), key=lambda r: r["trainable_pct"])
  positions = np.arange(len(done))
  bars.bar(positions, [r["metric_mean"] for r in done], yerr=[r["metric_std"] or 0.0 for r in done], capsize=3)
  bars.set_xticks(positions, [f"{r['method']} {r['trainable_pct']:.3g}%" for r in done], fontsize=7, rotation=60,
                  ha="right")
  bars.set(title=f"held-out {metric} ({'higher' if higher else 'lower'} is better) vs trainable %", ylabel=metric)
  if done and higher:
    low = min(r["metric_mean"] for r in done)
    bars.set_ylim(max(0.0, low - 0.1 * abs(low) - 0.05), None)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=DPI)
  pyplot.close(figure)
  return buffer.getvalue()


def write(workdir: str, outcomes: dict[str, list], base: dict | None, settings: dict, notes: list[str]) -> list[dict]:
  """Writes comparison.md / .csv / .json / .png into `workdir` (each atomically) and returns the rows."""
  records = [r for outcome in outcomes.values() for r in outcome if isinstance(r, dict)]
  metric, higher = metric_name(records)
  rows = [row(method, outcome, metric, base) for method, outcome in outcomes.items()]
  if base is not None:
    rows.insert(0, row("base (untrained)", [base], metric, None) | {"forgetting": 0.0})
  forgetting = settings.get("forgetting_task", "")
  picture = plot(outcomes, rows, metric, higher)
  write_text(os.path.join(workdir, "comparison.md"), markdown(rows, metric, settings, notes))
  write_text(os.path.join(workdir, "comparison.csv"), csv_text(rows, metric, forgetting))
  write_text(os.path.join(workdir, "comparison.json"), json.dumps(
      {"settings": settings, "metric": metric, "higher_is_better": higher, "notes": notes, "rows": rows,
       "runs": {m: o for m, o in outcomes.items()}, "base": base}, indent=2, sort_keys=True))
  write_text(os.path.join(workdir, "comparison.png"), picture)
  return rows
