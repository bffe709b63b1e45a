"""Parquet sources (data.source="parquet"): the manifest source's batches on the same data.

The Parquet files are written here with pyarrow, in the shapes Hugging Face publishes: an image
column of bytes, of ``{"bytes", "path"}`` structs or of paths, and a caption column of one string
or a list; several files and row groups, so records cross file and row-group boundaries.
"""

import json
import os
import pickle

import jax
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_jax.run import storage
from align_jax.data import factory, parquet, pipeline, reader_factory as readers, records, skip_log, transforms
from align_jax.evaluate import datasets

import helpers_data as hd
from gcs_emulator import gcs_bucket  # noqa: F401  (pytest fixture)

SIZE = 16
N = 23
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet(folder, rows, *, files=2, row_group_size=5, schema=None):
  """Rows split over ``files`` files of ``row_group_size``-row groups; returns the folder."""
  os.makedirs(folder, exist_ok=True)
  cut = -(-len(rows) // files)
  for f in range(files):
    table = pa.Table.from_pylist(rows[f * cut:(f + 1) * cut], schema=schema)
    pq.write_table(table, os.path.join(folder, f"test-{f:05d}-of-{files:05d}.parquet"),
                   row_group_size=row_group_size)
  return folder


def image_cell(kind, i, name):
  if kind == "bytes":
    return hd.image_bytes(i)
  if kind == "struct":  # Hugging Face's Image feature; every other row by path only
    return {"bytes": hd.image_bytes(i), "path": name} if i % 2 else {"bytes": None, "path": name}
  return name


def make(cfg, batch, *, seed=0, p=0, n=1, train=True):
  return pipeline.make_pair_source(
      cfg, global_batch_size=batch, seed=seed,
      image_transform=transforms.make_image_transform(SIZE, train=train),
      tokenize=hd.fake_tokenize, process_index=p, process_count=n, train=train)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A manifest of N images (3 captions each) and the same data as Parquet, three ways."""
  root = tmp_path_factory.mktemp("data")
  names = hd.write_image_folder(str(root / "images"), N)
  captions = [[hd.caption(i, v) for v in range(3)] for i in range(N)]
  manifest = hd.write_manifest(str(root / "images" / "train.jsonl"),
                               [{"image": n, "caption": c} for n, c in zip(names, captions)])
  out = {"manifest": ml_collections.ConfigDict(
      {"source": "manifest", "path": manifest, "num_workers": 0})}
  for kind in ("bytes", "struct", "path"):
    schema = pa.schema([("image", IMAGE if kind == "struct" else
                         pa.binary() if kind == "bytes" else pa.string()),
                        ("caption", pa.list_(pa.string()))])
    rows = [{"image": image_cell(kind, i, n), "caption": c}
            for i, (n, c) in enumerate(zip(names, captions))]
    folder = write_parquet(str(root / kind), rows, schema=schema)
    out[kind] = ml_collections.ConfigDict(
        {"source": "parquet", "path": folder + "/test-*.parquet", "num_workers": 0,
         "image_root": str(root / "images")})
  return out


def assert_batches_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("kind", ["bytes", "struct", "path"])
def test_training_and_eval_batches_equal_the_manifest_source(data, kind):
  reader = readers.make_reader(data[kind])
  assert len(reader) == N and reader.index_skips == {}
  assert reader.read(7).captions == [hd.caption(7, v) for v in range(3)]
  assert reader.read(7).image == hd.image_bytes(7)  # row 7: 2nd file, 2nd row group
  # 8 steps of 4 cross the epoch end (23 records): the (seed, epoch) order is the manifest's
  want, got = make(data["manifest"], 4, seed=3), make(data[kind], 4, seed=3)
  assert_batches_equal([next(want) for _ in range(8)], [next(got) for _ in range(8)])
  want, got = make(data["manifest"], 8, train=False), make(data[kind], 8, train=False)
  assert_batches_equal([b for b in want], [b for b in got])
  assert got.captions_flat == want.captions_flat and len(got.captions_flat) == 3 * N
  np.testing.assert_array_equal(got.text_to_image, want.text_to_image)


def test_two_processes_read_disjoint_rows_and_resume_exactly(data):
  cfg = data["bytes"]
  seen = []
  for p in range(2):
    source = make(cfg, 8, p=p, n=2, train=False)
    list(source)
    seen.append(set(source.image_ids))
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(N))
  for p in range(2):  # training: each process's batches are the manifest's, process by process
    want, got = make(data["manifest"], 8, seed=5, p=p, n=2), make(cfg, 8, seed=5, p=p, n=2)
    assert_batches_equal([next(want) for _ in range(4)], [next(got) for _ in range(4)])
  straight = make(cfg, 8, seed=5, p=1, n=2)
  expected = [next(straight) for _ in range(6)]
  first = make(cfg, 8, seed=5, p=1, n=2)
  for _ in range(3):
    next(first)
  resumed = make(cfg, 8, seed=5, p=1, n=2)
  resumed.set_state(json.loads(json.dumps(first.get_state())))  # as a checkpoint stores it
  assert_batches_equal(expected[3:], [next(resumed) for _ in range(3)])


def test_bad_rows_are_skipped_and_counted_like_the_manifest(tmp_path):
  root = tmp_path / "images"
  names = hd.write_image_folder(str(root), 12)
  (root / names[3]).write_bytes(b"not an image")  # corrupt_image
  os.remove(root / names[6])  # missing_file
  captions = [[hd.caption(i)] for i in range(12)]
  captions[8] = ["", "  "]  # empty_caption
  manifest_rows = [{"image": n, "caption": c} for n, c in zip(names, captions)]
  manifest_rows[10] = {"image": None, "caption": captions[10]}  # bad_manifest_row
  manifest = hd.write_manifest(str(root / "train.jsonl"), manifest_rows)
  rows = [{"image": {"bytes": None, "path": n}, "caption": c} for n, c in zip(names, captions)]
  rows[3]["image"] = {"bytes": b"not an image", "path": None}
  rows[10]["image"] = None
  folder = write_parquet(str(tmp_path / "pq"), rows, files=1, row_group_size=4,
                         schema=pa.schema([("image", IMAGE), ("caption", pa.list_(pa.string()))]))
  expected_skips = {f"data/skipped_{r}": 1 for r in
                    ("corrupt_image", "missing_file", "empty_caption", "bad_manifest_row")}
  results = []
  for cfg in ({"source": "manifest", "path": manifest},
              {"source": "parquet", "path": folder, "image_root": str(root)}):
    skip_log.reset()
    cfg = ml_collections.ConfigDict({**cfg, "num_workers": 0})
    evaluation = make(cfg, 4, train=False)
    batches = list(evaluation)
    assert evaluation.skipped() == expected_skips
    assert sorted(evaluation.image_ids) == [0, 1, 2, 4, 5, 7, 9, 11]
    training = make(cfg, 4, seed=1)
    results.append((batches, [next(training) for _ in range(3)], training.skipped()))
  assert_batches_equal(results[0][:2], results[1][:2])
  assert results[0][2] == results[1][2] and sum(results[1][2].values()) > 0


def test_a_damaged_row_group_skips_its_rows_only(tmp_path):
  path = str(tmp_path / "a.parquet")
  pq.write_table(pa.Table.from_pylist([{"image": hd.image_bytes(i), "caption": "c"}
                                       for i in range(6)]), path, row_group_size=3)
  image_chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
  data = bytearray(open(path, "rb").read())
  start = image_chunk.dictionary_page_offset + 30  # inside the first group's compressed images
  data[start:start + 300] = b"\xff" * 300
  open(path, "wb").write(bytes(data))
  reader = parquet.ParquetReader(path)
  for i in range(3):
    with pytest.raises(records.SkipRecord, match="row group 0: .*Corrupt") as error:
      reader.read(i)
    assert error.value.reason == "unreadable_record"
  assert [reader.read(i).image for i in range(3, 6)] == [hd.image_bytes(i) for i in range(3, 6)]


def test_unreadable_files_missing_columns_and_no_files(tmp_path, monkeypatch, caplog):
  folder = write_parquet(str(tmp_path / "pq"), [{"image": hd.image_bytes(i), "caption": "c"}
                                                for i in range(6)])
  (tmp_path / "pq" / "junk.parquet").write_bytes(b"PAR1" + b"x" * 100)
  monkeypatch.setattr(parquet, "LARGE_ROW_GROUP_BYTES", 2000)  # the 3-image groups are larger
  with caplog.at_level("WARNING"):
    reader = parquet.ParquetReader(folder)
  assert len(reader) == 6 and reader.index_skips == {"unreadable_file": 1}
  assert "junk.parquet" in caplog.text and "skipped_unreadable_file" in caplog.text
  large = [r.message for r in caplog.records if "smaller row groups" in r.message]
  assert len(large) == 2 and "test-00000-of-00002.parquet has row groups of up to" in large[0]
  fresh = len(pickle.dumps(reader))
  assert reader.read(5).captions == ["c"]
  # as grain sends it to worker processes: without the row groups read so far
  assert len(pickle.dumps(reader)) == fresh
  clone = pickle.loads(pickle.dumps(reader))
  assert clone.read(5) == reader.read(5) and clone.read(0).image == hd.image_bytes(0)
  with pytest.raises(IndexError):
    reader.read(6)
  with pytest.raises(ValueError, match=r"no column 'text'.*set data.caption_key"):
    parquet.ParquetReader(folder, caption_key="text")
  with pytest.raises(ValueError, match="no Parquet file matched; set data.path"):
    parquet.ParquetReader(str(tmp_path / "none-*.parquet"))
  with pytest.raises(ValueError, match="does not exist; check data.path"):
    parquet.ParquetReader(str(tmp_path / "absent.parquet"))
  with pytest.raises(ValueError, match="data.path is required for data.source='parquet'"):
    readers.make_reader(ml_collections.ConfigDict({"source": "parquet"}))
  # {split} in data.path, as Hugging Face names its files (data/test-00000-of-00001.parquet)
  config = ml_collections.ConfigDict({"data": {"source": "parquet", "split": "train",
                                               "path": str(tmp_path / "pq" / "{split}-*.parquet")}})
  assert factory.eval_data_config(config, {"split": "test"}).path == str(
      tmp_path / "pq" / "test-*.parquet")


def test_classification_reader_labels_and_huggingface_class_names(tmp_path):
  names = hd.write_image_folder(str(tmp_path / "images"), 6)
  # class indices, with the ClassLabel names `datasets` stores in the schema metadata
  features = {"image": {"_type": "Image"},
              "label": {"_type": "ClassLabel", "names": ["golden_retriever", "tabby_cat"]}}
  schema = pa.schema([("image", IMAGE), ("label", pa.int64())],
                     metadata={b"huggingface": json.dumps({"info": {"features": features}})})
  rows = [{"image": {"bytes": hd.image_bytes(i), "path": None}, "label": i % 2} for i in range(6)]
  folder = write_parquet(str(tmp_path / "cls"), rows, files=2, row_group_size=2, schema=schema)
  cfg = ml_collections.ConfigDict({"source": "parquet", "path": folder})
  reader = datasets.make_classification_reader(cfg)
  assert reader.class_names == ["golden retriever", "tabby cat"]
  assert reader.labels.tolist() == [0, 1, 0, 1, 0, 1] and len(reader) == 6
  record = reader.read(3)
  assert (record.image, record.label) == (hd.image_bytes(3), 1)
  assert datasets.make_classification_reader(cfg, ["dog", "cat"]).class_names == ["dog", "cat"]
  # class-name labels and image paths: the same classes and records as the manifest reader
  manifest = tmp_path / "images" / "labels.jsonl"
  manifest.write_text("".join(json.dumps({"image": n, "label": ["cat", "dog"][i % 2]}) + "\n"
                              for i, n in enumerate(names)))
  write_parquet(str(tmp_path / "named"), [{"image": n, "label": ["cat", "dog"][i % 2]}
                                          for i, n in enumerate(names)], files=1)
  want = datasets.ManifestClassificationReader(str(manifest))
  got = datasets.ParquetClassificationReader(str(tmp_path / "named"),
                                             image_root=str(tmp_path / "images"))
  assert got.class_names == want.class_names == ["cat", "dog"]
  assert got.labels.tolist() == want.labels.tolist()
  assert [got.read(i).image for i in range(6)] == [want.read(i).image for i in range(6)]
  # integer labels without names anywhere, and a label outside the classes
  write_parquet(str(tmp_path / "bare"), [{"image": b"x", "label": i} for i in range(3)], files=1)
  with pytest.raises(ValueError, match="integer labels.*pass class_names"):
    datasets.ParquetClassificationReader(str(tmp_path / "bare"))
  with pytest.raises(ValueError, match=r"label 2 of row 2 must be .* index in \[0, 2\)"):
    datasets.ParquetClassificationReader(str(tmp_path / "bare"), class_names=["a", "b"])


def test_parquet_on_gcs_reads_like_local(gcs_bucket, tmp_path, monkeypatch):
  names = hd.write_image_folder(str(tmp_path / "local"), 7)
  # even rows hold their bytes, odd rows a path relative to the Parquet file (then the bucket)
  rows = [{"image": {"bytes": None if i % 2 else hd.image_bytes(i), "path": n},
           "caption": [hd.caption(i)]} for i, n in enumerate(names)]
  write_parquet(str(tmp_path / "local"), rows, files=2, row_group_size=2,
                schema=pa.schema([("image", IMAGE), ("caption", pa.list_(pa.string()))]))
  for name in sorted(os.listdir(tmp_path / "local")):
    storage.write_bytes(f"{gcs_bucket}/pq/{name}", (tmp_path / "local" / name).read_bytes())
  monkeypatch.chdir(tmp_path)
  local = parquet.ParquetReader(str(tmp_path / "local" / "test-*.parquet"))
  remote = parquet.ParquetReader(f"{gcs_bucket}/pq")
  assert len(remote) == len(local) == 7
  for i in range(7):
    got, want = remote.read(i), local.read(i)
    assert (got.image, got.captions) == (want.image, want.captions) == (
        hd.image_bytes(i), [hd.caption(i)])
    assert got.key.startswith(f"{gcs_bucket}/pq/test-0000")


@pytest.mark.slow
def test_feature_extraction_from_parquet_equals_the_manifest(tmp_path, devices):
  """``--mode=extract_features`` over the same 20 shapes as a manifest and as Parquet bytes."""
  from align_jax.data import array_sources as features, synthetic_images
  from train_utils import extract_small_shards, tiny_online_config

  config = tiny_online_config(tmp_path / "models")
  shapes = synthetic_images.ShapesReader(split="train", num_records=20, seed=0)
  rows = []
  for i in range(20):
    record = shapes.read(i)
    png = records.decode_image(record.image, key="", max_pixels=10**6, min_size=1)
    png.save(tmp_path / f"{i}.png")
    rows.append({"image": f"{i}.png", "caption": list(record.captions)[:2]})
  hd.write_manifest(str(tmp_path / "shapes.jsonl"), rows)
  write_parquet(str(tmp_path / "pq"), [{"image": (tmp_path / r["image"]).read_bytes(),
                                        "caption": r["caption"]} for r in rows])
  stores = []
  for name, data in (("manifest", {"source": "manifest", "path": str(tmp_path / "shapes.jsonl")}),
                     ("parquet", {"source": "parquet", "path": str(tmp_path / "pq")})):
    config.data.update(data)
    stored = extract_small_shards(config, tmp_path / name)
    assert (stored["num_images"], stored["num_texts"]) == (20, 40)
    stores.append(features.load_stored_features(str(tmp_path / name)))
  for a, b in zip(jax.tree.leaves(stores[0][:2]), jax.tree.leaves(stores[1][:2])):
    assert len(a) in (20, 40)
    np.testing.assert_array_equal(a[np.arange(len(a))], b[np.arange(len(b))])
  np.testing.assert_array_equal(stores[0][2], stores[1][2])
