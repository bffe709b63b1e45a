"""Encode once, train many epochs: run the frozen encoders over a dataset and store the features.

    python main.py --mode=extract_features --config=configs/dinov2_roberta.py --workdir=/data/feats

SAIL-style (RECIPES §2): the image-caption source named by ``config.data`` is read once (every
image once, with all its captions), both frozen encoders run jitted and sharded over every device
and process, and each process writes its rows in shards (``OUT`` is a local folder or a URL such
as ``gs://bucket/feats``; all I/O goes through :mod:`align_jax.run.storage`)::

    OUT/fingerprint.json  everything that determines the features (written before any shard)
    OUT/shard-<process>-<n>/image.npy  [n, D] or [n, T, D] (+ image_mask.npy)   float16 by default
    OUT/shard-<process>-<n>/text.npy   [m, ...] for every caption (+ text_mask.npy)
    OUT/shard-<process>-<n>/text_to_image.npy  [m] int32, row of the shard's image
    OUT/shard-<process>-<n>/image_ids.npy      [n] int64, record index in the source
    OUT/manifest.json   format, fingerprint, split, counts, every file's shape, size and sha256
    OUT/<split>/        the same for each retrieval evaluator's split (e.g. ``heldout``)

The fingerprint records the encoder ids and a digest of their parameters
(:func:`align_jax.run.checksums.tree_digest`, on device), poolings, image size, the evaluation
transform's normalisation, max text length, a digest of the tokenizer, the encoder and storage
dtypes, and the data source, split and the keys that select its records. Extraction into a folder
whose store has another fingerprint (or none) is refused with one line listing what differs;
``--config.extract.overwrite=True`` deletes that store and starts over. Reading a store
(:mod:`align_jax.data.feature_store`) checks every shard against the manifest.

A local shard is written to a temporary folder and renamed when complete (on ``gs://``, where a
folder rename is a copy, its files are written in place and only count once listed); after each
shard the process saves the source position in ``progress-<process>.json``. Interrupted, the same
command resumes after the last complete shard: no duplicates, no gaps. Training reads the folder
with ``data.source = "features"`` (one caption sampled per image and step), and an evaluator that
asks for another split of the same data reads ``OUT/<split>/``. A training run records the store's
fingerprint in its ``config.json`` and refuses, in one line, a store whose fingerprint differs
from the run's or from the config's encoder settings (:func:`check_training_store`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from align_jax.run import checksums, storage
from align_jax.model import two_tower as model_lib
from align_jax.parallel import mesh as sharding
from align_jax.train import step as step_builder
from align_jax.data import factory, feature_store as feature_files, array_sources as features

logger = logging.getLogger("align_jax")
MANIFEST = feature_files.MANIFEST
FINGERPRINT = feature_files.FINGERPRINT
STORE_DTYPES = ("float16", "float32")  # config.extract.dtype: the stored arrays' dtype
FeatureStoreError = feature_files.FeatureStoreError

# The data keys that select which records a source yields (everything else -- threads, prefetch,
# training augmentation -- does not change the stored features).
_DATA_KEYS = {"tfds": ("name", "data_dir", "image_key", "caption_key"),
              "webdataset": ("urls", "caption_key"),
              "manifest": ("path", "image_root", "image_key", "caption_key"),
              "parquet": ("path", "image_root", "image_key", "caption_key"),
              "synthetic_shapes": ("num_pairs", "data_seed")}


def _sha256(path: str) -> str:
  return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def _is_store_file(name: str) -> bool:
  return (name in (MANIFEST, FINGERPRINT) or name.startswith("shard-")
          or (name.startswith("progress-") and name.endswith(".json")))


def _tokenizer_digest(tokenizer) -> str | None:
  if tokenizer is None:
    return None
  backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: the full pipeline
  if backend is not None:
    text = backend.to_str()
  else:
    text = json.dumps(sorted(tokenizer.get_vocab().items()))
  return f"{type(tokenizer).__name__}:{hashlib.sha256(text.encode()).hexdigest()}"


def _encoder_id(name: str) -> str:
  return storage.normalize(name) if not storage.is_url(name) and os.path.isdir(name) else name


def _layer_id(layer):
  """A hidden-state index or a list of them (averaged), JSON-comparable."""
  return [int(i) for i in layer] if isinstance(layer, (tuple, list)) else int(layer)


def fingerprint(config: ml_collections.ConfigDict, data, model, frozen: dict, dtype: str) -> dict:
  """Everything that determines the features of ``data`` (see the module docstring)."""
  m = config.model
  image, text = model.image_encoder, model.text_encoder
  # The hub commit an id resolved to (absent for local folders and toy encoders), so a store made
  # from an older revision of the same hub id is refused.
  revisions = {f"{tower}_revision": commit
               for tower, commit in model.encoder_revisions().items() if commit}
  fp = {
      "model": {
          "image_encoder": _encoder_id(m.image_encoder),
          "image_params": checksums.tree_digest(frozen["image"]),
          "image_pooling": m.image_pooling, "image_size": int(image.image_size),
          "image_layer": _layer_id(m.image_layer),
          "image_transform": {"kind": "resize + centre crop", "mean": list(image.mean),
                              "std": list(image.std)},
          "text_encoder": _encoder_id(m.text_encoder),
          "text_params": checksums.tree_digest(frozen["text"]),
          "text_pooling": m.text_pooling, "max_text_length": int(m.max_text_length),
          "text_layer": _layer_id(m.text_layer), "text_prefix": m.text_prefix,
          "tokenizer": _tokenizer_digest(getattr(text, "tokenizer", None)),
          "encoder_dtype": m.encoder_dtype},
      "dtype": dtype,
      "data": {"source": data.source, "split": data.split,
               "max_image_pixels": int(data.max_image_pixels),
               "min_image_size": int(data.min_image_size),
               **{k: data.get(k) for k in _DATA_KEYS.get(data.source, ())}},
  }
  fp["model"].update(revisions)
  return fp


# Encoder settings a config trained on stored features restates from the config that extracted
# them (a features config is the extraction config with both encoders set to "features", as
# align_jax.testing.demos.features_config makes it): each must equal the store's.
_RESTATED_SETTINGS = ("image_pooling", "image_layer", "text_pooling", "text_layer", "text_prefix",
                      "max_text_length", "encoder_dtype")
DAMAGED_STORE_HINT = ("; or the feature store is damaged: rerun with verify_features=always "
                      "(--config.data.verify_features=always hashes every shard file again)")


def _restated(config: ml_collections.ConfigDict, key: str):
  value = config.model[key]
  if key.endswith("_layer"):
    return _layer_id(value)
  return int(value) if key == "max_text_length" else value


def _recorded_in_run(workdir: str) -> tuple[dict | None, str]:
  """(the store fingerprint ``WORKDIR/config.json`` records, the store path it records)."""
  path = storage.join(workdir, "config.json")
  if not storage.isfile(path):
    return None, ""
  try:
    data = json.loads(storage.read_text(path)).get("data") or {}
  except (ValueError, AttributeError):
    return None, ""  # unreadable: align_jax.run.reader reports it where it is needed
  return data.get("store_fingerprint") or None, data.get("path") or ""


def check_training_store(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The fingerprint of the store a run trains on, checked; None when there is none to check.

  For ``data.source = "features"``: the encoders must be ``"features"``
  (:func:`align_jax.data.array_sources.check_feature_encoders`); the store's fingerprint must match
  the config's encoder settings (pooling, layer, text prefix, max text length, encoder dtype), and
  the fingerprint the run recorded in ``WORKDIR/config.json`` (``data.store_fingerprint``), or
  that the config itself names. The trainer then records the returned fingerprint, so resuming
  on a store made with other encoders, settings or data is refused in one line naming both.

  Raises:
    FeatureStoreError: one line naming the store, what differs, and what to set.
  """
  features.check_feature_encoders(config)
  if config.data.source != "features" or not config.data.path:
    return None  # the source names a missing path itself
  path = storage.normalize(config.data.path)
  current = feature_files.store_fingerprint(path) if storage.exists(path) else None
  model = (current or {}).get("model") or {}
  differ = [(key, model[key], _restated(config, key)) for key in _RESTATED_SETTINGS
            if key in model and model[key] != _restated(config, key)]
  if differ:
    store = ", ".join(f"model.{key}={a!r}" for key, a, _ in differ)
    now = ", ".join(f"model.{key}={b!r}" for key, _, b in differ)
    flags = " ".join(f"--config.model.{key}={a}" for key, a, _ in differ)
    raise FeatureStoreError(
        f"feature store {path} was extracted with {store}, but the config says {now}: train with "
        f"the store's settings ({flags}), or extract a store with the config's "
        "(--mode=extract_features)")
  run_record, run_path = _recorded_in_run(workdir)
  named = config.data.store_fingerprint
  records = [(run_record, f"{storage.join(workdir, 'config.json')} records that this run trains "
              f"on {run_path}", f"train on the run's store (--config.data.path={run_path}) or "
              "start a new run in another --workdir")]
  if named is not None:
    named = named.to_dict() if isinstance(named, ml_collections.ConfigDict) else named
    records.append((named, "the config names (data.store_fingerprint) another store",
                    "train on that store, or set config.data.store_fingerprint = None"))
  for recorded, what, hint in records:
    if recorded is None or recorded == current:
      continue
    if current is None:
      raise FeatureStoreError(
          f"feature store {path} has no fingerprint (a plain folder, or written by an older "
          f"align_jax), but {what} (fingerprint {feature_files.fingerprint_digest(recorded)}); "
          f"{hint}")
    differences = feature_files.fingerprint_differences(
        recorded, current, labels=("in the run's store", "in this one"))
    raise FeatureStoreError(
        f"feature store {path} (fingerprint {feature_files.fingerprint_digest(current)}) is not "
        f"the one expected: {what} (fingerprint {feature_files.fingerprint_digest(recorded)}); "
        f"they differ in {'; '.join(differences)}; {hint}")
  return current


def _prepare_folder(out_dir: str, current: dict, overwrite: bool) -> None:
  """Refuses a store with another fingerprint (or deletes it with ``overwrite``); every process
  reads the same answer, process 0 deletes and writes ``fingerprint.json``."""
  existing = [n for n in storage.listdir(out_dir) if _is_store_file(n)]
  hint = ("use another --workdir, or --config.extract.overwrite=True to delete it and extract "
          "again")
  if existing and not overwrite:
    path = storage.join(out_dir, FINGERPRINT)
    stored = feature_files.read_json(path) if storage.exists(path) else None
    if stored is None:
      manifest = feature_files.read_manifest(out_dir) if MANIFEST in existing else None
      stored = (manifest or {}).get("fingerprint")
    if stored is None:
      raise FeatureStoreError(f"{out_dir} holds a feature store without a fingerprint (written by "
                              f"an older align_jax): what it holds cannot be checked; {hint}")
    differences = feature_files.fingerprint_differences(stored, current)
    if differences:
      raise FeatureStoreError(f"feature store {out_dir} holds other features: "
                              f"{'; '.join(differences)}; {hint}")
  multihost_utils.sync_global_devices("feature_store_checked")
  if jax.process_index() == 0:
    if existing and overwrite:
      for name in existing:
        storage.remove(storage.join(out_dir, name))
      logger.warning("deleted the feature store in %s (--config.extract.overwrite)", out_dir)
    storage.write_text(storage.join(out_dir, FINGERPRINT), json.dumps(current, indent=1))
  multihost_utils.sync_global_devices("feature_store_prepared")


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


def _tower_arrays(tower: str, features: list[dict], dtype) -> dict[str, np.ndarray]:
  if "pooled" in features[0]:
    return {f"{tower}.npy": np.concatenate([f["pooled"] for f in features]).astype(dtype)}
  return {f"{tower}.npy": np.concatenate([f["tokens"] for f in features]).astype(dtype),
          f"{tower}_mask.npy": np.concatenate([f["mask"] for f in features]).astype(bool)}


class _ShardWriter:
  """Collects one shard's rows and writes them (atomically on local disks)."""

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
    final = storage.join(self.out_dir, name)
    # Object stores have no folder rename: files go in place, and the shard only counts once
    # progress-<process>.json lists it. Local disks get a staging folder renamed when complete.
    folder = final if storage.is_url(final) else final + ".tmp"
    storage.remove(folder)
    storage.makedirs(folder)
    arrays = {**_tower_arrays("image", self.images, self.dtype),
              **_tower_arrays("text", self.texts, self.dtype),
              "text_to_image.npy": np.asarray(self.text_to_image, np.int32),
              "image_ids.npy": np.concatenate(self.image_ids).astype(np.int64)}
    files = {}
    for file in sorted(arrays):
      data = feature_files.npy_bytes(arrays[file])
      files[file] = feature_files.file_entry(data, arrays[file])
      storage.write_bytes(storage.join(folder, file), data)
      del data
    if folder != final:
      storage.remove(final)  # left by a run killed between this rename and its progress file
      storage.rename(folder, final)
    entry = {"name": name, "num_images": self.num_images, "num_texts": len(self.text_to_image),
             "files": files}
    self.reset()
    return entry


def extract_features(config: ml_collections.ConfigDict, out_dir: str, *,
                     shard_batches: int | None = None, batch_size: int | None = None,
                     dtype: str | None = None, mesh=None, eval_splits: bool = True) -> dict:
  """Encodes ``config.data`` with the frozen encoders of ``config.model`` into ``out_dir``.

  Args:
    config: a training config (its data source and encoders are used).
    out_dir: the feature store folder (local or a URL); created, or resumed if a previous run with
      the same fingerprint was interrupted.
    shard_batches: global batches per shard (the resume granularity; default
      ``config.extract.shard_batches``).
    batch_size: global batch for encoding (default ``config.batch_size``).
    dtype: storage dtype, "float16" or "float32" (default ``config.extract.dtype``).
    mesh: defaults to ``config.mesh``.
    eval_splits: also extract the split of every retrieval evaluator that reads another split of
      the same data into ``out_dir/<split>`` (where training from the store finds it).

  Returns:
    The manifest of ``out_dir``.
  """
  shard_batches = shard_batches or config.extract.shard_batches
  dtype = dtype or config.extract.dtype
  if dtype not in STORE_DTYPES:
    raise ValueError(f"config.extract.dtype is {dtype!r}; use one of "
                     f"{', '.join(repr(d) for d in STORE_DTYPES)}")
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
  frozen, _ = step_builder.place_frozen(model, mesh, config)
  out_dir = storage.normalize(out_dir)
  splits = [(out_dir, factory.resolve_split(config.data))]
  if eval_splits:
    splits += [(storage.join(out_dir, data.split), data) for data in _evaluator_splits(config)]
  manifests = [_extract_split(config, data, folder, model, frozen, mesh, batch_size=batch_size,
                              shard_batches=shard_batches, dtype=dtype) for folder, data in splits]
  return manifests[0]


_EVAL_KEYS_KEEPING_DATA = {"split", "num_threads", "num_workers", "prefetch",
                           "max_consecutive_skips"}


def _evaluator_splits(config) -> list:
  """Data configs of the other splits retrieval evaluators read from the training data."""
  out, seen = [], {config.data.split}
  for name, eval_config in config.evals.items():
    if eval_config.get("type") != "retrieval":
      continue
    overrides = dict(eval_config.get("data", None) or {})
    split = overrides.get("split", config.data.split)
    if split in seen:
      continue
    if set(overrides) - _EVAL_KEYS_KEEPING_DATA:
      logger.info("config.evals.%s reads other data (%s): not extracted here; give it its own "
                  "feature store (config.evals.%s.data.path)", name,
                  sorted(set(overrides) - _EVAL_KEYS_KEEPING_DATA), name)
      continue
    seen.add(split)
    out.append(factory.eval_data_config(config, overrides, name=name))
  return out


def _extract_split(config, data, out_dir: str, model, frozen, mesh, *, batch_size: int,
                   shard_batches: int, dtype: str) -> dict:
  """Encodes ``data`` (one split of a data config) into the store ``out_dir``."""
  from align_jax.data import pipeline
  batch_axes = tuple(config.mesh.batch_axes)
  process = jax.process_index()
  current = fingerprint(config, data, model, frozen, dtype)
  storage.makedirs(out_dir)
  _prepare_folder(out_dir, current, bool(config.extract.overwrite))
  progress_path = storage.join(out_dir, f"progress-{process:05d}.json")
  progress = {"shards": [], "source_state": None, "batches_done": 0}
  if storage.exists(progress_path):
    progress = feature_files.read_json(progress_path)
    logger.info("resuming feature extraction into %s after %d batches (%d shards)", out_dir,
                progress["batches_done"], len(progress["shards"]))

  source = pipeline.make_pair_source(
      data, global_batch_size=batch_size, seed=0,
      image_transform=factory.make_image_transform(model, data, train=False),
      tokenize=model.text_encoder.preprocess, train=False)
  if progress["source_state"] is not None:
    source.set_state(progress["source_state"])
  batch_sharding = sharding.batch_sharding(mesh, batch_axes)
  # Outputs stay split like the batch (rows only: with FSDP-sharded frozen params XLA could
  # otherwise split them along the feature axis), so each process keeps its own rows.
  encode_images = jax.jit(lambda p, x: model.apply_encoder(model.image_encoder, p, x),
                          out_shardings=batch_sharding)
  encode_texts = jax.jit(lambda p, x: model.apply_encoder(model.text_encoder, p, x),
                         out_shardings=batch_sharding)
  text_local = batch_size // jax.process_count()

  writer = _ShardWriter(out_dir, process, np.dtype(dtype))
  total = len(source)
  from tqdm import tqdm
  bar = tqdm(total=total, initial=progress["batches_done"], desc=f"encoding {data.split}",
             unit="batch", disable=process != 0)
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
      storage.write_text(progress_path, json.dumps(progress))
  bar.close()
  multihost_utils.sync_global_devices("feature_store_done")
  manifest = _write_manifest(out_dir, current)
  logger.info("stored %d images and %d captions (split %r) in %s", manifest["num_images"],
              manifest["num_texts"], data.split, out_dir)
  return manifest


def _write_manifest(out_dir: str, current: dict) -> dict:
  shards = []
  for name in storage.listdir(out_dir):
    if name.startswith("progress-") and name.endswith(".json"):
      shards.extend(feature_files.read_json(storage.join(out_dir, name))["shards"])
  shards.sort(key=lambda s: s["name"])
  model = current["model"]
  manifest = {
      "format": feature_files.FORMAT, "split": current["data"]["split"],
      "image_encoder": model["image_encoder"], "image_pooling": model["image_pooling"],
      "image_size": model["image_size"], "text_encoder": model["text_encoder"],
      "text_pooling": model["text_pooling"], "max_text_length": model["max_text_length"],
      "image_layer": model["image_layer"], "text_layer": model["text_layer"],
      "text_prefix": model["text_prefix"],
      "encoder_dtype": model["encoder_dtype"], "dtype": current["dtype"],
      "num_images": sum(s["num_images"] for s in shards),
      "num_texts": sum(s["num_texts"] for s in shards),
      "fingerprint": current, "shards": shards}
  if jax.process_index() == 0:
    storage.write_text(storage.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
  return manifest
