"""The files of a feature store, read back checked: manifest, fingerprint, shard shapes and digests.

A store written by :mod:`align_jax.train.extract` is a folder (local, or a URL such as
``gs://bucket/feats``)::

    manifest.json      format, fingerprint, split, counts, per-row shapes, every shard's files
    fingerprint.json   what determines the features (written before the first shard)
    shard-<process>-<n>/{image,text}.npy (+ _mask.npy), text_to_image.npy, image_ids.npy

and the manifest lists, for every file of every shard, its ``shape``, ``dtype``, byte size and
sha256. :func:`open_store` checks all of them against the files and names the first bad shard:

* shapes, dtypes and byte sizes of every file, rows against the shard's counts, the same per-row
  shape in every shard, ``text_to_image`` in range and grouped: always (one ``stat`` and one
  ``.npy`` header per file; instant even for a million rows);
* sha256 digests, ``verify``: ``"once"`` (default) hashes each local file the first time this
  machine reads it and caches the result (keyed by path, size and mtime) in
  ``CACHE/verified.json``; ``"always"`` hashes every file on every load; ``"size"`` skips digests
  (for stores of hundreds of GB, e.g. image tokens).

Local stores are memory-mapped. A store at a URL is copied, file by file, into the local cache
``CACHE/objects/<sha256>.npy`` (content-addressed: a re-extracted store never reuses stale files)
and memory-mapped from there; each copy is hashed while it downloads, so its digest is always
verified. ``CACHE`` is ``data.feature_cache_dir``, default ``<cache root>/feature_stores``
(``$ALIGN_JAX_CACHE``, else ``$XDG_CACHE_HOME/align_jax``, else ``~/.cache/align_jax``): a private
folder, made with mode 0700, and refused if it is a symlink or another user could write it
(:mod:`align_jax.run.cache_dir`), since the digests recorded there are trusted. A plain folder with
``image.npy`` / ``text.npy`` (no manifest) has nothing to check against; at a URL it is read into
memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Any

import numpy as np

from align_jax.run import cache_dir as cache_lib
from align_jax.run import storage

FORMAT = "align_jax.feature_store/2"
MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.json"
VERIFY_MODES = ("once", "always", "size")
_CHUNK = 1 << 22


class FeatureStoreError(ValueError):
  """A feature store that is damaged, mixed or not the one asked for (one line, names the path)."""


def default_cache_dir() -> str:
  """``<cache root>/feature_stores``, made private (mode 0700; :mod:`align_jax.run.cache_dir`)."""
  return cache_lib.user_cache_dir("feature_stores")


def npy_bytes(array: np.ndarray) -> bytes:
  """``array`` as the bytes of a ``.npy`` file."""
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def file_entry(data: bytes, array: np.ndarray) -> dict:
  """The manifest's record of one shard file."""
  return {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": len(data),
          "sha256": hashlib.sha256(data).hexdigest()}


def read_json(path: str) -> Any:
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as error:
    raise FeatureStoreError(f"{path} is not valid JSON ({error}); the feature store is damaged: "
                            "extract it again") from None


def read_manifest(path: str) -> dict | None:
  """The manifest of the store at ``path``, or None for a folder without one."""
  manifest_path = storage.join(path, MANIFEST)
  if not storage.exists(manifest_path):
    return None
  manifest = read_json(manifest_path)
  if not isinstance(manifest, dict) or "shards" not in manifest:
    raise FeatureStoreError(f"{manifest_path} is not a feature-store manifest")
  return manifest


def stored_split(manifest: dict) -> str | None:
  """The data split a store was extracted from (None for stores written before it was recorded)."""
  fingerprint = manifest.get("fingerprint") or {}
  return (fingerprint.get("data") or {}).get("split") or manifest.get("split") or None


def fingerprint_differences(stored: dict, current: dict, prefix: str = "",
                            labels: tuple[str, str] = ("in the store", "now")) -> list[str]:
  """``["model.image_pooling: 'cls' in the store, 'tokens' now", ...]`` for every differing key."""
  out = []
  for key in sorted(set(stored) | set(current)):
    a, b = stored.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(fingerprint_differences(a, b, f"{prefix}{key}.", labels))
    elif a != b:
      out.append(f"{prefix}{key}: {_short(a)} {labels[0]}, {_short(b)} {labels[1]}")
  return out


def store_fingerprint(path: str) -> dict | None:
  """The fingerprint of the store at ``path`` (``fingerprint.json``, else the manifest's), or None
  for a folder without one (a plain ``image.npy`` / ``text.npy`` folder, an older store, nothing)."""
  fingerprint_path = storage.join(path, FINGERPRINT)
  if storage.exists(fingerprint_path):
    fingerprint = read_json(fingerprint_path)
  else:
    fingerprint = (read_manifest(path) or {}).get("fingerprint")
  if fingerprint is not None and not isinstance(fingerprint, dict):
    raise FeatureStoreError(f"{path}: the store's fingerprint is not a JSON object; the feature "
                            "store is damaged: extract it again")
  return fingerprint


def fingerprint_digest(fingerprint: dict) -> str:
  """A short id of a fingerprint (12 hex digits of the sha256 of its canonical JSON)."""
  return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


# --- digests -------------------------------------------------------------------------------------


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


class _VerifiedCache:
  """Digests this machine already checked: ``{path: [size, mtime_ns, sha256]}`` in a JSON file."""

  def __init__(self, cache_dir: str):
    self.path = os.path.join(cache_dir, "verified.json")
    self.entries: dict[str, list] = {}
    self.dirty = False
    if os.path.exists(self.path):
      try:
        with open(self.path) as f:
          self.entries = json.load(f)
      except (OSError, ValueError):
        self.entries = {}  # a damaged cache only costs re-hashing

  def known(self, path: str, sha256: str) -> bool:
    stat = os.stat(path)
    return self.entries.get(os.path.abspath(path)) == [stat.st_size, stat.st_mtime_ns, sha256]

  def add(self, path: str, sha256: str) -> None:
    stat = os.stat(path)
    self.entries[os.path.abspath(path)] = [stat.st_size, stat.st_mtime_ns, sha256]
    self.dirty = True

  def save(self) -> None:
    if not self.dirty:
      return
    try:
      current = {}
      if os.path.exists(self.path):  # another process may have added entries meanwhile
        with open(self.path) as f:
          current = json.load(f)
    except (OSError, ValueError):
      current = {}
    current.update(self.entries)
    try:
      storage.write_text(self.path, json.dumps(current))
    except OSError:
      pass  # a read-only cache only costs re-hashing next time


def _download(url: str, entry: dict, cache_dir: str, where: str) -> str:
  """A verified local copy of a shard file at a URL (content-addressed by its sha256)."""
  target = os.path.join(cache_dir, "objects", f"{entry['sha256']}.npy")
  if os.path.exists(target) and os.path.getsize(target) == entry.get("bytes", -1):
    return target  # complete copies only ever appear after their digest matched
  cache_lib.private_dir(os.path.dirname(target))
  digest = hashlib.sha256()
  handle, staging = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".download-")
  try:
    with os.fdopen(handle, "wb") as out, storage.open_file(url, "rb") as f:
      for block in iter(lambda: f.read(_CHUNK), b""):
        digest.update(block)
        out.write(block)
    if digest.hexdigest() != entry["sha256"]:
      raise FeatureStoreError(f"{where}: sha256 {digest.hexdigest()[:12]}... does not match the "
                              f"manifest's {entry['sha256'][:12]}...; the store is damaged: "
                              "extract it again")
    os.chmod(staging, 0o644)
    os.replace(staging, target)
  finally:
    if os.path.exists(staging):
      os.remove(staging)
  return target


# --- reading -----------------------------------------------------------------------------------


def _load_npy(path: str) -> np.ndarray:
  """Memory-maps a local .npy file; reads one at a URL into memory."""
  local = storage.local_path(path)
  if local is not None:
    return np.load(local, mmap_mode="r", allow_pickle=False)
  return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)


def load_tower(path: str, tower: str) -> dict:
  """``{"pooled": [N, D]}`` or ``{"tokens": [N, T, D], "mask": [N, T]}`` from a plain folder."""
  array_path = storage.join(path, f"{tower}.npy")
  if not storage.exists(array_path):
    raise FileNotFoundError(f"stored features not found: {array_path} (config.data.path should "
                            f"be a feature store, or a folder with image.npy and text.npy)")
  array = _load_npy(array_path)
  if array.ndim == 2:
    return {"pooled": array}
  mask_path = storage.join(path, f"{tower}_mask.npy")
  if array.ndim != 3 or not storage.exists(mask_path):
    raise ValueError(f"{array_path}: expected [N, D] features, or [N, T, D] tokens with "
                     f"{tower}_mask.npy [N, T]; got shape {array.shape}")
  mask = _load_npy(mask_path)
  if mask.shape != array.shape[:2]:
    raise ValueError(f"{mask_path} has shape {mask.shape}, expected {array.shape[:2]}")
  return {"tokens": array, "mask": mask}


def _shard_files(shard: dict) -> dict[str, dict]:
  if "files" in shard:
    return shard["files"]
  return {name: {"sha256": digest} for name, digest in shard.get("sha256", {}).items()}  # v1


def open_store(path: str, *, split: str = "", verify: str = "once",
               cache_dir: str = "") -> tuple[list[dict], list[dict], np.ndarray]:
  """Checks the store at ``path`` and opens every shard -> (image parts, text parts, text_to_image).

  Each part is one shard's tower (``{"pooled": ...}`` or ``{"tokens": ..., "mask": ...}``);
  ``text_to_image`` indexes the images of all shards in order. ``split`` (if given) must be the
  split the store was extracted from. Raises :class:`FeatureStoreError` naming the bad shard.
  """
  if verify not in VERIFY_MODES:
    raise ValueError(f"data.verify_features is {verify!r}; choose one of {VERIFY_MODES}")
  manifest = read_manifest(path)
  if manifest is None:
    raise FileNotFoundError(f"no feature store at {path} (no {MANIFEST})")
  recorded = stored_split(manifest)
  if split and recorded and recorded != split:
    raise FeatureStoreError(
        f"feature store {path} holds split {recorded!r}, not the {split!r} asked for; extract "
        f"that split (--config.data.split={split}) into its own folder")
  if not manifest["shards"]:
    raise FeatureStoreError(f"feature store {path} has no shards; extract it again")
  url = storage.is_url(path)
  verified = None
  if url or verify == "once":  # a cache is used: a private one (records in it are trusted)
    cache_dir = cache_lib.private_dir(cache_dir) if cache_dir else default_cache_dir()
    verified = _VerifiedCache(cache_dir) if not url else None
  row_shapes: dict[str, tuple] = {}  # tower -> (per-row shape, dtype) of the first shard
  images, texts, text_to_image, offset = [], [], [], 0
  for shard in manifest["shards"]:
    name = shard["name"]
    files = _shard_files(shard)
    arrays = {}
    for file, entry in sorted(files.items()):
      where = f"feature store {path}: shard {name}: {file}"
      file_path = storage.join(path, name, file)
      if url:
        if "sha256" not in entry:
          raise FeatureStoreError(f"{where}: the manifest has no sha256 for it")
        if not storage.exists(file_path):
          raise FeatureStoreError(f"{where} is missing; the store is incomplete: extract it again")
        local = _download(file_path, entry, cache_dir, where)
      else:
        local = file_path
        if not os.path.exists(local):
          raise FeatureStoreError(f"{where} is missing; the store is incomplete: extract it again")
      if "bytes" in entry and os.path.getsize(local) != entry["bytes"]:
        raise FeatureStoreError(f"{where} has {os.path.getsize(local)} bytes, the manifest says "
                                f"{entry['bytes']} (truncated or replaced); extract it again")
      try:
        array = np.load(local, mmap_mode="r", allow_pickle=False)
      except Exception as error:  # pylint: disable=broad-except
        raise FeatureStoreError(f"{where} is not a readable .npy file ({error})") from None
      if "shape" in entry and (list(array.shape) != entry["shape"]
                               or str(array.dtype) != entry["dtype"]):
        raise FeatureStoreError(f"{where} holds {array.dtype}{list(array.shape)}, the manifest "
                                f"says {entry['dtype']}{entry['shape']}; extract it again")
      if not url and verify != "size" and "sha256" in entry:
        if verified is None or not verified.known(local, entry["sha256"]):
          digest = _sha256_file(local)
          if digest != entry["sha256"]:
            raise FeatureStoreError(f"{where}: sha256 {digest[:12]}... does not match the "
                                    f"manifest's {entry['sha256'][:12]}...; the file changed "
                                    "after extraction: extract it again")
          if verified is not None:
            verified.add(local, digest)
      arrays[file] = array
    images.append(_shard_tower(arrays, "image", shard, path, row_shapes))
    texts.append(_shard_tower(arrays, "text", shard, path, row_shapes))
    mapping = np.asarray(arrays.get("text_to_image.npy", np.zeros(0, np.int32)))
    num_images = len(next(iter(images[-1].values())))
    num_texts = len(next(iter(texts[-1].values())))
    if (len(mapping) != num_texts or (len(mapping) and (mapping.min() < 0 or
                                                         mapping.max() >= num_images))
        or np.any(np.diff(mapping) < 0)):
      raise FeatureStoreError(f"feature store {path}: shard {name}: text_to_image.npy does not map "
                              f"its {num_texts} captions onto its {num_images} images in order; "
                              "extract it again")
    text_to_image.append(mapping.astype(np.int64) + offset)
    offset += num_images
  if verified is not None:
    verified.save()
  for key, total in (("num_images", offset), ("num_texts", sum(len(t) for t in text_to_image))):
    if key in manifest and manifest[key] != total:
      raise FeatureStoreError(f"feature store {path}: the manifest says {key}={manifest[key]} but "
                              f"its shards hold {total}; extract it again")
  return images, texts, np.concatenate(text_to_image)


def _shard_tower(arrays: dict, tower: str, shard: dict, path: str, row_shapes: dict) -> dict:
  """One shard's tower, checked against its counts and against the first shard's row shape."""
  where = f"feature store {path}: shard {shard['name']}"
  if f"{tower}.npy" not in arrays:
    raise FeatureStoreError(f"{where} has no {tower}.npy; extract it again")
  features = arrays[f"{tower}.npy"]
  rows = shard.get("num_images" if tower == "image" else "num_texts", len(features))
  if len(features) != rows:
    raise FeatureStoreError(f"{where}: {tower}.npy has {len(features)} rows, the manifest says "
                            f"{rows}; extract it again")
  signature = (tuple(features.shape[1:]), str(features.dtype))
  first = row_shapes.setdefault(tower, (signature, shard["name"]))
  if first[0] != signature:
    raise FeatureStoreError(
        f"{where}: {tower}.npy rows are {signature[1]}{list(signature[0])} but shard {first[1]}'s "
        f"are {first[0][1]}{list(first[0][0])}: the shards come from different encoders or "
        "settings; extract the store again")
  if features.ndim == 2:
    return {"pooled": features}
  mask = arrays.get(f"{tower}_mask.npy")
  if features.ndim != 3 or mask is None or mask.shape != features.shape[:2]:
    raise FeatureStoreError(f"{where}: {tower}.npy has shape {list(features.shape)}; token "
                            f"features need {tower}_mask.npy of shape {list(features.shape[:2])}")
  return {"tokens": features, "mask": mask}
