"""Manifest files: the one parser of the JSONL / CSV tables that list images.

Training and retrieval manifests give captions per image (:class:`align_jax.data.tfds_manifest_readers.
ManifestReader`), classification manifests a label (:class:`align_jax.evaluate.datasets.
ManifestClassificationReader`); both read their rows here. ``.jsonl``: one JSON object per line
(blank lines ignored); ``.csv``: a header row, then one row per image. A row that cannot be used
(not UTF-8, invalid JSON, not an object, no string image path) comes back as a :class:`Row` with an
``error`` rather than an exception, so the caller decides: the caption reader skips and counts it
as a bad record, the classification reader stops with the line. A file that cannot be a manifest
at all (unknown extension, a CSV without the needed columns) raises ``ValueError`` naming the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from typing import Any, Iterator, Mapping

from align_jax.run import storage


@dataclasses.dataclass(frozen=True)
class Row:
  """One data row: its line number and fields, or the problem ``(reason, detail)`` with it.

  ``reason`` is a skip reason (``bad_encoding`` / ``bad_manifest_row``); ``fields[image_key]`` is
  a string whenever ``error`` is None.
  """

  line: int
  fields: dict[str, Any] | None
  error: tuple[str, str] | None = None


def read_rows(path: str, *, image_key: str,
              columns: Mapping[str, str] | None = None) -> Iterator[Row]:
  """The rows of a ``.jsonl`` / ``.csv`` manifest, in file order.

  Args:
    path: the manifest (local or a URL).
    image_key: the field with each row's image path (``data.image_key``).
    columns: further CSV columns the caller needs, each with the config key that names it
      (``{"label": "data.label_key"}``); a CSV without them, or without ``image_key``, raises
      ``ValueError`` listing its columns and the keys to set.
  """
  ext = storage.extension(path)
  if ext == ".jsonl":
    yield from _jsonl_rows(path, image_key)
  elif ext == ".csv":
    yield from _csv_rows(path, image_key, dict(columns or {}))
  else:
    raise ValueError(f"manifest {path!r}: unsupported extension {ext!r}; use .jsonl or .csv")


def _jsonl_rows(path: str, image_key: str) -> Iterator[Row]:
  with storage.open_file(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        fields = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError:
        yield Row(line_no, None, ("bad_encoding", "manifest row is not UTF-8"))
        continue
      except json.JSONDecodeError as e:
        yield Row(line_no, None, ("bad_manifest_row", f"invalid JSON ({e})"))
        continue
      if not isinstance(fields, dict) or not isinstance(fields.get(image_key), str):
        yield Row(line_no, None, ("bad_manifest_row", f"no string field {image_key!r}"))
        continue
      yield Row(line_no, fields)


def _csv_rows(path: str, image_key: str, columns: dict[str, str]) -> Iterator[Row]:
  # surrogateescape keeps undecodable bytes; records.decode_captions turns them into bad_encoding.
  with storage.open_file(path, "r", newline="", encoding="utf-8", errors="surrogateescape") as f:
    reader = csv.DictReader(f)
    needed = {image_key: "data.image_key", **columns}
    missing = [k for k in needed if k not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"manifest {path!r} has no column {', '.join(map(repr, missing))} "
                       f"(columns: {reader.fieldnames}); set "
                       + " / ".join(needed[k] for k in missing))
    for fields in reader:
      if not isinstance(fields.get(image_key), str):
        yield Row(reader.line_num, None, ("bad_manifest_row", f"no {image_key!r} value"))
        continue
      yield Row(reader.line_num, fields)
