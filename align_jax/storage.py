"""Run-directory I/O for local paths and URLs (``gs://bucket/dir``, any fsspec protocol), in one place.

Everything a run reads or writes by path — the workdir, ``config.json``, ``metrics.jsonl``,
TensorBoard files, ``eval_results.json``, feature stores, exports, manifests, shard lists, class-name
files — goes through these functions, so ``--workdir=gs://bucket/run`` works like a local folder
and nothing ever lands in a local directory called ``gs:``. Local paths use the OS directly (fast,
memory-mappable); URLs use fsspec (``gcsfs`` for ``gs://``, the backend orbax's ``etils.epath``
also uses when TensorFlow is absent). Orbax checkpoints take the URL as they are (tensorstore).

Object stores have no rename or append: :func:`write_text` / :func:`write_bytes` replace a whole
object in one upload (atomic there; a temporary file + ``os.replace`` locally), :func:`rename` of
a folder copies then deletes, and readers never see a half-written object.

Testing against a local GCS emulator uses the standard variables: ``STORAGE_EMULATOR_HOST``
(gcsfs; anonymous credentials are used then) and ``TENSORSTORE_GCS_HTTP_URL`` (tensorstore).
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import tempfile
from typing import IO, Any

if os.environ.get("STORAGE_EMULATOR_HOST"):
  # gcsfs >= 2026.10 first probes each bucket over gRPC (zonal / hierarchical-namespace support),
  # which an HTTP emulator never answers: ~60 s per bucket. Plain buckets need none of it.
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402


class StorageError(OSError):
  """A path or bucket that cannot be reached, read or written; the message names the URL."""


def is_url(path: str | os.PathLike) -> bool:
  """True for ``protocol://...`` paths other than ``file://``."""
  text = os.fspath(path)
  return "://" in text and not text.startswith("file://")


def _local(path: str | os.PathLike) -> str:
  text = os.fspath(path)
  return text[len("file://"):] if text.startswith("file://") else text


def join(base: str | os.PathLike, *parts: str) -> str:
  """``os.path.join`` for local paths, ``/``-joining for URLs."""
  base = os.fspath(base)
  if is_url(base):
    return posixpath.join(base.rstrip("/") if not base.endswith("://") else base, *parts)
  return os.path.join(_local(base), *parts)


def normalize(path: str | os.PathLike) -> str:
  """An absolute local path, or the URL unchanged (orbax needs absolute directories)."""
  return os.fspath(path) if is_url(path) else os.path.abspath(_local(path))


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str):
  options: dict[str, Any] = {"use_listings_cache": False}  # other processes write here too
  if protocol in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
    options["token"] = "anon"
  return fsspec.filesystem(protocol, **options)


def filesystem(path: str | os.PathLike):
  """(fsspec filesystem, path inside it) for a URL."""
  text = os.fspath(path)
  protocol = text.split("://", 1)[0]
  return _filesystem(protocol), text


def _wrap(path: str, action: str, error: Exception) -> StorageError:
  if isinstance(error, StorageError):
    return error
  detail = str(error).splitlines()[0] if str(error) else type(error).__name__
  return StorageError(f"cannot {action} {path}: {detail}")


def exists(path: str | os.PathLike) -> bool:
  if not is_url(path):
    return os.path.exists(_local(path))
  fs, inner = filesystem(path)
  try:
    return fs.exists(inner)
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "check", error) from None


def isdir(path: str | os.PathLike) -> bool:
  if not is_url(path):
    return os.path.isdir(_local(path))
  fs, inner = filesystem(path)
  try:
    return fs.isdir(inner)
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "check", error) from None


def isfile(path: str | os.PathLike) -> bool:
  if not is_url(path):
    return os.path.isfile(_local(path))
  fs, inner = filesystem(path)
  try:
    return fs.isfile(inner)
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "check", error) from None


def makedirs(path: str | os.PathLike) -> None:
  """Creates a folder and its parents (object stores have no folders: nothing to do)."""
  if not is_url(path):
    os.makedirs(_local(path), exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names (not paths) directly inside a folder, sorted; [] if it does not exist."""
  if not is_url(path):
    local = _local(path)
    return sorted(os.listdir(local)) if os.path.isdir(local) else []
  fs, inner = filesystem(path)
  try:
    entries = fs.ls(inner, detail=False) if fs.exists(inner) else []
  except FileNotFoundError:
    return []
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "list", error) from None
  prefix = inner.split("://", 1)[-1].rstrip("/")
  names = {posixpath.relpath(e.split("://", 1)[-1].rstrip("/"), prefix) for e in entries}
  return sorted(n for n in names if n not in (".", ""))


def glob(pattern: str) -> list[str]:
  """Paths (URLs keep their protocol) matching a glob pattern, sorted."""
  if not is_url(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(glob_lib.glob(_local(pattern)))
  fs, inner = filesystem(pattern)
  protocol = pattern.split("://", 1)[0]
  try:
    found = fs.glob(inner)
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(pattern, "list", error) from None
  return sorted(f if "://" in f else f"{protocol}://{f}" for f in found)


def open_file(path: str | os.PathLike, mode: str = "rb", **kwargs) -> IO:
  """A file object for reading or writing (``rb``, ``r``, ``wb``, ``w``, ``ab``, ``a``)."""
  if not is_url(path):
    return open(_local(path), mode, **kwargs)  # pylint: disable=unspecified-encoding
  try:
    return fsspec.open(os.fspath(path), mode, **_open_options(path), **kwargs).open()
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "open", error) from None


def _open_options(path) -> dict:
  protocol = os.fspath(path).split("://", 1)[0]
  if protocol in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
    return {"token": "anon"}
  return {}


def read_bytes(path: str | os.PathLike) -> bytes:
  if not is_url(path):
    with open(_local(path), "rb") as f:
      return f.read()
  fs, inner = filesystem(path)
  try:
    return fs.cat_file(inner)
  except FileNotFoundError:
    raise
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "read", error) from None


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Replaces the file at ``path`` atomically: readers see the old content or the new, whole."""
  if not is_url(path):
    local = _local(path)
    folder = os.path.dirname(os.path.abspath(local))
    os.makedirs(folder, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(local))
    try:
      with os.fdopen(handle, "wb") as f:
        f.write(data)
      os.chmod(staging, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
      os.replace(staging, local)
    except BaseException:
      if os.path.exists(staging):
        os.remove(staging)
      raise
    return
  fs, inner = filesystem(path)
  try:
    fs.pipe_file(inner, data)  # one upload: an object appears whole or not at all
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "write", error) from None


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
  write_bytes(path, text.encode(encoding))


def remove(path: str | os.PathLike) -> None:
  """Deletes a file or a folder tree; a missing path is not an error."""
  if not is_url(path):
    local = _local(path)
    if os.path.isdir(local):
      shutil.rmtree(local)
    elif os.path.lexists(local):
      os.remove(local)
    return
  fs, inner = filesystem(path)
  try:
    if fs.exists(inner):
      fs.rm(inner, recursive=True)
  except FileNotFoundError:
    pass
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "delete", error) from None


def rename(source: str | os.PathLike, target: str | os.PathLike) -> None:
  """Moves a file or folder (atomic locally; copy + delete on object stores)."""
  if not is_url(source) and not is_url(target):
    os.replace(_local(source), _local(target))
    return
  fs, inner = filesystem(source)
  try:
    # copy + delete rather than fs.mv: gcsfs's server-side moveTo is newer than many emulators
    fs.copy(inner, filesystem(target)[1], recursive=True)
    fs.rm(inner, recursive=True)
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(source), "move", error) from None


def size(path: str | os.PathLike) -> int:
  if not is_url(path):
    return os.path.getsize(_local(path))
  fs, inner = filesystem(path)
  try:
    return int(fs.size(inner))
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "read", error) from None


def local_path(path: str | os.PathLike) -> str | None:
  """The OS path of a local file (e.g. to memory-map it), or None for a URL."""
  return None if is_url(path) else _local(path)


def clear_cache() -> None:
  """Forgets the cached filesystem clients (e.g. after the emulator's address changed)."""
  _filesystem.cache_clear()
