"""Random-access record readers for image–caption data: TFDS builders and JSONL/CSV manifests.

A reader is a sized, picklable sequence of raw records (image bytes + raw captions) that grain
workers read by index; shuffling, sharding, decoding and batching live in ``pipeline.py``. Random
access by index is what makes the order a pure function of (seed, position), hence exact resume.
WebDataset tars are read by :mod:`align_jax.data.webdataset`, and the reader a config names is
built by :func:`align_jax.data.reader_factory.make_reader`.

Bad input is reported by raising ``records.SkipRecord(reason, detail)``; the consumer counts it as
``data/skipped_<reason>`` (:class:`align_jax.data.records.SkipCounter`), logs it with the file or
key, and moves on to the next record.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from align_jax.run import storage
from align_jax.data import manifest
from align_jax.data import records
from align_jax.data import tfds_names


def _as_caption_list(value: Any) -> list[Any]:
  """A caption field (one string, a list, or a numpy array of them) as a flat list."""
  if isinstance(value, np.ndarray):
    return list(value.reshape(-1))
  if isinstance(value, (list, tuple)):
    return list(value)
  return [value]


class ManifestReader:
  """A JSONL or CSV manifest: one row per (image path, caption or list of captions).

  Rows naming the same image are merged, so an image with five caption rows is one record with
  five captions (one sampled per step in training, all kept for evaluation). Paths are relative
  to ``image_root`` (default: the manifest's folder) unless absolute. Rows that cannot be
  parsed become records that fail with ``bad_manifest_row`` / ``bad_encoding`` when read, so
  they are counted like any bad record.
  """

  def __init__(self, path: str, *, image_root: str = "", image_key: str = "image",
               caption_key: str = "caption"):
    if not storage.isfile(path):
      raise ValueError(f"manifest {path!r} does not exist: set data.path to a .jsonl or .csv file")
    self.name = f"manifest {path}"
    self.index_skips: dict[str, int] = {}
    self._root = image_root or storage.dirname(path)
    order: dict[str, int] = {}
    self._images: list[str] = []
    self._captions: list[list[Any]] = []
    self._errors: list[tuple[str, str] | None] = []
    for row in manifest.read_rows(path, image_key=image_key):
      if row.error is not None:
        self._images.append(f"{path}:{row.line}")
        self._captions.append([])
        self._errors.append(row.error)
        continue
      image = row.fields[image_key]
      if image not in order:
        order[image] = len(self._images)
        self._images.append(image)
        self._captions.append([])
        self._errors.append(None)
      self._captions[order[image]].extend(_as_caption_list(row.fields.get(caption_key)))

  def __len__(self) -> int:
    return len(self._images)

  def read(self, index: int) -> records.RawRecord:
    key = self._images[index]
    if self._errors[index] is not None:
      raise records.SkipRecord(self._errors[index][0], f"{key}: {self._errors[index][1]}")
    file = key if storage.is_absolute(key) else storage.join(self._root, key)
    return records.RawRecord(file, records.read_file(file), self._captions[index])


def _lookup(example: dict[str, Any], key: str) -> Any:
  """``example[key]``, where ``key`` may be a '/'-separated path (e.g. "captions/text")."""
  if key in example:
    return example[key]
  parts = key.split("/")
  for cut in range(len(parts) - 1, 0, -1):  # Keys themselves may contain "/" ("image/id").
    head = "/".join(parts[:cut])
    if head in example and isinstance(example[head], dict):
      return _lookup(example[head], "/".join(parts[cut:]))
  raise KeyError(key)


class TfdsReader:
  """Any TFDS builder prepared as ``array_record`` under ``data_dir``, read without TensorFlow.

  Uses ``tfds.data_source`` (random access, picklable). The image feature is read undecoded
  (``SkipDecoding``) so that corrupt images are caught and counted here rather than crashing
  inside TFDS. ``caption_key`` may be a nested path such as ``captions/text`` (coco_captions).
  """

  def __init__(self, name: str, *, split: str, data_dir: str | None = None,
               image_key: str = "image", caption_key: str = "captions/text"):
    import tensorflow_datasets as tfds  # Heavy import: only when this source is used.

    self.name = f"tfds {name}[{split}]"
    self.index_skips: dict[str, int] = {}
    self._image_key = image_key
    self._caption_key = caption_key
    decoders = {image_key: tfds.decode.SkipDecoding()} if "/" not in image_key else None
    try:
      self._source = tfds.data_source(
          name, split=split, data_dir=data_dir, download=False, decoders=decoders)
    except Exception as e:
      unknown = tfds_names.unknown_builder_message(name, e)
      if unknown:
        raise ValueError(unknown) from None
      raise ValueError(
          f"cannot open {self.name} under data_dir={data_dir!r}: {type(e).__name__}: {e}. Prepare "
          "it first with file_format='array_record' (e.g. `tfds build NAME --data_dir=DIR "
          "--file_format=array_record`), and check data.name, data.split and data.data_dir"
      ) from None
    if len(self._source) == 0:
      raise ValueError(f"{self.name} is empty; check data.split")
    first = self._source[0]
    for key in (image_key, caption_key):
      try:
        _lookup(first, key)
      except KeyError:
        raise ValueError(f"{self.name} has no feature {key!r}; its features are "
                         f"{sorted(first)}: set data.image_key / data.caption_key") from None

  def __len__(self) -> int:
    return len(self._source)

  def read(self, index: int) -> records.RawRecord:
    key, example = read_tfds_example(self._source, index, self.name)
    image = tfds_image(_lookup(example, self._image_key))
    return records.RawRecord(key, image, _as_caption_list(_lookup(example, self._caption_key)))


def read_tfds_example(data_source: Any, index: int, name: str) -> tuple[str, dict[str, Any]]:
  """(key, example) of a TFDS data source; an unreadable record becomes ``SkipRecord``."""
  key = f"{name}#{index}"
  try:
    return key, data_source[index]
  except Exception as e:  # A damaged array_record chunk must not stop the run.
    raise records.SkipRecord("unreadable_record", f"{key}: {type(e).__name__}: {e}") from None


def tfds_image(image: Any) -> Any:
  """An undecoded TFDS image (a 0-d bytes array) as bytes; decoded arrays pass through."""
  if isinstance(image, np.ndarray) and image.dtype.kind in "SO" and image.size == 1:
    return image.reshape(()).item()
  return image
