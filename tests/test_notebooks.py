"""Every notebook in notebooks/ runs top to bottom on CPU, in a fresh kernel and an empty folder.

The kernel sees the repository through PYTHONPATH (so the notebooks' Colab setup cell skips the
clone) and one CPU device, as a Colab CPU runtime would, and ``HF_HUB_OFFLINE=1``, so each notebook
takes its offline path (tiny models; the hub path is ``tests/test_demos.py``'s). Beyond "no cell raised", each notebook's
printed results are checked: the demos learn (held-out retrieval well above chance), AlignedModel
reproduces the trainer's own held-out evaluation, and the selection writes a ranked table.
"""

import ast
import glob
import json
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
TIMEOUT_S = 600  # per cell


def _run(path, workdir, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on Colab
  monkeypatch.setenv("ALIGN_JAX_CACHE", str(workdir / "cache"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the offline path (align_jax.testing.demos.use_hub)
  monkeypatch.setenv("ALIGN_JAX_RUNS", str(workdir / "runs"))  # else a temporary folder
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(workdir)}})
  client.execute()
  return "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("output_type") == "stream")


def _printed_dicts(text, first_key):
  """The dicts the notebook printed whose first key is ``first_key``."""
  return [ast.literal_eval(m) for m in re.findall(r"\{'" + re.escape(first_key) + r"': [^}]*\}",
                                                  text)]


# How close AlignedModel's held-out recall must be to the trainer's final evaluation, which the
# notebooks print rounded to 3 decimals: the same images and transform give the same numbers;
# trained on stored features, the raw-input model differs only by the features' float16 rounding.
TOLERANCE = {"zero_shot_and_retrieval.ipynb": 6e-4, "train_on_stored_features.ipynb": 0.02}


def _check_training(name, text, workdir):
  del workdir
  trainer, inference = _printed_dicts(text, "eval/i2t@1"), _printed_dicts(text, "i2t@1")
  assert trainer and inference, f"{name} printed no retrieval results:\n{text[-2000:]}"
  final = trainer[-1]
  assert final["eval/i2t@10"] > 0.3 and final["eval/t2i@10"] > 0.3, final  # chance: 10/256
  for key, value in inference[0].items():
    assert abs(value - final[f"eval/{key}"]) <= TOLERANCE[name], (key, inference[0], final)


def _check_selection(name, text, workdir):
  with open(workdir / "runs" / "selection" / "ranking.json") as f:
    rows = json.load(f)
  assert len(rows) == 4, rows  # 2 image x 2 text candidates
  scores = [row["linear_cka"] for row in rows]
  assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores), scores
  assert f"best pair: {rows[0]['image_encoder']} + {rows[0]['text_encoder']}" in text, name
  assert (workdir / "runs" / "selection" / "cka_heatmap.png").stat().st_size > 0


CHECKS = {"zero_shot_and_retrieval.ipynb": _check_training,
          "train_on_stored_features.ipynb": _check_training,
          "encoder_pair_selection.ipynb": _check_selection}


def test_every_notebook_is_tested():
  assert {os.path.basename(p) for p in NOTEBOOKS} == set(CHECKS)


def test_notebooks_hold_no_local_paths():
  for path in NOTEBOOKS:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
      assert "/work/" not in cell.source and "/tmp/" not in cell.source, path
      if cell.cell_type == "code":
        assert not cell.get("outputs"), f"{path}: store notebooks without outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  name = os.path.basename(path)
  text = _run(path, tmp_path, monkeypatch)
  assert "no network: HF_HUB_OFFLINE=1 -> offline path" in text, text[:2000]
  assert "TqdmWarning" not in text and "IProgress" not in text, text[:3000]
  assert f"runs and exports go to {tmp_path / 'runs'}" in text
  # Everything the notebook wrote is under ALIGN_JAX_RUNS (and the encoder cache): nothing is
  # left in the folder it runs in.
  assert sorted(os.listdir(tmp_path)) == ["cache", "runs"], os.listdir(tmp_path)
  CHECKS[name](name, text, tmp_path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_setup_cell_installs_nothing_outside_colab(path):
  """Opened in a clone where align_jax is not installed, the first code cell puts the clone on
  sys.path and says so; it never runs pip (only on Colab)."""
  import subprocess
  import sys
  setup = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
  guard = "import subprocess\nsubprocess.run = None  # any pip call fails the test\n"
  check = "\nimport align_jax\nprint('imported from', align_jax.__file__)\n"
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ALIGN_JAX_SOURCE")}
  result = subprocess.run([sys.executable, "-c", guard + setup.source + check],
                          cwd=os.path.join(ROOT, "notebooks"), env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"align_jax is not installed: using the clone at {ROOT} (added to sys.path, nothing "
      "installed; `pip install .` there installs it)",
      f"imported from {os.path.join(ROOT, 'align_jax', '__init__.py')}"]
