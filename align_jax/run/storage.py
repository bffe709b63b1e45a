"""Run-directory I/O for local paths and URLs (``gs://bucket/dir``, any fsspec protocol), in one place.

Everything a run reads or writes by path — the workdir, ``config.json``, ``metrics.jsonl``,
TensorBoard files, ``eval_results.json``, feature stores, exports, manifests, shard lists, class-name
files — goes through these functions, so ``--workdir=gs://bucket/run`` works like a local folder
and nothing ever lands in a local directory called ``gs:``. Local paths use the OS directly (fast,
memory-mappable); URLs use fsspec (``gcsfs`` for ``gs://``, the backend orbax's ``etils.epath``
also uses when TensorFlow is absent). Orbax checkpoints take the URL as they are (tensorstore).

Object stores have no rename or append: :func:`write_text` / :func:`write_bytes` replace a whole
object in one upload (atomic there; a temporary file + ``os.replace`` locally), :func:`rename` of
a folder copies then deletes, and readers never see a half-written object. Append modes of
:func:`open_file` are for local files only.

Errors name the path: a URL that cannot be reached, read or written raises :class:`StorageError`
(an ``OSError``) with ``cannot <action> <url>: <cause>`` on one line; a missing file raises
``FileNotFoundError`` naming it, locally and remotely alike. gcsfs retries a failing request for
about 30 s; :func:`check_writable` answers within seconds instead (run it on the workdir first).

Testing against a local GCS emulator uses the standard variables: ``STORAGE_EMULATOR_HOST``
(gcsfs; anonymous credentials are used then) and ``TENSORSTORE_GCS_HTTP_URL`` (tensorstore).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import urllib.parse
import uuid
from typing import IO, Any

if os.environ.get("STORAGE_EMULATOR_HOST"):
  # gcsfs >= 2026.10 first probes each bucket over gRPC (zonal / hierarchical-namespace support),
  # which an HTTP emulator never answers: ~60 s per bucket. Plain buckets need none of it. gcsfs
  # reads this when it is imported, so it must be set before the first gs:// access.
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402

# gcsfs logs each failed request with a traceback (logger.exception) before raising; the
# StorageError raised here carries the cause on one line, and the log would only bury it.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

GCS_ENDPOINT = ("storage.googleapis.com", 443)
CREDENTIALS_HINT = ("check the bucket's permissions and this machine's credentials (gcloud auth "
                    "application-default login, or GOOGLE_APPLICATION_CREDENTIALS)")


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


def dirname(path: str | os.PathLike) -> str:
  """The folder holding ``path`` (``gs://b/x/y.jsonl`` -> ``gs://b/x``; local paths made absolute)."""
  text = os.fspath(path)
  if is_url(text):
    protocol, inner = text.split("://", 1)
    return f"{protocol}://{posixpath.dirname(inner.rstrip('/'))}"
  return os.path.dirname(os.path.abspath(_local(text)))


def basename(path: str | os.PathLike) -> str:
  return posixpath.basename(os.fspath(path).rstrip("/"))


def extension(path: str | os.PathLike) -> str:
  """The lower-case extension of a path or URL's file name, with its dot (``".jsonl"``)."""
  return posixpath.splitext(basename(path))[1].lower()


def is_absolute(path: str | os.PathLike) -> bool:
  """True for URLs and absolute local paths (a relative path is resolved against a root)."""
  return is_url(path) or os.path.isabs(_local(path))


def normalize(path: str | os.PathLike) -> str:
  """An absolute local path, or the URL unchanged (orbax needs absolute directories)."""
  return os.fspath(path) if is_url(path) else os.path.abspath(_local(path))


def _protocol(path: str) -> str:
  return path.split("://", 1)[0]


def _emulated(protocol: str) -> bool:
  return protocol in ("gs", "gcs") and bool(os.environ.get("STORAGE_EMULATOR_HOST"))


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str, pid: int):
  del pid  # part of the key: a forked worker (grain) must not reuse its parent's event loop
  options: dict[str, Any] = {"use_listings_cache": False}  # other processes write here too
  if _emulated(protocol):
    options["token"] = "anon"
  try:
    return fsspec.filesystem(protocol, **options)
  except (ValueError, ImportError) as error:  # unknown protocol, or its package is missing
    raise StorageError(f"cannot open {protocol}:// paths: {error}") from None


def filesystem(path: str | os.PathLike):
  """(fsspec filesystem, path inside it) for a URL."""
  text = os.fspath(path)
  return _filesystem(_protocol(text), os.getpid()), text


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _wrap(path: str, action: str, error: Exception) -> OSError:
  if isinstance(error, StorageError):
    return error
  if isinstance(error, FileNotFoundError):
    return FileNotFoundError(errno.ENOENT, "no such file or object", path)
  return StorageError(f"cannot {action} {path}: {_first_line(error)}")


def _call(path: str | os.PathLike, action: str, method: str, *args, **kwargs):
  """``fs.<method>(inner path, *args)`` with its errors as one line naming ``path``."""
  fs, inner = filesystem(path)
  try:
    return getattr(fs, method)(inner, *args, **kwargs)
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), action, error) from None


def exists(path: str | os.PathLike) -> bool:
  if not is_url(path):
    return os.path.exists(_local(path))
  return _call(path, "check", "exists")


def isdir(path: str | os.PathLike) -> bool:
  if not is_url(path):
    return os.path.isdir(_local(path))
  return _call(path, "check", "isdir")


def isfile(path: str | os.PathLike) -> bool:
  if not is_url(path):
    return os.path.isfile(_local(path))
  return _call(path, "check", "isfile")


def makedirs(path: str | os.PathLike) -> None:
  """Creates a folder and its parents (object stores have no folders: nothing to do)."""
  if not is_url(path):
    os.makedirs(_local(path), exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names (not paths) directly inside a folder, sorted; [] if it does not exist."""
  if not is_url(path):
    local = _local(path)
    return sorted(os.listdir(local)) if os.path.isdir(local) else []
  try:
    entries = _call(path, "list", "ls", detail=False) if exists(path) else []
  except FileNotFoundError:
    return []
  prefix = os.fspath(path).split("://", 1)[-1].rstrip("/")
  names = {posixpath.relpath(e.split("://", 1)[-1].rstrip("/"), prefix) for e in entries}
  return sorted(n for n in names if n not in (".", ""))


def glob(pattern: str) -> list[str]:
  """Paths (URLs keep their protocol) matching a glob pattern, sorted."""
  if not is_url(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(glob_lib.glob(_local(pattern)))
  found = _call(pattern, "list", "glob")
  protocol = _protocol(pattern)
  return sorted(f if "://" in f else f"{protocol}://{f}" for f in found)


def open_file(path: str | os.PathLike, mode: str = "rb", **kwargs) -> IO:
  """A file object: ``rb``/``r`` (seekable; URLs read ahead in blocks), ``wb``/``w`` (a URL is
  uploaded when closed), ``ab``/``a`` (local files only). Text modes take encoding/errors/newline.
  """
  if not is_url(path):
    return open(_local(path), mode, **kwargs)  # pylint: disable=unspecified-encoding
  if "a" in mode or "+" in mode:
    raise StorageError(f"cannot append to {os.fspath(path)}: object stores have no append; "
                       "rewrite the whole object with storage.write_bytes")
  return _call(path, "open", "open", mode, **kwargs)


def read_bytes(path: str | os.PathLike) -> bytes:
  if not is_url(path):
    with open(_local(path), "rb") as f:
      return f.read()
  return _call(path, "read", "cat_file")


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def read_ranges(path: str | os.PathLike, spans: list[tuple[int, int]]) -> list[bytes]:
  """The bytes of each ``(offset, size)`` span of one file (shorter where the file ends).

  Locally one descriptor and ``os.pread`` per span (no shared file position, so loader threads
  can read the same file); for a URL, ranged requests sent concurrently.
  """
  if not is_url(path):
    fd = os.open(_local(path), os.O_RDONLY)
    try:
      return [os.pread(fd, size, offset) for offset, size in spans]
    finally:
      os.close(fd)
  fs, inner = filesystem(path)
  try:
    return fs.cat_ranges([inner] * len(spans), [o for o, _ in spans],
                         [o + s for o, s in spans], on_error="raise")
  except Exception as error:  # pylint: disable=broad-except
    raise _wrap(os.fspath(path), "read", error) from None


def _file_mode() -> int:
  """The mode ``open()`` gives a new file: 0666 less the umask (0644 under the usual 022)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
  except (OSError, StopIteration, ValueError):
    umask = os.umask(0)
    os.umask(umask)
  return 0o666 & ~umask


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _full_disk(path: str, error: OSError) -> StorageError:
  """``[Errno 28] No space left on device`` names no file: this names the path and the fix."""
  why = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  return StorageError(f"cannot write {path}: {why} ({errno.errorcode[error.errno]}); free space "
                      f"on the disk that holds {folder} (df -h {folder} shows it), or write to "
                      "another folder (e.g. another --workdir)")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Replaces the file at ``path`` atomically: readers see the old content or the new, whole.

  Local files get the mode a plain ``open()`` would give (0644 under the usual umask), not the
  0600 of the temporary file they are staged in. A full disk raises :class:`StorageError` naming
  ``path``.
  """
  if not is_url(path):
    local = _local(path)
    folder = os.path.dirname(os.path.abspath(local))
    staging = None
    try:
      os.makedirs(folder, exist_ok=True)
      handle, staging = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(local))
      with os.fdopen(handle, "wb") as f:
        f.write(data)
      os.chmod(staging, _file_mode())
      os.replace(staging, local)
    except BaseException as error:
      if staging is not None and os.path.exists(staging):
        os.remove(staging)
      if isinstance(error, OSError) and error.errno in _FULL:
        raise _full_disk(local, error) from None
      raise
    return
  _call(path, "write", "pipe_file", data)  # one upload: an object appears whole or not at all


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
  try:
    if exists(path):
      _call(path, "delete", "rm", recursive=True)
  except FileNotFoundError:
    pass


def rename(source: str | os.PathLike, target: str | os.PathLike) -> None:
  """Moves a file or folder within one store (atomic locally; copy + delete on object stores)."""
  if not is_url(source) and not is_url(target):
    os.replace(_local(source), _local(target))
    return
  # copy + delete rather than fs.mv: gcsfs's server-side moveTo is newer than many emulators
  _call(source, "move", "copy", filesystem(target)[1], recursive=True)
  _call(source, "move", "rm", recursive=True)


def size(path: str | os.PathLike) -> int:
  if not is_url(path):
    return os.path.getsize(_local(path))
  return int(_call(path, "read", "size"))


def _version_of(info: dict) -> str:
  tag = next((info[k] for k in ("generation", "ETag", "etag", "mtime", "updated", "md5Hash")
              if info.get(k)), "")
  return f"{info.get('size')}:{tag}"


def versions(paths: list[str]) -> list[str]:
  """For each file, a string that changes whenever its content may have (for caches).

  Local: size and modification time. Object stores: size and the object's generation (GCS) or
  its ETag / modification time where the store has no generations; one listing per folder, not
  one request per file (thousands of WebDataset shards). A missing file raises
  ``FileNotFoundError``.
  """
  out: list[str] = []
  listings: dict[str, dict[str, dict]] = {}
  for path in paths:
    text = os.fspath(path)
    if not is_url(text):
      st = os.stat(_local(text))
      out.append(f"{st.st_size}:{st.st_mtime_ns}")
      continue
    folder = dirname(text)
    if folder not in listings:
      entries = _call(folder, "list", "ls", detail=True) if exists(folder) else []
      listings[folder] = {e["name"].split("://", 1)[-1].rstrip("/"): e for e in entries}
    info = listings[folder].get(text.split("://", 1)[-1])
    if info is None or info.get("type") == "directory":
      raise FileNotFoundError(errno.ENOENT, "no such file or object", text)
    out.append(_version_of(info))
  return out


def version(path: str | os.PathLike) -> str:
  """:func:`versions` of one file."""
  return versions([os.fspath(path)])[0]


def local_path(path: str | os.PathLike) -> str | None:
  """The OS path of a local file (e.g. to memory-map it), or None for a URL."""
  return None if is_url(path) else _local(path)


def _endpoint(protocol: str) -> tuple[str, int] | None:
  """(host, port) the client for ``protocol`` connects to, when known (GCS and its emulator)."""
  if protocol not in ("gs", "gcs"):
    return None
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if emulator in ("", "default"):
    return GCS_ENDPOINT
  parsed = urllib.parse.urlsplit(emulator if "://" in emulator else f"http://{emulator}")
  return parsed.hostname or "localhost", parsed.port or (443 if parsed.scheme == "https" else 80)


def check_writable(path: str | os.PathLike, timeout: float = 30.0) -> None:
  """Fails within seconds, in one line naming ``path``, where a run could not write.

  A local folder is created and checked for write permission, and a small probe file is written
  and removed (a full disk: one line naming the folder and the fix). For a URL, the storage endpoint
  must accept a connection (skipped behind an HTTP proxy), then a small probe object is written
  and deleted under ``path`` within ``timeout`` seconds: a missing bucket, missing credentials or
  no network show up here, before any training, rather than after gcsfs's ~30 s of retries on the
  first save.

  Raises:
    StorageError: ``cannot write <path>: <cause>; <what to check>``.
  """
  text = os.fspath(path)
  if not is_url(text):
    local = _local(text)
    try:
      os.makedirs(local, exist_ok=True)
    except OSError as error:
      raise StorageError(f"cannot write {text}: {error.strerror or error}") from None
    if not os.access(local, os.W_OK | os.X_OK):
      raise StorageError(f"cannot write {text}: permission denied")
    probe = os.path.join(local, f".align_jax-write-check-{uuid.uuid4().hex}")
    try:
      with open(probe, "wb") as f:  # a disk that is already full fails here, not after the build
        f.write(b"\n")
    except OSError as error:
      if error.errno in _FULL:
        raise _full_disk(text, error) from None
      raise StorageError(f"cannot write {text}: {error.strerror or error}") from None
    finally:
      remove(probe)
    return
  endpoint = _endpoint(_protocol(text))
  proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
  if endpoint is not None and not proxied:
    try:
      socket.create_connection(endpoint, timeout=min(timeout, 10.0)).close()
    except OSError as error:
      where = ("STORAGE_EMULATOR_HOST" if os.environ.get("STORAGE_EMULATOR_HOST")
               else "the network")
      raise StorageError(f"cannot write {text}: cannot connect to {endpoint[0]}:{endpoint[1]} "
                         f"({error.strerror or error}); check {where}") from None
  fs, inner = filesystem(text)
  probe = posixpath.join(inner.rstrip("/"), f".align_jax-write-check-{uuid.uuid4().hex}")
  try:
    fs.pipe_file(probe, b"", timeout=timeout)
    fs.rm_file(probe, timeout=timeout)
  except fsspec.exceptions.FSTimeoutError:
    raise StorageError(f"cannot write {text}: no answer within {timeout:.0f} s; "
                       f"{CREDENTIALS_HINT}") from None
  except FileNotFoundError:
    bucket = inner.split("://", 1)[-1].split("/", 1)[0]
    raise StorageError(f"cannot write {text}: bucket {bucket!r} does not exist (or these "
                       "credentials cannot see it); create it or fix the URL") from None
  except Exception as error:  # pylint: disable=broad-except
    raise StorageError(f"cannot write {text}: {_first_line(error)}; {CREDENTIALS_HINT}") from None


def clear_cache() -> None:
  """Forgets the cached filesystem clients (e.g. after the emulator's address changed)."""
  _filesystem.cache_clear()
