"""Runs and data on gs:// (the in-memory GCS emulator): the same results as on a local disk.

* The CPU demo trains with ``--workdir=gs://...`` (``main.py`` as a subprocess): config.json,
  checkpoints, metrics.jsonl and TensorBoard land in the bucket; ``evaluate_checkpoint`` and
  ``AlignedModel.load`` read it back. Slow: SIGKILL mid-run and resume (the same losses at every
  logged step and the same final params as an uninterrupted local run, TensorBoard equal to
  metrics.jsonl), ``--mode=evaluate`` and ``python -m align_jax.cli.export`` to gs://.
* Data read from gs://: WebDataset shards (braces and globs, the index cached locally or in the
  bucket), a caption manifest with its images, a classification manifest, a class-name file and
  a description file; each gives exactly what the same files give locally.
* An unreachable bucket stops ``main.py`` with one line naming the URL, within seconds.

Every subprocess runs with its working directory in ``tmp_path``, which must stay empty: nothing
may land in a local folder named ``gs:``.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

import align_jax
from align_jax.run import storage
from align_jax.run import reader as run_dir_lib
from align_jax.data import pipeline, records, tfds_manifest_readers as sources, transforms, webdataset
from align_jax.evaluate import datasets, prompts, standalone

import helpers_data as hd
from gcs_emulator import gcs_bucket  # noqa: F401  (pytest fixture)
from helpers_metrics import assert_tensorboard_equals_metrics, rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_args(steps: int) -> list[str]:
  return [f"--config={REPO}/configs/demo.py:steps={steps}", "--config.batch_size=256",
          "--config.checkpoint_every=10", "--config.log_every=5", "--config.eval_every=10",
          "--config.data.num_pairs=2048"]


def _main(args, cwd, timeout=300, **kwargs):
  """``python main.py ARGS`` in ``cwd`` with this process's environment (the emulator's)."""
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout, **kwargs)


def _output(done) -> str:
  return done.stdout + done.stderr


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in rows(workdir) if "train/loss" in r}


def _eval_steps(workdir):
  return [r["step"] for r in rows(workdir) if "eval/i2t@1" in r]


def _upload(local_dir, url):
  for name in sorted(os.listdir(local_dir)):
    path = os.path.join(local_dir, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        storage.write_bytes(storage.join(url, name), f.read())


# ------------------------------------------------------------------------------- training runs


def test_demo_trains_on_gcs_then_evaluates_and_loads(gcs_bucket, tmp_path, monkeypatch, devices):
  workdir = f"{gcs_bucket}/demo"
  done = _main([*_demo_args(20), f"--workdir={workdir}"], tmp_path)
  assert done.returncode == 0, _output(done)[-3000:]
  assert {"checkpoints", "config.json", "metrics.jsonl", "tensorboard"} <= set(
      storage.listdir(workdir))
  assert run_dir_lib.steps(workdir) == [10, 20]
  assert sorted(_losses(workdir)) == [5, 10, 15, 20] and _eval_steps(workdir) == [0, 10, 20]
  assert_tensorboard_equals_metrics(workdir)

  monkeypatch.chdir(tmp_path)  # in-process reads below: nothing local either
  config = run_dir_lib.read_config(workdir)
  assert config.total_steps == 20 and config.batch_size == 256
  report = standalone.evaluate_checkpoint(config, workdir)
  assert report["step"] == 20 and report["checkpoint"] == f"{workdir}/checkpoints/20"
  saved = json.loads(storage.read_text(f"{workdir}/eval_results.json"))
  last_eval = [r for r in rows(workdir) if "eval/i2t@1" in r][-1]
  assert saved["results"] == {k: v for k, v in last_eval.items() if k.startswith("eval/")}

  model = align_jax.AlignedModel.load(workdir)
  assert model.step == 20
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params),
               run_dir_lib.restore_params(workdir).params)
  embeddings = model.embed_images(np.random.RandomState(0).randn(
      3, config.data.image_input_dim).astype(np.float32))
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
  assert os.listdir(tmp_path) == []  # no local gs: folder, no stray file


def test_unreachable_bucket_stops_main_in_one_line(gcs_bucket, tmp_path):
  start = time.time()
  done = _main([*_demo_args(20), "--workdir=gs://no-such-bucket-1f2e/run"], tmp_path)
  elapsed = time.time() - start
  assert done.returncode == 1 and "Traceback" not in _output(done), _output(done)[-3000:]
  last = _output(done).strip().splitlines()[-1]
  assert last.startswith("error: cannot write gs://no-such-bucket-1f2e/run: bucket "
                         "'no-such-bucket-1f2e' does not exist"), last
  assert elapsed < 90, elapsed  # jax import + config + one probe; not gcsfs's retries
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_sigkill_and_resume_on_gcs_matches_uninterrupted_local_run(gcs_bucket, tmp_path):
  reference, workdir = str(tmp_path / "reference"), f"{gcs_bucket}/resumed"
  args = [*_demo_args(100), "--config.eval_every=25"]
  done = _main([*args, f"--workdir={reference}"], tmp_path)
  assert done.returncode == 0, _output(done)[-3000:]

  run_dir = tmp_path / "cwd"
  run_dir.mkdir()
  process = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *args,
                              f"--workdir={workdir}"], cwd=run_dir, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not storage.exists(f"{workdir}/checkpoints/20/commit_success.txt"):
      assert process.poll() is None, "run ended before it could be killed"
      assert time.time() < deadline, "no checkpoint appeared"
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait()
  assert run_dir_lib.steps(workdir)[-1] < 100  # killed mid-run
  done = _main([*args, f"--workdir={workdir}"], run_dir)
  assert done.returncode == 0, _output(done)[-3000:]
  assert "restored checkpoint at step" in _output(done)

  expected, got = _losses(reference), _losses(workdir)
  assert sorted(got) == sorted(expected) == list(range(5, 101, 5))
  assert got == expected  # bit-identical losses at every logged step
  assert _eval_steps(workdir) == _eval_steps(reference) == [0, 25, 50, 75, 100]
  jax.tree.map(np.testing.assert_array_equal, run_dir_lib.restore_params(reference).params,
               run_dir_lib.restore_params(workdir).params)
  assert_tensorboard_equals_metrics(workdir)  # after SIGKILL + resume, on gs://
  assert_tensorboard_equals_metrics(reference)  # uninterrupted, local
  assert os.listdir(run_dir) == []


@pytest.mark.slow
def test_mode_evaluate_and_export_to_gcs(gcs_bucket, tmp_path, monkeypatch):
  workdir, out = f"{gcs_bucket}/run", f"{gcs_bucket}/exports/demo"
  done = _main([*_demo_args(20), f"--workdir={workdir}"], tmp_path)
  assert done.returncode == 0, _output(done)[-3000:]
  done = _main([*_demo_args(20), "--mode=evaluate", f"--workdir={workdir}"], tmp_path)
  assert done.returncode == 0, _output(done)[-3000:]
  report = json.loads(storage.read_text(f"{workdir}/eval_results.json"))
  last_eval = [r for r in rows(workdir) if "eval/i2t@1" in r][-1]
  assert report["step"] == 20
  assert report["results"] == {k: v for k, v in last_eval.items() if k.startswith("eval/")}

  done = subprocess.run([sys.executable, "-m", "align_jax.cli.export", f"--workdir={workdir}",
                         f"--out={out}"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "PYTHONPATH": REPO})
  assert done.returncode == 0, _output(done)[-3000:]
  assert "exported step 20" in done.stdout
  assert storage.listdir(out) == ["align_jax_model.json", "config.json", "projectors.safetensors"]

  monkeypatch.chdir(tmp_path)
  exported, run = align_jax.AlignedModel.load(out), align_jax.AlignedModel.load(workdir)
  assert exported.step == run.step == 20
  inputs = np.random.RandomState(1).randn(5, run.config.data.text_input_dim).astype(np.float32)
  np.testing.assert_array_equal(exported.embed_texts(inputs), run.embed_texts(inputs))
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------- data on gs://


@pytest.fixture
def local_and_gcs_shards(gcs_bucket, tmp_path):
  local = tmp_path / "shards"
  hd.write_webdataset(str(local), num_shards=3, per_shard=5, json_every=4)
  _upload(str(local), f"{gcs_bucket}/wds")
  return str(local), f"{gcs_bucket}/wds"


def _records(reader):
  return [(r.key.rsplit("/", 1)[-1], r.image, r.captions)
          for r in (reader.read(i) for i in range(len(reader)))]


def test_webdataset_shards_read_from_gcs(local_and_gcs_shards, tmp_path, monkeypatch, caplog):
  local, remote = local_and_gcs_shards
  monkeypatch.chdir(tmp_path)
  expected = _records(webdataset.WebDatasetReader(f"{local}/{{00000..00002}}.tar",
                                                  index_cache_dir=str(tmp_path / "i0")))
  assert len(expected) == 15
  braces = webdataset.WebDatasetReader(f"{remote}/{{00000..00002}}.tar",
                                       index_cache_dir=str(tmp_path / "index"))
  assert _records(braces) == expected
  assert braces.read(0).key == f"{remote}/00000.tar:000000000"
  assert len(os.listdir(tmp_path / "index")) == 2  # the table and the keys, cached locally
  with caplog.at_level("INFO"):
    again = webdataset.WebDatasetReader(f"{remote}/*.tar", index_cache_dir=str(tmp_path / "index"))
  assert "reusing the shard index" in caplog.text and _records(again) == expected
  # the index kept in the bucket (shared by a pod's hosts), read back into memory
  in_bucket = webdataset.WebDatasetReader(f"{remote}/*.tar", index_cache_dir=f"{remote}/index")
  assert len(storage.listdir(f"{remote}/index")) == 2
  assert _records(webdataset.WebDatasetReader(f"{remote}/*.tar",
                                              index_cache_dir=f"{remote}/index")) == expected
  assert _records(in_bucket) == expected
  # a shard replaced in the bucket is indexed again (its generation changed)
  storage.write_bytes(f"{remote}/00002.tar", storage.read_bytes(f"{remote}/00001.tar"))
  changed = webdataset.WebDatasetReader(f"{remote}/*.tar", index_cache_dir=f"{remote}/index")
  assert len(storage.listdir(f"{remote}/index")) == 4
  assert [r[1] for r in _records(changed)][10:] == [r[1] for r in expected][5:10]
  assert sorted(os.listdir(tmp_path)) == ["i0", "index", "shards"]  # no gs: folder


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_webdataset_batches_from_gcs_equal_local(local_and_gcs_shards, tmp_path, workers):
  """Decoded, augmented batches; with grain worker processes, each its own gcsfs client."""
  local, remote = local_and_gcs_shards
  batches = []
  for urls, num_workers in ((f"{local}/{{00000..00002}}.tar", 0),
                            (f"{remote}/{{00000..00002}}.tar", workers)):
    config = ml_collections.ConfigDict({"source": "webdataset", "urls": urls,
                                        "num_workers": num_workers,
                                        "index_cache_dir": str(tmp_path / "index")})
    source = pipeline.make_pair_source(
        config, global_batch_size=4, seed=3, image_transform=transforms.make_image_transform(
            16, train=True), tokenize=hd.fake_tokenize, process_index=0, process_count=1)
    batches.append([next(source) for _ in range(4)])  # more than an epoch of 15 records
  jax.tree.map(np.testing.assert_array_equal, batches[0], batches[1])


def test_manifests_and_class_files_read_from_gcs(gcs_bucket, tmp_path, monkeypatch):
  root = tmp_path / "data"
  names = hd.write_image_folder(str(root / "images"), 4)
  hd.write_manifest(str(root / "images" / "train.jsonl"),
                    [{"image": n, "caption": [hd.caption(i, 0), hd.caption(i, 1)]}
                     for i, n in enumerate(names)])
  hd.write_manifest(str(root / "images" / "train.csv"),
                    [{"image": n, "caption": hd.caption(i)} for i, n in enumerate(names)])
  (root / "images" / "labels.jsonl").write_text("".join(
      json.dumps({"image": n, "label": i % 2}) + "\n" for i, n in enumerate(names)))
  (root / "images" / "classes.txt").write_text("circle\nsquare\n")
  (root / "images" / "descriptions.json").write_text(json.dumps(
      {"circle": ["a round shape"], "square": ["four equal sides"]}))
  _upload(str(root / "images"), f"{gcs_bucket}/data")
  monkeypatch.chdir(tmp_path)

  for name in ("train.jsonl", "train.csv"):  # image paths relative to the manifest's gs:// folder
    local = sources.ManifestReader(str(root / "images" / name))
    remote = sources.ManifestReader(f"{gcs_bucket}/data/{name}")
    assert len(remote) == len(local) == 4
    for i in range(4):
      got, want = remote.read(i), local.read(i)
      assert got.key == f"{gcs_bucket}/data/{names[i]}"
      assert (got.image, got.captions) == (want.image, want.captions)
  # an image root elsewhere in the bucket, and a missing image counted as missing_file
  elsewhere = sources.ManifestReader(str(root / "images" / "train.jsonl"),
                                     image_root=f"{gcs_bucket}/data")
  assert elsewhere.read(2).image == hd.image_bytes(2)
  storage.remove(f"{gcs_bucket}/data/{names[3]}")
  with pytest.raises(records.SkipRecord, match="missing_file") as error:
    elsewhere.read(3)
  assert f"{gcs_bucket}/data/{names[3]}" in str(error.value)

  classes = f"{gcs_bucket}/data/classes.txt"
  assert datasets.load_class_names(classes) == ["circle", "square"]
  labelled = datasets.ManifestClassificationReader(f"{gcs_bucket}/data/labels.jsonl",
                                                   class_names=classes)
  assert labelled.class_names == ["circle", "square"] and list(labelled.labels) == [0, 1, 0, 1]
  assert labelled.read(1).image == hd.image_bytes(1)
  assert prompts.load_descriptions(f"{gcs_bucket}/data/descriptions.json") == {
      "circle": ["a round shape"], "square": ["four equal sides"]}
  with pytest.raises(FileNotFoundError, match=f"{gcs_bucket}/data/nothing.json"):
    prompts.load_descriptions(f"{gcs_bucket}/data/nothing.json")
  assert sorted(os.listdir(tmp_path)) == ["data"]
