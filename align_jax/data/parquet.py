"""Parquet tables of images with captions or labels, as Hugging Face publishes image datasets.

COCO, Flickr30k and most evaluation sets on the Hugging Face Hub are Parquet files (``data/
test-00000-of-00001.parquet``): one row per image, an image column and a caption (or label)
column. ``data.source = "parquet"`` reads them directly, locally or on gs://
(:mod:`align_jax.run.storage`), as a random-access record list like the manifest and WebDataset
readers, so the order, the split between processes, the exact resume and the skip counting are
the pipeline's own (:mod:`align_jax.data.pipeline`, :mod:`align_jax.data.order`).

* Files: ``data.path`` is one file, a folder (every ``*.parquet`` in it), a glob or several of
  these joined by ``::``; ``{split}`` in it is replaced by the split
  (:func:`align_jax.data.factory.resolve_split`), e.g. ``data/{split}-*.parquet``.
* Columns: ``data.image_key`` (default ``image``) holds encoded image bytes, Hugging Face's
  image struct ``{"bytes": ..., "path": ...}`` (bytes first, else the path), or a path string;
  paths are relative to ``data.image_root`` (default: the Parquet file's folder) unless absolute
  or URLs. ``data.caption_key`` (default ``caption``) holds one string or a list of strings.
  Classification sets (:class:`align_jax.evaluate.datasets.ParquetClassificationReader`) have a
  label column (``label_key``, default ``label``).
* Index: opening reads only the files' footers: the row count of every row group gives each row
  its (file, row group, offset). Record ``i`` is row ``i`` in file order; one row is one record
  (rows naming the same image are not merged, unlike a manifest's).
* Reading: a record reads its row group's needed columns (``ParquetFile.read_row_group``), kept
  in a small per-process cache of recent row groups, so an in-order pass (evaluation, feature
  extraction) reads each row group once. A shuffled training pass reads a whole row group per
  record: fine for row groups of ~100 images (what ``datasets`` writes for image sets), costly
  for large ones (a warning names them; rewrite with ``row_group_size=100``).
* Bad rows, skipped and counted as the manifest's are (``data/skipped_<reason>``): no image in
  the row (``bad_manifest_row``), an image path that does not exist (``missing_file``),
  undecodable bytes (``corrupt_image``), no caption (``empty_caption``), and a row group that
  cannot be read (``unreadable_record``). A file whose footer cannot be read is left out at
  opening and counted (``unreadable_file``, in ``index_skips``).
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import threading
from typing import Any, Sequence

from align_jax.run import storage
from align_jax.data import records
from align_jax.data import skip_log

_log = logging.getLogger(__name__)

CACHED_ROW_GROUPS = 4  # row groups kept per reader (per process / grain worker)
LARGE_ROW_GROUP_BYTES = 256 << 20  # a row group read per shuffled record: warn above this


def expand_paths(path: str | Sequence[str]) -> list[str]:
  """Parquet files named by ``data.path``: files, folders, globs, joined by ``::`` or a list."""
  parts = path.split("::") if isinstance(path, str) else list(path)
  files: list[str] = []
  for part in (p for p in parts if p):
    if any(c in part for c in "*?["):
      files.extend(storage.glob(part))
    elif storage.isdir(part):
      files.extend(storage.join(part, name) for name in storage.listdir(part)
                   if name.endswith(".parquet"))
    else:
      files.append(part)
  return files


def read_metadata(path: str):
  """A Parquet file's footer (row groups, schema): a few KB read from the end of the file.

  Raises FileNotFoundError for a missing file, another OSError if the storage cannot be read,
  and ``records.SkipRecord("unreadable_file")`` if the bytes are not a Parquet footer.
  """
  import pyarrow.parquet as pq  # Only where Parquet is read.
  with storage.open_file(path, "rb") as f:
    try:
      return pq.ParquetFile(f).metadata
    except (ValueError, EOFError) as e:  # pyarrow.ArrowInvalid is a ValueError
      raise records.SkipRecord("unreadable_file", f"{path}: {type(e).__name__}: {e}") from None


def huggingface_features(schema) -> dict[str, Any]:
  """The ``features`` Hugging Face ``datasets`` stores in a Parquet schema's metadata ({} if none).

  They name the classes of a ``ClassLabel`` column: ``{"label": {"_type": "ClassLabel",
  "names": [...]}}``.
  """
  raw = (schema.metadata or {}).get(b"huggingface")
  if not raw:
    return {}
  try:
    features = json.loads(raw).get("info", {}).get("features", {})
  except (ValueError, AttributeError):
    return {}
  return features if isinstance(features, dict) else {}


class ParquetTable:
  """Rows of one or more Parquet files, read by row group: the index, the cache, image cells.

  Shared by the caption reader (:class:`ParquetReader`) and the classification reader
  (:class:`align_jax.evaluate.datasets.ParquetClassificationReader`). ``columns`` are the ones
  every file must have (a ValueError names the config key to set otherwise).
  """

  def __init__(self, path: str | Sequence[str], columns: dict[str, str], *, image_root: str = ""):
    self.files = expand_paths(path)
    self.name = f"parquet {path if isinstance(path, str) else '::'.join(path)}"
    if not self.files:
      raise ValueError(f"{self.name}: no Parquet file matched; set data.path to a .parquet "
                       "file, a folder of them or a glob (e.g. data/test-*.parquet)")
    self.columns = list(columns)
    self.index_skips: dict[str, int] = {}
    self._image_root = image_root
    self.schema = None
    starts, groups = [], []  # first global row of each row group, and its (file, group)
    total = 0
    for file_id, file in enumerate(self.files):
      try:
        metadata = read_metadata(file)
      except FileNotFoundError:
        raise ValueError(f"{self.name}: {file} does not exist; check data.path") from None
      except records.SkipRecord as e:  # a damaged file: the others are still read
        self.index_skips[e.reason] = self.index_skips.get(e.reason, 0) + 1
        skip_log.record(_log, self.name, e.reason, e.detail)
        continue
      schema = metadata.schema.to_arrow_schema()
      missing = [c for c in columns if c not in schema.names]
      if missing:
        raise ValueError(f"{file} has no column {', '.join(map(repr, missing))} (columns: "
                         f"{schema.names}); set " + " / ".join(columns[c] for c in missing))
      self.schema = self.schema or schema
      largest = 0
      for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if rows:
          starts.append(total)
          groups.append((file_id, group))
          total += rows
        largest = max(largest, metadata.row_group(group).total_byte_size)
      if largest > LARGE_ROW_GROUP_BYTES:
        _log.warning("%s: %s has row groups of up to %.0f MB; a shuffled pass reads a whole row "
                     "group per record: rewrite it with smaller row groups (row_group_size=100)",
                     self.name, file, largest / 2**20)
    self._starts, self._groups, self._num_rows = starts, groups, total
    self._reset_cache()

  def _reset_cache(self) -> None:
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._footers: dict[str, Any] = {}  # parsed once per process: no footer request per read
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    for name in ("_cache", "_footers", "_lock"):  # rebuilt in each worker
      state.pop(name)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset_cache()

  def __len__(self) -> int:
    return self._num_rows

  def locate(self, index: int) -> tuple[str, int, int]:
    """(file, row group, row within it) of global row ``index``."""
    if not 0 <= index < self._num_rows:
      raise IndexError(f"{self.name}: row {index} out of range [0, {self._num_rows})")
    slot = bisect.bisect_right(self._starts, index) - 1
    file_id, group = self._groups[slot]
    return self.files[file_id], group, index - self._starts[slot]

  def _row_group(self, file: str, group: int):
    """The row group's needed columns as a pyarrow Table (cached), or SkipRecord if unreadable."""
    key = (file, group)
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        table = self._cache[key]
        if isinstance(table, records.SkipRecord):  # a fresh exception: no growing traceback
          raise records.SkipRecord(table.reason, table.detail)
        return table
    try:
      import pyarrow.parquet as pq
      footer = self._footers.get(file) or read_metadata(file)
      self._footers[file] = footer
      with storage.open_file(file, "rb") as f:
        table = pq.ParquetFile(f, metadata=footer).read_row_group(group, columns=self.columns)
    except records.SkipRecord as e:  # the file was replaced by one that is not Parquet
      table = records.SkipRecord("unreadable_record", e.detail)
    except FileNotFoundError:
      table = records.SkipRecord("missing_file", f"{file}: the Parquet file disappeared")
    except Exception as e:  # a damaged column chunk must not stop the run
      table = records.SkipRecord("unreadable_record",
                                 f"{file} row group {group}: {type(e).__name__}: {e}")
    with self._lock:
      self._cache[key] = table
      while len(self._cache) > CACHED_ROW_GROUPS:
        self._cache.popitem(last=False)
    if isinstance(table, records.SkipRecord):
      raise records.SkipRecord(table.reason, table.detail)
    return table

  def row(self, index: int) -> tuple[str, dict[str, Any]]:
    """(key ``<file>#<index>``, {column: Python value}) of global row ``index``."""
    file, group, offset = self.locate(index)
    table = self._row_group(file, group)
    return (f"{file}#{index}",
            {name: table.column(name)[offset].as_py() for name in self.columns})

  def image(self, value: Any, key: str, file: str) -> bytes:
    """The encoded image of an image cell: bytes, ``{"bytes", "path"}`` or a path string."""
    if isinstance(value, dict):
      data, path = value.get("bytes"), value.get("path")
      if data:
        return data
      value = path
    if isinstance(value, (bytes, bytearray)):
      return bytes(value)
    if not isinstance(value, str) or not value:
      raise records.SkipRecord("bad_manifest_row", f"{key}: no image bytes or path in the row")
    if storage.is_absolute(value):
      return records.read_file(value)
    return records.read_file(storage.join(self._image_root or storage.dirname(file), value))


def read_column(files: Sequence[str], column: str) -> list[Any]:
  """One column of every file, in row order, as Python values (labels: small, read whole).

  Files that could not be opened when indexing are left out here too, so rows line up with
  :class:`ParquetTable`'s.
  """
  import pyarrow.parquet as pq
  values: list[Any] = []
  for file in files:
    try:
      metadata = read_metadata(file)
    except records.SkipRecord:
      continue
    with storage.open_file(file, "rb") as f:
      table = pq.ParquetFile(f, metadata=metadata).read(columns=[column])
    values.extend(table.column(column).to_pylist())
  return values


def caption_list(value: Any) -> list[Any]:
  """A caption cell (one string, a list of them, or null) as a list; null gives []."""
  if value is None:
    return []
  return list(value) if isinstance(value, (list, tuple)) else [value]


class ParquetReader:
  """Image-caption records of Parquet files (see the module docstring): one per row."""

  def __init__(self, path: str | Sequence[str], *, image_root: str = "", image_key: str = "image",
               caption_key: str = "caption"):
    self._image_key, self._caption_key = image_key, caption_key
    self._table = ParquetTable(path, {image_key: "data.image_key",
                                      caption_key: "data.caption_key"}, image_root=image_root)
    self.name = self._table.name
    self.index_skips = self._table.index_skips

  def __len__(self) -> int:
    return len(self._table)

  def read(self, index: int) -> records.RawRecord:
    file, _, _ = self._table.locate(index)
    key, row = self._table.row(index)
    image = self._table.image(row[self._image_key], key, file)
    return records.RawRecord(key, image, caption_list(row[self._caption_key]))
