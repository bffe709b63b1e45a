"""The absl runner every absl command shares: flags defined, listed in ``--help``, then ``main``."""

from __future__ import annotations

import logging
import sys
from typing import Callable


def list_flags_in_help(module_name: str) -> None:
  """Makes absl's ``--help`` list the flags ``module_name`` defines (and adopted).

  absl lists the key flags of the module named by ``sys.argv[0]``: the module itself under
  ``python -m``, but ``main.py`` or ``align-jax`` when a command line defined in a module is
  started from another file. Called by each absl command's ``run()``.
  """
  from absl import flags
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run_absl(main: Callable, module_name: str, *, define_flags: Callable | None = None,
             flags_parser: Callable | None = None, log_messages: bool = False) -> None:
  """An absl command's ``run()``: defines its flags, lists them in ``--help``, runs ``main``.

  ``log_messages``: INFO log lines as bare messages (the analysis commands' progress output).
  """
  from absl import app
  if define_flags is not None:
    define_flags()
  list_flags_in_help(module_name)
  if log_messages:
    logging.basicConfig(level=logging.INFO, format="%(message)s")

  def main_then_finish(argv):
    result = main(argv)
    from align_jax.parallel import peer_watch
    peer_watch.finish()  # multi-process: the others stop watching this process, which ends well
    return result

  try:
    app.run(main_then_finish, **({"flags_parser": flags_parser} if flags_parser else {}))
  except SystemExit as stop:  # absl ends --help with status 1; help asked for is a success
    if stop.code == 1 and set(sys.argv[1:]) & {"--help", "-?", "--helpshort", "--helpfull"}:
      sys.exit(0)
    raise
