"""A local, in-memory Google Cloud Storage server for tests (``gcp-storage-emulator`` from PyPI).

``gcs_bucket`` (a pytest fixture, imported by the tests that use it) starts the emulator on a free
localhost port, points every client at it with the standard variables — ``STORAGE_EMULATOR_HOST``
(gcsfs, google-cloud-storage) and ``TENSORSTORE_GCS_HTTP_URL`` + ``GOOGLE_AUTH_TOKEN_FOR_TESTING``
(tensorstore, i.e. orbax's array writes) — in this process and in the subprocesses it starts, and
stops the server afterwards. It yields the bucket's URL, ``gs://<bucket>``.

One gap of the emulator is filled here (run as ``python tests/gcs_emulator.py start ...``): real
GCS sends an object's generation with its bytes (``x-goog-generation`` on ``alt=media`` reads);
the emulator does not, and tensorstore then records generation 0 for ranged reads of an OCDBT
manifest and fails the next read of it with "Malformed StorageGeneration" (seen on about one in
three orbax saves). :func:`_serve` adds the header before the server starts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from http import HTTPStatus

import pytest

from multihost import free_port

BUCKET = "align-jax-test"

# gcsfs picks its class (with or without the ~60 s gRPC bucket probe an emulator never answers)
# when it is first imported, which may be before a fixture sets the emulator's variables.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def emulator_env(port: int) -> dict[str, str]:
  """The variables that send gcsfs, google-cloud-storage and tensorstore to the emulator."""
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def running_emulator(bucket: str = BUCKET, timeout: float = 30.0):
  """Starts the emulator with ``bucket``; yields its port; stops it on exit."""
  port = free_port()
  process = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "start", "--host=127.0.0.1", f"--port={port}",
       "--in-memory", f"--default-bucket={bucket}", "--quiet"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + timeout
    while True:
      with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
          break
      if process.poll() is not None or time.time() > deadline:
        raise RuntimeError(f"GCS emulator did not start on port {port}")
      time.sleep(0.1)
    yield port
  finally:
    process.terminate()
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


@pytest.fixture
def gcs_bucket(monkeypatch):
  """``gs://<bucket>`` on a fresh in-memory emulator, with this process's clients pointed at it.

  The variables are also in ``os.environ``, so subprocesses (``main.py``) inherit them. gcsfs
  instances are cached per process: the cache is cleared so no client keeps an old endpoint.
  """
  with running_emulator() as port:
    for key, value in emulator_env(port).items():
      monkeypatch.setenv(key, value)
    _clear_client_caches()
    yield f"gs://{BUCKET}"
  _clear_client_caches()


def _clear_client_caches() -> None:
  from align_jax.run import storage  # pylint: disable=g-import-not-at-top
  storage.clear_cache()
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top
    gcsfs.GCSFileSystem.clear_instance_cache()
  except ImportError:  # pragma: no cover - gcsfs is in requirements.txt
    pass


def _serve(argv: list[str]) -> None:
  """The emulator's own ``main``, with object downloads that carry their generation like GCS."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    try:
      before = storage.get_file_obj(bucket, name)
    except Exception:  # pylint: disable=broad-except  (missing: the handler answers 404)
      before = None
    download(request, response, storage, *args, **kwargs)
    if before is None or response.status not in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      return
    try:
      after = storage.get_file_obj(bucket, name)
    except Exception:  # pylint: disable=broad-except
      after = None
    if after is None or after["generation"] != before["generation"]:  # replaced meanwhile
      response.status = HTTPStatus.SERVICE_UNAVAILABLE  # clients retry
      response.write_file(b"")
      return
    response["x-goog-generation"] = str(before["generation"])
    response["x-goog-metageneration"] = str(before.get("metageneration") or "1")

  objects.download = download_with_generation  # before the server module builds its routes
  from gcp_storage_emulator.__main__ import main  # pylint: disable=g-import-not-at-top
  main(argv)


if __name__ == "__main__":
  _serve(sys.argv[1:])
