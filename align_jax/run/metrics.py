"""Where metrics go: ``WORKDIR/metrics.jsonl``, TensorBoard event files and a console progress line.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per logged step (train and eval
keys alike), so a run can be plotted or compared with ``pandas.read_json(..., lines=True)``.
``WORKDIR/tensorboard`` holds the same points (every finite number of every row) under the same
tag names.

The run directory describes a single trajectory, whatever killed the previous process and when.
On start (:class:`MetricsWriter`):

* an unreadable line (torn by a kill during a write, or damaged) is dropped and reported with the
  file's path, never fatal;
* after a resume from the checkpoint at step S, rows of steps after S (train and eval alike) are
  dropped: the run logs them again. A fresh start (no checkpoint, S = 0) drops every row,
  including a step-0 evaluation that the new attempt runs again;
* TensorBoard is rebuilt from the rows kept: one new event file (original wall times kept where
  the old files had them), after which the old files are deleted. So TensorBoard and
  ``metrics.jsonl`` hold the same points after any kill and resume.

Local files are appended to (one write per row, flushed). Object stores have no append: for a URL
workdir the writer keeps both files' content in memory and replaces each object whole at every
row (they are small: ~0.5 KB per row).
"""

from __future__ import annotations

import json
import logging
import math
import time

import jax

from align_jax.run import storage, tb_events

logger = logging.getLogger("align_jax")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _to_python(value):
  value = getattr(value, "item", lambda: value)()
  return value


def parse_metrics(data: bytes) -> tuple[list[tuple[dict, str]], int]:
  """``([(row, line text)], number of unreadable lines)`` of a metrics.jsonl file's bytes.

  A line is readable when it is UTF-8 JSON of an object with an integer ``step``.
  """
  rows, unreadable = [], 0
  for raw in data.split(b"\n"):
    if not raw.strip():
      continue
    try:
      text = raw.decode("utf-8").strip()
      row = json.loads(text)
    except (UnicodeDecodeError, ValueError):
      unreadable += 1
      continue
    if (not isinstance(row, dict) or not isinstance(row.get("step"), int)
        or isinstance(row.get("step"), bool)):
      unreadable += 1
      continue
    rows.append((row, text))
  return rows, unreadable


def scalars(row: dict) -> dict[str, float]:
  """The TensorBoard points of a metrics row: every finite number except ``step``."""
  return {k: float(v) for k, v in row.items()
          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v)}


class MetricsWriter:
  """Writes metric dicts to metrics.jsonl and TensorBoard; prints progress with steps/s and ETA.

  Args:
    workdir: the run's folder (local path or URL).
    total_steps: for the ETA.
    resume_step: the step of the checkpoint the run restored; 0 for a fresh start.
    tensorboard: also write ``WORKDIR/tensorboard``.
  """

  def __init__(self, workdir: str, total_steps: int, *, resume_step: int = 0,
               tensorboard: bool = True):
    self.is_writer = jax.process_index() == 0
    self.total_steps = total_steps
    self.path = storage.join(workdir, METRICS_FILE)
    self._remote = storage.is_url(workdir)
    self._lines: list[str] = []  # the file's content, for a URL workdir (no append there)
    self._tb = None
    if self.is_writer:
      storage.makedirs(workdir)
      kept = self._clean(resume_step)
      if tensorboard:
        self._tb = self._rebuild_tensorboard(storage.join(workdir, TENSORBOARD_DIR), kept)
    self._last_time, self._last_step = time.time(), resume_step

  def _clean(self, resume_step: int) -> list[dict]:
    """Drops unreadable lines and rows the resumed run logs again; returns the rows kept."""
    if not storage.exists(self.path):
      return []
    data = storage.read_bytes(self.path)
    rows, unreadable = parse_metrics(data)
    if unreadable:
      logger.warning("%s: dropped %d unreadable line(s) (a write cut short by a kill?)",
                     self.path, unreadable)
    kept = [(row, text) for row, text in rows if resume_step > 0 and row["step"] <= resume_step]
    if len(kept) != len(rows):
      logger.info("%s: dropped %d row(s) after step %d, which this run logs again", self.path,
                  len(rows) - len(kept), resume_step)
    # One row per (step, kind of row): a repeated row (from a version that re-evaluated step 0
    # on every restart) keeps its last copy.
    last = {(row["step"], tuple(sorted(row))): i for i, (row, _) in enumerate(kept)}
    unique = [kept[i] for i in sorted(last.values())]
    if len(unique) != len(kept):
      logger.info("%s: dropped %d repeated row(s)", self.path, len(kept) - len(unique))
    self._lines = [text + "\n" for _, text in unique]
    if unreadable or len(unique) != len(rows) or (data and not data.endswith(b"\n")):
      storage.write_text(self.path, "".join(self._lines))
    return [row for row, _ in unique]

  def _rebuild_tensorboard(self, folder: str, rows: list[dict]) -> tb_events.EventFile:
    """A new event file holding ``rows``; the old event files are deleted once it is written."""
    old = [storage.join(folder, name) for name in storage.listdir(folder)
           if tb_events.is_event_file(name)]
    wall_times: dict[int, float] = {}
    for path in old:
      try:
        wall_times.update({step: t for t, step in tb_events.read_steps(storage.read_bytes(path))})
      except OSError:
        pass  # an unreadable old file only loses its wall times
    events = tb_events.EventFile(folder)
    now = time.time()
    for row in rows:
      events.add(row["step"], scalars(row), wall_time=wall_times.get(row["step"], now))
    events.flush()
    for path in old:
      storage.remove(path)
    return events

  def write(self, step: int, metrics: dict) -> None:
    """Writes one line ``{"step": step, **metrics}`` and its TensorBoard scalars."""
    if not self.is_writer:
      return
    record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    if self._remote:
      self._lines.append(line)
      storage.write_text(self.path, "".join(self._lines))
    else:
      with storage.open_file(self.path, "a", encoding="utf-8") as f:
        f.write(line)
    if self._tb is not None:
      self._tb.add(record["step"], scalars(record))
      self._tb.flush()

  def start_clock(self, step: int) -> None:
    """Times steps/s and the ETA from now, as if ``step`` had just finished.

    The trainer calls it once the first step of a start has finished, so the compile time of the
    step (seconds to minutes) is left out of the rate and the ETA.
    """
    self._last_time, self._last_step = time.time(), step

  def progress(self, step: int, metrics: dict) -> None:
    """Console line: step, loss, steps/s and ETA (from the steps after the first, compiled one)."""
    now = time.time()
    shown = " ".join(f"{k.split('/')[-1]}={_to_python(v):.4g}" for k, v in metrics.items()
                     if k in ("train/loss", "train/temperature", "train/scale", "train/grad_norm"))
    if step == self._last_step:  # only the first step so far: its time is mostly compiling
      logger.info("step %d/%d  %s  (first step, compiled)", step, self.total_steps, shown)
      return
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    logger.info("step %d/%d  %s  %.2f steps/s  ETA %s", step, self.total_steps, shown,
                steps_per_sec, _format_seconds(eta))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _data_summary(data) -> str:
  where = data.get("name") or data.get("path") or data.get("urls") or ""
  return f"{data.source}" + (f" {where}" if where else "") + f"[{data.split}]"


def config_summary(config, config_file: str | None = None) -> str:
  """One console line of a run's key settings (the full config is in ``config.json``).

  ``config_file``: where the full config is, named at the end of the line.
  """
  m = config.model
  parts = [f"{config.total_steps} steps", f"batch {config.batch_size}", f"seed {config.seed}",
           f"data {_data_summary(config.data)}",
           f"image {m.image_encoder} ({m.image_pooling}) -> {m.image_projector}",
           f"text {m.text_encoder} ({m.text_pooling}) -> {m.text_projector}",
           f"embed {m.embed_dim}", f"loss {config.loss.name}",
           f"lr {config.optim.learning_rate:g}",
           f"mesh {tuple(config.mesh.shape)} over {tuple(config.mesh.axes)}"]
  if config.evals:
    parts.append("evals " + ", ".join(config.evals.keys()))
  line = "config: " + "; ".join(parts)
  return line + (f". Full config: {config_file}" if config_file else "")


def count_parameters(params) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(math.prod(getattr(x, "shape", ())) for x in jax.tree.leaves(params)))


def parameters_line(params) -> str:
  """``trainable parameters: 1,234,567 (image: ..., text: ..., logit: ...)``, one console line."""
  parts = [f"{name}: {count_parameters(sub):,}" for name, sub in params.items()] if isinstance(
      params, dict) else []
  return f"trainable parameters: {count_parameters(params):,}" + (
      f" ({', '.join(parts)})" if parts else "")


def last_metrics(workdir: str) -> dict:
  """The latest value of every key in ``WORKDIR/metrics.jsonl`` ({} without the file): what a
  completed run's ``train_and_evaluate`` returns when it is run again."""
  path = storage.join(workdir, METRICS_FILE)
  if not storage.exists(path):
    return {}
  latest: dict = {}
  for row, _ in parse_metrics(storage.read_bytes(path))[0]:
    latest.update({k: v for k, v in row.items() if k != "step"})
  return latest


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
