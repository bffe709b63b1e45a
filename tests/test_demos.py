"""The notebooks' two paths (align_jax.testing.demos): the network check, and the hub path end to end.

The hub path runs here with local stand-ins for what Colab downloads: tiny random checkpoints in
place of ``facebook/dinov2-small`` / ``all-MiniLM-L6-v2`` (``image_encoder=`` / ``text_encoder=``
variants), and tiny CIFAR-100 / CIFAR-10 builds written through TFDS's own CIFAR builders into the
``data_root`` the config prepares (so ``download_and_prepare`` finds them and downloads nothing).
"""

import http.server
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

import align_jax
from align_jax.testing import demos
from align_jax.train import loop as train
from align_jax.data import synthetic_images
from align_jax.testing import tiny_checkpoints as tiny
from align_jax.evaluate import templates
from configs import demo_online
from helpers_tfds import write_tfds
import multihost


class _Handler(http.server.BaseHTTPRequestHandler):
  status = 200
  delay_s = 0.0

  def do_HEAD(self):  # noqa: N802 (http.server's naming)
    time.sleep(self.delay_s)
    self.send_response(self.status)
    self.end_headers()

  def log_message(self, *args):
    del args


@pytest.fixture
def server():
  """An HTTP server on a free localhost port, in a thread; stopped after the test."""
  servers = []

  def start(status=200, delay_s=0.0):
    handler = type("Handler", (_Handler,), {"status": status, "delay_s": delay_s})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    servers.append((httpd, thread))
    return f"http://127.0.0.1:{httpd.server_address[1]}/api/models/x"

  yield start
  for httpd, thread in servers:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)



def test_network_check_is_bounded_and_says_why(server, monkeypatch):
  for name in demos.OFFLINE_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  url = server()
  assert demos.network_available(url) == (True, f"{url} answered")
  url = server(status=404)
  assert demos.network_available(url) == (True, f"{url} answered 404")  # the network is there
  closed = f"http://127.0.0.1:{multihost.free_port()}/"
  online, why = demos.network_available(closed, timeout_s=1)
  assert not online and why.startswith(f"{closed} unreachable within 1 s")
  slow = server(delay_s=5)
  start = time.monotonic()
  online, why = demos.network_available(slow, timeout_s=0.5)
  assert not online and "unreachable within 0.5 s" in why and time.monotonic() - start < 3
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert demos.network_available(url) == (False, "HF_HUB_OFFLINE=1")  # no request made
  lines = []
  assert demos.use_hub(url, echo=lines.append) is False
  assert lines == ["no network: HF_HUB_OFFLINE=1 -> offline path: the demo's tiny random "
                   "encoders and rendered shapes"]
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  monkeypatch.setenv("ALIGN_JAX_OFFLINE", "")
  assert demos.use_hub(url, echo=lines.append) is True
  assert lines[-1] == (f"network: {url} answered 404 -> hub path: facebook/dinov2-small + "
                       "sentence-transformers/all-MiniLM-L6-v2, aligned on TFDS cifar100, "
                       "zero-shot on TFDS cifar10")


def test_offline_examples_are_labelled_by_colour(tmp_path):
  config = demo_online.get_config(f"steps=2,cache={tmp_path}")
  examples = demos.zero_shot_examples(config)
  assert len(examples.images) == 12 and examples.class_names == list(synthetic_images.COLORS)
  for caption, label in zip(examples.captions, examples.labels):
    assert caption.split()[2] == label  # "a {size} {colour} {shape} in the {position}"
  assert all(t.count("{}") == 1 for t in examples.templates)


def _pngs(count: int, seed: int) -> list[bytes]:
  rng = np.random.default_rng(seed)
  colours = list(synthetic_images.COLORS)
  out = []
  for i in range(count):
    pixels = synthetic_images.render(colours[i % len(colours)], synthetic_images.SHAPES[i % 4],
                                     synthetic_images.POSITIONS[i % 4], "large", rng,
                                     image_size=32)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    out.append(buf.getvalue())
  return out


CIFAR100 = [f"thing {i}" for i in range(100)]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


@pytest.mark.slow
def test_hub_path_with_local_stand_ins(tmp_path, capsys):
  """get_config(hub=True) -> caption manifest -> 2 online steps -> zero-shot on the unseen set,
  equal to AlignedModel's own classification; then stored features and selection."""
  root = str(tmp_path / "data")
  tfds_dir = os.path.join(root, "tfds")
  write_tfds(tfds_dir, "cifar100", {"train": (_pngs(32, 0), [i % 7 for i in range(32)]),
                                    "test": (_pngs(10, 1), [i % 5 for i in range(10)])}, CIFAR100)
  write_tfds(tfds_dir, "cifar10", {"test": (_pngs(10, 2), list(range(10)))}, CIFAR10)
  image = tiny.make_tiny_dinov2(str(tmp_path / "dinov2"), image_size=16, patch_size=4,
                                save_format="flax")
  text = tiny.make_tiny_bert(str(tmp_path / "bert"), save_format="flax",
                             corpus=[" ".join(CIFAR10 + list(templates.TEMPLATES["cifar"]))] * 2)
  config = demo_online.get_config(
      f"hub=True,steps=2,data_root={root},num_train=24,num_eval=10,batch=8,image_size=16,"
      f"image_encoder={image},text_encoder={text}")
  assert (config.model.image_encoder, config.model.text_encoder) == (image, text)
  assert config.model.image_size == 16 and config.batch_size == 8

  with open(config.data.path) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 24 and all(os.path.isfile(os.path.join(os.path.dirname(config.data.path),
                                                             r["image"])) for r in rows)
  for row in rows:  # each caption is the class name in one of CLIP's 18 CIFAR templates
    assert row["label"] in CIFAR100 and row["label"].split()[1].isdigit()
    assert row["caption"] == [t.format(row["label"]) for t in templates.TEMPLATES["cifar"]]
    assert int(row["label"].split()[1]) < 7  # labels of the train split only

  last = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert {"eval/cifar10_top1", "eval/cifar10_top5", "eval/cifar100_top1"} <= set(last)
  model = align_jax.AlignedModel.load(str(tmp_path / "run"))
  examples = demos.zero_shot_examples(config)
  assert len(examples.images) == 10 and sorted(examples.labels) == sorted(CIFAR10)
  assert examples.class_names == CIFAR10 and examples.images[0].shape == (32, 32, 3)
  capsys.readouterr()
  accuracy = demos.show_zero_shot(model, examples)
  out = capsys.readouterr().out
  # AlignedModel (one device, its own preprocessing) agrees with the trainer's evaluator.
  assert accuracy == last["eval/cifar10_top1"]
  assert f"zero-shot accuracy: {accuracy:.3f} on 10 images, 10 classes (chance 0.100)" in out
  assert demos.heldout_recall(model, config) is None
  assert len(demos.search(model, config, k=3)) == 3

  stores = demos.extract_feature_stores(config, str(tmp_path / "features"))
  assert set(stores) == {"train"} and stores["train"]["num_images"] == 24
  assert stores["train"]["num_texts"] == 24 * 18
  features = demos.features_config(config, str(tmp_path / "features"), steps=2)
  assert not features.evals and features.data.source == "features"
  train.train_and_evaluate(features, str(tmp_path / "features_run"))
  on_raw = align_jax.AlignedModel.load(str(tmp_path / "features_run"),
                                       image_encoder=stores["train"]["image_encoder"],
                                       text_encoder=stores["train"]["text_encoder"])
  assert 0 <= demos.show_zero_shot(on_raw, examples) <= 1

  images, texts, data, num_images = demos.selection_candidates(config, str(tmp_path / "cand"))
  assert (images, texts, num_images) == (list(demos.HUB_SELECTION[0]),
                                         list(demos.HUB_SELECTION[1]), 1000)
  assert data.to_dict() == {"source": "manifest", "path": config.data.path}
