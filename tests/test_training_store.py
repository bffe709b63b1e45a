"""A run trains on one feature store: its fingerprint is recorded in WORKDIR/config.json, and a store
that differs from the run's or from the config's encoder settings is refused in one line; stored
features are never run through an encoder again; a non-finite loss on an unverified store says
the store may be damaged (issue 21, items 3, 8 and 10)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from align_jax.train import loop as train
from align_jax.data import feature_store as feature_files

import helpers_store as hs
from train_utils import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(store, **overrides):
  config = tiny_config(**{"data.source": "features", "data.path": str(store),
                          "model.image_encoder": "features", "model.text_encoder": "features",
                          "total_steps": 2, "checkpoint_every": 2, **overrides})
  config.evals = {}
  return config


def _recorded(workdir):
  return json.loads((workdir / "config.json").read_text())["data"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, devices):
  """A 2-step run on store ``a`` (the schema's encoder settings)."""
  root = tmp_path_factory.mktemp("run_store")
  store = hs.write_store(root / "a", hs.fingerprint())
  workdir = root / "run"
  train.train_and_evaluate(_config(store), str(workdir))
  return root, store, workdir


def test_the_run_records_its_store_fingerprint(trained):
  _, store, workdir = trained
  recorded = _recorded(workdir)
  assert recorded["path"] == store
  assert recorded["store_fingerprint"] == hs.fingerprint()


def test_resume_on_a_store_from_other_encoder_weights_is_refused(trained):
  root, store, workdir = trained
  before = (workdir / "config.json").read_text()
  other = hs.write_store(root / "b", hs.fingerprint(image_params="d" * 64))
  config = _config(other, total_steps=4)
  with pytest.raises(feature_files.FeatureStoreError) as error:
    train.train_and_evaluate(config, str(workdir))
  old_id = feature_files.fingerprint_digest(hs.fingerprint())
  new_id = feature_files.fingerprint_digest(hs.fingerprint(image_params="d" * 64))
  assert str(error.value) == (
      f"feature store {other} (fingerprint {new_id}) is not the one expected: "
      f"{workdir}/config.json records that this run trains on {store} (fingerprint {old_id}); "
      f"they differ in model.image_params: '{'a' * 64}' in the run's store, '{'d' * 64}' in this "
      f"one; train on the run's store (--config.data.path={store}) or start a new run in another "
      "--workdir")
  assert (workdir / "config.json").read_text() == before  # still the run's store
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]  # nothing trained


def test_resume_on_a_store_with_another_layer_is_refused(trained):
  """Store and config agree on image_layer=0, but the run trained on the -1 store."""
  root, _, workdir = trained
  other = hs.write_store(root / "layer0", hs.fingerprint(image_layer=0))
  config = _config(other, total_steps=4, **{"model.image_layer": 0})
  with pytest.raises(feature_files.FeatureStoreError,
                     match=r"they differ in model.image_layer: -1 in the run's store, 0 in this "
                           r"one; train on the run's store") as error:
    train.train_and_evaluate(config, str(workdir))
  assert "\n" not in str(error.value)


def test_resume_on_the_same_store_continues(trained):
  _, store, workdir = trained
  last = train.train_and_evaluate(_config(store, total_steps=4), str(workdir))
  assert np.isfinite(last["train/loss"])
  assert _recorded(workdir)["store_fingerprint"] == hs.fingerprint()


def test_a_store_that_disagrees_with_the_config_is_refused(tmp_path):
  store = hs.write_store(tmp_path / "layer0", hs.fingerprint(image_layer=0, text_pooling="cls"))
  with pytest.raises(feature_files.FeatureStoreError) as error:
    train.train_and_evaluate(_config(store), str(tmp_path / "run"))
  assert str(error.value) == (
      f"feature store {store} was extracted with model.image_layer=0, model.text_pooling='cls', "
      "but the config says model.image_layer=-1, model.text_pooling='mean': train with the "
      "store's settings (--config.model.image_layer=0 --config.model.text_pooling=cls), or "
      "extract a store with the config's (--mode=extract_features)")
  assert not (tmp_path / "run" / "config.json").exists()


def test_stored_features_with_an_encoder_named_are_refused(tmp_path):
  """Was ``KeyError: 'pixel_values'`` from inside the step's build."""
  from align_jax.testing import tiny_checkpoints as tiny
  encoder = tiny.make_tiny_dinov2(str(tmp_path / "tiny_dinov2"), image_size=16, patch_size=4,
                                  save_format="flax")
  store = hs.write_store(tmp_path / "a", hs.fingerprint())
  config = _config(store, **{"model.image_encoder": encoder})
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(error.value) == (
      f"data.source='features' reads stored encoder outputs, but model.image_encoder is "
      f"{encoder!r}: set --config.model.image_encoder=features (the store's "
      "fingerprint.json records which encoders made it), or train on raw images and captions "
      "with another data.source")


def test_nan_from_a_store_changed_after_its_check_names_the_store(tmp_path, devices):
  """verify_features=once: bytes changed with size and mtime kept are not hashed again."""
  store = hs.write_store(tmp_path / "a", hs.fingerprint())
  cache = tmp_path / "cache"
  config = _config(store, **{"data.feature_cache_dir": str(cache), "log_every": 1})
  path = tmp_path / "a" / "shard-00000-00000" / "image.npy"
  feature_files.open_store(store, cache_dir=str(cache))  # verified once: recorded in the cache
  before = os.stat(path)
  image = np.load(path)
  image[:] = np.nan
  path.write_bytes(feature_files.npy_bytes(image))
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(error.value) == (
      "non-finite loss (nan) at step 1; stopping. Lower config.optim.learning_rate, check the "
      "input features, or resume from the last checkpoint; or the feature store is damaged: "
      "rerun with verify_features=always (--config.data.verify_features=always hashes every "
      "shard file again)")
  config.data.verify_features = "always"
  with pytest.raises(feature_files.FeatureStoreError, match="image.npy: sha256 .* does not match"):
    train.train_and_evaluate(config, str(tmp_path / "run2"))


@pytest.mark.slow
def test_demo_online_on_stored_features_is_one_line(tmp_path):
  """The issue's repro: configs/demo_online.py with data.source=features (encoders still named)."""
  store = hs.write_store(tmp_path / "store", hs.fingerprint())
  env = {**os.environ, "PYTHONPATH": REPO, "ALIGN_JAX_CACHE": str(tmp_path / "cache")}
  result = subprocess.run(
      [sys.executable, "main.py", "--config=configs/demo_online.py",
       "--config.data.source=features", f"--config.data.path={store}",
       "--config.model.image_pooling=cls", "--config.model.image_projector=mlp",
       f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith(
      "error: data.source='features' reads stored encoder outputs, but model.image_encoder is ")
  assert errors[0].endswith("set --config.model.image_encoder=features "
                            "--config.model.text_encoder=features (the store's fingerprint.json "
                            "records which encoders made it), or train on raw images and captions "
                            "with another data.source")
