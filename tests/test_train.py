"""The train step: frozen params stay frozen, 8 devices equal 1, metrics and errors of the loop."""

import json
import math

import jax
import numpy as np
import pytest

from align_jax.parallel import mesh as sharding
from align_jax.run import reader as run_dir
from align_jax.train import loop as train
from helpers_metrics import assert_tensorboard_equals_metrics, tensorboard
from train_utils import tiny_config


def _run_steps(config, mesh, steps):
  trainer = train.build_trainer(config, mesh)
  state, losses = trainer.state, []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, trainer.frozen, trainer.next_batch())
    losses.append(float(metrics["train/loss"]))
  return trainer, state, losses


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_eight_devices_equal_one(devices, loss):
  config = tiny_config(**{"loss.name": loss, "model.dropout": 0.0})
  _, state8, losses8 = _run_steps(config, sharding.make_mesh(("data",), (8,)), 4)
  _, state1, losses1 = _run_steps(config, sharding.make_mesh(("data",), (1,), devices[:1]), 4)
  np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5),
               state8.params, state1.params)


def test_frozen_params_bit_identical_and_never_in_optimizer(devices):
  config = tiny_config()
  trainer = train.build_trainer(config, sharding.make_mesh(("data",), (8,)))
  before = jax.tree.map(np.array, trainer.frozen)
  state = trainer.state
  for _ in range(3):
    state, _ = trainer.train_step(state, trainer.frozen, trainer.next_batch())
  after = jax.tree.map(np.array, trainer.frozen)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, after)
  # Adam's moments mirror the trainable tree exactly: projectors + logit params, nothing frozen.
  adam = state.opt_state[1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)
  assert set(state.params) == {"image", "text", "logit"}
  frozen_shapes = {x.shape for x in jax.tree.leaves(before)}
  opt_shapes = {x.shape for x in jax.tree.leaves(state.opt_state)}
  trainable_shapes = {x.shape for x in jax.tree.leaves(state.params)}
  assert not (frozen_shapes - trainable_shapes) & opt_shapes
  assert int(state.step) == 3


def test_temperature_is_clamped(devices):
  # Adam's first update moves log-temperature by about the learning rate (0.5) whichever way its
  # gradient points: from 0.1 that leaves [0.09, 0.11] on either side, so the clamp must act.
  low, high = 0.09, 0.11
  overrides = {"loss.temperature_init": 0.1, "optim.learning_rate": 0.5, "optim.warmup_steps": 0}
  mesh = sharding.make_mesh(("data",), (8,))
  _, free, _ = _run_steps(tiny_config(**overrides), mesh, 1)  # the default range [0.001, 0.5]
  unclamped = math.exp(float(free.params["logit"]["log_temperature"]))
  assert not low <= unclamped <= high, unclamped  # the step pushes it out of the narrow range
  config = tiny_config(**overrides, **{"loss.temperature_min": low, "loss.temperature_max": high})
  trainer = train.build_trainer(config, mesh)
  state = trainer.state
  assert low < math.exp(float(state.params["logit"]["log_temperature"])) < high  # starts inside
  state, _ = trainer.train_step(state, trainer.frozen, trainer.next_batch())
  bound = high if unclamped > high else low  # the same first step, clamped to the bound it crossed
  assert float(state.params["logit"]["log_temperature"]) == float(np.float32(math.log(bound)))
  for _ in range(2):
    state, _ = trainer.train_step(state, trainer.frozen, trainer.next_batch())
  temperature = math.exp(float(state.params["logit"]["log_temperature"]))
  assert low - 1e-7 <= temperature <= high + 1e-6


def test_loop_writes_metrics_and_eval(tiny_demo_run, devices):
  _, workdir, last = tiny_demo_run  # tiny_config() trained once per session (conftest)
  lines = [json.loads(l) for l in open(f"{workdir}/metrics.jsonl").read().splitlines()]
  train_lines = [l for l in lines if "train/loss" in l]
  assert [l["step"] for l in train_lines] == [2, 4, 6]
  for key in ("train/loss", "train/temperature", "train/grad_norm", "train/learning_rate",
              "train/examples_per_sec"):
    assert all(math.isfinite(l[key]) for l in train_lines), key
  eval_lines = [l for l in lines if "eval/i2t@1" in l]
  assert [l["step"] for l in eval_lines] == [3, 6]
  assert 0.0 <= last["eval/t2i@5"] <= 1.0
  # TensorBoard holds exactly metrics.jsonl's numbers (same tags, steps, float32 values).
  assert tensorboard(workdir)["eval/i2t@1"][-1][:2] == (6, pytest.approx(
      last["eval/i2t@1"], rel=1e-6))
  assert_tensorboard_equals_metrics(workdir)
  # optax counts updates from 0: logged step 2 is update 1 of 2 warm-up updates -> half the peak
  assert train_lines[0]["train/learning_rate"] == pytest.approx(0.5e-3, rel=1e-5)


def test_non_finite_loss_names_the_step(tmp_path, devices):
  features = tmp_path / "features"
  features.mkdir()
  image = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
  image[:, 0] = np.nan
  np.save(features / "image.npy", image)
  np.save(features / "text.npy", np.ones((128, 6), np.float32))
  config = tiny_config(**{"data.source": "features", "data.path": str(features),
                          "model.image_encoder": "features", "model.text_encoder": "features"})
  config.evals = {}
  with pytest.raises(FloatingPointError, match="non-finite loss .* at step 1"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_run_stopping_on_an_error_waits_for_its_pending_save(tmp_path, devices, monkeypatch):
  """An error inside the loop (here a non-finite loss at step 3, after the async save of step 2)
  first lets the save in flight finish (orbax's writer threads die with the process), then
  raises the run's own error; the step-2 checkpoint is complete and restorable."""
  from align_jax.run import checkpoint as checkpoint_lib
  closed = []
  original_close = checkpoint_lib.Checkpointer.close
  def close(self):
    original_close(self)
    closed.append(self.last_good)
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "close", close)
  features = tmp_path / "features"
  features.mkdir()
  image = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
  np.save(features / "image.npy", image)
  np.save(features / "text.npy", np.random.default_rng(1).normal(size=(128, 6)).astype(np.float32))
  config = tiny_config(**{"data.source": "features", "data.path": str(features),
                          "model.image_encoder": "features", "model.text_encoder": "features",
                          "checkpoint_every": 2, "log_every": 1, "async_checkpointing": True})
  config.evals = {}
  real_check = train._check_finite
  def nan_at_step_3(pending, hint=""):
    if pending and pending[-1][0] == 3:
      raise FloatingPointError("non-finite loss nan at step 3 (injected)")
    return real_check(pending, hint)
  monkeypatch.setattr(train, "_check_finite", nan_at_step_3)
  with pytest.raises(FloatingPointError, match="at step 3"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert closed == [2], closed  # waited for, and the step-2 save was the last complete one
  assert run_dir.restore_params(str(tmp_path / "run"), 2) is not None
