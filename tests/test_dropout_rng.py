"""The dropout PRNG (config.model.dropout_rng_impl): its keys, its masks, and exact resume with it."""

import json
import shutil

import jax
import numpy as np
import pytest

from align_jax.model import two_tower as model_lib
from align_jax.run import reader as run_dir
from align_jax.train import loop as train
from train_utils import tiny_config


@pytest.mark.parametrize("impl", model_lib.DROPOUT_RNG_IMPLS)
def test_dropout_keys_are_pure_and_keep_the_rate(impl):
  state_key = jax.random.PRNGKey(3)
  keys = [model_lib.dropout_key(jax.random.fold_in(state_key, step), impl) for step in (1, 2)]
  again = model_lib.dropout_key(jax.random.fold_in(state_key, 1), impl)
  masks = [np.asarray(jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (200_000,)))(k))
           for k in (*keys, again)]
  np.testing.assert_array_equal(masks[0], masks[2])  # a pure function of (state key, step)
  assert (masks[0] != masks[1]).mean() > 0.1  # each step draws other masks
  for mask in masks[:2]:
    assert abs(mask.mean() - 0.9) < 0.003  # 200k draws: 4.5 standard deviations
  if impl == "threefry2x32":
    np.testing.assert_array_equal(keys[0], jax.random.fold_in(state_key, 1))  # as before
  else:
    assert jax.random.key_impl(keys[0]) == jax.random.key_impl(jax.random.key(0, impl=impl))


def test_unknown_dropout_rng_names_the_flag():
  config = tiny_config(**{"model.dropout_rng_impl": "philox"})
  with pytest.raises(ValueError, match="--config.model.dropout_rng_impl to one of"):
    model_lib.build_model(config)


def _losses(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


@pytest.mark.parametrize("impl", [
    "rbg", pytest.param("unsafe_rbg", marks=pytest.mark.slow),
    pytest.param("threefry2x32", marks=pytest.mark.slow)])
def test_resume_with_dropout_is_bit_exact(tmp_path, devices, impl):
  """A run resumed from its step-3 checkpoint ends bit-identical to the uninterrupted run."""
  config = tiny_config(**{"model.dropout": 0.3, "model.dropout_rng_impl": impl,
                          "log_every": 1})
  config.evals = {}
  reference = tmp_path / "reference"
  train.train_and_evaluate(config, str(reference))
  resumed = tmp_path / "resumed"
  shutil.copytree(reference, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed after the step-3 checkpoint
  train.train_and_evaluate(config, str(resumed))
  assert _losses(resumed) == _losses(reference)
  assert sorted(_losses(reference)) == [1, 2, 3, 4, 5, 6]
  jax.tree.map(np.testing.assert_array_equal, run_dir.restore_params(str(reference)).params,
               run_dir.restore_params(str(resumed)).params)


def test_dropout_rng_impl_changes_masks_only(tmp_path, devices):
  """rbg and threefry draw different masks (other losses), and the same thing without dropout."""
  first_loss = {}
  for dropout in (0.0, 0.3):
    for impl in ("threefry2x32", "rbg"):
      config = tiny_config(**{"model.dropout": dropout, "model.dropout_rng_impl": impl})
      trainer = train.build_trainer(config)
      _, metrics = trainer.train_step(trainer.state, trainer.frozen, trainer.next_batch())
      first_loss[dropout, impl] = float(metrics["train/loss"])
  assert first_loss[0.0, "threefry2x32"] == first_loss[0.0, "rbg"]
  assert first_loss[0.3, "threefry2x32"] != first_loss[0.3, "rbg"]

