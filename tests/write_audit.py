"""``python tests/write_audit.py RECORD main.py ARGS...``: runs main.py, recording written files.

A Python audit hook (``sys.addaudithook``) sees every ``open`` made from Python (``open()``,
``io.open``, ``os.open``) and appends the absolute path of each one opened for writing to
RECORD, one per line. The multi-host tests use it to check that only process 0 writes
``metrics.jsonl``, ``config.json`` and TensorBoard events. (Checkpoint shards are written by
tensorstore in C++, outside the hook; the tests look at their files instead.)
"""

import os
import runpy
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install(record: str) -> None:
  seen = set()
  sink = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

  def hook(event, args):
    if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
      return
    path, mode, flags = args[0], args[1], args[2]
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
        isinstance(flags, int) and flags & _WRITE_FLAGS)
    if not writing:
      return
    path = os.path.abspath(os.fsdecode(path))
    if path not in seen and path != record:
      seen.add(path)
      os.write(sink, (path + "\n").encode())

  sys.addaudithook(hook)


if __name__ == "__main__":
  _install(os.path.abspath(sys.argv[1]))
  script = sys.argv[2]
  sys.argv = sys.argv[2:]
  sys.path[0] = os.path.dirname(os.path.abspath(script))
  runpy.run_path(script, run_name="__main__")
