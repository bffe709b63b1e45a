"""metrics.jsonl and TensorBoard after kills: torn lines, replayed steps, step-0 evals, same points.

A "kill" here is a MetricsWriter dropped without ``close()`` (every row is on disk when ``write``
returns), optionally followed by a torn line as a kill during a write leaves it; the resumed
writer is built as train.py builds it (``resume_step`` = the restored checkpoint, 0 = fresh).
TensorBoard files are read back with TensorBoard's own reader.
"""

import json
import logging
import os
import struct

import pytest

from align_jax.run import metrics as reporting, storage, tb_events

from gcs_emulator import gcs_bucket  # noqa: F401  (pytest fixture)
from helpers_metrics import assert_tensorboard_equals_metrics, rows as _rows, tensorboard

EVAL = {"eval/i2t@1": 0.25, "eval/t2i@5": 0.5}


def _train(step):
  return {"train/loss": 10.0 / step, "train/learning_rate": 1e-3 * step}


def _kill_mid_write(workdir):
  """What a kill during a write leaves: the start of a line, no newline."""
  path = storage.join(workdir, "metrics.jsonl")
  storage.write_bytes(path, storage.read_bytes(path) + b'{"step": 35, "train/lo')


def test_torn_line_is_dropped_and_reported(tmp_path, caplog):
  workdir = str(tmp_path)
  writer = reporting.MetricsWriter(workdir, 100)
  for step in (10, 20, 30):
    writer.write(step, _train(step))
  _kill_mid_write(workdir)  # the run dies; the checkpoint at 30 was saved
  with caplog.at_level(logging.WARNING, logger="align_jax"):
    writer = reporting.MetricsWriter(workdir, 100, resume_step=30)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [f"{tmp_path}/metrics.jsonl: dropped 1 unreadable line(s) (a write cut short "
                      "by a kill?)"]
  assert [r["step"] for r in _rows(workdir)] == [10, 20, 30]
  writer.write(40, _train(40))
  writer.close()
  assert [r["step"] for r in _rows(workdir)] == [10, 20, 30, 40]
  assert _rows(workdir)[-1] == {"step": 40, **_train(40)}
  assert_tensorboard_equals_metrics(workdir)


def test_unreadable_lines_anywhere_are_dropped(tmp_path, caplog):
  lines = [b'{"step": 1, "train/loss": 1.0}', b"\xff\xfe garbage", b"[1, 2]", b'{"loss": 3}',
           b'{"step": true}', b'{"step": 2, "train/loss": 2.0}']
  (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  with caplog.at_level(logging.WARNING, logger="align_jax"):
    reporting.MetricsWriter(str(tmp_path), 10, resume_step=5).close()
  assert "dropped 4 unreadable line(s)" in caplog.text and str(tmp_path) in caplog.text
  assert _rows(str(tmp_path)) == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 2.0}]


def test_rows_after_the_restored_step_are_dropped_eval_rows_too(tmp_path):
  workdir = str(tmp_path)
  writer = reporting.MetricsWriter(workdir, 100)
  writer.write(0, EVAL)
  for step in (10, 20, 30):  # eval at every step; checkpoints at 20; killed after the step-30 logs
    writer.write(step, _train(step))
    writer.write(step, {k: v + step for k, v in EVAL.items()})
  writer = reporting.MetricsWriter(workdir, 100, resume_step=20)
  writer.write(30, _train(30))  # the resumed run logs step 30 again
  writer.write(30, {k: v + 30 for k, v in EVAL.items()})
  writer.close()
  rows = _rows(workdir)
  assert [(r["step"], "eval/i2t@1" in r) for r in rows] == [
      (0, True), (10, False), (10, True), (20, False), (20, True), (30, False), (30, True)]
  assert_tensorboard_equals_metrics(workdir)


def test_fresh_restarts_keep_one_step0_eval_row(tmp_path):
  """Killed before the first checkpoint, four times: one step-0 row, as after a single run."""
  workdir = str(tmp_path)
  for _ in range(4):
    writer = reporting.MetricsWriter(workdir, 100, resume_step=0)  # nothing restored
    writer.write(0, EVAL)  # eval_at_start
    writer.write(10, _train(10))
  writer.close()
  assert [r["step"] for r in _rows(workdir)] == [0, 10]
  assert_tensorboard_equals_metrics(workdir)


def test_repeated_rows_of_older_runs_keep_one(tmp_path):
  rows = [{"step": 0, **EVAL}] * 4 + [{"step": 10, **_train(10)}, {"step": 10, **EVAL}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  reporting.MetricsWriter(str(tmp_path), 100, resume_step=10).close()
  assert _rows(str(tmp_path)) == [rows[0], rows[4], rows[5]]


def test_tensorboard_keeps_tag_names_values_and_wall_times(tmp_path):
  workdir = str(tmp_path)
  writer = reporting.MetricsWriter(workdir, 100)
  writer.write(0, {**EVAL, "eval/zero_shot@imagenet/top1": 0.125, "data/skipped_corrupt": 3,
                   "train/loss": float("nan"), "note": "text"})
  writer.write(10, _train(10))
  writer.write(20, _train(20))
  before = tensorboard(workdir)
  assert sorted(before) == ["data/skipped_corrupt", "eval/i2t@1", "eval/t2i@5",
                            "eval/zero_shot@imagenet/top1", "train/learning_rate", "train/loss"]
  assert before["eval/i2t@1"][0][:2] == (0, 0.25)
  assert [p[:2] for p in before["train/loss"]] == [(10, 1.0), (20, 0.5)]  # NaN: not a point
  reporting.MetricsWriter(workdir, 100, resume_step=10).close()  # resume at 10: step 20 dropped
  after = tensorboard(workdir)
  assert after["train/loss"] == before["train/loss"][:1]  # the same wall time, not the rebuild's
  assert after["eval/i2t@1"] == before["eval/i2t@1"]
  assert len([n for n in os.listdir(tmp_path / "tensorboard") if "tfevents" in n]) == 1
  assert_tensorboard_equals_metrics(workdir)


def test_event_file_reader_stops_at_a_torn_frame(tmp_path):
  events = tb_events.EventFile(str(tmp_path))
  events.add(3, {"a": 1.5}, wall_time=7.0)
  events.add(4, {"a": 2.5}, wall_time=8.0)
  events.close()
  data = open(events.path, "rb").read()
  assert tb_events.read_steps(data) == [(7.0, 3), (8.0, 4)]
  assert tb_events.read_steps(data[:-3]) == [(7.0, 3)]
  corrupt = bytearray(data)
  corrupt[-6] ^= 0xFF  # a flipped payload byte of the last event: its CRC no longer matches
  assert tb_events.read_steps(bytes(corrupt)) == [(7.0, 3)]
  # the frame layout TensorBoard expects: length, CRC of the length, payload, CRC of the payload
  (length,) = struct.unpack_from("<Q", data)
  assert len(data) > 16 + length


def test_gcs_workdir_metrics_and_tensorboard(gcs_bucket, tmp_path, monkeypatch, caplog):
  """The same guarantees on gs://, where both files are rewritten whole (no append)."""
  monkeypatch.chdir(tmp_path)
  workdir = f"{gcs_bucket}/run"
  writer = reporting.MetricsWriter(workdir, 100)
  writer.write(0, EVAL)
  for step in (10, 20, 30):
    writer.write(step, _train(step))
  _kill_mid_write(workdir)
  with caplog.at_level(logging.WARNING, logger="align_jax"):
    writer = reporting.MetricsWriter(workdir, 100, resume_step=20)
  assert f"{workdir}/metrics.jsonl: dropped 1 unreadable line(s)" in caplog.text
  writer.write(30, _train(30))
  writer.write(30, EVAL)
  writer.close()
  assert [r["step"] for r in _rows(workdir)] == [0, 10, 20, 30, 30]
  assert_tensorboard_equals_metrics(workdir)
  assert len(storage.listdir(f"{workdir}/tensorboard")) == 1
  assert os.listdir(tmp_path) == []  # no local gs: folder


@pytest.mark.parametrize("resume_step", [0, 7])
def test_no_file_yet(tmp_path, resume_step):
  writer = reporting.MetricsWriter(str(tmp_path / "new"), 10, resume_step=resume_step)
  writer.write(8, _train(8))
  writer.close()
  assert _rows(str(tmp_path / "new")) == [{"step": 8, **_train(8)}]


def test_eta_leaves_out_the_first_steps_compile_time(tmp_path, caplog, monkeypatch):
  """Step 1 took 60 s (compiling), then 10 steps took 1 s: 10 steps/s, ETA of 89 steps = 0:08."""
  now = [0.0]
  monkeypatch.setattr(reporting.time, "time", lambda: now[0])
  writer = reporting.MetricsWriter(str(tmp_path), 100, tensorboard=False)  # t = 0
  caplog.set_level(logging.INFO, logger="align_jax")
  now[0] = 60.0
  writer.start_clock(1)  # the first step finished
  writer.progress(1, {"train/loss": 2.0})
  now[0] = 61.0
  writer.progress(11, {"train/loss": 1.0})
  lines = [r.getMessage() for r in caplog.records]
  assert lines == ["step 1/100  loss=2  (first step, compiled)",
                   "step 11/100  loss=1  10.00 steps/s  ETA 0:08"]


def test_config_line_parameters_line_and_last_metrics(tmp_path):
  import numpy as np
  from configs import demo
  line = reporting.config_summary(demo.get_config("steps=7"), "/runs/a/config.json")
  assert "\n" not in line and line.startswith("config: 7 steps; batch 512; seed 0; data "
                                              "synthetic[train]; image random_mlp (cls) -> mlp;")
  assert line.endswith("; evals heldout. Full config: /runs/a/config.json")
  params = {"image": {"w": np.zeros((3, 4))}, "text": {"w": np.zeros(5)}, "logit": np.zeros(())}
  assert reporting.parameters_line(params) == (
      "trainable parameters: 18 (image: 12, text: 5, logit: 1)")
  assert reporting.last_metrics(str(tmp_path)) == {}
  writer = reporting.MetricsWriter(str(tmp_path), 10, tensorboard=False)
  writer.write(5, {"train/loss": 2.0})
  writer.write(10, {"train/loss": 1.0})
  writer.write(10, EVAL)
  assert reporting.last_metrics(str(tmp_path)) == {"train/loss": 1.0, **EVAL}
