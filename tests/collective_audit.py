"""``python tests/collective_audit.py RECORD main.py ARGS...``: runs main.py, recording which
thread starts each host-side collective.

jax's host-side collectives (``multihost_utils.sync_global_devices``, ``process_allgather``,
``broadcast_one_to_all``) are jitted programs with collectives over every device. Every process
must launch such programs in the same order, so align_jax launches them from the main thread
only (README, "Running on a pod"). This wrapper appends ``THREAD NAME`` to RECORD for each call,
from whichever module calls it (align_jax, orbax), so a multi-process test can check the rule.
"""

import os
import threading


def _install(record: str) -> None:
  from jax.experimental import multihost_utils
  sink = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

  def recorded(name, fn):
    def wrapper(*args, **kwargs):
      os.write(sink, f"{threading.current_thread().name} {name}\n".encode())
      return fn(*args, **kwargs)
    return wrapper

  for name in ("sync_global_devices", "process_allgather", "broadcast_one_to_all"):
    setattr(multihost_utils, name, recorded(name, getattr(multihost_utils, name)))


if __name__ == "__main__":
  import write_audit  # beside this file: sys.path[0]
  write_audit.run_wrapped(_install)
