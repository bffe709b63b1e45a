"""A run killed with SIGKILL and started again continues on exactly the same trajectory."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/demo.py:steps=100", "--config.batch_size=256",
        "--config.checkpoint_every=10", "--config.log_every=5", "--config.eval_every=50",
        "--config.eval_at_start=False", "--config.data.num_pairs=4096"]


def _command(workdir):
  return [sys.executable, "main.py", *ARGS, f"--workdir={workdir}"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def _final_params(workdir):
  from align_jax.run import reader as run_dir
  return run_dir.restore_params(workdir).params


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  subprocess.run(_command(reference), cwd=REPO, check=True, capture_output=True, timeout=300)

  process = subprocess.Popen(_command(resumed), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (resumed / "checkpoints" / "20").exists():
    assert process.poll() is None, "run ended before it could be killed"
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  done = subprocess.run(_command(resumed), cwd=REPO, check=True, capture_output=True, text=True,
                        timeout=300)
  assert "restored checkpoint at step" in done.stdout + done.stderr

  expected, got = _losses(reference), _losses(resumed)
  assert sorted(got) == sorted(expected) == list(range(5, 101, 5))
  assert got == expected  # bit-identical losses at every logged step
  ref_params, res_params = _final_params(str(reference)), _final_params(str(resumed))
  import jax
  jax.tree.map(np.testing.assert_array_equal, ref_params, res_params)
