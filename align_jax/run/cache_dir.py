"""Private per-user cache folders: created with mode 0700, refused when someone else could write them.

align_jax caches things it later trusts: the WebDataset shard indexes (byte offsets read back
without a re-scan), the feature-store digests already verified on this machine (a file listed
there is not hashed again) and local copies of stores on ``gs://``, and the online demo's tiny
encoder checkpoints. A folder another user can create, replace or write (a fixed name in the shared
``/tmp``, a symlink, a folder with group or other write bits) would let them plant an index or a
"verified" record. So every cache folder comes from :func:`private_dir`: missing folders are made
with mode 0700, and an existing one must be a real folder (not a symlink), owned by this user and
not writable by group or others, or it is refused with one line naming the fix.

The default root is ``$ALIGN_JAX_CACHE``, else ``$XDG_CACHE_HOME/align_jax``, else
``~/.cache/align_jax`` (:func:`user_cache_dir`).
"""

from __future__ import annotations

import os
import stat


class UnsafeCacheDirError(PermissionError):
  """A cache folder that another user could change (one line: the path, why, and the fix)."""


def cache_root() -> str:
  """``$ALIGN_JAX_CACHE``, else ``$XDG_CACHE_HOME/align_jax``, else ``~/.cache/align_jax``."""
  root = os.environ.get("ALIGN_JAX_CACHE")
  if root:
    return os.path.abspath(os.path.expanduser(root))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(os.path.abspath(os.path.expanduser(base)), "align_jax")


def _check(path: str) -> None:
  """Raises :class:`UnsafeCacheDirError` unless ``path`` is a folder only this user can write."""
  elsewhere = "or set ALIGN_JAX_CACHE (or the config's cache folder) to a folder of your own"
  info = os.lstat(path)
  if stat.S_ISLNK(info.st_mode):
    raise UnsafeCacheDirError(
        f"cache folder {path} is a symlink (to {os.readlink(path)}): refused, since whoever "
        f"controls the link controls the cache; remove the link, {elsewhere}")
  if not stat.S_ISDIR(info.st_mode):
    raise UnsafeCacheDirError(f"cache folder {path} is not a folder: remove it, {elsewhere}")
  if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
    raise UnsafeCacheDirError(
        f"cache folder {path} belongs to user id {info.st_uid}, not to you ({os.geteuid()}): "
        f"refused; {elsewhere}")
  if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    raise UnsafeCacheDirError(
        f"cache folder {path} is writable by group or others (mode "
        f"{stat.S_IMODE(info.st_mode):o}): refused; make it private (chmod 700 {path}), "
        f"{elsewhere}")


def private_dir(path: str) -> str:
  """``path`` (absolute) as a private cache folder: made with mode 0700 if missing, else checked.

  Missing parents are made with mode 0700 too. Raises :class:`UnsafeCacheDirError` (a
  ``PermissionError``) for a symlink, a non-folder, a folder of another user, or one writable by
  group or others.
  """
  path = os.path.abspath(os.path.expanduser(path))
  missing = []
  parent = path
  while not os.path.lexists(parent):
    missing.append(parent)
    parent = os.path.dirname(parent)
  for folder in reversed(missing):
    try:
      os.mkdir(folder, 0o700)
    except FileExistsError:
      pass  # made meanwhile by another process: checked below like any existing folder
  _check(path)
  return path


def user_cache_dir(*parts: str) -> str:
  """The private folder ``<cache root>/<parts...>`` (:func:`cache_root`); root and leaf checked."""
  root = private_dir(cache_root())
  return private_dir(os.path.join(root, *parts)) if parts else root
