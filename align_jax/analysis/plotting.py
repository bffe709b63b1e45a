"""Pictures of a run and of an encoder-pair selection, drawn with matplotlib.

    python -m align_jax.cli.plot WORKDIR [--out=curves.png]     # = align-jax plot WORKDIR

:func:`plot_run` draws a run's curves from ``WORKDIR/metrics.jsonl`` (the file every run writes,
:mod:`align_jax.run.metrics`): the training loss, the logit parameters (temperature, or SigLIP's
scale and bias) and every evaluation metric against the step, one panel each, into
``WORKDIR/curves.png`` (a ``gs://`` workdir too). :func:`cka_heatmap` draws the linear-CKA grid of
:mod:`align_jax.analysis.select` with a title, axis names, a colour bar, every model's full name
(wrapped) and the value in each cell.

Only matplotlib's object API is used (``matplotlib.figure.Figure``, no pyplot), so drawing never
changes the plotting backend of a notebook or needs a display.
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Sequence

import numpy as np

from align_jax.run import metrics as reporting, storage

CURVES_FILE = "curves.png"
# Panels drawn before the eval metrics, in this order, when the run logged them.
TRAIN_KEYS = ("train/loss", "train/temperature", "train/scale", "train/bias")


def read_metrics(workdir: str) -> list[dict]:
  """The readable rows of ``WORKDIR/metrics.jsonl`` (unreadable lines skipped), in file order."""
  path = storage.join(workdir, reporting.METRICS_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} not found: WORKDIR must be a training run's folder (every run "
                            "writes metrics.jsonl there)")
  rows, _ = reporting.parse_metrics(storage.read_bytes(path))
  return [row for row, _ in rows]


def series(rows: Sequence[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{key: (steps, values)}`` for every plotted key: :data:`TRAIN_KEYS` first, then each eval
  metric (keys with an ``eval`` prefix, e.g. ``eval/i2t@1``) in the order first logged.

  A row logged twice for the same step keeps its last value; non-finite values are left out.
  """
  keys = [k for k in TRAIN_KEYS if any(k in row for row in rows)]
  for row in rows:
    keys += [k for k in row if k.split("/")[0].startswith("eval") and k not in keys
             and isinstance(row[k], (int, float)) and not isinstance(row[k], bool)]
  out = {}
  for key in keys:
    points = {}
    for row in rows:
      value = row.get(key)
      if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        points[row["step"]] = float(value)
    if points:
      steps = np.array(sorted(points))
      out[key] = (steps, np.array([points[s] for s in steps]))
  return out


def _save(figure, path: str) -> str:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  storage.write_bytes(path, buffer.getvalue())
  return path


def plot_run(workdir: str, out: str | None = None) -> str:
  """Draws the run's curves (one panel per metric, against the step) into a PNG; returns its path.

  ``out`` defaults to ``WORKDIR/curves.png``. Raises ValueError when metrics.jsonl holds nothing
  to plot.
  """
  from matplotlib.figure import Figure
  data = series(read_metrics(workdir))
  if not data:
    raise ValueError(f"{storage.join(workdir, reporting.METRICS_FILE)} holds no loss, temperature "
                     "or eval metric yet: plot a run after its first logged step")
  columns = min(3, len(data))
  rows = math.ceil(len(data) / columns)
  figure = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.6), layout="constrained")
  figure.suptitle(f"{workdir}: {reporting.METRICS_FILE}")
  for index, (key, (steps, values)) in enumerate(data.items()):
    axes = figure.add_subplot(rows, columns, index + 1)
    axes.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3)
    axes.set_title(key)
    axes.set_xlabel("step")
    axes.set_ylabel(key.split("/")[-1])
    axes.grid(alpha=0.3)
    if key.startswith("eval"):
      axes.annotate(f"{values[-1]:.3f}", (steps[-1], values[-1]), textcoords="offset points",
                    xytext=(-4, 6), ha="right", fontsize=8)
  return _save(figure, out or storage.join(workdir, CURVES_FILE))


def wrap_name(name: str, width: int = 24) -> str:
  """A model name (hub id or folder) on lines of about ``width`` characters, broken after a '/'
  where possible, never shortened."""
  parts = [p + "/" for p in str(name).split("/")]
  parts[-1] = parts[-1][:-1]
  lines, line = [], ""
  for part in parts:
    if line and len(line) + len(part) > width:
      lines.append(line)
      line = ""
    line += part
  lines.append(line)
  return "\n".join(piece for line in lines
                   for piece in (textwrap.wrap(line, width, break_on_hyphens=False) or [line]))


def cka_heatmap(values, image_names: Sequence[str], text_names: Sequence[str], path: str, *,
                title: str = "Linear CKA of frozen encoder features", note: str = "") -> str:
  """A heat-map PNG of ``values`` ``[len(image_names), len(text_names)]``; returns ``path``.

  Rows are image encoders, columns text encoders; each cell shows its value; the colour scale
  spans [0, 1] (CKA's range) with a colour bar. The figure grows with the labels' wrapped size.
  """
  from matplotlib.figure import Figure
  values = np.asarray(values, dtype=float)
  if values.shape != (len(image_names), len(text_names)):
    raise ValueError(f"cka_heatmap: values of shape {values.shape} for {len(image_names)} image "
                     f"and {len(text_names)} text encoders")
  rows_text = [wrap_name(n) for n in image_names]
  cols_text = [wrap_name(n, 22) for n in text_names]
  row_label_w = max(len(line) for t in rows_text for line in t.splitlines()) * 0.085
  col_label_h = max(t.count("\n") + 1 for t in cols_text) * 0.2
  cell = 1.3
  width = row_label_w + cell * len(text_names) + 2.8  # + the axis name and the colour bar
  height = col_label_h + cell * len(image_names) + 1.4 + (0.3 if note else 0)
  figure = Figure(figsize=(max(width, 4.5), max(height, 3.0)), layout="constrained")
  axes = figure.add_subplot()
  image = axes.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="equal")
  axes.set_xticks(range(len(text_names)), cols_text, fontsize=8)
  axes.set_yticks(range(len(image_names)), rows_text, fontsize=8)
  axes.set_xlabel("text encoder")
  axes.set_ylabel("image encoder")
  axes.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      axes.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=9,
                color="black" if values[i, j] > 0.6 else "white")
  figure.colorbar(image, ax=axes, label="linear CKA", shrink=0.9)
  return _save(figure, path)
