"""Record readers: url expansion, tar indexing by offset, manifests, TFDS keys, image decoding."""

import io
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from align_jax.data import records, tfds_manifest_readers as sources, webdataset

import helpers_data as hd


def test_expand_braces_and_globs(tmp_path):
  assert webdataset.expand_braces("s/{000..003}.tar") == [f"s/{i:03d}.tar" for i in range(4)]
  assert webdataset.expand_braces("{a,b}/{8..10}.tar") == [
      "a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
  for name in ("x1.tar", "x2.tar", "y.tar"):
    (tmp_path / name).write_bytes(b"")
  assert webdataset.expand_urls(f"{tmp_path}/x*.tar::{tmp_path}/y.tar") == [
      str(tmp_path / "x1.tar"), str(tmp_path / "x2.tar"), str(tmp_path / "y.tar")]
  assert webdataset.expand_urls([str(tmp_path / "z*.tar")]) == []


def test_tar_index_reads_members_by_offset(tmp_path):
  members = [("a/000.jpg", b"JPEGDATA"), ("a/000.txt", b"cap zero"), ("a/001.png", b"PNG"),
             ("a/001.json", b'{"caption": ["c1", "c2"]}'), ("readme", b"no extension")]
  path = hd.write_tar(str(tmp_path / "s.tar"), members)
  index, problem = webdataset.index_shard(path)
  assert problem is None
  assert sorted(index) == ["a/000", "a/001"]
  data = open(path, "rb").read()
  offset, size = index["a/001"]["json"]
  assert data[offset:offset + size] == b'{"caption": ["c1", "c2"]}'
  reader = webdataset.WebDatasetReader(path, index_cache_dir=str(tmp_path / "cache"))
  assert len(reader) == 2
  first, second = reader.read(0), reader.read(1)
  assert (first.image, first.captions) == (b"JPEGDATA", [b"cap zero"])
  assert (second.image, second.captions) == (b"PNG", ["c1", "c2"])
  assert first.key == f"{path}:a/000"


def test_webdataset_index_is_cached_and_memory_mapped(tmp_path):
  paths = hd.write_webdataset(str(tmp_path / "s"), 2, 3)
  cache = str(tmp_path / "cache")
  first = webdataset.WebDatasetReader(paths, index_cache_dir=cache)
  assert len(os.listdir(cache)) == 2 and isinstance(first._table, np.memmap)
  assert first.__getstate__()["_table"] is None  # Workers re-map the file, no copy is sent.
  clone = webdataset.WebDatasetReader.__new__(webdataset.WebDatasetReader)
  clone.__setstate__(first.__getstate__())
  again = webdataset.WebDatasetReader(paths, index_cache_dir=cache)
  for i in range(6):
    assert first.read(i) == clone.read(i) == again.read(i)
    assert first.read(i).captions == [hd.caption(i).encode()]
  hd.write_tar(paths[1], [("000000099.jpg", hd.image_bytes(99)), ("000000099.txt", b"new")])
  changed = webdataset.WebDatasetReader(paths, index_cache_dir=cache)  # Shard changed: re-index.
  assert len(changed) == 4 and changed.read(3).captions == [b"new"]
  assert len(os.listdir(cache)) == 4
  (tmp_path / "s" / "junk.tar").write_bytes(b"junk" * 200)
  damaged = webdataset.WebDatasetReader(paths + [str(tmp_path / "s" / "junk.tar")],
                                        index_cache_dir=cache)
  assert damaged.index_skips == {"unreadable_shard": 1} and len(damaged) == 4
  assert len(os.listdir(cache)) == 4  # An index of damaged shards is not cached.


def test_webdataset_json_caption_lists_kept_for_eval(tmp_path):
  from align_jax.data import pipeline, transforms

  hd.write_webdataset(str(tmp_path), 1, 4, captions_per_image=3)
  cfg = ml_collections.ConfigDict({"source": "webdataset", "urls": str(tmp_path / "00000.tar"),
                                   "index_cache_dir": str(tmp_path / "cache")})
  source = pipeline.make_pair_source(
      cfg, global_batch_size=4, seed=0,
      image_transform=transforms.make_image_transform(8, train=False),
      tokenize=hd.fake_tokenize, process_index=0, process_count=1, train=False)
  batch = next(source)
  assert batch["captions"] == [[hd.caption(i, v) for v in range(3)] for i in range(4)]
  assert source.text_to_image.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
  with pytest.raises(StopIteration):
    next(source)


def test_manifest_reader_paths_and_caption_lists(tmp_path):
  names = hd.write_image_folder(str(tmp_path / "img"), 2)
  rows = [{"image": names[0], "caption": ["a", "b"]},
          {"image": str(tmp_path / "img" / names[1]), "caption": "c"},
          {"image": names[0], "caption": "d"}]
  reader = sources.ManifestReader(hd.write_manifest(str(tmp_path / "m.jsonl"), rows),
                                  image_root=str(tmp_path / "img"))
  assert len(reader) == 2
  assert reader.read(0).captions == ["a", "b", "d"]
  assert reader.read(1).image == (tmp_path / "img" / names[1]).read_bytes()
  with pytest.raises(ValueError, match="use .jsonl or .csv"):
    sources.ManifestReader(str((tmp_path / "m.txt").write_text("x") and tmp_path / "m.txt"))
  (tmp_path / "bad.csv").write_text("path,text\nx.jpg,y\n")
  with pytest.raises(ValueError, match="no column 'image'"):
    sources.ManifestReader(str(tmp_path / "bad.csv"))


def test_lookup_nested_and_slashed_keys():
  example = {"image/id": 3, "captions": {"text": [b"x"]}, "meta": {"a/b": {"c": 1}}}
  assert sources._lookup(example, "image/id") == 3
  assert sources._lookup(example, "captions/text") == [b"x"]
  assert sources._lookup(example, "meta/a/b/c") == 1
  with pytest.raises(KeyError):
    sources._lookup(example, "captions/nope")


def test_tfds_reader_bad_keys(tmp_path):
  name = hd.write_tfds(str(tmp_path), [{"image": hd.image_bytes(0), "captions": ["x"]}])
  with pytest.raises(ValueError, match="no feature 'caption'.*data.caption_key"):
    sources.TfdsReader(name, split="train", data_dir=str(tmp_path), caption_key="caption")
  reader = sources.TfdsReader(name, split="train", data_dir=str(tmp_path))
  record = reader.read(0)
  assert record.image == hd.image_bytes(0) and record.captions == [b"x"]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_decode_image_modes_to_rgb(mode):
  arr = hd.pattern_array(1, 12, 10)
  image = Image.fromarray(arr).convert(mode if mode != "I;16" else "L")
  if mode == "I;16":
    image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
  buf = io.BytesIO()
  image.save(buf, "PNG")
  out = records.decode_image(buf.getvalue(), key="k", max_pixels=10**6, min_size=1)
  assert out.mode == "RGB" and out.size == (12, 10)
  if mode in ("RGB", "RGBA"):
    np.testing.assert_array_equal(np.asarray(out), arr)  # PNG is lossless.
  if mode in ("L", "I;16"):  # 16-bit grey is scaled to 8 bits, not clipped at 255.
    grey = np.asarray(Image.fromarray(arr).convert("L"))
    np.testing.assert_array_equal(np.asarray(out), np.stack([grey] * 3, -1))
  decoded = records.decode_image(arr, key="k", max_pixels=10**6, min_size=1)
  np.testing.assert_array_equal(np.asarray(decoded), arr)  # Pre-decoded arrays pass through.


def test_decode_captions_rules():
  assert records.decode_captions([b" a ", "", "b", None], key="k") == ["a", "b"]
  with pytest.raises(records.SkipRecord, match="bad_encoding"):
    records.decode_captions([b"ok", b"\xff"], key="k")
  with pytest.raises(records.SkipRecord, match="bad_encoding"):
    records.decode_captions(["bad \udcff"], key="k")  # Escaped undecodable byte from a CSV.
  with pytest.raises(records.SkipRecord, match="empty_caption"):
    records.decode_captions([" ", b""], key="k")
  assert os.path.basename(__file__) == "test_data_sources.py"
