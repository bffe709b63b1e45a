"""Reading records: one layer for read -> decode -> skip (counted, with a capped log).

Every consumer of image data goes through here: the training and evaluation pipeline
(:mod:`align_jax.data.pipeline`), zero-shot classification (:mod:`align_jax.evaluate.zero_shot`),
encoder selection (:mod:`align_jax.analysis.select`) and the readers themselves
(:mod:`align_jax.data.tfds_manifest_readers`, :mod:`align_jax.data.webdataset`,
:mod:`align_jax.data.synthetic_images`, :mod:`align_jax.evaluate.datasets`).

* A reader is a sized, picklable, random-access list of undecoded records (:class:`RecordReader`).
  A record that cannot be used raises :class:`SkipRecord` ``(reason, detail)``, in the reader
  (missing file, bad manifest row, damaged shard) or when decoded here (:func:`decode`).
* :func:`decode` turns a record into a checked RGB image (within :class:`DecodeLimits`, the
  config's ``data.max_image_pixels`` / ``data.min_image_size``) and, for caption records, its
  non-empty captions.
* :class:`SkipCounter` counts skips as ``data/skipped_<reason>`` and logs them through
  :mod:`align_jax.data.skip_log` (the first few with their file or key, then only counts).
* :func:`load_in_order` computes a load function over indices ahead, in order, with grain threads
  (and worker processes), as training and evaluation both read.

Reasons: ``corrupt_image``, ``missing_file``, ``unreadable_file``, ``empty_caption``,
``bad_encoding``, ``too_small``, ``too_large``, ``bad_manifest_row``, ``unreadable_record`` and,
at indexing time, ``unreadable_shard`` / ``truncated_shard`` (see ``webdataset.py``).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
from PIL import Image

from align_jax.run import storage
from align_jax.data import skip_log


class SkipRecord(Exception):
  """A record that cannot be used; ``reason`` names the counter ``data/skipped_<reason>``."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """One undecoded example: ``image`` is encoded bytes (or an already decoded uint8 array)."""

  key: str
  image: bytes | np.ndarray
  captions: list[Any]


class RecordReader(Protocol):
  """What the pipeline needs from a source: a picklable, sized, random-access record list."""

  name: str  # Names the source in errors and logs, e.g. "manifest /data/train.jsonl".
  index_skips: dict[str, int]  # Records lost while indexing (e.g. unreadable shards), by reason.

  def __len__(self) -> int: ...

  def read(self, index: int) -> RawRecord: ...


def decode_image(data: bytes | np.ndarray, *, key: str, max_pixels: int,
                 min_size: int) -> Image.Image:
  """Decodes and checks one image, raising ``SkipRecord`` for anything unusable.

  The size check reads only the header, so a decompression bomb is refused before its pixels are
  allocated; ``max_pixels`` replaces PIL's global ``MAX_IMAGE_PIXELS`` for this call.
  """
  if isinstance(data, np.ndarray):
    if data.ndim not in (2, 3) or data.size == 0:
      raise SkipRecord("too_small", f"{key}: decoded image of shape {data.shape}")
    image = Image.fromarray(data.astype(np.uint8).squeeze())
  else:
    if not data:
      raise SkipRecord("too_small", f"{key}: empty (0-byte) image file")
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
      raise SkipRecord("too_large", f"{key}: {e}") from None
    except Exception as e:  # PIL raises many types on garbage; all mean "not an image".
      raise SkipRecord("corrupt_image", f"{key}: {type(e).__name__}: {e}") from None
  width, height = image.size
  if width * height > max_pixels:
    raise SkipRecord("too_large", f"{key}: {width}x{height} exceeds max_image_pixels={max_pixels}")
  if min(width, height) < min_size:
    raise SkipRecord("too_small", f"{key}: {width}x{height} below min_image_size={min_size}")
  try:
    if image.mode.startswith("I") or image.mode == "F":
      image = _high_depth_to_8bit(image)
    image = image.convert("RGB")  # Forces the full decode: truncated data fails here.
  except Exception as e:
    raise SkipRecord("corrupt_image", f"{key}: {type(e).__name__}: {e}") from None
  return image


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
  """16-bit / 32-bit grey → 8-bit grey. PIL's own convert clips at 255, whitening the image."""
  pixels = np.asarray(image, np.float64)
  if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255):
    pixels = pixels / 257.0  # 65535 → 255.
  return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")


def decode_captions(values: Sequence[Any], *, key: str) -> list[str]:
  """Raw captions (str / UTF-8 bytes) → stripped non-empty strings, or ``SkipRecord``.

  Individual empty captions are dropped; the record is skipped only if none is left. A caption
  that is not valid UTF-8 skips the record (``bad_encoding``): a half-decoded caption is a wrong
  training pair, not a usable one.
  """
  captions = []
  for value in values:
    if isinstance(value, (bytes, np.bytes_)):
      try:
        value = bytes(value).decode("utf-8")
      except UnicodeDecodeError as e:
        raise SkipRecord("bad_encoding", f"{key}: caption is not UTF-8 ({e})") from None
    if not isinstance(value, str):
      continue
    try:
      value.encode("utf-8")  # Lone surrogates come from undecodable bytes read with escapes.
    except UnicodeEncodeError:
      raise SkipRecord("bad_encoding", f"{key}: caption is not UTF-8") from None
    value = value.strip()
    if value:
      captions.append(value)
  if not captions:
    raise SkipRecord("empty_caption", f"{key}: no non-empty caption")
  return captions


def read_file(path: str) -> bytes:
  """The bytes of an image file named by a manifest; a missing or unreadable one is skipped."""
  try:
    return storage.read_bytes(path)
  except FileNotFoundError:
    raise SkipRecord("missing_file", f"{path}: no such file") from None
  except OSError as e:
    raise SkipRecord("unreadable_file", f"{path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
  """Images with more than ``max_pixels`` pixels or a side below ``min_size`` are skipped."""

  max_pixels: int
  min_size: int


def decode(record: Any, limits: DecodeLimits, *,
           captions: bool = True) -> tuple[Image.Image, list[str] | None]:
  """(RGB image, captions) of a read record, or ``SkipRecord``; captions are checked first.

  ``captions=False`` for records without them (a classification set's labelled images).
  """
  texts = decode_captions(record.captions, key=record.key) if captions else None
  image = decode_image(record.image, key=record.key, max_pixels=limits.max_pixels,
                       min_size=limits.min_size)
  return image, texts


class SkipCounter:
  """Skipped records of one source by reason, ``{"data/skipped_<reason>": count}``.

  Each skip is also handed to :func:`skip_log.record` (capped log). ``initial``: counts to start
  from, by reason (a reader's ``index_skips``) or by counter name (a restored state).
  """

  def __init__(self, source: str, logger: logging.Logger, initial: dict[str, int] | None = None):
    self.source, self._logger = source, logger
    self.counts: dict[str, int] = {}
    for name, count in (initial or {}).items():
      self.counts[counter_name(name)] = self.counts.get(counter_name(name), 0) + int(count)

  def add(self, reason: str, detail: str) -> None:
    name = counter_name(reason)
    self.counts[name] = self.counts.get(name, 0) + 1
    skip_log.record(self._logger, self.source, reason, detail)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self, what: str) -> None:
    """One log line with the counts (nothing if there were none)."""
    skip_log.summary(self._logger, what, self.counts)


def counter_name(reason: str) -> str:
  """``corrupt_image`` -> ``data/skipped_corrupt_image`` (names already in that form unchanged)."""
  return reason if reason.startswith("data/skipped_") else f"data/skipped_{reason}"


def load_in_order(load: Callable[[Any], Any], items: Sequence[Any], *, num_threads: int,
                  prefetch: int, num_workers: int = 0) -> Iterator[Any]:
  """``load(item)`` for every item, in order, computed ahead by grain.

  ``num_threads`` read threads (per worker) and ``prefetch`` results buffered; with
  ``num_workers`` > 0 the loads run in that many worker processes (``load`` must pickle).
  ``items`` may be a ``range`` (an endless stream: ``range(start, 2**62)``).
  """
  import grain  # Only where records are loaded in bulk.
  from absl import flags

  if len(items) == 0:
    return iter(())
  if isinstance(items, range) and items.step == 1:
    dataset = grain.MapDataset.range(items.start, items.stop)
  else:
    dataset = grain.MapDataset.source(items)
  dataset = dataset.map(load).to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app.run, use defaults.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch))
  return iter(dataset)
