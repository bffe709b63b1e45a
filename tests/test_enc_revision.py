"""The hub commit an encoder id resolves to is recorded in the run's config.json and in the
feature store's fingerprint; a moved ``main`` changes the fingerprint and the store is refused.

The hub is faked offline: the tiny checkpoints are laid out as huggingface_hub's cache
(``models--org--name/refs/main`` naming ``snapshots/<commit>/``) under a temporary HF_HUB_CACHE,
with HF_HUB_OFFLINE, so ``org/name`` resolves with no network to the snapshot ``refs/main`` names.
"""

import json
import pathlib
import shutil

import pytest

from align_jax.data import feature_store as feature_files
from align_jax.model import two_tower as model_lib
from align_jax.train import extract as feature_store
from align_jax.train import loop as train
from train_utils import extract_small_shards, tiny_online_config

OLD, NEW = "1" * 40, "2" * 40
IDS = {"image": "align-jax-tests/tiny-dinov2", "text": "align-jax-tests/tiny-bert"}


def _repo(cache: pathlib.Path, hub_id: str) -> pathlib.Path:
  return cache / ("models--" + hub_id.replace("/", "--"))


def _point_main_at(cache: pathlib.Path, commit: str) -> None:
  for hub_id in IDS.values():
    (_repo(cache, hub_id) / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_config(tmp_path, monkeypatch):
  """A tiny online config whose encoders are hub ids, in a fake offline cache holding two commits
  of each (``main`` at OLD); returns (config, cache folder)."""
  import huggingface_hub
  config = tiny_online_config(tmp_path / "models")
  cache = tmp_path / "hub"
  for tower, hub_id in IDS.items():
    folder = config.model[f"{tower}_encoder"]
    for commit in (OLD, NEW):
      shutil.copytree(folder, _repo(cache, hub_id) / "snapshots" / commit)
    (_repo(cache, hub_id) / "refs").mkdir()
    config.model[f"{tower}_encoder"] = hub_id
  _point_main_at(cache, OLD)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  return config, cache


def test_run_config_json_records_the_resolved_commits(hub_config, tmp_path, devices):
  config, cache = hub_config
  config.total_steps, config.checkpoint_every = 1, 1
  train.train_and_evaluate(config, str(tmp_path / "run"))
  saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
  assert (saved["image_encoder"], saved["text_encoder"]) == (IDS["image"], IDS["text"])
  assert (saved["image_encoder_revision"], saved["text_encoder_revision"]) == (OLD, OLD)
  assert config.model.image_encoder_revision == ""  # the caller's config is not changed


def test_fingerprint_holds_the_commit_and_a_moved_main_changes_it(hub_config, tmp_path, devices):
  config, cache = hub_config
  store = tmp_path / "store"
  extract_small_shards(config, store)
  stored = json.loads((store / feature_files.FINGERPRINT).read_text())
  assert (stored["model"]["image_revision"], stored["model"]["text_revision"]) == (OLD, OLD)

  _point_main_at(cache, NEW)  # the hub's main moved: same ids, same weights, another commit
  model = model_lib.build_model(config)
  assert model.encoder_revisions() == {"image": NEW, "text": NEW}
  moved = feature_store.fingerprint(config, config.data, model, model.frozen_params(), "float32")
  assert feature_files.fingerprint_digest(moved) != feature_files.fingerprint_digest(stored)
  assert [d.split(":")[0] for d in feature_files.fingerprint_differences(stored, moved)] == [
      "model.image_revision", "model.text_revision"]
  with pytest.raises(feature_store.FeatureStoreError,
                     match=f"holds other features: model.image_revision.*{OLD}.*{NEW}"):
    extract_small_shards(config, store)


def test_a_local_folder_records_no_revision(tmp_path, devices):
  config = tiny_online_config(tmp_path / "models")
  model = model_lib.build_model(config)
  assert model.encoder_revisions() == {"image": "", "text": ""}
  fp = feature_store.fingerprint(config, config.data, model, model.frozen_params(), "float32")
  assert "image_revision" not in fp["model"] and "text_revision" not in fp["model"]
