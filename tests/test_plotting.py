"""align_jax.analysis.plotting: a run's curves from metrics.jsonl, the CKA heat-map, `align-jax plot`."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import helpers_cli
from align_jax.analysis import plotting
from align_jax.cli import plot as plot_cli
from align_jax.run import metrics as reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path), 20, tensorboard=False)
  writer.write(0, {"eval/i2t@1": 0.01, "eval/t2i@1": 0.02})
  for step in (5, 10, 15, 20):
    writer.write(step, {"train/loss": 4.0 / step, "train/temperature": 0.07 - step * 1e-3,
                        "train/grad_norm": 1.0})
  writer.write(10, {"eval/i2t@1": 0.5, "eval/t2i@1": 0.4})
  writer.write(20, {"eval/i2t@1": 0.8, "eval/t2i@1": float("nan")})
  return str(tmp_path)


def test_series_are_the_metrics_rows(tmp_path):
  data = plotting.series(plotting.read_metrics(_run(tmp_path)))
  assert list(data) == ["train/loss", "train/temperature", "eval/i2t@1", "eval/t2i@1"]
  np.testing.assert_array_equal(data["train/loss"][0], [5, 10, 15, 20])
  np.testing.assert_allclose(data["train/loss"][1], [0.8, 0.4, 4 / 15, 0.2])
  np.testing.assert_array_equal(data["eval/i2t@1"][0], [0, 10, 20])
  np.testing.assert_allclose(data["eval/i2t@1"][1], [0.01, 0.5, 0.8])
  np.testing.assert_array_equal(data["eval/t2i@1"][0], [0, 10])  # the NaN is left out


def test_plot_command_writes_the_png(tmp_path):
  workdir = _run(tmp_path)
  env = {**os.environ, "PYTHONPATH": REPO}
  result = subprocess.run([sys.executable, "-m", "align_jax.cli.main", "plot", workdir], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == f"wrote {workdir}/curves.png"
  with Image.open(os.path.join(workdir, "curves.png")) as image:
    assert image.format == "PNG" and image.size[0] > 800 and image.size[1] > 500  # 3 x 2 panels
  status = helpers_cli.run_command(plot_cli, [str(tmp_path / "no")])
  assert re.match(r"^error: .*/no/metrics.jsonl not found: WORKDIR must be", str(status)), status


def test_heatmap_shape_check_and_name_wrapping(tmp_path):
  assert plotting.wrap_name("sentence-transformers/all-roberta-large-v1", 22) == (
      "sentence-transformers/\nall-roberta-large-v1")
  long = "/home/someone/.cache/align_jax/demo_online/tiny_dinov2"
  assert plotting.wrap_name(long).replace("\n", "") == long  # wrapped, never cut
  with pytest.raises(ValueError, match=r"values of shape \(1, 2\) for 2 image and 2 text"):
    plotting.cka_heatmap([[0.1, 0.2]], ["a", "b"], ["c", "d"], str(tmp_path / "x.png"))
  path = plotting.cka_heatmap([[0.1, 0.9]], [long], ["c", "d"], str(tmp_path / "h.png"))
  with Image.open(path) as image:
    assert image.size[0] > 450
