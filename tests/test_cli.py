"""The command line: the demo learns, and bad configs stop with one clear line (no traceback)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, check=False):
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=check)


def test_demo_learns_held_out_retrieval(tmp_path):
  _main("--config=configs/demo.py:steps=150", f"--workdir={tmp_path}", check=True)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = {r["step"]: r for r in records if "eval/i2t@1" in r}
  assert evals[0]["eval/i2t@1"] < 0.05 and evals[0]["eval/t2i@1"] < 0.05  # untrained: near chance
  assert evals[150]["eval/i2t@1"] > 0.5 and evals[150]["eval/t2i@1"] > 0.5
  assert evals[150]["eval/i2t@10"] >= evals[150]["eval/i2t@1"]


@pytest.mark.parametrize("args, message", [
    (["--config.batchsize=8"], "unknown config key 'batchsize'; did you mean 'batch_size'?"),
    (["--config.batch_size=100"], "batch_size 100 is not divisible by the 8 devices"),
    (["--config.model.image_projector=transformer"], "unknown projector 'transformer'"),
    (["--config.loss.name=hinge"], "unknown loss 'hinge'"),
    (["--config.mesh.shape=(3,)"], "mesh shape (3,) needs 3 devices, but 8 are present"),
    (["--config.mesh.dcn_shape=(2,)"], "mesh.dcn_shape (2,) needs 2 processes (one slice: each "
     "process a granule), but 1 are present"),
])
def test_bad_config_gives_one_clear_error(tmp_path, args, message):
  result = _main("--config=configs/demo.py:steps=2", f"--workdir={tmp_path}", *args)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr + result.stdout


def test_bad_variant_and_missing_config_file(tmp_path):
  result = _main("--config=configs/demo.py:stepz=2", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "unknown config variant 'stepz'" in result.stderr
  assert "Traceback" not in result.stderr
  result = _main("--config=configs/no_such_config.py", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "could not load --config" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command, flag", [
    (["main.py"], "--workdir"), (["main.py"], "--coordinator_address"),
    (["-m", "align_jax.cli", "train"], "--workdir"),
    (["-m", "align_jax.cli", "select"], "--image_encoders"),
    (["-m", "align_jax.cli", "curate"], "--quota"),
    (["-m", "align_jax.cli", "aot"], "--topology"),
])
def test_help_lists_the_commands_flags(command, flag):
  result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert "Traceback" not in result.stderr, result.stderr[-2000:]  # (absl's --help exits 1)
  assert f"  {flag}:" in result.stdout


def test_console_command_rejects_an_unknown_subcommand():
  result = subprocess.run([sys.executable, "-m", "align_jax.cli", "fly"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "unknown command 'fly'; one of: train," in result.stderr
