"""Pairs held in arrays: stored encoder features (memory-mapped .npy) and the synthetic demo world.

Both are served by :class:`ArrayPairSource`, the simplest implementation of the source interface
every training input follows (:class:`align_jax.model.interfaces.PairSource`):

* ``next(source)`` -> this process's rows of the next global batch, ``{"image": {...}, "text": {...}}``;
* ``get_state()`` / ``set_state(state)`` -> a JSON dict saved in each checkpoint, so a resumed run
  sees exactly the examples an uninterrupted run would have seen;
* ``skipped()`` -> counters of dropped records (none for arrays).

Order (a pure function of the seed and the position, so the state is a single integer; the
image pipeline's too, :mod:`align_jax.data.order`): global position ``q`` holds pair
``permutation(seed, e)[q mod N]`` with ``e = q div N`` (epoch ``e`` visits every pair once, in
numpy ``default_rng([seed, e]).permutation`` order; batches run on across epoch ends). The global batch that starts at position ``s`` is the pairs at positions
``s .. s + B - 1`` **sorted by row index** (each epoch's part of it separately, when it spans an
epoch end), and process ``p`` of ``P`` takes the ``p``-th contiguous slice of it. Which pairs
share a batch is as random as the permutation; only their order inside the batch is fixed
(ascending rows), which the contrastive losses do not see: they sum over every pair and every
negative of the global batch. The sorted order is what makes the loader fast: each process
reads its rows of each file front to back (page-cache and disk friendly), with no second copy to
undo a sort, and on many hosts process ``p`` reads mostly the ``p``-th ``1/P`` of the rows, so
each host's page cache needs about its share of the store. Each epoch's permutation is computed
once and kept (4 bytes per pair). ``shuffle_block_rows = R > 1`` (``data.shuffle_block_rows``)
permutes blocks of ``R`` consecutive pairs instead (:mod:`align_jax.data.order`), so each batch
reads runs of ``R`` rows: a faster gather of pooled rows (benchmarks/README.md, "Stored-feature
loader speed"), at the price that a block's pairs always share a batch.

Stored features: a folder with ``image.npy`` ([N, D] pooled, or [N, T, D] tokens with
``image_mask.npy`` [N, T]) and the same for ``text``; or a feature store written by
:mod:`align_jax.train.extract` (shards + manifest, several captions per image), whose every shard
is checked against its manifest when opened (:mod:`align_jax.data.feature_store`; stores on
``gs://`` are read through verified local copies). Rows are copied with one sorted ``np.take``
per file and batch into recycled output buffers (see :class:`_BatchBuffers`; the rates:
benchmarks/README.md, "Stored-feature loader speed"); memory-mapped files far larger than RAM
train at disk speed.
"""

from __future__ import annotations

import sys
from typing import Iterator

import jax
import numpy as np

from align_jax.run import storage
from align_jax.data import feature_store as feature_files
from align_jax.data import order as order_lib

_ALIGN = 64  # bytes; keeps every array of a recycled batch buffer cache-line (and SIMD) aligned


def _check_rows(index: np.ndarray, num_rows: int) -> None:
  if len(index) and (index.min() < 0 or index.max() >= num_rows):
    raise IndexError(f"row indices [{index.min()}, {index.max()}] are outside 0..{num_rows - 1}")


def _is_sorted(index: np.ndarray) -> bool:
  return len(index) < 2 or bool(np.all(index[1:] >= index[:-1]))


def take_rows(array, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """``array[index]`` along the first axis, written to ``out`` (one copy; fastest when sorted).

  ``array`` is a numpy array, a ``np.memmap`` or a :class:`ConcatenatedArray`. ``np.take`` with
  ``mode="clip"`` writes straight into ``out`` (with the default ``mode="raise"`` numpy buffers
  ``out``, a second copy), so the bounds are checked here instead.
  """
  index = np.asarray(index)
  if out is None:
    out = np.empty((len(index), *array.shape[1:]), array.dtype)
  if isinstance(array, ConcatenatedArray):
    return array.take(index, out)
  _check_rows(index, len(array))
  np.take(np.asarray(array), index, axis=0, out=out, mode="clip")
  return out


class ConcatenatedArray:
  """Rows of several (memory-mapped) arrays seen as one, read with integer index arrays."""

  def __init__(self, parts: list):
    self.parts = parts
    self.offsets = np.cumsum([0] + [len(p) for p in parts])
    self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
    self.dtype = parts[0].dtype

  def __len__(self) -> int:
    return self.shape[0]

  def take(self, index: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[:] = self[index]``: one ``take_rows`` per part for sorted ``index``."""
    index = np.asarray(index)
    _check_rows(index, len(self))
    if _is_sorted(index):  # each part's rows are one contiguous run of ``index``
      cuts = np.searchsorted(index, self.offsets)
      for p, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        if hi > lo:
          take_rows(self.parts[p], index[lo:hi] - self.offsets[p], out[lo:hi])
      return out
    part = np.searchsorted(self.offsets, index, side="right") - 1
    for p in np.unique(part):
      sel = part == p
      out[sel] = take_rows(self.parts[p], index[sel] - self.offsets[p])
    return out

  def __getitem__(self, index: np.ndarray) -> np.ndarray:
    return take_rows(self, index)


class _BatchBuffers:
  """Recycled output memory for batches of one layout (a few buffers, reused when free).

  A fresh multi-MiB numpy array is a fresh mapping from the OS (glibc hands large freed blocks
  back), so writing a batch into it takes a page fault per 4 KiB: that halved the loader's rate at
  batch 4,096 (benchmarks/README.md). Each batch's arrays are views of one buffer, so they keep it
  alive; a buffer is written again only when this pool holds the sole reference to it. A batch
  that the caller still holds, or that jax still reads (a host-to-device copy in flight, a
  zero-copy CPU array: jax keeps a reference to the numpy array), is therefore never overwritten;
  if every buffer is in use, the batch gets fresh memory.
  """

  def __init__(self, layout: dict, rows: dict, capacity: int = 3):
    """``layout``: ``{tower: {key: (row shape, dtype)}}``; ``rows``: ``{tower: rows per batch}``."""
    self.fields, offset = [], 0
    for tower, arrays in layout.items():
      for key, (shape, dtype) in arrays.items():
        shape, dtype = (rows[tower], *shape), np.dtype(dtype)
        self.fields.append((tower, key, offset, shape, dtype))
        offset += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
    self.nbytes, self.capacity, self.buffers = max(offset, 1), capacity, []

  def _free_buffer(self) -> np.ndarray:
    for k in range(len(self.buffers)):
      # References: the list entry and getrefcount's own argument. Any view still alive adds one.
      if sys.getrefcount(self.buffers[k]) == 2:
        return self.buffers[k]
    buffer = np.empty(self.nbytes + _ALIGN, np.uint8)  # + _ALIGN: room to align the start
    if len(self.buffers) < self.capacity:
      self.buffers.append(buffer)
    return buffer

  def get(self) -> dict:
    """Empty arrays for one batch, ``{tower: {key: array}}``, in memory nothing else uses."""
    buffer = self._free_buffer()
    start = -buffer.ctypes.data % _ALIGN
    out = {}
    for tower, key, offset, shape, dtype in self.fields:
      size = int(np.prod(shape)) * dtype.itemsize
      flat = buffer[start + offset:start + offset + size]
      out.setdefault(tower, {})[key] = flat.view(dtype).reshape(shape)
    return out


class ArrayPairSource:
  """Deterministic, resumable, process-sharded batches of pairs from arrays with a leading N.

  With ``text_to_image`` (text row -> image row, grouped by image), images may have several
  captions: each step takes one of them, chosen from (seed, position); otherwise text i is the
  caption of image i. With ``captions_per_image`` k > 1 each image brings k captions: text rows
  [n * k], image-major (k cyclically consecutive captions from a random start: distinct when the
  image has >= k, repeated when it has fewer), for the multi-positive losses
  (align_jax.objectives.multi_positive). The order is described in the module docstring.
  """

  def __init__(self, image: dict, text: dict, *, global_batch_size: int, seed: int,
               text_to_image: np.ndarray | None = None, process_index: int | None = None,
               process_count: int | None = None, shuffle: bool = True,
               captions_per_image: int = 1, shuffle_block_rows: int = 1):
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
    self._one_caption_each = bool(np.all(self.caption_count == 1))
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
    self._order = order_lib.EpochOrder(self.num_pairs, seed, shuffle, block=shuffle_block_rows)
    layout = {tower: {k: (v.shape[1:], v.dtype) for k, v in arrays.items()}
              for tower, arrays in (("image", image), ("text", text))}
    self._buffers = _BatchBuffers(layout, {"image": self.local_batch_size,
                                           "text": self.local_batch_size * self.captions_per_image})

  def indices(self, start: int, count: int) -> np.ndarray:
    """Pair indices at global positions ``start .. start + count - 1`` (before any sort)."""
    return self._order.records(start, count)

  def batch_indices(self, position: int) -> np.ndarray:
    """This process's pair indices (ascending) of the global batch starting at ``position``."""
    rows = self.indices(position, self.global_batch_size)
    lo = 0  # sorted within each epoch's part, so every epoch's positions still hold its pairs
    for hi in range(-position % self.num_pairs or self.num_pairs, len(rows) + self.num_pairs,
                    self.num_pairs):
      rows[lo:hi].sort()
      lo = hi
    first = order_lib.process_start(0, self.local_batch_size, self.process_index)
    return rows[first:first + self.local_batch_size]

  def caption_rows(self, indices: np.ndarray, start: int) -> np.ndarray:
    """The text rows each image uses at positions ``start, start + 1, ...`` (k per image, flat)."""
    k = self.captions_per_image
    if self._one_caption_each:
      starts = self.caption_start[indices]
      return starts if k == 1 else np.repeat(starts, k)
    count = self.caption_count[indices]
    draw = np.random.default_rng([self.seed, 1, start]).integers(0, 2**31, len(indices))
    offsets = (draw[:, None] + np.arange(k)[None, :]) % count[:, None]
    return (self.caption_start[indices][:, None] + offsets).reshape(-1)

  @staticmethod
  def _rows(arrays: dict, index: np.ndarray, out: dict | None = None) -> dict:
    """``arrays`` at ``index``, into ``out`` (same keys) when given: one copy per array."""
    return {k: take_rows(v, index, None if out is None else out[k]) for k, v in arrays.items()}

  def gather(self, indices: np.ndarray, start: int = 0, out: dict | None = None) -> dict:
    """The pairs at ``indices`` (their captions chosen for positions from ``start``).

    ``out``: ``{"image": {...}, "text": {...}}`` arrays to write into (fresh ones if None).
    """
    out = out or {}
    return {"image": self._rows(self.image, indices, out.get("image")),
            "text": self._rows(self.text, self.caption_rows(indices, start), out.get("text"))}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    start = order_lib.process_start(self.position, self.local_batch_size, self.process_index)
    batch = self.gather(self.batch_indices(self.position), start, out=self._buffers.get())
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


def load_stored_features(path: str, *, split: str = "", verify: str = "once",
                         cache_dir: str = "") -> tuple[dict, dict, np.ndarray | None]:
  """Opens stored features -> (image features, text features, text_to_image or None).

  ``path`` (local or a URL such as ``gs://...``) is either a feature store written by
  :mod:`align_jax.train.extract` (``manifest.json`` and shards: every shard's shapes, sizes and
  digests are checked against the manifest, and ``split``, if given, must be the store's split;
  :mod:`align_jax.data.feature_store`), or a plain folder with ``image.npy`` / ``text.npy`` (one
  caption per image). Local files are memory-mapped.
  """
  if feature_files.read_manifest(path) is None:
    return (feature_files.load_tower(path, "image"), feature_files.load_tower(path, "text"),
            None)
  images, texts, text_to_image = feature_files.open_store(path, split=split, verify=verify,
                                                          cache_dir=cache_dir)
  joined = {t: {k: ConcatenatedArray([part[k] for part in parts]) for k in parts[0]}
            for t, parts in (("image", images), ("text", texts))}
  return joined["image"], joined["text"], text_to_image


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
  c = int(data_config.num_captions)
  text = (np.repeat(latent, c, axis=0) @ text_view
          + noise * rng.normal(size=(n * c, data_config.text_input_dim)))
  text_to_image = np.repeat(np.arange(n), c) if c > 1 else None
  return ({"values": image.astype(np.float32)}, {"values": text.astype(np.float32)},
          text_to_image)


def check_feature_encoders(config) -> None:
  """``data.source = "features"`` serves encoder outputs: both encoders must be ``"features"``.

  Another encoder would be run again on the stored features (a Hugging Face encoder looks for
  ``pixel_values``, the demo's random MLP for ``values``) and fail deep inside the first step;
  this says what to set instead, in one line.
  """
  if config.data.source != "features":
    return
  wrong = {tower: config.model[f"{tower}_encoder"] for tower in ("image", "text")
           if config.model[f"{tower}_encoder"] != "features"}
  if wrong:
    now = " and ".join(f"model.{tower}_encoder is {name!r}" for tower, name in wrong.items())
    flags = " ".join(f"--config.model.{tower}_encoder=features" for tower in wrong)
    raise ValueError(
        f"data.source='features' reads stored encoder outputs, but {now}: set {flags} (the "
        "store's fingerprint.json records which encoders made it), or train on raw images and "
        "captions with another data.source")


def make_array_source(data_config, *, split: str, global_batch_size: int, seed: int,
                      shuffle: bool = True, path: str = "", **kwargs) -> ArrayPairSource:
  """The source ``config.data`` names: stored features (``path`` or ``data.path``) or synthetic."""
  if data_config.source == "synthetic":
    image, text, kwargs["text_to_image"] = synthetic_pairs(data_config, split)
  elif data_config.source == "features":
    path = path or data_config.path
    if not path:
      raise ValueError("no stored-feature folder: set config.data.path (and an evaluator's path)")
    if not storage.exists(path):
      raise FileNotFoundError(
          f"no stored features at {path} (data.source='features', split {split!r}): "
          "--mode=extract_features writes the training split to --workdir and each retrieval "
          "evaluator's split to <workdir>/<split>; or set data.path")
    image, text, text_to_image = load_stored_features(
        path, split=split, verify=data_config.verify_features or "once",
        cache_dir=data_config.feature_cache_dir)
    kwargs["text_to_image"] = text_to_image
  else:
    raise ValueError(f"unknown data source {data_config.source!r}; choose 'synthetic' or "
                     "'features' (config.data.source)")
  kwargs.setdefault("shuffle_block_rows", data_config.shuffle_block_rows)
  return ArrayPairSource(image, text, global_batch_size=global_batch_size, seed=seed,
                         shuffle=shuffle, **kwargs)
