"""Commands of align_jax.cli run in the test's process, as a shell would run them, but cheaper.

Every command defines its absl flags into the process-wide ``absl.flags.FLAGS`` when it starts
(one command per process, in real use). :func:`run_command` runs one command, then removes the
flags it defined and puts back what it changed for the process (the root logger's handlers and
level, align_jax's logger level, ``sys.argv``), so the next command (another test) starts as in
a fresh process.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from absl import app, flags


def run_command(command, args: Sequence[str]):
  """``command.run(args)`` (``command``: a module of :mod:`align_jax.cli`, or a callable taking
  ``args``); returns its exit status (SystemExit's code: None or 0 for success, an ``error: ...``
  string for a one-line error)."""
  app.define_help_flags()  # absl's own flags (these, and app's at import) stay: not the command's
  before = set(flags.FLAGS)
  root, ours = logging.getLogger(), logging.getLogger("align_jax")
  handlers, level, our_level, saved_argv = root.handlers[:], root.level, ours.level, sys.argv
  run = command.run if hasattr(command, "run") else command
  try:
    run(list(args))
  except SystemExit as stop:
    return stop.code
  finally:
    sys.argv = saved_argv
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)
  raise AssertionError(f"{command} returned instead of exiting")
