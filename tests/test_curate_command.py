"""Curation command: exact selection on a hand-built pool, output readable by the data pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import helpers_data
from align_jax.analysis import curation_files as curate
from align_jax.data import tfds_manifest_readers as sources
from align_jax.testing import tiny_checkpoints as tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cosine scores vs prototypes A = e1, B = e2. Top-3 of A: rows 0, 1, 5 (3rd best 0.8); of B: rows
# 2, 3, 5 (3rd best 0.6), so B is harder and picks first: rows 2, 3; then A: rows 0, 1.
FEATURES = np.array([[1, 0, 0], [0.9, 0.1, 0], [0.6, 0.8, 0], [0, 0.7, 0.71], [0, 0.5, 0.866],
                     [0.8, 0.6, 0], [0, 0, 1], [0, 0, 1]], np.float32)


def _pool(tmp_path):
  names = helpers_data.write_image_folder(str(tmp_path), len(FEATURES))
  rows = [{"image": name, "caption": helpers_data.caption(i)} for i, name in enumerate(names)]
  pool = helpers_data.write_manifest(str(tmp_path / "pool.jsonl"), rows)
  np.save(tmp_path / "feats.npy", FEATURES / np.linalg.norm(FEATURES, axis=1, keepdims=True))
  (tmp_path / "concepts.txt").write_text("alpha\nbeta\n")
  np.save(tmp_path / "protos.npy", np.eye(3, dtype=np.float32)[:2])
  return pool


def test_command_selects_exactly_and_pipeline_reads_it(tmp_path):
  pool = _pool(tmp_path)
  out = tmp_path / "curated.jsonl"
  result = subprocess.run(
      [sys.executable, "-m", "align_jax.cli.curate", f"--pool={pool}",
       f"--features={tmp_path / 'feats.npy'}", f"--concepts={tmp_path / 'concepts.txt'}",
       f"--prototypes={tmp_path / 'protos.npy'}", "--top_k=3", "--quota=2", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert {(r["caption"], r["concept"]) for r in rows} == {
      (helpers_data.caption(0), "alpha"), (helpers_data.caption(1), "alpha"),
      (helpers_data.caption(2), "beta"), (helpers_data.caption(3), "beta")}
  reader = sources.ManifestReader(str(out))
  assert len(reader) == 4 and reader.read(0).captions


def test_text_prototypes_and_bad_features(tmp_path):
  pool = _pool(tmp_path)
  bert = tiny.make_tiny_bert(str(tmp_path / "bert"), save_format="flax")
  prototypes = curate.concept_prototypes(["cat", "dog"], bert, ["a photo of a {}."], max_length=16)
  assert prototypes.shape == (2, 32)
  np.testing.assert_allclose(np.linalg.norm(prototypes, axis=1), 1.0, rtol=1e-5)
  np.save(tmp_path / "short.npy", FEATURES[:5])
  with pytest.raises(ValueError, match=r"expected \[8, D\] caption features"):
    curate.curate_pool(pool, str(tmp_path / "short.npy"), prototypes[:, :3], ["a", "b"], top_k=2,
                       quota=1, out=str(tmp_path / "x.jsonl"))


def test_command_with_a_text_encoder_uses_its_length_limit_and_shows_a_bar(tmp_path):
  """The tiny BERT has 64 positions: no --max_text_length -> 64 (77 crashed before); too many ->
  one line. The progress bar counts scored captions against the pool's total."""
  pool = _pool(tmp_path)
  bert = tiny.make_tiny_bert(str(tmp_path / "bert"), save_format="flax")
  np.save(tmp_path / "feats32.npy", np.random.default_rng(0).normal(size=(8, 32)).astype("f4"))
  base = [sys.executable, "-m", "align_jax.cli.main", "curate", f"--pool={pool}",
          f"--features={tmp_path / 'feats32.npy'}", f"--concepts={tmp_path / 'concepts.txt'}",
          f"--text_encoder={bert}", "--top_k=3", "--quota=2", "--chunk_size=3"]
  result = subprocess.run(base + [f"--out={tmp_path / 'a.jsonl'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "scoring against 2 concepts: 100%" in result.stderr and "8.00/8.00" in result.stderr, (
      result.stderr)
  rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
  assert 2 <= len(rows) <= 4 and {r["concept"] for r in rows} == {"alpha", "beta"}  # quota 2 each
  result = subprocess.run(base + ["--max_text_length=100", f"--out={tmp_path / 'b.jsonl'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: --max_text_length=100 does not fit text encoder")
