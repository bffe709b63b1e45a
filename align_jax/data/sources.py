"""Random-access record readers for image–caption data: TFDS, WebDataset tars, JSONL/CSV manifests.

A reader is a sized, picklable sequence of raw records (image bytes + raw captions) that grain
workers read by index; shuffling, sharding, decoding and batching live in ``pipeline.py``. Random
access by index is what makes the order a pure function of (seed, position), hence exact resume.

Bad input is reported by raising ``SkipRecord(reason, detail)``; the pipeline counts it as
``data/skipped_<reason>``, logs it with the file or key, and moves on to the next record. Reasons:
``corrupt_image``, ``missing_file``, ``unreadable_file``, ``empty_caption``, ``bad_encoding``,
``too_small``, ``too_large``, ``bad_manifest_row``, ``unreadable_record`` and, at indexing time,
``unreadable_shard`` / ``truncated_shard`` (see ``webdataset.py``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import warnings
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from align_jax import storage


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
    rows = self._read_rows(path, image_key, caption_key)
    order: dict[str, int] = {}
    self._images: list[str] = []
    self._captions: list[list[Any]] = []
    self._errors: list[tuple[str, str] | None] = []
    for line_no, image, captions, error in rows:
      if error is not None:
        self._images.append(f"{path}:{line_no}")
        self._captions.append([])
        self._errors.append(error)
        continue
      if image not in order:
        order[image] = len(self._images)
        self._images.append(image)
        self._captions.append([])
        self._errors.append(None)
      self._captions[order[image]].extend(captions)

  @staticmethod
  def _read_rows(path: str, image_key: str, caption_key: str):
    """Yields ``(line, image, captions, error)`` per data row; ``error``: ``(reason, detail)``."""
    ext = storage.extension(path)
    if ext == ".jsonl":
      with storage.open_file(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
          if not raw.strip():
            continue
          try:
            row = json.loads(raw.decode("utf-8"))
          except UnicodeDecodeError:
            yield line_no, None, None, ("bad_encoding", "manifest row is not UTF-8")
            continue
          except json.JSONDecodeError as e:
            yield line_no, None, None, ("bad_manifest_row", f"invalid JSON ({e})")
            continue
          if not isinstance(row, dict) or not isinstance(row.get(image_key), str):
            yield line_no, None, None, ("bad_manifest_row", f"no string field {image_key!r}")
            continue
          yield line_no, row[image_key], _as_caption_list(row.get(caption_key)), None
    elif ext == ".csv":
      # surrogateescape keeps undecodable bytes; decode_captions turns them into bad_encoding.
      with storage.open_file(path, "r", newline="", encoding="utf-8",
                             errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or image_key not in reader.fieldnames:
          raise ValueError(f"manifest {path!r} has no column {image_key!r} (columns: "
                           f"{reader.fieldnames}); set data.image_key")
        for row in reader:
          yield reader.line_num, row[image_key], [row.get(caption_key)], None
    else:
      raise ValueError(f"manifest {path!r}: unsupported extension {ext!r}; use .jsonl or .csv")

  def __len__(self) -> int:
    return len(self._images)

  def read(self, index: int) -> RawRecord:
    key = self._images[index]
    if self._errors[index] is not None:
      raise SkipRecord(self._errors[index][0], f"{key}: {self._errors[index][1]}")
    file = key if storage.is_absolute(key) else storage.join(self._root, key)
    try:
      data = storage.read_bytes(file)
    except FileNotFoundError:
      raise SkipRecord("missing_file", f"{file}: no such file") from None
    except OSError as e:
      raise SkipRecord("unreadable_file", f"{file}: {e}") from None
    return RawRecord(file, data, self._captions[index])


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

  def read(self, index: int) -> RawRecord:
    key, example = read_tfds_example(self._source, index, self.name)
    image = tfds_image(_lookup(example, self._image_key))
    return RawRecord(key, image, _as_caption_list(_lookup(example, self._caption_key)))


def read_tfds_example(data_source: Any, index: int, name: str) -> tuple[str, dict[str, Any]]:
  """(key, example) of a TFDS data source; an unreadable record becomes ``SkipRecord``."""
  key = f"{name}#{index}"
  try:
    return key, data_source[index]
  except Exception as e:  # A damaged array_record chunk must not stop the run.
    raise SkipRecord("unreadable_record", f"{key}: {type(e).__name__}: {e}") from None


def tfds_image(image: Any) -> Any:
  """An undecoded TFDS image (a 0-d bytes array) as bytes; decoded arrays pass through."""
  if isinstance(image, np.ndarray) and image.dtype.kind in "SO" and image.size == 1:
    return image.reshape(()).item()
  return image


def _require(data_config: Any, key: str) -> Any:
  value = data_config.get(key)
  if value in (None, ""):
    raise ValueError(f"data.{key} is required for data.source={data_config.get('source')!r}")
  return value


def make_reader(data_config: Any) -> RecordReader:
  """The reader named by ``data_config.source``: tfds, webdataset, manifest or synthetic_shapes."""
  source = data_config.get("source")
  if source == "tfds":
    return TfdsReader(
        _require(data_config, "name"), split=data_config.get("split", "train"),
        data_dir=data_config.get("data_dir") or None,
        image_key=data_config.get("image_key") or "image",
        caption_key=data_config.get("caption_key") or "captions/text")
  if source == "webdataset":
    from align_jax.data import webdataset  # Local import keeps the module graph acyclic.

    return webdataset.WebDatasetReader(
        _require(data_config, "urls"), caption_key=data_config.get("caption_key") or "caption",
        index_cache_dir=data_config.get("index_cache_dir") or None)
  if source == "manifest":
    return ManifestReader(
        _require(data_config, "path"), image_root=data_config.get("image_root", ""),
        image_key=data_config.get("image_key") or "image",
        caption_key=data_config.get("caption_key") or "caption")
  if source == "synthetic_shapes":
    from align_jax.data import synthetic_images  # Local import keeps the module graph acyclic.

    return synthetic_images.ShapesReader(
        split=data_config.get("split", "train"), num_records=data_config.get("num_pairs", 4096),
        seed=data_config.get("data_seed", 0))
  raise ValueError(f"unknown data.source {source!r}; expected 'tfds', 'webdataset', 'manifest' or "
                   "'synthetic_shapes' (stored features and the synthetic latent world are built "
                   "by align_jax.data.features)")
