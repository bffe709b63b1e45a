"""Small hand-made feature stores (pooled rows, one shard) with a chosen fingerprint, for tests that
need a store's files and checks but not an extraction run."""

import copy
import json
import os

import numpy as np

from align_jax.data import feature_store as feature_files


def fingerprint(**model) -> dict:
  """A fingerprint as ``align_jax.train.extract.fingerprint`` writes it, with the schema's default
  encoder settings (what a features config restates) unless ``model`` overrides them."""
  record = {
      "model": {"image_encoder": "/models/dinov2", "image_params": "a" * 64,
                "image_pooling": "cls", "image_size": 16, "image_layer": -1,
                "image_transform": {"kind": "resize + centre crop", "mean": [0.5] * 3,
                                    "std": [0.5] * 3},
                "text_encoder": "/models/bert", "text_params": "b" * 64, "text_pooling": "mean",
                "max_text_length": 77, "text_layer": -1, "text_prefix": "",
                "tokenizer": "BertTokenizerFast:" + "c" * 64, "encoder_dtype": "float32"},
      "dtype": "float32",
      "data": {"source": "synthetic_shapes", "split": "train", "max_image_pixels": 89_478_485,
               "min_image_size": 8, "num_pairs": 64, "data_seed": 1234}}
  record = copy.deepcopy(record)
  record["model"].update(model)
  return record


def write_store(path, record: dict, num_images: int = 64, seed: int = 0) -> str:
  """A one-shard store of ``num_images`` pooled pairs (image [n, 8], text [n, 6], float32)."""
  rng = np.random.default_rng(seed)
  arrays = {"image.npy": rng.normal(size=(num_images, 8)).astype(np.float32),
            "text.npy": rng.normal(size=(num_images, 6)).astype(np.float32),
            "text_to_image.npy": np.arange(num_images, dtype=np.int32),
            "image_ids.npy": np.arange(num_images, dtype=np.int64)}
  shard = os.path.join(path, "shard-00000-00000")
  os.makedirs(shard)
  files = {}
  for name, array in arrays.items():
    data = feature_files.npy_bytes(array)
    files[name] = feature_files.file_entry(data, array)
    with open(os.path.join(shard, name), "wb") as f:
      f.write(data)
  manifest = {"format": feature_files.FORMAT, "split": record["data"]["split"],
              "num_images": num_images, "num_texts": num_images, "fingerprint": record,
              "shards": [{"name": "shard-00000-00000", "num_images": num_images,
                          "num_texts": num_images, "files": files}]}
  with open(os.path.join(path, feature_files.MANIFEST), "w") as f:
    json.dump(manifest, f)
  with open(os.path.join(path, feature_files.FINGERPRINT), "w") as f:
    json.dump(record, f)
  return str(path)
