"""benchmarks/accelerator_suite.py: the smoke run prints every row; FLOPs, search, timeouts."""

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import accelerator_suite as suite  # noqa: E402


@pytest.mark.parametrize("cases", [
    # the default suite's lighter twin: one loss case and one train-step case (with its
    # largest-batch search), every row property below checked on them
    "loss 32k,stored SAIL GLU",
    pytest.param("", marks=pytest.mark.slow)])  # every case, as on an accelerator
def test_smoke_run_prints_every_row_with_consistent_numbers(tmp_path, cases):
  out = tmp_path / "suite.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  done = subprocess.run([sys.executable, "benchmarks/accelerator_suite.py", "--smoke",
                         f"--out={out}"] + ([f"--cases={cases}"] if cases else []), cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  chosen = cases.split(",") if cases else list(suite.CASES)
  want = [(case, variant) for case, (_, variants) in suite.CASES.items() if case in chosen
          for variant in variants]
  assert sorted((r["case"], r["variant"]) for r in rows) == sorted(want)
  table_lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
  assert len(table_lines) == 1 + len(want)  # header + one line per row
  for row in rows:
    assert row["status"] == "ok", row
    assert row["step_s"] > 0 and row["compile_s"] > 0
    assert row["samples_per_s"] == pytest.approx(row["batch"] / row["step_s"])
    assert row["mfu"] is None  # CPU: no bf16 peak in the table
    flops = row["tflops"] * 1e12 * row["step_s"]
    if row["case"].startswith("loss"):
      assert flops == pytest.approx(6.0 * row["batch"] ** 2 * 16)  # smoke D = 16
  sail = {r["variant"]: r for r in rows if r["case"] == "stored SAIL GLU"}
  assert sail["largest batch"]["batch"] >= sail["batch 32k"]["batch"]


def test_flop_formulas_give_known_answers():
  # lin, fc1, fc2 of 4 -> 4 on every token: 3 x (2 * 16) x 3 (fwd + bwd) = 288 per token;
  # text head 2 x 96; 4 tokens; 2 examples; loss 6 * 2^2 * 4.
  assert suite.freeze_align_flops(2, 3, 1, 4, 4) == 2 * (4 * 288 + 192) + 96
  # 1 layer, D 2, F 3, T 5: 8*5*4 + 4*5*2*3 + 4*25*2.
  assert suite.encoder_flops(1, 2, 3, 5) == 480
  # batch 2, widths (2, 1), mult 2, e 3; a map d -> h on 2 rows costs 6 * 2 * d * h.
  image = 2 * (6 * 2 * 2 * 4) + 6 * 2 * 4 * 3  # gate, value 2 -> 4; out 4 -> 3
  text = 2 * (6 * 2 * 1 * 2) + 6 * 2 * 2 * 3  # gate, value 1 -> 2; out 2 -> 3
  assert suite.glu_flops(2, (2, 1), 2, 3) == image + text + 6 * 2**2 * 3


class _Kind:
  def __init__(self, kind):
    self.device_kind = kind


@pytest.mark.parametrize("kind,peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v5 lite", 197e12),
                                       ("TPU v5p", 459e12), ("cpu", None)])
def test_peak_rate_by_device_kind(kind, peak):
  assert suite.peak_flops(_Kind(kind)) == peak


class _FakeBench:
  """Batches up to ``fits`` run in ``seconds_per_row * batch``; larger ones are out of memory."""
  device = _Kind("cpu")

  def __init__(self, fits, seconds_per_row=1e-6, compile_s=0.01):
    self.fits, self.per_row, self.compile_s, self.tried = fits, seconds_per_row, compile_s, []

  def trial(self, row, batch, flops, deadline):
    self.tried.append(batch)
    row.batch, row.compile_s = batch, self.compile_s
    if batch > self.fits:
      row.status = "OOM"
      return row, None
    row.step_s = self.per_row * batch
    return suite.fill_rates(row, flops, self.device), None


def test_largest_batch_doubles_until_out_of_memory_cap_or_time():
  recorder = suite.Recorder(None)
  bench = _FakeBench(fits=48)
  row = suite.largest_batch(bench, "c", "largest batch", 8, 1024, lambda b: 1.0 * b,
                            suite.Deadline(60), recorder, first_variant="first")
  assert bench.tried == [8, 16, 32, 64] and row.batch == 32
  assert "64 OOM" in row.note
  assert [r.variant for r in recorder.rows] == ["first", "largest batch"]
  assert recorder.rows[0].batch == 8
  capped = suite.largest_batch(_FakeBench(fits=10**6), "c", "v", 8, 32, lambda b: 1.0,
                               suite.Deadline(60), suite.Recorder(None))
  assert capped.batch == 32 and "cap 32 reached" in capped.note
  slow = _FakeBench(fits=10**6, seconds_per_row=1.0)  # batch 8: 8 s a step; 16 would need 32+
  timed = suite.largest_batch(slow, "c", "v", 8, 1024, lambda b: 1.0, suite.Deadline(20),
                              suite.Recorder(None))
  assert slow.tried == [8] and timed.batch == 8 and "16 not tried (time budget)" in timed.note
  nothing = suite.largest_batch(_FakeBench(fits=4), "c", "v", 8, 64, lambda b: 1.0,
                                suite.Deadline(60), suite.Recorder(None))
  assert nothing.status == "8 OOM" and nothing.step_s is None


def test_a_case_past_its_budget_is_killed_and_reported():
  start = time.monotonic()
  rows = suite.run_isolated("loss 32k", 1.0, smoke=True)  # jax alone takes longer to import
  assert time.monotonic() - start < 30
  assert [r.variant for r in rows] == suite.CASES["loss 32k"][1]
  assert all(r.status == "timed out after 1 s (case budget)" for r in rows)
