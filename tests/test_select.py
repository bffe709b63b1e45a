"""Encoder-pair selection end to end on tiny encoders: ranking, CKA values, layers, heat-map."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from align_jax.analysis import cka, select
from align_jax.data import synthetic_images
from align_jax.encoders import ImageEncoder, TextEncoder, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  corpus = [" ".join(synthetic_images.vocabulary())] * 4
  images = [tiny.make_tiny_dinov2(str(root / "dinov2"), save_format="flax"),
            tiny.make_tiny_vit(str(root / "vit"), save_format="flax")]
  texts = [tiny.make_tiny_bert(str(root / "bert"), save_format="flax", corpus=corpus),
           tiny.make_tiny_bert(str(root / "bert2"), save_format="flax", seed=1, corpus=corpus)]
  return images, texts


def _data():
  return ml_collections.ConfigDict({"source": "synthetic_shapes", "split": "heldout",
                                    "num_pairs": 24})


def test_ranking_matches_direct_cka_with_layers(encoders, tmp_path):
  images, texts = encoders
  rows = select.select_encoders(_data(), images, texts, str(tmp_path), num_images=24,
                                layers=True, batch_size=16, max_text_length=32)
  assert len(rows) == 4
  assert [r["linear_cka"] for r in rows] == sorted((r["linear_cka"] for r in rows), reverse=True)
  # The reported CKA equals linear CKA on features computed directly through the public encoders.
  reader = synthetic_images.ShapesReader(split="heldout")
  records = [reader.read(i) for i in range(24)]
  pil = [Image.fromarray(r.image) for r in records]
  x = ImageEncoder.from_pretrained(images[0], pooling="mean").encode(pil)
  text_encoder = TextEncoder.from_pretrained(texts[0], pooling="mean", max_length=32)
  y = np.stack([text_encoder.encode(r.captions).mean(0) for r in records])
  row = next(r for r in rows if (r["image_encoder"], r["text_encoder"]) == (images[0], texts[0]))
  assert row["linear_cka"] == pytest.approx(cka.linear_cka(x, y), abs=1e-4)
  assert np.array(row["layer_cka"]).shape == (3, 3)  # embeddings + 2 layers each
  assert row["best_layer_cka"] == pytest.approx(np.max(row["layer_cka"]), abs=1e-6)
  assert row["layer_cka"][-1][-1] == pytest.approx(row["linear_cka"], abs=1e-5)
  assert json.loads((tmp_path / "ranking.json").read_text()) == rows
  assert (tmp_path / "ranking.md").read_text().count("\n") == 2 + 4
  with Image.open(tmp_path / "cka_heatmap.png") as heatmap:
    assert heatmap.size == (260 + 2 * 90, 40 + 2 * 90)

  # The override file names the pair and layers of the highest CKA over all layer pairs, and
  # encoders built from it (through the config, as training builds them) reproduce that CKA.
  best = max(rows, key=lambda r: r["best_layer_cka"])
  config = _config_with_flagfile(tmp_path / "best_config_overrides.txt")
  m = config.model
  assert (m.image_encoder, m.text_encoder) == (best["image_encoder"], best["text_encoder"])
  assert m.image_layer == (-1 if best["best_image_layer"] == 2 else best["best_image_layer"])
  assert m.text_layer == (-1 if best["best_text_layer"] == 2 else best["best_text_layer"])
  x = ImageEncoder.from_pretrained(m.image_encoder, pooling="mean", layer=m.image_layer).encode(pil)
  text_encoder = TextEncoder.from_pretrained(m.text_encoder, pooling="mean", max_length=32,
                                             layer=m.text_layer)
  y = np.stack([text_encoder.encode(r.captions).mean(0) for r in records])
  assert cka.linear_cka(x, y) == pytest.approx(best["best_layer_cka"], abs=1e-4)


def _config_with_flagfile(path):
  """configs/dinov2_roberta.py with ``--flagfile=path``, parsed by absl as main.py parses it."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["prog", f"--config={REPO}/configs/dinov2_roberta.py", f"--flagfile={path}"]
  values = flags.FlagValues()  # config_flags reads the overrides from this argv, as from sys.argv
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_command_line(encoders, tmp_path):
  images, texts = encoders
  result = subprocess.run(
      [sys.executable, "-m", "align_jax.analysis.select", "--source=synthetic_shapes",
       "--num_images=16", f"--image_encoders={images[0]}", f"--text_encoders={','.join(texts)}",
       "--max_text_length=32", f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "best pair:" in result.stdout
  rows = json.loads((tmp_path / "ranking.json").read_text())
  assert len(rows) == 2
  assert f"--flagfile={tmp_path / 'best_config_overrides.txt'}" in result.stdout
  config = _config_with_flagfile(tmp_path / "best_config_overrides.txt")  # without --layers:
  assert (config.model.image_encoder, config.model.text_encoder) == (
      rows[0]["image_encoder"], rows[0]["text_encoder"])  # the top-ranked pair, final layers
  assert (config.model.image_layer, config.model.text_layer) == (-1, -1)
