"""Standalone evaluation of a checkpoint equals the in-training evaluation at the same step."""

import json
import os

import numpy as np
import pytest

from align_jax.run import reader as run_dir
from align_jax.train import loop as train
from align_jax.evaluate import standalone
from train_utils import tiny_config


def _eval_lines(workdir):
  """metrics.jsonl eval lines by step (lines that hold eval/ keys)."""
  found = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      evals = {k: v for k, v in row.items() if k.startswith("eval/")}
      if evals:
        found[row["step"]] = evals
  return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  # 30 steps; retrieval on 64 held-out pairs and a checkpoint at steps 15 and 30.
  config = tiny_config(total_steps=30, eval_every=15, checkpoint_every=15, log_every=15,
                       **{"optim.learning_rate": 1e-2})
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_latest_checkpoint_matches_training_eval_and_writes_json(trained):
  config, workdir = trained
  report = standalone.evaluate_checkpoint(config, workdir)
  in_training = _eval_lines(workdir)
  assert report["step"] == 30
  assert set(report["results"]) == {"eval/i2t@1", "eval/i2t@5", "eval/t2i@1", "eval/t2i@5"}
  for key, value in in_training[30].items():
    np.testing.assert_allclose(report["results"][key], value, rtol=0, atol=1e-7)
  with open(os.path.join(workdir, "eval_results.json")) as f:
    written = json.load(f)
  assert written == report
  assert written["checkpoint"] == os.path.join(os.path.abspath(workdir), "checkpoints", "30")
  # A trained model: far above the 1/64 chance recall@1.
  assert report["results"]["eval/i2t@1"] > 10 / 64


def test_given_step_restores_that_checkpoint(trained):
  config, workdir = trained
  report = standalone.evaluate_checkpoint(config, workdir, step=15)
  in_training = _eval_lines(workdir)
  assert report["step"] == 15
  for key, value in in_training[15].items():
    np.testing.assert_allclose(report["results"][key], value, rtol=0, atol=1e-7)
  # The step-15 and step-30 params differ, so the restore really picked the step.
  params15, _, _ = run_dir.restore_params(workdir, 15)
  params30, _, _ = run_dir.restore_params(workdir)
  np.testing.assert_array_equal(params30["image"]["hidden"]["kernel"],
                                run_dir.restore_params(workdir).params["image"]["hidden"]["kernel"])
  assert not np.allclose(params15["image"]["hidden"]["kernel"],
                         params30["image"]["hidden"]["kernel"])


def test_missing_checkpoints_name_the_folder(trained, tmp_path):
  config, workdir = trained
  no_evals = config.copy_and_resolve_references()
  no_evals.evals = {}
  with pytest.raises(ValueError, match="config.evals is empty"):
    standalone.evaluate_checkpoint(no_evals, workdir)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty_run.*checkpoints"):
    standalone.evaluate_checkpoint(config, str(tmp_path / "empty_run"))
  assert not (tmp_path / "empty_run").exists()  # looking did not create the folder
  (tmp_path / "no_steps" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*no_steps.*checkpoints"):
    standalone.evaluate_checkpoint(config, str(tmp_path / "no_steps"))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 4 .*steps: \[15, 30\]"):
    standalone.evaluate_checkpoint(config, workdir, step=4)


def test_damaged_latest_checkpoint_evaluates_the_previous_one(trained, tmp_path, caplog):
  """Issue 21, item 5: the newest checkpoint that restores is evaluated, the damaged one is
  named in one line (with the steps to pick with --step) and left in place."""
  import shutil
  config, workdir = trained
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  (damaged / "checkpoints" / "30" / "state" / "_METADATA").write_text("{garbage")
  caplog.set_level("INFO")
  report = standalone.evaluate_checkpoint(config, str(damaged))
  assert report["step"] == 15 and report["checkpoint"] == f"{damaged}/checkpoints/15"
  for key, value in _eval_lines(workdir)[15].items():
    np.testing.assert_allclose(report["results"][key], value, rtol=0, atol=1e-7)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert warnings[0].startswith(f"checkpoint step 30 at {damaged}/checkpoints/30 cannot be "
                                "restored (state: metadata: "), warnings[0]
  assert warnings[0].endswith("left it in place and used step 15 instead (steps available with "
                              "--step: 15)")
  assert sorted(os.listdir(damaged / "checkpoints")) == ["15", "30"]
  assert not (damaged / "checkpoints_corrupt").exists()
