"""The training command line: ``python main.py`` and ``align-jax train|evaluate|extract_features``.

    python main.py --config=configs/demo.py --workdir=/tmp/align_demo
    python main.py --config=configs/demo.py:steps=100 --config.batch_size=256 --workdir=...
    python main.py --mode=extract_features --config=configs/demo_online.py --workdir=/tmp/feats
    python main.py --mode=evaluate --config=configs/demo.py --workdir=/tmp/align_demo
    python main.py ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I  # per host
    align-jax train --config=configs/demo.py --workdir=/tmp/align_demo   # the same, once installed

``--config`` is a Python file with ``get_config(arg)`` (the text after ``:`` selects a variant), or
the name of a packaged one (``--config=demo``, ``--config=dinov2_roberta:batch=32768``;
:mod:`align_jax.config.files`); ``--config.key=value`` overrides any key, and an unknown key is
rejected. The console shows one line of the config's key settings (``--print_config``: all of it). Running the same command
again resumes from the workdir's latest checkpoint. This module parses flags and turns errors into
one line; all training logic lives in :mod:`align_jax.train.loop`.
"""

import logging
import os
import re
import sys
import traceback

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from align_jax.cli import absl_app
from align_jax.config import errors as config_errors
from align_jax.config import files as config_files
from align_jax.config import schema as config_schema
from align_jax.parallel import processes as distributed

FLAGS = flags.FLAGS
PROGRAM = "python main.py"


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Training config: a .py file, or a packaged config's name (demo, "
      "demo_online, dinov2_roberta, dinov2_llm), then optionally :variant.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics.jsonl and TensorBoard.")
  flags.DEFINE_enum("mode", "train", ["train", "evaluate", "extract_features"],
                    "train: train (or resume) in --workdir. evaluate: run config.evals on the "
                    "workdir's latest (or --step) checkpoint, writing WORKDIR/eval_results.json. "
                    "extract_features: run the frozen encoders over config.data once and write a "
                    "feature store to --workdir.")
  flags.DEFINE_integer("step", None, "--mode=evaluate: the checkpoint step (default: latest).")
  flags.DEFINE_bool("print_config", False, "Print the whole config (default: one line of its key "
                    "settings; the whole config is in WORKDIR/config.json).")
  distributed.define_flags()  # --distributed, --coordinator_address, --num_processes, --process_id
  flags.adopt_module_key_flags(distributed)  # ... listed by --help with main.py's own
  flags.mark_flags_as_required(["config", "workdir"])


def _config_file_line(error: BaseException, config_file: str | None) -> int | None:
  """The line of ``config_file`` where ``error`` was raised (the traceback's innermost entry in
  that file), or None when it was raised elsewhere."""
  if not config_file:
    return None
  entries = [entry for entry in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(entry.filename) == os.path.abspath(config_file)]
  return entries[-1].lineno if entries else None


def _config_file(argv) -> str | None:
  """The config file ``--config=FILE[:variant]`` names (names already resolved to paths)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):].partition(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].partition(":")[0]
  return None


def _unknown_key_error(error: BaseException, argv) -> str | None:
  """The one line for an AttributeError / KeyError of flag parsing that is an unknown key, or None.

  Either ``--config.<key>=...`` names a key the schema lacks (found by comparing each override
  with the schema), or the config file reads one (``x = config.optim.lr``): its ``file:line`` and
  dotted path come from the file's source (:func:`align_jax.config.errors.read_key_path`). A key
  the file *sets* does not raise here: the file is loaded unlocked and compared with the schema
  after parsing (:func:`parse_flags`).
  """
  for arg in argv[1:]:
    match = re.match(r"--config\.([\w.]+)", arg)
    if match and not config_schema.key_exists(match.group(1)):
      return config_errors.unknown_key_message([match.group(1)])
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  quoted = re.search(r"""Key ["']([^"']+)["']|^["']+([^"']+)["']+$""", text.strip())
  leaf = next((g for g in quoted.groups() if g), None) if quoted else None
  if leaf is None:
    return None
  file = _config_file(argv)
  if file and _config_file_line(error, file) is not None:
    return config_errors.unknown_key_message([config_errors.read_key_path(file, leaf)], file)
  return config_errors.unknown_key_message([leaf])


def resolve_config_names(argv: list[str]) -> list[str]:
  """``argv`` with a packaged config's name in ``--config=NAME[:variant]`` (or ``--config NAME``)
  replaced by its file's path (:func:`align_jax.config.files.resolve`); ValueError if neither."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + config_files.resolve(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = config_files.resolve(out[i + 1])
  return out


def parse_flags(argv):
  """absl's flag parsing, with config errors (unknown key, bad file, bad variant) as one line.

  The config file is loaded unlocked (:func:`align_jax.config.schema.built_unlocked`), then its
  keys are compared with the schema: an unknown one is named by its full dotted path and the
  file's line, found in the file's source (:mod:`align_jax.config.errors`); then it is locked as
  the schema is.
  """
  try:
    argv = resolve_config_names(argv)
  except ValueError as error:
    sys.exit(f"error: {error}")
  try:
    with config_schema.built_unlocked():
      rest = FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except
    sys.exit(f"error: {_flag_error_message(error, argv)}\n" + _SEE_KEYS)
  config = FLAGS.config
  if isinstance(config, ml_collections.ConfigDict):
    unknown = config_schema.unknown_keys(config)
    if unknown:
      sys.exit(f"error: {config_errors.unknown_key_message(unknown, _config_file(argv))}\n"
               + _SEE_KEYS)
    config_schema.lock(config)
  return rest


_SEE_KEYS = "(see --helpfull, and the keys in align_jax/config/schema.py:default_config)"


def _flag_error_message(error: BaseException, argv) -> str:
  """One line for an error of absl's flag parsing or of running the config file."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if isinstance(error, (AttributeError, KeyError)):
    message = _unknown_key_error(error, argv)
    if message is not None:
      return message
  file = _config_file(argv)
  line = _config_file_line(error, file)
  if isinstance(error, SyntaxError):
    return f"could not load --config: {error.filename}:{error.lineno}: SyntaxError: {error.msg}"
  if isinstance(error, flags.Error) or line is None:
    # config_flags wraps errors from get_config() in a traceback: keep the last line.
    return lines[-1] if "Traceback" in text else " ".join(lines)
  return f"could not load --config: {file}:{line}: {type(error).__name__}: {' '.join(lines)}"


def load_config():
  """The parsed, checked config; a config file that failed to load exits with its own error line."""
  config = FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):
    try:
      config.lock()  # config_flags' error placeholder raises the stored load error on any use
    except Exception as error:  # pylint: disable=broad-except
      lines = [line.strip() for line in str(error).splitlines() if line.strip()]
      sys.exit(f"error: could not load --config: {' '.join(lines[-2:])}")
  from align_jax.train import validation
  try:
    validation.check_choices(config)  # e.g. --config.data.source=bogus, before anything is built
  except ValueError as error:
    sys.exit(f"error: {error}")
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                      stream=sys.stdout, force=True)
  logging.getLogger("align_jax").setLevel(logging.INFO)  # orbax and absl stay at WARNING
  config = load_config()
  # Multi-process runs: before jax starts its backends; every process checks that the others run
  # this same config, mode and workdir.
  distributed.initialize_or_exit(identity=distributed.command_identity(
      FLAGS.workdir, config.to_json_best_effort(sort_keys=True), FLAGS.mode))
  import jax
  if jax.process_index() != 0:  # info lines once, from process 0; warnings and errors from all
    logging.getLogger("align_jax").setLevel(logging.WARNING)
  from align_jax.parallel import peer_watch
  from align_jax.run import metrics as reporting, reader as run_dir, storage
  from align_jax.train import loop as train
  logger = logging.getLogger("align_jax")
  from align_jax.train import compilation_cache
  compilation_cache.enable(config.get("compilation_cache_dir", ""))  # every mode, first compile
  try:
    complete = False
    if FLAGS.mode == "train":  # a complete run says so in one line, before any config output
      storage.check_writable(FLAGS.workdir)
      complete = train.finished_step(config, FLAGS.workdir) is not None
    if not complete:
      full = (storage.join(FLAGS.workdir, run_dir.CONFIG_FILE) if FLAGS.mode == "train"
              else None)  # written by training; evaluate and extract_features read or keep theirs
      logger.info("%s", reporting.config_summary(config, full) + (
          "" if FLAGS.print_config else " (--print_config prints it all)"))
      if FLAGS.print_config:
        logger.info("config:\n%s", config)
    if FLAGS.mode == "extract_features":
      from align_jax.train import extract as feature_store
      feature_store.extract_features(config, FLAGS.workdir)
    elif FLAGS.mode == "evaluate":
      from align_jax.evaluate import standalone
      standalone.evaluate_checkpoint(config, FLAGS.workdir, step=FLAGS.step)
      logger.info("wrote %s", storage.join(FLAGS.workdir, standalone.RESULTS_FILE))
    else:
      train.train_and_evaluate(config, FLAGS.workdir)
  except (ValueError, OSError, FloatingPointError) as error:
    peer_watch.fail(str(error))  # the other processes stop too, naming this error
    sys.exit(f"error: {error}")  # config, input and divergence errors: one line, no traceback
  except Exception as error:  # pylint: disable=broad-except
    peer_watch.explain(error)  # a lost peer broke a collective: one line, exit
    raise


def run(argv: list[str] | None = None) -> None:
  """Entry point: parses ``argv`` (default: ``sys.argv[1:]``; absl flags) and runs :func:`main`."""
  absl_app.run_absl(main, __name__, program=PROGRAM, define_flags=define_flags,
                    flags_parser=parse_flags, argv=argv)


if __name__ == "__main__":
  run()
