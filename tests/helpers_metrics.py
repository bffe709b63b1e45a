"""Reading a run's metrics.jsonl and TensorBoard files back, for tests (local or gs:// workdirs)."""

import json
import os
import tempfile

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from align_jax.run import metrics as reporting, storage


def rows(workdir: str) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl``, in order."""
  return [json.loads(line) for line in storage.read_text(
      storage.join(workdir, "metrics.jsonl")).splitlines()]


def tensorboard(workdir: str) -> dict[str, list[tuple[int, float, float]]]:
  """``{tag: [(step, value, wall_time)]}`` as TensorBoard's own reader sees ``workdir/tensorboard``.

  TensorBoard reads gs:// only through TensorFlow, so a URL folder is copied to a local one first.
  """
  folder = storage.join(workdir, "tensorboard")
  with tempfile.TemporaryDirectory() as local:
    if storage.is_url(folder):
      for name in storage.listdir(folder):
        with open(os.path.join(local, name), "wb") as f:
          f.write(storage.read_bytes(storage.join(folder, name)))
      folder = local
    accumulator = event_accumulator.EventAccumulator(
        folder, size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def assert_tensorboard_equals_metrics(workdir: str) -> None:
  """Every finite number of every metrics.jsonl row is one TensorBoard point (same tag, step and
  float32 value), and TensorBoard has no other point."""
  expected: dict[str, list] = {}
  for row in rows(workdir):
    for tag, value in reporting.scalars(row).items():
      expected.setdefault(tag, []).append((row["step"], float(np.float32(value))))
  got = {tag: [(step, value) for step, value, _ in points]
         for tag, points in tensorboard(workdir).items()}
  assert got == expected
