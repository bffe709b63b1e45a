"""A feature store knows what it holds: reused folders are refused, damaged shards are named.

One finished store (tiny DINOv2 + BERT token features of 40 rendered shapes, 3 shards) is shared by
the module; tests that damage or extend it work on copies.
"""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from align_jax.train import extract as feature_store, loop as train
from align_jax.data import feature_store as feature_files, array_sources as features, synthetic_images
from align_jax.testing import tiny_checkpoints as tiny
from train_utils import (extract_interrupted_after_one_shard, extract_small_shards,
                         tiny_online_config)


@pytest.fixture(scope="module")
def online_config(tmp_path_factory):
  return tiny_online_config(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def store(online_config, tmp_path_factory):
  path = tmp_path_factory.mktemp("store") / "feats"
  extract_small_shards(online_config, path)
  return path


def _copy(store, tmp_path):
  target = tmp_path / "feats"
  shutil.copytree(store, target)
  return target


def _arrays(path, **kw):
  image, text, text_to_image = features.load_stored_features(str(path), **kw)
  take = lambda tower: {k: np.asarray(v[np.arange(len(v))]) for k, v in tower.items()}
  return take(image), take(text), text_to_image


def test_manifest_records_the_fingerprint(store, online_config):
  manifest = json.loads((store / "manifest.json").read_text())
  assert manifest["format"] == "align_jax.feature_store/2" and manifest["split"] == "train"
  fingerprint = manifest["fingerprint"]
  assert fingerprint == json.loads((store / "fingerprint.json").read_text())
  model = fingerprint["model"]
  assert model["image_encoder"] == online_config.model.image_encoder
  assert model["image_pooling"] == "tokens" and model["text_pooling"] == "tokens"
  assert model["image_size"] == 16 and model["max_text_length"] == 12
  assert len(model["image_params"]) == 64 and len(model["text_params"]) == 64  # sha256 hex
  # transformers 5 names the (fast, tokenizers-backed) BERT tokenizer BertTokenizer; 4.x added Fast
  assert re.fullmatch(r"BertTokenizer(Fast)?:[0-9a-f]{64}", model["tokenizer"])
  assert model["image_transform"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
  assert fingerprint["dtype"] == "float32"
  assert fingerprint["data"] == {"source": "synthetic_shapes", "split": "train", "num_pairs": 40,
                                 "data_seed": 1234, "max_image_pixels": 89_478_485,
                                 "min_image_size": 8}


def test_resume_with_another_encoder_is_refused(online_config, tmp_path, monkeypatch):
  """Interrupted after one shard, resumed with another text encoder: refused, store untouched."""
  out = tmp_path / "feats"
  extract_interrupted_after_one_shard(online_config, out, monkeypatch)
  before = sorted(os.listdir(out))
  other = online_config.copy_and_resolve_references()
  other.model.text_encoder = tiny.make_tiny_bert(
      str(tmp_path / "other_bert"), save_format="flax", seed=1,
      corpus=[" ".join(synthetic_images.vocabulary())] * 4)
  with pytest.raises(feature_files.FeatureStoreError) as error:
    extract_small_shards(other, out)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"feature store {out} holds other features: ")
  assert f"model.text_encoder: '{online_config.model.text_encoder}' in the store, " in message
  assert "model.text_params: " in message and "model.image_params" not in message
  assert message.endswith("use another --workdir, or --config.extract.overwrite=True to delete "
                          "it and extract again")
  assert sorted(os.listdir(out)) == before  # nothing written or deleted

  other.extract.overwrite = True
  manifest = extract_small_shards(other, out)
  assert manifest["text_encoder"] == other.model.text_encoder
  fresh = tmp_path / "fresh"
  # every shard is from the new encoder: equal to a fresh extraction
  extract_small_shards(other, fresh)
  for a, b in zip(jax.tree.leaves(_arrays(out)), jax.tree.leaves(_arrays(fresh))):
    np.testing.assert_array_equal(a, b)


def test_other_pooling_on_a_finished_store_is_refused(store, online_config, tmp_path):
  out = _copy(store, tmp_path)
  manifest_before = (out / "manifest.json").read_text()
  other = online_config.copy_and_resolve_references()
  other.model.image_pooling = "cls"
  with pytest.raises(feature_files.FeatureStoreError,
                     match=r"model.image_pooling: 'tokens' in the store, 'cls' now"):
    extract_small_shards(other, out)
  assert (out / "manifest.json").read_text() == manifest_before  # still says what it holds


def test_same_settings_resume_a_finished_store_as_is(store, online_config, tmp_path):
  out = _copy(store, tmp_path)
  manifest = extract_small_shards(online_config, out)
  assert manifest == json.loads((store / "manifest.json").read_text())


def test_other_split_or_dtype_is_refused(store, online_config, tmp_path):
  out = _copy(store, tmp_path)
  with pytest.raises(feature_files.FeatureStoreError, match=r"dtype: 'float32' in the store, "
                     r"'float16' now"):
    feature_store.extract_features(online_config, str(out), shard_batches=1, dtype="float16")
  other = online_config.copy_and_resolve_references()
  other.data.num_pairs = 48
  with pytest.raises(feature_files.FeatureStoreError, match=r"data.num_pairs: 40 in the store, 48"):
    extract_small_shards(other, out)


def _rewrite_shard_file(store, shard_name, file, array):
  """Replaces one shard file and updates the manifest to match (a consistent-looking mix)."""
  path = store / shard_name / file
  data = feature_files.npy_bytes(array)
  path.write_bytes(data)
  manifest = json.loads((store / "manifest.json").read_text())
  for shard in manifest["shards"]:
    if shard["name"] == shard_name:
      shard["files"][file] = feature_files.file_entry(data, array)
  (store / "manifest.json").write_text(json.dumps(manifest))


def test_shards_that_disagree_are_named(store, tmp_path):
  out = _copy(store, tmp_path)
  name = "shard-00000-00001"
  tokens = np.load(out / name / "image.npy")
  _rewrite_shard_file(out, name, "image.npy", np.zeros(tokens.shape[:2] + (48,), np.float32))
  with pytest.raises(feature_files.FeatureStoreError) as error:
    features.load_stored_features(str(out))
  assert str(error.value) == (
      f"feature store {out}: shard {name}: image.npy rows are float32[17, 48] but shard "
      f"shard-00000-00000's are float32[17, {tokens.shape[2]}]: the shards come from different "
      "encoders or settings; extract the store again")


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "has 1000 bytes, the manifest says"),
    ("garbage", "sha256 "),
    ("remove", "is missing; the store is incomplete"),
])
def test_damaged_shard_file_is_named(store, tmp_path, damage, expected):
  out = _copy(store, tmp_path)
  path = out / "shard-00000-00002" / "text.npy"
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[:1000])
  elif damage == "garbage":
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)  # same size and header: only the digest can tell
    path.write_bytes(bytes(data))
  else:
    path.unlink()
  with pytest.raises(feature_files.FeatureStoreError) as error:
    features.load_stored_features(str(out), cache_dir=str(tmp_path / "cache"))
  assert str(error.value).startswith(f"feature store {out}: shard shard-00000-00002: text.npy")
  assert expected in str(error.value)


def test_training_on_a_mixed_store_stops_with_one_line(store, online_config, tmp_path):
  out = _copy(store, tmp_path)
  text = np.load(out / "shard-00000-00000" / "text.npy")  # as if encoded with max length 7
  _rewrite_shard_file(out, "shard-00000-00000", "text.npy",
                      np.zeros(text.shape[:1] + (7, text.shape[2]), np.float32))
  _rewrite_shard_file(out, "shard-00000-00000", "text_mask.npy",
                      np.ones(text.shape[:1] + (7,), bool))
  config = online_config.copy_and_resolve_references()
  config.data.source, config.data.path = "features", str(out)
  config.model.image_encoder = config.model.text_encoder = "features"
  with pytest.raises(ValueError, match=r"^feature store .*: shard shard-00000-00001: text.npy rows "
                     r"are float32\[12, \d+\] but shard shard-00000-00000's are float32\[7, "):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_digests_are_verified_once_per_machine(store, tmp_path, monkeypatch):
  out = _copy(store, tmp_path)
  cache = str(tmp_path / "cache")
  hashed = []
  real = feature_files._sha256_file
  monkeypatch.setattr(feature_files, "_sha256_file", lambda p: hashed.append(p) or real(p))
  num_files = sum(len(s["files"]) for s in
                  json.loads((out / "manifest.json").read_text())["shards"])
  features.load_stored_features(str(out), cache_dir=cache)
  assert len(hashed) == num_files
  features.load_stored_features(str(out), cache_dir=cache)
  assert len(hashed) == num_files  # cached: not hashed again
  features.load_stored_features(str(out), cache_dir=cache, verify="always")
  assert len(hashed) == 2 * num_files
  features.load_stored_features(str(out), cache_dir=cache, verify="size")
  assert len(hashed) == 2 * num_files
  path = out / "shard-00000-00000" / "image_ids.npy"
  data = bytearray(path.read_bytes())
  data[-8:] = np.int64(12345).tobytes()  # same size, new mtime: hashed again, and caught
  path.write_bytes(bytes(data))
  with pytest.raises(feature_files.FeatureStoreError, match="image_ids.npy: sha256"):
    features.load_stored_features(str(out), cache_dir=cache)


def test_reading_another_split_than_the_store_holds_is_refused(store):
  with pytest.raises(feature_files.FeatureStoreError,
                     match=r"holds split 'train', not the 'heldout' asked for"):
    features.load_stored_features(str(store), split="heldout")


# --- gs:// -------------------------------------------------------------------------------------


from gcs_emulator import gcs_bucket  # noqa: E402,F401  (pytest fixture)


def test_extract_to_and_train_from_gcs(gcs_bucket, store, online_config, tmp_path,  # noqa: F811
                                       monkeypatch):
  monkeypatch.chdir(tmp_path)  # so a stray local "gs:" folder would show up here
  url = f"{gcs_bucket}/feats"
  manifest = extract_small_shards(online_config, url)
  local = json.loads((store / "manifest.json").read_text())
  assert manifest["fingerprint"] == local["fingerprint"]
  assert [s["files"] for s in manifest["shards"]] == [s["files"] for s in local["shards"]]

  cache = tmp_path / "cache"
  for a, b in zip(jax.tree.leaves(_arrays(url, cache_dir=str(cache))),
                  jax.tree.leaves(_arrays(store))):
    np.testing.assert_array_equal(a, b)
  copies = sorted(os.listdir(cache / "objects"))
  digests = {f["sha256"] for s in manifest["shards"] for f in s["files"].values()}
  assert copies == sorted(f"{d}.npy" for d in digests)  # content-addressed local copies

  with pytest.raises(feature_files.FeatureStoreError, match="holds other features"):
    other = online_config.copy_and_resolve_references()
    other.model.text_pooling = "mean"
    extract_small_shards(other, url)

  config = online_config.copy_and_resolve_references()
  config.data.source, config.data.path = "features", url
  config.data.feature_cache_dir = str(cache)
  config.model.image_encoder = config.model.text_encoder = "features"
  config.total_steps, config.log_every = 4, 2
  last = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(last["train/loss"])
  assert not os.path.exists(tmp_path / "gs:")
