"""Train projectors that align two frozen encoders.

    python main.py --config=configs/demo.py --workdir=/tmp/align_demo
    python main.py --config=configs/demo.py:steps=100 --config.batch_size=256 --workdir=...
    python main.py --mode=extract_features --config=configs/demo_online.py --workdir=/tmp/feats
    python main.py --mode=evaluate --config=configs/demo.py --workdir=/tmp/align_demo
    python main.py ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I  # per host

``--config`` is a Python file with ``get_config(arg)`` (the text after ``:`` selects a variant);
``--config.key=value`` overrides any key, and an unknown key is rejected. Running the same command
again resumes from the workdir's latest checkpoint. All logic lives in ``align_jax.train``.
"""

import logging
import re
import sys

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from align_jax import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics.jsonl and TensorBoard.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "extract_features"],
                  "train: train (or resume) in --workdir. evaluate: run config.evals on the "
                  "workdir's latest (or --step) checkpoint, writing WORKDIR/eval_results.json. "
                  "extract_features: run the frozen encoders over config.data once and write a "
                  "feature store to --workdir.")
flags.DEFINE_integer("step", None, "--mode=evaluate: the checkpoint step (default: latest).")
distributed.define_flags()  # --distributed, --coordinator_address, --num_processes, --process_id
flags.adopt_module_key_flags(distributed)  # ... listed by --help with main.py's own
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's flag parsing, with config errors (unknown key, bad variant) as one clear message."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as error:
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(error, (AttributeError, KeyError)):  # --config.<unknown key>=...
      key = re.search(r"[\w.]+", text)
      suggestion = re.search(r'Did you mean "([^"]+)"', text)
      message = f"unknown config key {key.group(0) if key else text!r}" + (
          f"; did you mean {suggestion.group(1)!r}?" if suggestion else "")
    else:  # config_flags wraps errors from get_config() in a traceback: keep the last line.
      message = lines[-1] if "Traceback" in text else " ".join(lines)
    sys.exit(f"error: {message}\n(see --helpfull, and the keys in "
             "align_jax/config.py:default_config)")


def load_config():
  """The parsed config; a config file that failed to load exits with its own error line."""
  config = FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):
    try:
      config.lock()  # config_flags' error placeholder raises the stored load error on any use
    except Exception as error:  # pylint: disable=broad-except
      lines = [line.strip() for line in str(error).splitlines() if line.strip()]
      sys.exit(f"error: could not load --config: {' '.join(lines[-2:])}")
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                      stream=sys.stdout, force=True)
  logging.getLogger("align_jax").setLevel(logging.INFO)  # orbax and absl stay at WARNING
  distributed.initialize_or_exit()  # multi-process runs: before jax starts its backends
  from align_jax import train
  config = load_config()
  logging.getLogger("align_jax").info("config:\n%s", config)
  try:
    if FLAGS.mode == "extract_features":
      from align_jax import feature_store
      feature_store.extract_features(config, FLAGS.workdir)
    elif FLAGS.mode == "evaluate":
      from align_jax.evaluate import standalone
      standalone.evaluate_checkpoint(config, FLAGS.workdir, step=FLAGS.step)
    else:
      train.train_and_evaluate(config, FLAGS.workdir)
  except (ValueError, OSError, FloatingPointError) as error:
    sys.exit(f"error: {error}")  # config, input and divergence errors: one line, no traceback


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
