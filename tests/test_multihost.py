"""The real main.py as 2 processes x 4 CPU devices equals 1 process x 8 devices.

Each case starts ``main.py`` as two JAX processes on a free localhost port (tests/multihost.py),
and once as a single process with all eight devices, and compares what the runs wrote.
"""

import glob
import os
import re

import numpy as np
import pytest

import multihost
import multihost_config
from train_utils import apply_overrides

DEMO_VARIANT = "steps=40"
DEMO_OVERRIDES = {"batch_size": 64, "log_every": 1, "eval_every": 40, "eval_at_start": False,
                  "data.num_pairs": 4096, "checkpoint_every": 40}
DEMO = [f"--config=configs/demo.py:{DEMO_VARIANT}",
        *(f"--config.{key}={value}" for key, value in DEMO_OVERRIDES.items())]
TIMEOUT = 240  # seconds for one run, on a loaded 2-core machine


def _train_in_this_process(workdir):
  """The 1 process x 8 devices reference: what main.py does with DEMO, in the test process."""
  from align_jax.train import loop as train
  from configs import demo
  config = demo.get_config(DEMO_VARIANT)
  apply_overrides(config, DEMO_OVERRIDES)
  train.train_and_evaluate(config, str(workdir))


def _final_params(workdir):
  """The latest checkpoint's params, read onto this process's device whatever mesh saved them."""
  from align_jax.run import reader as run_dir
  return run_dir.restore_params(str(workdir))[0]


def _assert_params_close(expected, got, atol=1e-6):
  import jax
  flat_expected, flat_got = jax.tree.leaves(expected), jax.tree.leaves(got)
  assert len(flat_expected) == len(flat_got)
  for a, b in zip(flat_expected, flat_got):
    np.testing.assert_allclose(b, a, rtol=0, atol=atol)


def _assert_writers(workdir, group):
  """Only process 0 writes metrics, config and TensorBoard; each writes its checkpoint shards."""
  workdir = os.path.abspath(workdir)
  own = [os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "config.json")]
  first, other = group[0].writes, group[1].writes
  for path in own:
    assert path in first and path not in other, path
  tensorboard = os.path.join(workdir, "tensorboard") + os.sep
  assert any(p.startswith(tensorboard) for p in first)
  assert not any(p.startswith(tensorboard) for p in other)
  assert len(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))) == 1
  for step_dir in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")):
    for process in (0, 1):
      shards = glob.glob(os.path.join(step_dir, "state", f"ocdbt.process_{process}", "d", "*"))
      assert shards, f"process {process} wrote no checkpoint shard in {step_dir}"


def test_demo_training_two_processes_equals_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  _train_in_this_process(one)
  group = multihost.run_main([*DEMO, f"--workdir={two}"], processes=2, devices=4,
                             logs=tmp_path / "l2", timeout=TIMEOUT, audit=True)
  assert "process 1 of 2" in group[1].output
  for line in (" config: ", "trainable parameters: ", " eval: ", "step 40/40"):  # info lines:
    assert line in group[0].output and line not in group[1].output, line  # from process 0 only

  expected, got = multihost.losses(one), multihost.losses(two)
  assert sorted(got) == sorted(expected) == list(range(1, 41))
  steps = sorted(expected)
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=1e-6)
  assert multihost.evals(two) == multihost.evals(one) and 40 in multihost.evals(one)
  _assert_params_close(_final_params(one), _final_params(two))
  _assert_writers(two, group)


# ---- image-caption training with tiny Hugging Face encoders (manifest source) -----------------

@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_images")
  multihost_config.write_data(str(root))
  return root


def _image_config(root):
  return multihost_config.get_config(f"root={root}")


def _epochs_read(process, per_epoch, epochs):
  """The training images one process read, per epoch, in stream order.

  The trainer peeks at the first batch for shapes and then restarts the stream at position 0, so
  the stream proper starts at the second read of the first image.
  """
  reads = process.reads
  stream = reads[reads.index(reads[0], 1):]
  assert len(stream) >= per_epoch * epochs
  return [stream[e * per_epoch:(e + 1) * per_epoch] for e in range(epochs)]


def _store(folder):
  """{image id: (image features, [its caption features])} of a feature store, any shard layout."""
  import json
  with open(os.path.join(folder, "manifest.json")) as f:
    manifest = json.load(f)
  rows = {}
  for shard in manifest["shards"]:
    path = os.path.join(folder, shard["name"])
    ids = np.load(os.path.join(path, "image_ids.npy"))
    image = np.load(os.path.join(path, "image.npy"))
    text = np.load(os.path.join(path, "text.npy"))
    owner = np.load(os.path.join(path, "text_to_image.npy"))
    for row, image_id in enumerate(ids):
      assert int(image_id) not in rows, f"image {image_id} stored twice"
      rows[int(image_id)] = (image[row], text[owner == row])
  return manifest, rows


@pytest.fixture(scope="module")
def image_runs(image_root, tmp_path_factory):
  """The image-caption run as 1 process x 8 devices (in this process) and as 2 x 4 (main.py)."""
  from align_jax.train import loop as train
  tmp = tmp_path_factory.mktemp("image_runs")
  one, two = tmp / "one", tmp / "two"
  train.train_and_evaluate(_image_config(image_root), str(one))
  group = multihost.run_main(
      [f"--config=tests/multihost_config.py:root={image_root}", f"--workdir={two}"],
      processes=2, devices=4, logs=tmp / "logs", timeout=TIMEOUT, audit=True,
      reads_under=str(image_root / "train"))
  return one, two, group


@pytest.mark.slow
def test_image_caption_training_two_processes_equals_one(image_root, image_runs):
  one, two, group = image_runs
  expected, got = multihost.losses(one), multihost.losses(two)
  assert sorted(got) == sorted(expected) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)],
                             rtol=1e-5)
  # the in-training retrieval and zero-shot evaluators, at steps 4 and 8
  evals = multihost.evals(one)
  assert sorted(evals) == [4, 8] and "eval/i2t@1" in evals[8] and "eval/shapes_top1" in evals[8]
  assert multihost.evals(two) == evals
  _assert_params_close(_final_params(one), _final_params(two))
  _assert_writers(two, group)

  # Each record of an epoch was read exactly once, by one of the two processes.
  per_process = multihost_config.NUM_TRAIN // 2  # 2 epochs in 8 steps of 16
  everything = sorted(str(image_root / "train" / f"{i:04d}.png")
                      for i in range(multihost_config.NUM_TRAIN))
  epochs = [_epochs_read(group[p], per_process, 2) for p in (0, 1)]
  for epoch in (0, 1):
    first, second = epochs[0][epoch], epochs[1][epoch]
    assert not set(first) & set(second)
    assert sorted(first + second) == everything
  assert epochs[0][0] != epochs[0][1]  # a new order each epoch


@pytest.mark.slow
def test_evaluate_mode_two_processes_equals_one(image_root, image_runs, tmp_path):
  """--mode=evaluate of the final checkpoint: the same numbers, and those of training."""
  import json
  from align_jax.evaluate import standalone
  one, two, _ = image_runs
  reference = standalone.evaluate_checkpoint(_image_config(image_root), str(one))
  multihost.run_main([f"--config=tests/multihost_config.py:root={image_root}",
                      f"--workdir={two}", "--mode=evaluate"], processes=2, devices=4,
                     logs=tmp_path / "logs", timeout=TIMEOUT)
  report = json.loads((two / "eval_results.json").read_text())
  assert report["step"] == reference["step"] == 8
  assert report["results"] == reference["results"]
  in_training = multihost.evals(one)[8]
  assert {k: v for k, v in reference["results"].items() if k.startswith("eval/")} == in_training


@pytest.mark.slow
def test_extract_features_two_processes_equals_one(image_root, tmp_path):
  """--mode=extract_features: per-process shards, one manifest, the same features per image."""
  from align_jax.train import extract as feature_store
  feature_store.extract_features(_image_config(image_root), str(tmp_path / "f1"))
  multihost.run_main([f"--config=tests/multihost_config.py:root={image_root}",
                      f"--workdir={tmp_path / 'f2'}", "--mode=extract_features"],
                     processes=2, devices=4, logs=tmp_path / "logs", timeout=TIMEOUT)
  manifest1, rows1 = _store(tmp_path / "f1")
  manifest2, rows2 = _store(tmp_path / "f2")
  assert {s["name"].split("-")[1] for s in manifest2["shards"]} == {"00000", "00001"}
  assert manifest2["num_images"] == manifest1["num_images"] == multihost_config.NUM_TRAIN
  assert manifest2["num_texts"] == manifest1["num_texts"] == 2 * multihost_config.NUM_TRAIN
  assert sorted(rows2) == sorted(rows1) == list(range(multihost_config.NUM_TRAIN))
  for image_id, (image, texts) in rows1.items():
    np.testing.assert_allclose(rows2[image_id][0], image, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(rows2[image_id][1], texts, atol=2e-3)


# ---- interruptions: SIGKILL of one process, then SIGTERM (preemption) of one -------------------

@pytest.mark.slow
def test_sigkill_then_preemption_restarts_continue_the_same_trajectory(tmp_path):
  """SIGKILL process 1 mid-run (then process 0), restart both; SIGTERM process 1 only: both save
  at the same step and exit 0; restart both: the run ends as an uninterrupted one."""
  steps = 60
  overrides = [f"--config=configs/demo.py:steps={steps}", "--config.batch_size=64",
               "--config.log_every=1", "--config.eval_every=30", "--config.eval_at_start=False",
               "--config.data.num_pairs=4096", "--config.checkpoint_every=10"]
  reference, run = tmp_path / "reference", tmp_path / "run"
  from align_jax.train import loop as train
  from configs import demo
  config = demo.get_config(f"steps={steps}")
  config.batch_size, config.log_every, config.eval_every = 64, 1, 30
  config.eval_at_start, config.data.num_pairs, config.checkpoint_every = False, 4096, 10
  train.train_and_evaluate(config, str(reference))

  command = [*overrides, f"--workdir={run}"]
  port = multihost.free_port()
  with multihost.start_main(command, processes=2, devices=4, logs=tmp_path / "a",
                            port=port) as group:
    multihost.wait_for_step(str(run), 12, group, timeout=TIMEOUT)
    group[1].kill()  # SIGKILL
    group[0].kill()  # the other process cannot go on alone: stopped too
  assert (run / "checkpoints" / "10").exists()

  with multihost.start_main(command, processes=2, devices=4, logs=tmp_path / "b",
                            port=port) as group:
    restored = multihost.wait_for_step(str(run), 25, group, timeout=TIMEOUT)
    assert "restored checkpoint at step" in group[0].output
    group[1].signal(15)  # SIGTERM to one process: both must stop at the same step
    assert group.wait(timeout=TIMEOUT) == [0, 0], group.tails()
  stops = [re.search(r"preempted: saved a checkpoint at step (\d+)", group[p].output)
           for p in (0, 1)]
  assert all(stops), group.tails()
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step and restored <= step < steps
  assert (run / "checkpoints" / str(step)).exists()

  multihost.run_main(command, processes=2, devices=4, logs=tmp_path / "c", timeout=TIMEOUT)
  assert multihost.logged_steps(run) == list(range(1, steps + 1))  # none twice, none lost
  expected, got = multihost.losses(reference), multihost.losses(run)
  np.testing.assert_allclose([got[s] for s in range(1, steps + 1)],
                             [expected[s] for s in range(1, steps + 1)], rtol=1e-6)
  assert multihost.evals(run) == multihost.evals(reference)
  _assert_params_close(_final_params(reference), _final_params(run))

  # python -m align_jax.cli.export as 2 processes: process 0 writes the folder, as one process
  # would.
  from align_jax.serving import export
  from safetensors.numpy import load_file
  card = export.export(str(run), str(tmp_path / "export1"))
  multihost.run_main([f"--workdir={run}", f"--out={tmp_path / 'export2'}"], processes=2,
                     devices=4, logs=tmp_path / "d", timeout=TIMEOUT,
                     program=("-m", "align_jax.cli.export"))
  import json
  assert json.loads((tmp_path / "export2" / "align_jax_model.json").read_text()) == card
  one, two = (load_file(str(tmp_path / e / "projectors.safetensors"))
              for e in ("export1", "export2"))
  assert sorted(one) == sorted(two)
  for name in one:
    np.testing.assert_array_equal(two[name], one[name])


@pytest.mark.slow
def test_curate_command_two_processes_writes_one_manifest(tmp_path):
  """Analysis commands run as 2 processes too: process 0 writes --out, the other waits for it."""
  import helpers_data
  features = np.eye(4, dtype=np.float32)[[0, 1, 1, 2, 0, 3]]
  names = helpers_data.write_image_folder(str(tmp_path), len(features))
  helpers_data.write_manifest(str(tmp_path / "pool.jsonl"), [
      {"image": name, "caption": helpers_data.caption(i)} for i, name in enumerate(names)])
  np.save(tmp_path / "feats.npy", features)
  np.save(tmp_path / "protos.npy", np.eye(4, dtype=np.float32)[:2])
  (tmp_path / "concepts.txt").write_text("alpha\nbeta\n")
  outputs = {}
  for processes in (1, 2):
    out = tmp_path / f"curated-{processes}.jsonl"
    group = multihost.run_main(
        [f"--pool={tmp_path / 'pool.jsonl'}", f"--features={tmp_path / 'feats.npy'}",
         f"--concepts={tmp_path / 'concepts.txt'}", f"--prototypes={tmp_path / 'protos.npy'}",
         "--top_k=2", "--quota=2", f"--out={out}"], processes=processes, devices=4 * (3 - processes),
        logs=tmp_path / f"logs-{processes}", timeout=TIMEOUT,
        program=("-m", "align_jax.cli.curate"))
    outputs[processes] = out.read_text()
    assert "selected 4" in group[0].output
  assert outputs[2] == outputs[1] and len(outputs[1].splitlines()) == 4
  assert sorted(p.name for p in tmp_path.glob("curated-2*")) == ["curated-2.jsonl"]
