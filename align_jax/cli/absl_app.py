"""The absl runner every command shares: flags defined, ``--help`` answered, then ``main``.

Every command of ``align-jax`` (and ``python main.py``, ``python -m align_jax.cli.COMMAND``) parses
its flags with absl, as big_vision and MaxText do. :func:`run_absl` adds what absl's ``app.run``
lacks for a command line with several commands: ``--help`` (``-h``, ``-?``, ``--helpshort``,
``--helpfull``) prints ``usage: PROGRAM ...``, the command module's docstring and its flags, and
exits 0 (absl's own help names ``__main__``'s docstring, which under ``align-jax`` is the
dispatcher's, and exits 1); a command can be run again in one process (tests), its flags starting
from their defaults each time.

This module imports no other command module (each command imports it).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

# absl's help flags (with one or two dashes), and -h as argparse and most tools spell it.
HELP_FLAGS = ("help", "helpshort", "helpfull")


def list_flags_in_help(module_name: str) -> None:
  """Makes absl's help list the flags ``module_name`` defines (and adopted).

  absl lists the key flags of the module named by ``sys.argv[0]``: the module itself under
  ``python -m``, but ``main.py`` or ``align-jax`` when a command line defined in a module is
  started from another file.
  """
  from absl import flags
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def help_asked(args: Sequence[str]) -> str | None:
  """``"short"`` / ``"full"`` when ``args`` (before a ``--``) ask for help; else None."""
  for arg in args:
    if arg == "--":
      break
    name = arg.lstrip("-")
    if arg in ("-h", "-?") or (arg.startswith("-") and name in HELP_FLAGS):
      return "full" if name == "helpfull" else "short"
  return None


def program_name(program: str) -> str:
  """How the user started the command: ``align-jax NAME`` when the dispatcher set it, else
  ``program`` (``python -m align_jax.cli.NAME``, ``python main.py``)."""
  return sys.argv[0] if sys.argv[0].startswith("align-jax") else program


def print_help(module_name: str, program: str, arguments: str, full: bool) -> None:
  """``usage: PROGRAM ARGUMENTS``, the command module's docstring and its flags, on stdout."""
  from absl import flags
  doc = (sys.modules[module_name].__doc__ or "").strip("\n")
  text = flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()
  more = "" if full else "Try --helpfull to get a list of all flags.\n"
  try:
    sys.stdout.write(f"usage: {program_name(program)} {arguments}\n\n{doc}\n\n"
                     f"flags:\n{text}\n\n{more}")
    sys.stdout.flush()
  except BrokenPipeError:  # `--help | head`: the reader has what it wanted (Python's recipe)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def no_arguments(argv: Sequence[str]) -> None:
  """A command that takes flags only: anything else on the line stops it with one line."""
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {list(argv[1:])}: this command takes flags "
                     "only (see --help)")


def use_plain_logging(log_messages: bool, log_format: str) -> None:
  """Warnings and errors of every library as ``log_format`` lines on stderr, and align_jax's INFO
  lines too with ``log_messages``.

  absl's ``app.run`` puts its own handler on the root logger, which prints every library's INFO
  lines (orbax's, for each checkpoint call). It is taken off, not closed: its stream is the one
  the process started with. A process that set up logging itself (a notebook, the tests) keeps
  its handlers.
  """
  from absl import logging as absl_logging
  root = logging.getLogger()
  root.removeHandler(absl_logging.get_absl_handler())
  if not root.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(log_format))
    root.addHandler(handler)
  root.setLevel(logging.WARNING)
  if log_messages:
    logging.getLogger("align_jax").setLevel(logging.INFO)


def run_absl(main: Callable, module_name: str, *, program: str,
             define_flags: Callable | None = None, flags_parser: Callable | None = None,
             argv: Sequence[str] | None = None, arguments: str = "[flags]",
             log_messages: bool = False, log_format: str = "%(message)s") -> None:
  """A command's entry point: defines its flags, answers ``--help``, runs ``main`` (absl).

  Args:
    main: absl's ``main(argv)``; what it returns is the exit status.
    module_name: the command module (its docstring is the help text; its flags are listed).
    program: how the command is started without the dispatcher (``python -m
      align_jax.cli.export``), for the usage line.
    define_flags: defines the command's flags (unless the module's flags are defined already).
    flags_parser: absl's ``flags_parser`` (default: absl's own).
    argv: the arguments after the program name (default: ``sys.argv[1:]``).
    arguments: the usage line after the program (``WORKDIR [flags]``).
    log_messages: align_jax's INFO lines too (progress), not only warnings and errors.
    log_format: of the log lines (:func:`use_plain_logging`).

  Raises:
    SystemExit: always, as ``absl.app.run`` does (status 0 after ``--help``).
  """
  from absl import app, flags
  defined = flags.FLAGS.get_flags_for_module(sys.argv[0] if module_name == "__main__"
                                             else module_name)
  if define_flags is not None and not defined:
    define_flags()
  list_flags_in_help(module_name)
  args = list(sys.argv[1:] if argv is None else argv)
  asked = help_asked(args)
  if asked:
    print_help(module_name, program, arguments, asked == "full")
    sys.exit(0)
  if flags.FLAGS.is_parsed():  # run again in this process: every flag from its default
    flags.FLAGS.unparse_flags()

  def main_then_finish(parsed):
    use_plain_logging(log_messages, log_format)
    result = main(parsed)
    from align_jax.parallel import peer_watch
    peer_watch.finish()  # multi-process: the others stop watching this process, which ends well
    return result

  app.run(main_then_finish, argv=[sys.argv[0], *args],
          **({"flags_parser": flags_parser} if flags_parser else {}))
