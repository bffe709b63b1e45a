"""Pairs held in arrays: stored encoder features (memory-mapped .npy) and the synthetic demo world.

Both are served by :class:`ArrayPairSource`, the simplest implementation of the source interface
every training input follows:

* ``next(source)`` -> this process's rows of the next global batch, ``{"image": {...}, "text": {...}}``;
* ``get_state()`` / ``set_state(state)`` -> a JSON dict saved in each checkpoint, so a resumed run
  sees exactly the examples an uninterrupted run would have seen;
* ``skipped()`` -> counters of dropped records (none for arrays).

The order is a pure function of (seed, position): epoch ``e`` visits ``permutation(seed, e)`` of
all pairs, batches run on across epoch ends, and process ``p`` of ``P`` takes the ``p``-th
contiguous slice of every global batch. So the state is a single integer.

Stored features: a folder with ``image.npy`` ([N, D] pooled, or [N, T, D] tokens with
``image_mask.npy`` [N, T]) and the same for ``text``; or a feature store written by
:mod:`align_jax.feature_store` (shards + manifest, several captions per image). Rows are read with
one sorted fancy index per batch, so memory-mapped files far larger than RAM train at disk speed.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import jax
import numpy as np


class ConcatenatedArray:
  """Rows of several (memory-mapped) arrays seen as one, read with integer index arrays."""

  def __init__(self, parts: list):
    self.parts = parts
    self.offsets = np.cumsum([0] + [len(p) for p in parts])
    self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
    self.dtype = parts[0].dtype

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index: np.ndarray) -> np.ndarray:
    index = np.asarray(index)
    part = np.searchsorted(self.offsets, index, side="right") - 1
    out = np.empty((len(index), *self.shape[1:]), self.dtype)
    for p in np.unique(part):
      sel = part == p
      out[sel] = self.parts[p][index[sel] - self.offsets[p]]
    return out


class ArrayPairSource:
  """Deterministic, resumable, process-sharded batches of pairs from arrays with a leading N.

  With ``text_to_image`` (text row -> image row, grouped by image), images may have several
  captions: each step takes one of them, chosen from (seed, position); otherwise text i is the
  caption of image i. With ``captions_per_image`` k > 1 each image brings k captions: text rows
  [n * k], image-major (k cyclically consecutive captions from a random start: distinct when the
  image has >= k, repeated when it has fewer), for the multi-positive losses (align_jax.variants).
  """

  def __init__(self, image: dict, text: dict, *, global_batch_size: int, seed: int,
               text_to_image: np.ndarray | None = None, process_index: int | None = None,
               process_count: int | None = None, shuffle: bool = True,
               captions_per_image: int = 1):
    num_images = {len(v) for v in image.values()}
    num_texts = {len(v) for v in text.values()}
    if len(num_images) != 1 or len(num_texts) != 1:
      raise ValueError("the arrays of one tower hold different numbers of rows")
    self.num_pairs, num_texts = num_images.pop(), num_texts.pop()
    if text_to_image is None:
      if num_texts != self.num_pairs:
        raise ValueError(f"image and text arrays hold different numbers of pairs: "
                         f"{sorted({self.num_pairs, num_texts})}")
      text_to_image = np.arange(self.num_pairs)
    text_to_image = np.asarray(text_to_image)
    if len(text_to_image) != num_texts or np.any(np.diff(text_to_image) < 0):
      raise ValueError("text_to_image must give every text row its image, grouped by image")
    self.text_to_image = text_to_image
    self.caption_start = np.searchsorted(text_to_image, np.arange(self.num_pairs))
    self.caption_count = np.searchsorted(text_to_image, np.arange(self.num_pairs),
                                         side="right") - self.caption_start
    if self.num_pairs == 0 or np.any(self.caption_count == 0):
      raise ValueError("the pair source is empty or has images without a caption")
    self.image, self.text = image, text
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise ValueError(f"global batch {global_batch_size} is not divisible by "
                       f"{self.process_count} processes")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // self.process_count
    self.seed, self.shuffle = seed, shuffle
    self.captions_per_image = int(captions_per_image)
    self.position = 0  # global position of the next batch's first example

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_pairs)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)

  def indices(self, start: int, count: int) -> np.ndarray:
    """Pair indices at global positions ``start .. start + count - 1``."""
    positions = np.arange(start, start + count)
    epochs, offsets = np.divmod(positions, self.num_pairs)
    out = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._order(int(epoch))[offsets[sel]]
    return out

  def caption_rows(self, indices: np.ndarray, start: int) -> np.ndarray:
    """The text rows each image uses at positions ``start, start + 1, ...`` (k per image, flat)."""
    count = self.caption_count[indices]
    k = self.captions_per_image
    if np.all(count == 1):
      return np.repeat(self.caption_start[indices], k)
    draw = np.random.default_rng([self.seed, 1, start]).integers(0, 2**31, len(indices))
    offsets = (draw[:, None] + np.arange(k)[None, :]) % count[:, None]
    return (self.caption_start[indices][:, None] + offsets).reshape(-1)

  @staticmethod
  def _rows(arrays: dict, index: np.ndarray) -> dict:
    """``arrays`` at ``index`` (read in sorted order: fast on memory-mapped files)."""
    order = np.argsort(index, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return {k: np.asarray(v[index[order]])[inverse] for k, v in arrays.items()}

  def gather(self, indices: np.ndarray, start: int = 0) -> dict:
    """The pairs at ``indices`` (their captions chosen for positions from ``start``)."""
    return {"image": self._rows(self.image, indices),
            "text": self._rows(self.text, self.caption_rows(indices, start))}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    start = self.position + self.process_index * self.local_batch_size
    batch = self.gather(self.indices(start, self.local_batch_size), start)
    self.position += self.global_batch_size
    return batch

  def get_state(self) -> dict:
    return {"position": int(self.position)}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])

  def skipped(self) -> dict:
    return {}

  def tower_batches(self, tower: str, global_batch_size: int) -> Iterator[tuple[dict, np.ndarray]]:
    """Every row of one tower once, in order: (this process's rows, validity) per global batch.

    The last batch is padded with row 0 (valid False) so every batch has the same shape.
    """
    arrays = self.image if tower == "image" else self.text
    total = self.num_pairs if tower == "image" else len(self.text_to_image)
    local = global_batch_size // self.process_count
    for start in range(0, total, global_batch_size):
      rows = start + self.process_index * local + np.arange(local)
      valid = rows < total
      yield self._rows(arrays, np.where(valid, rows, 0)), valid


def _load_tower(path: str, tower: str) -> dict:
  array_path = os.path.join(path, f"{tower}.npy")
  if not os.path.exists(array_path):
    raise FileNotFoundError(f"stored features not found: {array_path} (config.data.path should "
                            f"be a folder with image.npy and text.npy)")
  array = np.load(array_path, mmap_mode="r")
  if array.ndim == 2:
    return {"pooled": array}
  mask_path = os.path.join(path, f"{tower}_mask.npy")
  if array.ndim != 3 or not os.path.exists(mask_path):
    raise ValueError(f"{array_path}: expected [N, D] features, or [N, T, D] tokens with "
                     f"{tower}_mask.npy [N, T]; got shape {array.shape}")
  mask = np.load(mask_path, mmap_mode="r")
  if mask.shape != array.shape[:2]:
    raise ValueError(f"{mask_path} has shape {mask.shape}, expected {array.shape[:2]}")
  return {"tokens": array, "mask": mask}


def load_stored_features(path: str) -> tuple[dict, dict, np.ndarray | None]:
  """Memory-maps stored features -> (image features, text features, text_to_image or None).

  ``path`` is either a folder with ``image.npy`` / ``text.npy`` (one caption per image), or a
  feature store written by :mod:`align_jax.feature_store` (``manifest.json`` and shards).
  """
  manifest_path = os.path.join(path, "manifest.json")
  if not os.path.exists(manifest_path):
    return _load_tower(path, "image"), _load_tower(path, "text"), None
  with open(manifest_path) as f:
    manifest = json.load(f)
  if not manifest["shards"]:
    raise ValueError(f"feature store {path} has no shards")
  towers = {"image": [], "text": []}
  text_to_image, image_offset = [], 0
  for shard in manifest["shards"]:
    folder = os.path.join(path, shard["name"])
    for tower in towers:
      towers[tower].append(_load_tower(folder, tower))
    text_to_image.append(np.load(os.path.join(folder, "text_to_image.npy")) + image_offset)
    image_offset += shard["num_images"]
  joined = {t: {k: ConcatenatedArray([part[k] for part in parts]) for k in parts[0]}
            for t, parts in towers.items()}
  return joined["image"], joined["text"], np.concatenate(text_to_image)


def synthetic_pairs(data_config, split: str) -> tuple[dict, dict, np.ndarray | None]:
  """A shared latent seen through two different noisy linear views (the demo's "raw data").

  The views are fixed by ``data_seed`` (the world); ``split`` only changes which latents are drawn,
  so held-out pairs come from the same world but are never trained on. The demo's frozen encoders
  (random MLPs with different activations) make the two feature spaces nonlinearly different.
  With ``data.num_captions`` c > 1 each latent has c text views with independent noise (its
  "captions"; text_to_image returned), else text i is the caption of image i (None).
  """
  world = np.random.default_rng(data_config.data_seed)
  latent_dim = data_config.latent_dim
  image_view = world.normal(size=(latent_dim, data_config.image_input_dim)) / np.sqrt(latent_dim)
  text_view = world.normal(size=(latent_dim, data_config.text_input_dim)) / np.sqrt(latent_dim)
  split_ids = {"train": 0, "heldout": 1}
  if split not in split_ids:
    raise ValueError(f"unknown synthetic split {split!r}; choose from {sorted(split_ids)}")
  rng = np.random.default_rng([data_config.data_seed, split_ids[split]])
  n = data_config.num_pairs if split == "train" else data_config.num_heldout
  latent = rng.normal(size=(n, latent_dim))
  noise = data_config.noise
  image = latent @ image_view + noise * rng.normal(size=(n, data_config.image_input_dim))
  c = int(data_config.get("num_captions", 1))
  text = (np.repeat(latent, c, axis=0) @ text_view
          + noise * rng.normal(size=(n * c, data_config.text_input_dim)))
  text_to_image = np.repeat(np.arange(n), c) if c > 1 else None
  return ({"values": image.astype(np.float32)}, {"values": text.astype(np.float32)},
          text_to_image)


def make_array_source(data_config, *, split: str, global_batch_size: int, seed: int,
                      shuffle: bool = True, path: str = "", **kwargs) -> ArrayPairSource:
  """The source ``config.data`` names: stored features (``path`` or ``data.path``) or synthetic."""
  if data_config.source == "synthetic":
    image, text, kwargs["text_to_image"] = synthetic_pairs(data_config, split)
  elif data_config.source == "features":
    path = path or data_config.path
    if not path:
      raise ValueError("no stored-feature folder: set config.data.path (and an evaluator's path)")
    image, text, text_to_image = load_stored_features(path)
    kwargs["text_to_image"] = text_to_image
  else:
    raise ValueError(f"unknown data source {data_config.source!r}; choose 'synthetic' or "
                     "'features' (config.data.source)")
  return ArrayPairSource(image, text, global_batch_size=global_batch_size, seed=seed,
                         shuffle=shuffle, **kwargs)
