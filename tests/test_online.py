"""Online mode: Hugging Face encoders inside the sharded step; the recipe config without a hub."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from align_jax.parallel import mesh as sharding
from train_utils import run_train_steps, tiny_online_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def online_config(tmp_path_factory):
  return tiny_online_config(tmp_path_factory.mktemp("models"))


def test_online_step_eight_devices_equal_one_and_encoders_stay_frozen(online_config, devices):
  config = online_config.copy_and_resolve_references()
  config.model.encoder_micro_batch = 1  # and micro-batching inside the step,
  config.model.projector_micro_batch = 1  # encoders and rematerialised token projectors
  trainer8, losses8, state8, before = run_train_steps(config, sharding.make_mesh(("data",), (8,)),
                                                      2)
  after = jax.tree.map(np.array, trainer8.frozen)
  _, losses1, state1, _ = run_train_steps(online_config,
                                          sharding.make_mesh(("data",), (1,), devices[:1]), 2)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state8.params,
               state1.params)
  jax.tree.map(np.testing.assert_array_equal, before, after)  # bit-identical encoder params
  assert len(jax.tree.leaves(before)) > 20  # the real encoders' weights, not an empty tree


def test_recipe_config_without_hub_stops_with_one_clear_line(tmp_path):
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/dinov2_roberta.py", f"--workdir={tmp_path}",
       "--config.batch_size=64"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode != 0
  assert "facebook/dinov2-large" in result.stderr
  assert "--config.model.image_encoder" in result.stderr
  assert "Traceback" not in result.stderr + result.stdout
