"""Config mistakes give one clear line naming the real key or file:line; skips are logged capped."""

import json
import logging
import os
import subprocess
import sys

import ml_collections
import pytest

from align_jax.config import errors, schema as config_lib
from align_jax.data import pipeline, skip_log, transforms

import helpers_data as hd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def _first_error_line(result):
  assert result.returncode != 0
  assert "Traceback" not in result.stdout + result.stderr, result.stderr[-2000:]
  return next(line for line in result.stderr.splitlines() if line.startswith("error: "))


def _config_file(tmp_path, body):
  path = tmp_path / "my_config.py"
  path.write_text("from configs import demo\n\n\ndef get_config(arg=None):\n" + body)
  return str(path)


@pytest.mark.parametrize("body, expected", [
    # set through a variable holding the block
    ("  m = config.optim\n  m.learnin_rate = 1.0\n",
     "unknown config key 'optim.learnin_rate' in {path}:7; did you mean 'optim.learning_rate'?"),
    ("  config.batchsize = 8\n",
     "unknown config key 'batchsize' in {path}:6; did you mean 'batch_size'?"),
    # nested keys, found by comparing the loaded tree with the schema: the first one the file sets
    ("  config.optim.warmup_steps = 5\n  config.model.img_encoder = 'x'\n"
     "  config.data.sorce = 'y'\n",
     "unknown config key 'model.img_encoder' in {path}:7; did you mean 'model.image_encoder'? "
     "(also unknown: 'data.sorce')"),
    # read, not set
    ("  config.optim.warmup_steps = config.optim.warmup\n",
     "unknown config key 'optim.warmup' in {path}:6; did you mean 'optim.warmup_steps'?"),
])
def test_unknown_key_in_a_config_file_names_the_full_key_and_its_line(tmp_path, body, expected):
  path = _config_file(tmp_path, "  config = demo.get_config()\n" + body + "  return config\n")
  line = _first_error_line(_main(f"--config={path}", f"--workdir={tmp_path}/w"))
  assert line == "error: " + expected.format(path=path)


def test_config_file_with_a_syntax_error_gives_file_line_and_message(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(arg=None)\n  return None\n")
  line = _first_error_line(_main(f"--config={path}", f"--workdir={tmp_path}/w"))
  assert line == f"error: could not load --config: {path}:1: SyntaxError: expected ':'"


def test_error_raised_by_a_config_file_gives_file_line(tmp_path):
  path = _config_file(tmp_path, "  return undefined_name\n")
  line = _first_error_line(_main(f"--config={path}", f"--workdir={tmp_path}/w"))
  assert line == (f"error: could not load --config: {path}:5: NameError: name 'undefined_name' "
                  "is not defined")


@pytest.mark.parametrize("flag, expected", [
    ("--config.optim.lr=1e-3",
     "unknown config key 'optim.lr'; did you mean 'optim.learning_rate'?"),
    ("--config.lr=1e-3", "unknown config key 'lr'; did you mean 'optim.learning_rate'?"),
    ("--config.model.img_encoder=x",
     "unknown config key 'model.img_encoder'; did you mean 'model.image_encoder'?"),
    ("--config.data.sorce=x", "unknown config key 'data.sorce'; did you mean 'data.source'?"),
])
def test_unknown_command_line_key_gets_did_you_mean(tmp_path, flag, expected):
  line = _first_error_line(_main("--config=configs/demo.py", flag, f"--workdir={tmp_path}/w"))
  assert line == f"error: {expected}"


def test_bogus_data_source_names_the_source_and_its_choices(tmp_path):
  line = _first_error_line(_main("--config=configs/demo.py", "--config.data.source=bogus",
                                 f"--workdir={tmp_path}/w"))
  assert line == ("error: unknown data source 'bogus': set --config.data.source to one of "
                  "'synthetic', 'features', 'tfds', 'webdataset', 'manifest', 'parquet', "
                  "'synthetic_shapes'")


def test_suggestions():
  assert errors.suggest_key("optim.lr") == "optim.learning_rate"
  assert errors.suggest_key("optim.wd") == "optim.weight_decay"
  assert errors.suggest_key("data.sorce") == "data.source"
  assert errors.suggest_key("lr") == "optim.learning_rate"
  assert errors.suggest_key("zzz.qqq") is None
  assert config_lib.key_exists("optim.learning_rate") and config_lib.key_exists("evals.x.y")
  assert not config_lib.key_exists("optim.lr")


def test_skipped_records_are_logged_capped(tmp_path, caplog):
  """40 missing images of 48, read in three evaluation passes: a handful of lines, not 120."""
  images = tmp_path / "images"
  names = hd.write_image_folder(str(images), 48)
  for name in names[8:]:
    (images / name).unlink()
  (tmp_path / "m.jsonl").write_text("".join(
      json.dumps({"image": n, "caption": [hd.caption(i)]}) + "\n" for i, n in enumerate(names)))
  cfg = ml_collections.ConfigDict({"source": "manifest", "path": str(tmp_path / "m.jsonl"),
                                   "image_root": str(images), "num_workers": 0})
  with caplog.at_level(logging.WARNING):
    for _ in range(3):
      source = pipeline.make_pair_source(
          cfg, global_batch_size=8, seed=0, tokenize=hd.fake_tokenize, train=False,
          image_transform=transforms.make_image_transform(16, train=False), process_index=0,
          process_count=1)
      for _ in source:
        pass
      assert source.skipped() == {"data/skipped_missing_file": 40}  # all still counted
  lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  individual = [l for l in lines if l.startswith("data: skipped_missing_file (#")]
  assert len(individual) == skip_log.LOG_FIRST
  assert "further missing_file skips in manifest" in individual[-1]
  assert [l for l in lines if "so far" in l] == [
      f"data: skipped_missing_file: {n} records of manifest {tmp_path}/m.jsonl so far"
      for n in (10, 100)]
  summaries = [l for l in lines if "evaluation pass" in l]
  assert summaries == [f"data: manifest {tmp_path}/m.jsonl: evaluation pass: 40 records skipped "
                       "(data/skipped_missing_file=40)"] * 3
  assert len(lines) == skip_log.LOG_FIRST + 2 + 3
