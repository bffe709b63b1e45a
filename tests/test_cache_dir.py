"""Caches that align_jax trusts live in private per-user folders (issue 21, item 9): made with mode
0700, and a symlink, another user's folder or a group/other-writable one is refused in one line.
The WebDataset index no longer goes to the fixed, shared ``/tmp/align_jax_wds_index``."""

import os
import stat
import tempfile

import pytest

from align_jax.run import cache_dir
from align_jax.data import array_sources as features, webdataset

import helpers_data as hd
import helpers_store as hs


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
  """A fresh $XDG_CACHE_HOME (and $HOME), no $ALIGN_JAX_CACHE: the default root is under it."""
  monkeypatch.delenv("ALIGN_JAX_CACHE", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  return tmp_path / "xdg" / "align_jax"


def _mode(path) -> int:
  return stat.S_IMODE(os.lstat(path).st_mode)


def test_folders_are_made_private_parents_included(tmp_path):
  old = os.umask(0o002)  # a umask that would leave new folders group-writable
  try:
    path = cache_dir.private_dir(str(tmp_path / "a" / "b" / "c"))
  finally:
    os.umask(old)
  assert path == str(tmp_path / "a" / "b" / "c")
  assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3
  assert cache_dir.private_dir(path) == path  # an existing private folder is reused


def test_the_root_follows_align_jax_cache_then_xdg_then_home(tmp_path, monkeypatch):
  monkeypatch.setenv("ALIGN_JAX_CACHE", str(tmp_path / "mine"))
  assert cache_dir.cache_root() == str(tmp_path / "mine")
  monkeypatch.delenv("ALIGN_JAX_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache_dir.cache_root() == str(tmp_path / "xdg" / "align_jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cache_dir.cache_root() == str(tmp_path / "home" / ".cache" / "align_jax")
  assert cache_dir.user_cache_dir("x") == str(tmp_path / "home" / ".cache" / "align_jax" / "x")
  assert _mode(tmp_path / "home" / ".cache") == 0o700


def test_a_symlink_is_refused(tmp_path):
  (tmp_path / "elsewhere").mkdir(mode=0o700)
  os.symlink(tmp_path / "elsewhere", tmp_path / "link")
  with pytest.raises(cache_dir.UnsafeCacheDirError) as error:
    cache_dir.private_dir(str(tmp_path / "link"))
  assert str(error.value) == (
      f"cache folder {tmp_path / 'link'} is a symlink (to {tmp_path / 'elsewhere'}): refused, "
      "since whoever controls the link controls the cache; remove the link, or set "
      "ALIGN_JAX_CACHE (or the config's cache folder) to a folder of your own")


def test_a_group_writable_folder_is_refused(tmp_path):
  (tmp_path / "shared").mkdir()
  os.chmod(tmp_path / "shared", 0o775)
  with pytest.raises(cache_dir.UnsafeCacheDirError,
                     match=r"is writable by group or others \(mode 775\): refused; make it private "
                           rf"\(chmod 700 {tmp_path / 'shared'}\)"):
    cache_dir.private_dir(str(tmp_path / "shared"))
  os.chmod(tmp_path / "shared", 0o755)  # readable by others is fine: nobody else can write
  cache_dir.private_dir(str(tmp_path / "shared"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a folder to another user needs root")
def test_another_users_folder_is_refused(tmp_path):
  (tmp_path / "theirs").mkdir(mode=0o700)
  os.chown(tmp_path / "theirs", 54321, 54321)
  with pytest.raises(cache_dir.UnsafeCacheDirError,
                     match=r"belongs to user id 54321, not to you \(0\): refused"):
    cache_dir.private_dir(str(tmp_path / "theirs"))


def test_webdataset_index_goes_to_the_private_user_cache(tmp_path, user_cache):
  paths = hd.write_webdataset(str(tmp_path / "shards"), 1, 3)
  shared = os.path.join(tempfile.gettempdir(), "align_jax_wds_index")
  before = sorted(os.listdir(shared)) if os.path.isdir(shared) else None
  reader = webdataset.WebDatasetReader(paths)
  assert len(reader) == 3
  assert len(os.listdir(user_cache / "wds_index")) == 2  # table and keys
  assert _mode(user_cache) == _mode(user_cache / "wds_index") == 0o700
  after = sorted(os.listdir(shared)) if os.path.isdir(shared) else None
  assert after == before  # nothing written to the shared temp folder


def test_webdataset_index_in_a_planted_symlink_is_refused(tmp_path, user_cache):
  paths = hd.write_webdataset(str(tmp_path / "shards"), 1, 3)
  (tmp_path / "attacker").mkdir()
  user_cache.mkdir(parents=True, mode=0o700)
  os.symlink(tmp_path / "attacker", user_cache / "wds_index")
  with pytest.raises(PermissionError, match=r"wds_index is a symlink .*: refused"):
    webdataset.WebDatasetReader(paths)
  with pytest.raises(PermissionError, match=r"attacker_link is a symlink"):
    os.symlink(tmp_path / "attacker", tmp_path / "attacker_link")
    webdataset.WebDatasetReader(paths, index_cache_dir=str(tmp_path / "attacker_link"))
  assert os.listdir(tmp_path / "attacker") == []


def test_verified_store_records_go_to_the_private_user_cache(tmp_path, user_cache):
  store = hs.write_store(tmp_path / "store", hs.fingerprint())
  features.load_stored_features(store)
  assert os.listdir(user_cache / "feature_stores") == ["verified.json"]
  assert _mode(user_cache) == _mode(user_cache / "feature_stores") == 0o700
  assert not (tmp_path / "home" / ".cache").exists()
  os.chmod(user_cache / "feature_stores", 0o777)  # now anyone could plant "verified" records
  with pytest.raises(PermissionError, match="feature_stores is writable by group or others"):
    features.load_stored_features(store)
  features.load_stored_features(store, verify="size")  # no cache used: nothing to refuse
