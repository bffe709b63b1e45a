"""WebDataset tar shards (as img2dataset writes them) read by member offset.

A sample is the group of tar members sharing a key (the path up to the first dot of the file
name): ``{key}.jpg`` (or .jpeg/.png/.webp) plus ``{key}.txt`` or ``{key}.json`` with a caption
field. The shards are indexed once, headers only (tarfile seeks over the member data), into flat
numpy arrays of offsets, so any sample can be read with one ``os.pread`` (or one ranged request
for a URL): random access gives a seeded global shuffle and an exact resume without replaying the
stream.

Shards are local paths or URLs (``gs://bucket/shards-{00000..00099}.tar``, globs included), read
through :mod:`align_jax.run.storage`. Only uncompressed tars can be read by offset (img2dataset's
default output). A shard that cannot be opened is skipped and counted (``unreadable_shard``); a
truncated shard keeps the samples stored before the damage (``truncated_shard``).
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import logging
import re
import tarfile
from typing import Sequence

import numpy as np

from align_jax.run import cache_dir as cache_lib
from align_jax.run import storage
from align_jax.data import skip_log
from align_jax.data.records import RawRecord, SkipRecord

_log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_CAPTION_TXT, _CAPTION_JSON, _MISSING = 0, 1, -1


def expand_braces(pattern: str) -> list[str]:
  """Expands ``{a,b}`` lists and zero-padded ``{000..009}`` ranges, as webdataset urls use them."""
  match = re.search(r"\{([^{}]*)\}", pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  rng = _RANGE.match(body)
  if rng:
    lo, hi = int(rng.group(1)), int(rng.group(2))
    width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
    items = [str(i).zfill(width) for i in range(lo, hi + 1)]
  else:
    items = body.split(",")
  head, tail = pattern[:match.start()], pattern[match.end():]
  return list(itertools.chain.from_iterable(expand_braces(head + i + tail) for i in items))


def expand_urls(urls: str | Sequence[str]) -> list[str]:
  """Paths or URLs, globs and brace lists (a list, or one string joined by '::') → shard paths."""
  if isinstance(urls, str):
    urls = urls.split("::")
  paths: list[str] = []
  for url in urls:
    if (not storage.is_url(url) and re.match(r"^[a-z][a-z0-9+]*:", url)
        and not storage.exists(url)):
      raise ValueError(f"webdataset url {url!r} is neither a local path nor a URL such as "
                       "gs://bucket/shard-{000..009}.tar ('pipe:' commands are not supported); "
                       "fix data.urls")
    for pattern in expand_braces(url):
      if glob.has_magic(pattern):
        paths.extend(storage.glob(pattern))
      else:
        paths.append(pattern)
  for path in paths:
    if path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
      raise ValueError(f"shard {path!r} is compressed and cannot be read by offset; decompress it "
                       "(img2dataset writes plain .tar by default)")
  return paths


def index_shard(path: str) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
  """Reads one tar's headers: ``{key: {ext: (data_offset, size)}}`` and a problem, if any."""
  members: dict[str, dict[str, tuple[int, int]]] = {}
  try:
    file_size = storage.size(path)
    with storage.open_file(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      try:
        for info in tar:
          if not info.isfile():
            continue
          if info.offset_data + info.size > file_size:
            return members, f"truncated_shard: {info.name} ends past the end of the file"
          match = _KEY_EXT.match(info.name)
          if match is None:
            continue
          members.setdefault(match.group(1), {})[match.group(2).lower()] = (
              info.offset_data, info.size)
      except (tarfile.TarError, OSError, EOFError) as e:
        return members, f"truncated_shard: {e}"
  except (tarfile.TarError, OSError, EOFError) as e:
    return {}, f"unreadable_shard: {type(e).__name__}: {e}"
  return members, None


def _index_digest(shards: list[str], caption_key: str) -> str:
  """Identifies a set of shards by path, size and version (mtime, or the object's generation)."""
  digest = hashlib.sha256(f"v1|{caption_key}".encode())
  for path, version in zip(shards, storage.versions(shards)):
    digest.update(f"|{storage.normalize(path)}|{version}".encode())
  return digest.hexdigest()[:24]


class WebDatasetReader:
  """Samples of WebDataset shards (local or URLs), in shard order then member order.

  The index (a ``[n, 6]`` int64 table and the keys) is saved as ``.npy`` files under
  ``index_cache_dir`` and memory-mapped, so grain workers share one copy in the page cache instead
  of each unpickling its own (about 60 bytes per sample), and a restart reuses it. The default is
  the private per-user folder ``<cache>/wds_index`` (:mod:`align_jax.run.cache_dir`; data buckets
  are often read-only); a local ``index_cache_dir`` must be private too, since an index planted
  there would be trusted. A URL ``index_cache_dir`` (shared by the hosts of a pod) is read into
  memory instead.
  """

  def __init__(self, urls: str | Sequence[str], *, caption_key: str = "caption",
               index_cache_dir: str | None = None):
    self._shards = expand_urls(urls)
    self.name = f"webdataset {urls}"
    if not self._shards:
      raise ValueError(f"{self.name}: no shard matched; check data.urls")
    self._caption_key = caption_key
    self.index_skips: dict[str, int] = {}
    if not index_cache_dir:
      cache_dir = cache_lib.user_cache_dir("wds_index")
    elif storage.local_path(index_cache_dir) is None:
      cache_dir = index_cache_dir  # a bucket folder shared by a pod's hosts
    else:
      cache_dir = cache_lib.private_dir(storage.local_path(index_cache_dir))
    try:
      base = storage.join(cache_dir, _index_digest(self._shards, caption_key))
    except OSError:
      base = None  # A shard cannot be stat'ed: index without caching, counting it below.
    self._paths = (base + "-table.npy", base + "-keys.npy") if base else None
    if self._paths and all(storage.exists(p) for p in self._paths):
      _log.info("%s: reusing the shard index %s", self.name, base)
    else:
      table, keys = self._build_index()
      if self._paths and not self.index_skips:  # Never cache an index of damaged shards.
        for path, array in zip(self._paths, (table, keys)):
          buffer = io.BytesIO()
          np.save(buffer, array, allow_pickle=False)
          # Replaced whole (atomic): processes indexing the same shards do not clash.
          storage.write_bytes(path, buffer.getvalue())
      else:
        self._paths = None
        self._table, self._keys = table, keys
    self._open()

  def _open(self) -> None:
    if self._paths is not None:
      self._table, self._keys = (
          np.load(storage.local_path(p), mmap_mode="r", allow_pickle=False)
          if storage.local_path(p) is not None
          else np.load(io.BytesIO(storage.read_bytes(p)), allow_pickle=False)
          for p in self._paths)

  def __getstate__(self):
    state = self.__dict__.copy()
    if self._paths is not None:  # Workers re-map the files rather than receive a copy.
      state["_table"] = state["_keys"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def _build_index(self) -> tuple[np.ndarray, np.ndarray]:
    keys: list[bytes] = []
    columns: list[tuple[int, int, int, int, int, int]] = []
    for shard_id, path in enumerate(self._shards):
      members, problem = index_shard(path)
      if problem is not None:
        reason = problem.split(":", 1)[0]
        self.index_skips[reason] = self.index_skips.get(reason, 0) + 1
        skip_log.record(_log, self.name, reason, f"{path} ({problem.split(':', 1)[1].strip()}); "
                        f"kept {len(members)} samples from it")
      for key, exts in members.items():
        image = next((exts[e] for e in IMAGE_EXTS if e in exts), (_MISSING, 0))
        if "txt" in exts:
          kind, caption = _CAPTION_TXT, exts["txt"]
        elif "json" in exts:
          kind, caption = _CAPTION_JSON, exts["json"]
        else:
          kind, caption = _MISSING, (_MISSING, 0)
        keys.append(key.encode("utf-8"))
        columns.append((shard_id, *image, kind, *caption))
    # Columns: shard, image offset, image size, caption kind, caption offset, caption size.
    table = np.asarray(columns, np.int64).reshape(-1, 6)
    return table, np.asarray(keys, dtype=f"S{max(map(len, keys), default=1)}")

  def __len__(self) -> int:
    return len(self._keys)

  def _read_members(self, shard: int, key: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """Reads ``(offset, size)`` spans of one shard; a fresh descriptor per record, so that no
    descriptor is shared between loader threads and thousands of shards never exhaust the limit."""
    path = self._shards[shard]
    try:
      out = storage.read_ranges(path, spans)
    except FileNotFoundError:
      raise SkipRecord("missing_file", f"{path}:{key}: shard disappeared") from None
    except OSError as e:
      raise SkipRecord("unreadable_shard", f"{path}:{key}: {e}") from None
    if any(len(data) != size for data, (_, size) in zip(out, spans)):
      raise SkipRecord("unreadable_shard", f"{path}:{key}: short read (shard changed on disk?)")
    return out

  def read(self, index: int) -> RawRecord:
    shard, img_off, img_size, kind, cap_off, cap_size = (int(v) for v in self._table[index])
    member = self._keys[index].decode("utf-8")
    key = f"{self._shards[shard]}:{member}"
    if img_off == _MISSING:
      raise SkipRecord("missing_file", f"{key}: no image member ({'/'.join(IMAGE_EXTS)})")
    if kind == _MISSING:
      raise SkipRecord("missing_file", f"{key}: no .txt or .json caption member")
    raw_caption, image = self._read_members(
        shard, member, [(cap_off, cap_size), (img_off, img_size)])
    if kind == _CAPTION_TXT:
      captions = [raw_caption]
    else:
      try:
        meta = json.loads(raw_caption.decode("utf-8"))
      except UnicodeDecodeError:
        raise SkipRecord("bad_encoding", f"{key}: .json is not UTF-8") from None
      except json.JSONDecodeError as e:
        raise SkipRecord("bad_encoding", f"{key}: .json is not valid JSON ({e})") from None
      value = meta.get(self._caption_key) if isinstance(meta, dict) else None
      captions = list(value) if isinstance(value, list) else [value]
    return RawRecord(key, image, captions)
