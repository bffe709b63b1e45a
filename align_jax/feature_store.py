"""Encode once, train many epochs: run the frozen encoders over a dataset and store the features.

    python main.py --mode=extract_features --config=configs/dinov2_roberta.py --workdir=/data/feats

SAIL-style (RECIPES §2): the image-caption source named by ``config.data`` is read once (every
image once, with all its captions), both frozen encoders run jitted and sharded over every device
and process, and each process writes its rows in shards::

    OUT/shard-<process>-<n>/image.npy  [n, D] or [n, T, D] (+ image_mask.npy)   float16 by default
    OUT/shard-<process>-<n>/text.npy   [m, ...] for every caption (+ text_mask.npy)
    OUT/shard-<process>-<n>/text_to_image.npy  [m] int32, row of the shard's image
    OUT/shard-<process>-<n>/image_ids.npy      [n] int64, record index in the source
    OUT/manifest.json   model ids, poolings, dtype, counts, every shard with its checksums

A shard is written to a temporary folder and renamed when complete; after each shard the process
saves the source position in ``progress-<process>.json``. Interrupted, the same command resumes
after the last complete shard: no duplicates, no gaps. Training reads the folder with
``data.source = "features"`` (memory-mapped; one caption sampled per image and step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from align_jax import model as model_lib, sharding
from align_jax.data import factory

logger = logging.getLogger("align_jax")
MANIFEST = "manifest.json"


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # replicas along non-batch axes hold the same rows
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)


def _write_tower(folder: str, tower: str, features: list[dict], dtype) -> None:
  if "pooled" in features[0]:
    np.save(os.path.join(folder, f"{tower}.npy"),
            np.concatenate([f["pooled"] for f in features]).astype(dtype))
  else:
    np.save(os.path.join(folder, f"{tower}.npy"),
            np.concatenate([f["tokens"] for f in features]).astype(dtype))
    np.save(os.path.join(folder, f"{tower}_mask.npy"),
            np.concatenate([f["mask"] for f in features]).astype(bool))


class _ShardWriter:
  """Collects one shard's rows and writes them atomically."""

  def __init__(self, out_dir: str, process: int, dtype):
    self.out_dir, self.process, self.dtype = out_dir, process, dtype
    self.reset()

  def reset(self):
    self.images, self.texts, self.text_to_image, self.image_ids = [], [], [], []
    self.num_images = 0

  def add(self, image_features: dict, text_features: dict, captions_per_image: list[int],
          image_ids: np.ndarray) -> None:
    self.images.append(image_features)
    self.texts.append(text_features)
    for row, count in enumerate(captions_per_image):
      self.text_to_image.extend([self.num_images + row] * count)
    self.image_ids.append(image_ids)
    self.num_images += len(image_ids)

  def flush(self, index: int) -> dict | None:
    if not self.num_images:
      return None
    name = f"shard-{self.process:05d}-{index:05d}"
    final, staging = os.path.join(self.out_dir, name), os.path.join(self.out_dir, name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    _write_tower(staging, "image", self.images, self.dtype)
    _write_tower(staging, "text", self.texts, self.dtype)
    np.save(os.path.join(staging, "text_to_image.npy"), np.asarray(self.text_to_image, np.int32))
    np.save(os.path.join(staging, "image_ids.npy"), np.concatenate(self.image_ids))
    files = {f: _sha256(os.path.join(staging, f)) for f in sorted(os.listdir(staging))}
    os.rename(staging, final)
    entry = {"name": name, "num_images": self.num_images, "num_texts": len(self.text_to_image),
             "sha256": files}
    self.reset()
    return entry


def extract_features(config: ml_collections.ConfigDict, out_dir: str, *, shard_batches: int = 16,
                     batch_size: int | None = None, dtype: str = "float16", mesh=None) -> dict:
  """Encodes ``config.data`` with the frozen encoders of ``config.model`` into ``out_dir``.

  Args:
    config: a training config (its data source and encoders are used).
    out_dir: the feature store folder; created, or resumed if a previous run was interrupted.
    shard_batches: global batches per shard (the resume granularity).
    batch_size: global batch for encoding (default ``config.batch_size``).
    dtype: storage dtype ("float16" or "float32").
    mesh: defaults to ``config.mesh``.

  Returns:
    The manifest.
  """
  from align_jax.data import pipeline
  mesh = sharding.mesh_from_config(config.mesh) if mesh is None else mesh
  batch_axes = tuple(config.mesh.batch_axes)
  batch_size = batch_size or config.batch_size
  if batch_size % sharding.num_batch_shards(mesh, batch_axes):
    raise ValueError(f"batch_size {batch_size} is not divisible by the "
                     f"{sharding.num_batch_shards(mesh, batch_axes)} devices that split the batch")
  if factory.is_array_source(config.data):
    raise ValueError("extract_features reads raw images and captions: set config.data.source to "
                     "tfds, webdataset, manifest or synthetic_shapes")
  model = model_lib.build_model(config, mesh)
  process = jax.process_index()
  os.makedirs(out_dir, exist_ok=True)
  progress_path = os.path.join(out_dir, f"progress-{process:05d}.json")
  progress = {"shards": [], "source_state": None, "batches_done": 0}
  if os.path.exists(progress_path):
    with open(progress_path) as f:
      progress = json.load(f)
    logger.info("resuming feature extraction after %d batches (%d shards)",
                progress["batches_done"], len(progress["shards"]))

  source = pipeline.make_pair_source(
      config.data, global_batch_size=batch_size, seed=0,
      image_transform=factory.make_image_transform(model, config.data, train=False),
      tokenize=model.text_encoder.preprocess, train=False)
  if progress["source_state"] is not None:
    source.set_state(progress["source_state"])
  batch_sharding = sharding.batch_sharding(mesh, batch_axes)
  frozen = jax.device_put(model.frozen_params(), sharding.param_shardings(
      model.frozen_params(), mesh, config.mesh.frozen_param_rules))
  # Outputs stay split like the batch (rows only: with FSDP-sharded frozen params XLA could
  # otherwise split them along the feature axis), so each process keeps its own rows.
  encode_images = jax.jit(lambda p, x: model._run(model.image_encoder, p, x),
                          out_shardings=batch_sharding)
  encode_texts = jax.jit(lambda p, x: model._run(model.text_encoder, p, x),
                         out_shardings=batch_sharding)
  text_local = batch_size // jax.process_count()

  writer = _ShardWriter(out_dir, process, np.dtype(dtype))
  total = len(source)
  from tqdm import tqdm
  bar = tqdm(total=total, initial=progress["batches_done"], desc="encoding", unit="batch",
             disable=process != 0)
  for batch in source:
    valid = batch["valid"]
    images = jax.tree.map(_local_rows, encode_images(
        frozen["image"], sharding.host_to_global(batch["image"], batch_sharding)))
    captions = [c for row, c in enumerate(batch["captions"]) if valid[row]]
    flat = [caption for c in captions for caption in c]
    texts = []
    for text_batch, text_valid in pipeline.text_batches(flat, model.text_encoder.preprocess,
                                                        text_local):
      out = encode_texts(frozen["text"], sharding.host_to_global(text_batch, batch_sharding))
      texts.append(jax.tree.map(lambda x: _local_rows(x)[text_valid], out))
    if flat:
      writer.add(jax.tree.map(lambda x: x[valid], images),
                 jax.tree.map(lambda *xs: np.concatenate(xs), *texts),
                 [len(c) for c in captions], batch["image_id"][valid])
    progress["batches_done"] += 1
    bar.update(1)
    if progress["batches_done"] % shard_batches == 0 or progress["batches_done"] == total:
      entry = writer.flush(len(progress["shards"]))
      if entry:
        progress["shards"].append(entry)
      state = source.get_state()
      state.update(image_ids=[], captions_flat=[], text_to_image=[])  # not needed to resume
      progress["source_state"] = state
      with open(progress_path + ".tmp", "w") as f:
        json.dump(progress, f)
      os.replace(progress_path + ".tmp", progress_path)
  bar.close()
  multihost_utils.sync_global_devices("feature_store_done")
  manifest = _write_manifest(out_dir, config, dtype)
  logger.info("stored %d images and %d captions in %s", manifest["num_images"],
              manifest["num_texts"], out_dir)
  return manifest


def _write_manifest(out_dir: str, config, dtype: str) -> dict:
  shards = []
  for name in sorted(os.listdir(out_dir)):
    if name.startswith("progress-") and name.endswith(".json"):
      with open(os.path.join(out_dir, name)) as f:
        shards.extend(json.load(f)["shards"])
  shards.sort(key=lambda s: s["name"])
  m = config.model
  manifest = {
      "format": "align_jax.feature_store/1",
      "image_encoder": m.image_encoder, "image_pooling": m.image_pooling,
      "image_size": m.image_size, "text_encoder": m.text_encoder,
      "text_pooling": m.text_pooling, "max_text_length": m.max_text_length,
      "image_layer": m.image_layer, "text_layer": m.text_layer, "text_prefix": m.text_prefix,
      "encoder_dtype": m.encoder_dtype, "dtype": dtype,
      "data": {k: v for k, v in config.data.to_dict().items() if isinstance(v, (str, int, float))},
      "num_images": sum(s["num_images"] for s in shards),
      "num_texts": sum(s["num_texts"] for s in shards), "shards": shards}
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as f:
      json.dump(manifest, f, indent=1)
    os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
  return manifest
