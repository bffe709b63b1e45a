"""Training on image-caption files: bad records are counted in metrics.jsonl, resume is exact."""

import json
import os
import shutil

import pytest

import helpers_data
from align_jax.train import loop as train
from train_utils import tiny_online_config


@pytest.fixture(scope="module")
def manifest_config(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  names = helpers_data.write_image_folder(str(root / "images"), 46)
  rows = [{"image": f"images/{n}", "caption": [helpers_data.caption(i), helpers_data.caption(i, 1)]}
          for i, n in enumerate(names)]
  (root / "images" / "broken.jpg").write_bytes(helpers_data.truncated_jpeg())
  rows.insert(5, {"image": "images/broken.jpg", "caption": "a broken image"})
  rows.insert(9, {"image": "images/missing.jpg", "caption": "a missing image"})
  helpers_data.write_manifest(str(root / "train.jsonl"), rows)
  config = tiny_online_config(tmp_path_factory.mktemp("models"))
  config.data.source = "manifest"
  config.data.path = str(root / "train.jsonl")
  config.total_steps, config.log_every, config.checkpoint_every = 6, 1, 3
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}, records


def test_bad_records_counted_and_resume_exact(manifest_config, tmp_path, devices):
  train.train_and_evaluate(manifest_config, str(tmp_path / "whole"))
  losses, records = _losses(tmp_path / "whole")
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  last = [r for r in records if "train/loss" in r][-1]
  # 48 records, 16 read per step: by step 6 both bad records were met twice (two whole epochs),
  # maybe thrice (the third epoch has begun)
  assert last["data/skipped_corrupt_image"] in (2, 3)
  assert last["data/skipped_missing_file"] in (2, 3)

  # Resume from the step-3 checkpoint (as after a crash): the same losses at steps 4..6.
  shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
  train.train_and_evaluate(manifest_config, str(tmp_path / "resumed"))
  resumed, _ = _losses(tmp_path / "resumed")
  assert resumed == losses
