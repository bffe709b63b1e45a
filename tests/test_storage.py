"""align_jax.run.storage: the same answers for local paths and gs:// URLs (against the GCS emulator).

Every function is checked on a local folder and on the in-memory emulator with the same
expectations, so a run directory behaves the same wherever it lives; plus the one-line, bounded
errors for a missing bucket, a dead endpoint and no emulator at all (no network here).
"""

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from align_jax.run import storage

from gcs_emulator import gcs_bucket  # noqa: F401  (pytest fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _round_trips(root: str) -> None:
  """The checks both backends must pass, under the folder ``root`` (which does not exist yet)."""
  assert not storage.exists(root) and storage.listdir(root) == []
  run = storage.join(root, "run")
  storage.makedirs(run)
  storage.write_text(storage.join(run, "config.json"), '{"a": 1}')
  storage.write_bytes(storage.join(run, "sub", "blob.bin"), bytes(range(256)) * 4)
  assert storage.read_text(storage.join(run, "config.json")) == '{"a": 1}'
  assert storage.read_bytes(storage.join(run, "sub", "blob.bin")) == bytes(range(256)) * 4
  assert storage.isfile(storage.join(run, "config.json"))
  assert not storage.isdir(storage.join(run, "config.json"))
  assert storage.isdir(storage.join(run, "sub")) and not storage.isfile(storage.join(run, "sub"))
  assert storage.listdir(run) == ["config.json", "sub"]
  assert storage.size(storage.join(run, "sub", "blob.bin")) == 1024

  # replacing a file: whole new content, no staging files left behind, a new version string
  before = storage.version(storage.join(run, "config.json"))
  time.sleep(0.01)
  storage.write_text(storage.join(run, "config.json"), '{"a": 22}')
  assert storage.read_text(storage.join(run, "config.json")) == '{"a": 22}'
  assert storage.version(storage.join(run, "config.json")) != before
  assert storage.listdir(run) == ["config.json", "sub"]

  # ranged reads (webdataset members), one short at the end of the file
  spans = [(0, 4), (300, 2), (1020, 10)]
  assert storage.read_ranges(storage.join(run, "sub", "blob.bin"), spans) == [
      bytes([0, 1, 2, 3]), bytes([44, 45]), bytes([252, 253, 254, 255])]

  # streams: a text read with newline control, a seekable binary read
  storage.write_text(storage.join(run, "rows.csv"), "image,caption\r\na.jpg,x\r\n")
  with storage.open_file(storage.join(run, "rows.csv"), "r", newline="", encoding="utf-8") as f:
    assert f.read() == "image,caption\r\na.jpg,x\r\n"
  with storage.open_file(storage.join(run, "sub", "blob.bin"), "rb") as f:
    f.seek(510)
    assert f.read(2) == bytes([254, 255])
  with storage.open_file(storage.join(run, "new.txt"), "w") as f:
    f.write("written by a stream")
  assert storage.read_text(storage.join(run, "new.txt")) == "written by a stream"

  assert storage.glob(storage.join(run, "*.json")) == [storage.join(run, "config.json")]
  assert storage.glob(storage.join(run, "sub", "*.bin")) == [storage.join(run, "sub", "blob.bin")]

  missing = storage.join(run, "nothing.json")
  with pytest.raises(FileNotFoundError, match="nothing.json"):
    storage.read_bytes(missing)
  assert not storage.exists(missing) and not storage.isfile(missing)
  with pytest.raises(FileNotFoundError):
    storage.version(missing)
  assert len(set(storage.versions([storage.join(run, "config.json"),
                                   storage.join(run, "rows.csv")]))) == 2

  storage.rename(storage.join(run, "sub"), storage.join(run, "moved"))
  assert storage.listdir(run) == ["config.json", "moved", "new.txt", "rows.csv"]
  assert storage.read_bytes(storage.join(run, "moved", "blob.bin"))[:3] == bytes([0, 1, 2])
  storage.remove(storage.join(run, "moved"))
  storage.remove(storage.join(run, "moved"))  # missing: not an error
  storage.remove(storage.join(run, "new.txt"))
  assert storage.listdir(run) == ["config.json", "rows.csv"]
  storage.check_writable(storage.join(root, "fresh"))
  assert storage.listdir(storage.join(root, "fresh")) == []  # the probe object is gone


def test_local_round_trips(tmp_path):
  _round_trips(str(tmp_path / "root"))


def test_gcs_round_trips(gcs_bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _round_trips(f"{gcs_bucket}/root")
  with pytest.raises(storage.StorageError, match="cannot append to gs://.*no append"):
    storage.open_file(f"{gcs_bucket}/root/run/config.json", "a")
  assert os.listdir(tmp_path) == []  # nothing under a local folder named gs:


def test_path_helpers():
  assert storage.join("gs://b/run", "checkpoints", "10") == "gs://b/run/checkpoints/10"
  assert storage.join("gs://b/run/", "x") == "gs://b/run/x"
  assert storage.dirname("gs://b/data/train.jsonl") == "gs://b/data"
  assert storage.dirname("rel/train.jsonl") == os.path.join(os.getcwd(), "rel")
  assert storage.normalize("gs://b/run") == "gs://b/run"
  assert storage.normalize("run") == os.path.join(os.getcwd(), "run")
  assert storage.normalize("file:///tmp/x") == "/tmp/x"
  assert storage.is_url("gs://b") and not storage.is_url("/tmp/gs:/b") and not storage.is_url(
      "file:///tmp")
  assert storage.is_absolute("gs://b/x.jpg") and storage.is_absolute("/x.jpg")
  assert not storage.is_absolute("images/x.jpg")
  assert storage.extension("gs://b/d.x/Train.JSONL") == ".jsonl"
  assert storage.extension("/d.x/noext") == ""


def test_local_files_get_the_mode_open_gives(tmp_path):
  old = os.umask(0o022)
  try:
    storage.write_bytes(str(tmp_path / "a.bin"), b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o644  # not mkstemp's 0600
    os.umask(0o077)
    storage.write_bytes(str(tmp_path / "b.bin"), b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "b.bin").st_mode) == 0o600  # the umask asked for it
  finally:
    os.umask(old)
  assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"]


def test_unknown_protocol_is_one_line():
  with pytest.raises(storage.StorageError, match="cannot open nosuchproto:// paths"):
    storage.exists("nosuchproto://x/y")


def test_missing_bucket_fails_fast_with_the_url(gcs_bucket):
  start = time.time()
  with pytest.raises(storage.StorageError) as error:
    storage.check_writable("gs://no-such-bucket-xyz/run")
  assert time.time() - start < 15
  message = str(error.value)
  assert message.startswith("cannot write gs://no-such-bucket-xyz/run: bucket 'no-such-bucket-xyz'"
                            " does not exist") and "\n" not in message


def test_dead_endpoint_fails_fast_with_the_url(gcs_bucket, monkeypatch):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  storage.clear_cache()
  start = time.time()
  with pytest.raises(storage.StorageError, match=rf"cannot write gs://align-jax-test/run: cannot "
                     rf"connect to 127.0.0.1:{port} .*STORAGE_EMULATOR_HOST"):
    storage.check_writable("gs://align-jax-test/run")
  assert time.time() - start < 5


def test_endpoint_that_never_answers_fails_after_the_timeout(monkeypatch):
  with socket.socket() as server:  # accepts connections (kernel backlog), never replies
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.getsockname()[1]}")
    storage.clear_cache()
    start = time.time()
    try:
      with pytest.raises(storage.StorageError, match=r"^cannot write gs://align-jax-test/run: no "
                         r"answer within 2 s; check the bucket's permissions"):
        storage.check_writable("gs://align-jax-test/run", timeout=2)
    finally:
      storage.clear_cache()
  assert time.time() - start < 10


def test_no_emulator_no_credentials_fails_in_one_line(tmp_path):
  """Real GCS endpoint, no credentials (and no network here): one line, bounded in time."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS",
                      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
  env["PYTHONPATH"] = REPO
  code = ("import sys\nfrom align_jax.run import storage\ntry:\n"
          "  storage.check_writable('gs://align-jax-no-such-bucket-7f3a/run')\n"
          "except storage.StorageError as e:\n  sys.exit(f'error: {e}')\n")
  start = time.time()
  done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=120)
  elapsed = time.time() - start
  assert done.returncode == 1 and elapsed < 60, (elapsed, done.stderr[-2000:])
  lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(
      "error: cannot write gs://align-jax-no-such-bucket-7f3a/run: "), lines
  assert os.listdir(tmp_path) == []


def _fill_disk(monkeypatch, folder):
  """Every file written under ``folder`` goes to /dev/full: each write fails with ENOSPC, as on a
  full disk (``open`` and ``tempfile.mkstemp``, the two ways files are created)."""
  import builtins
  import tempfile
  real_open, real_mkstemp = builtins.open, tempfile.mkstemp
  inside = lambda p: os.path.abspath(os.fspath(p)).startswith(str(folder))

  def full_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and inside(file) and set(mode) & set("wax"):
      real_open(file, mode, *args, **kwargs).close()  # the inode is made; its data is not
      return real_open("/dev/full", mode.replace("x", "w").replace("a", "w"), *args, **kwargs)
    return real_open(file, mode, *args, **kwargs)

  def full_mkstemp(*args, **kwargs):
    handle, path = real_mkstemp(*args, **kwargs)
    if inside(path):
      os.close(handle)
      handle = os.open("/dev/full", os.O_WRONLY)
    return handle, path

  monkeypatch.setattr(builtins, "open", full_open)
  monkeypatch.setattr(tempfile, "mkstemp", full_mkstemp)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_names_the_path_and_the_fix(tmp_path, monkeypatch):
  run = tmp_path / "run"
  run.mkdir()
  _fill_disk(monkeypatch, run)
  with pytest.raises(storage.StorageError) as error:
    storage.write_text(str(run / "config.json"), "{}")
  assert str(error.value) == (
      f"cannot write {run / 'config.json'}: no space left on device (ENOSPC); free space on the "
      f"disk that holds {run} (df -h {run} shows it), or write to another folder (e.g. another "
      "--workdir)")
  assert os.listdir(run) == []  # no staging file left behind
  with pytest.raises(storage.StorageError) as error:  # the check every run makes first
    storage.check_writable(str(run))
  assert str(error.value) == (
      f"cannot write {run}: no space left on device (ENOSPC); free space on the disk that holds "
      f"{run} (df -h {run} shows it), or write to another folder (e.g. another --workdir)")
  assert os.listdir(run) == []  # the probe is gone


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_run_on_a_full_disk_stops_before_the_build_naming_the_workdir(tmp_path, monkeypatch,
                                                                        devices):
  from align_jax.train import loop as train
  from train_utils import tiny_config
  run = tmp_path / "run"
  run.mkdir()
  _fill_disk(monkeypatch, run)
  built, build = [], train.build_trainer
  monkeypatch.setattr(train, "build_trainer", lambda *a, **k: built.append(1) or build(*a, **k))
  with pytest.raises(OSError, match=rf"^cannot write {run}: no space left on device \(ENOSPC\); "
                                    rf"free space on the disk that holds {run} "):
    train.train_and_evaluate(tiny_config(), str(run))
  assert not built
