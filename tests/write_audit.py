"""``python tests/write_audit.py RECORD main.py ARGS...``: runs main.py, recording opened files.

A Python audit hook (``sys.addaudithook``) sees every ``open`` made from Python (``open()``,
``io.open``, ``os.open``, from any thread) and appends to RECORD ``w PATH`` (absolute) the first
time a file is opened for writing or is the target of ``os.rename`` / ``os.replace`` (atomic
writes go through a temporary file), and ``r PATH`` every time a file under
``$ALIGN_JAX_AUDIT_READS`` (a folder) is opened for reading, in order. The multi-host tests use it
to check that only process 0 writes ``metrics.jsonl``, ``config.json`` and TensorBoard events,
and which image files each process's input pipeline read. (Checkpoint shards are written by
tensorstore in C++, outside the hook; the tests look at their files instead.)
"""

import os
import runpy
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install(record: str) -> None:
  seen = set()
  sink = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  reads_under = os.environ.get("ALIGN_JAX_AUDIT_READS", "")
  reads_under = os.path.join(os.path.abspath(reads_under), "") if reads_under else None

  def hook(event, args):
    if event == "os.rename" and len(args) >= 2:  # os.rename / os.replace: the target is written
      target = os.path.abspath(os.fsdecode(args[1]))
      if target not in seen:
        seen.add(target)
        os.write(sink, f"w {target}\n".encode())
      return
    if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
      return
    path, mode, flags = args[0], args[1], args[2]
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
        isinstance(flags, int) and flags & _WRITE_FLAGS)
    path = os.path.abspath(os.fsdecode(path))
    if not writing:
      if reads_under and path.startswith(reads_under):
        os.write(sink, f"r {path}\n".encode())
    elif path not in seen and path != record:
      seen.add(path)
      os.write(sink, f"w {path}\n".encode())

  sys.addaudithook(hook)


def run_wrapped(install) -> None:
  """``python WRAPPER RECORD SCRIPT ARGS...``: ``install(RECORD)``, then runs SCRIPT as
  ``__main__`` with ARGS (shared by this audit and tests/collective_audit.py)."""
  install(os.path.abspath(sys.argv[1]))
  script = sys.argv[2]
  sys.argv = sys.argv[2:]
  sys.path[0] = os.path.dirname(os.path.abspath(script))
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  run_wrapped(_install)
