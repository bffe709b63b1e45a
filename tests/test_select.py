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
from align_jax.encoders import ImageEncoder, TextEncoder
from align_jax.testing import tiny_checkpoints as tiny

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
  with Image.open(tmp_path / "cka_heatmap.png") as heatmap:  # matplotlib's, sized to its labels
    width, height = heatmap.size
    assert width > 600 and height > 300, heatmap.size
    assert len({tuple(p) for p in np.asarray(heatmap.convert("RGB")).reshape(-1, 3)[::97]}) > 20

  # The table's best layers are the numbers the overrides file gives (-1 = final output).
  md = (tmp_path / "ranking.md").read_text().splitlines()
  for rank, r in enumerate(rows, 1):
    layers = select.best_layers(r)
    assert f"| {rank} | {r['image_encoder']} | {r['text_encoder']} |" in md[1 + rank]
    assert f" {layers[0]}, {layers[1]} | {r['best_layer_cka']:.4f} |" in md[1 + rank]

  # The override file names the pair and layers of the highest CKA over all layer pairs, and
  # encoders built from it (through the config, as training builds them) reproduce that CKA.
  best = max(rows, key=lambda r: r["best_layer_cka"])
  config = _config_with_flagfile(tmp_path / "best_config_overrides.txt")
  m = config.model
  assert (m.image_encoder, m.text_encoder) == (best["image_encoder"], best["text_encoder"])
  assert m.image_layer == (-1 if best["best_image_layer"] == 2 else best["best_image_layer"])
  assert m.text_layer == (-1 if best["best_text_layer"] == 2 else best["best_text_layer"])
  assert (m.image_layer, m.text_layer) == select.best_layers(best)
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
      [sys.executable, "-m", "align_jax.cli.select", "--source=synthetic_shapes",
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


def test_best_layers_count_the_final_output_as_minus_one():
  row = {"best_image_layer": 2, "best_text_layer": 1, "layer_cka": [[0.0] * 3] * 3}
  assert select.best_layers(row) == (-1, 1)
  assert select.config_layer(0, 25) == 0 and select.config_layer(24, 25) == -1


def test_text_length_defaults_to_the_encoders_limit(encoders, tmp_path):
  """The tiny BERT has 64 positions: no flag -> 64 (77 would not fit); too many -> one line."""
  from align_jax.analysis import text_length
  _, texts = encoders
  assert text_length.encoder_limit(texts[0]) == 64
  assert text_length.choose(texts[0], None) == 64 and text_length.choose(texts[0], 32) == 32
  with pytest.raises(ValueError, match=r"--max_text_length=100 does not fit text encoder .* 1 "
                                       r"to 64 tokens .* use --max_text_length=64 or less"):
    text_length.choose(texts[0], 100)


def test_command_line_without_max_text_length_and_with_too_many(encoders, tmp_path):
  images, texts = encoders
  base = [sys.executable, "-m", "align_jax.cli.main", "select", "--source=synthetic_shapes",
          "--num_images=8", f"--image_encoders={images[0]}", f"--text_encoders={texts[0]}",
          "--batch_size=8"]
  result = subprocess.run(base + [f"--out={tmp_path / 'a'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  # the bar: 1 batch of 8 images + 2 of their 16 captions
  assert "encoding 8 pairs with 2 encoders: 100%" in result.stderr and "3/3" in result.stderr
  result = subprocess.run(base + ["--max_text_length=100", f"--out={tmp_path / 'b'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: --max_text_length=100 does not")
