"""Training/eval sources: order, per-process slices, coverage, exact resume, captions, workers."""

import json
import zlib

import ml_collections
import numpy as np
import pytest

from align_jax.data import pipeline, transforms

import helpers_data as hd

SIZE = 16
# Token id of the word "{i}" → i: recovers a batch row's record from its caption "record {i} ...".
_RECORD_OF_TOKEN = {1 + zlib.crc32(str(i).encode()) % (hd.VOCAB - 1): i for i in range(100)}
assert len(_RECORD_OF_TOKEN) == 100  # No hash collision among the record numbers used.


def records_of(batch):
  return [_RECORD_OF_TOKEN[int(t)] for t in batch["text"]["input_ids"][:, 1]]


def make(cfg, batch, *, seed=0, p=0, n=1, train=True, randaugment=False):
  return pipeline.make_pair_source(
      cfg, global_batch_size=batch, seed=seed,
      image_transform=transforms.make_image_transform(SIZE, train=train, randaugment=randaugment),
      tokenize=hd.fake_tokenize, process_index=p, process_count=n, train=train)


@pytest.fixture(scope="module")
def manifest_cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp("manifest")
  names = hd.write_image_folder(str(root / "images"), 23)
  rows = [{"image": name, "caption": [hd.caption(i, v) for v in range(3)]}
          for i, name in enumerate(names)]
  path = hd.write_manifest(str(root / "train.jsonl"), rows)
  return ml_collections.ConfigDict(
      {"source": "manifest", "path": path, "image_root": str(root / "images"), "num_workers": 0})


@pytest.fixture(scope="module")
def wds_cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp("wds")
  hd.write_webdataset(str(root), num_shards=3, per_shard=7, json_every=3)
  return ml_collections.ConfigDict(
      {"source": "webdataset", "urls": str(root / "{00000..00002}.tar"), "num_workers": 0,
       "index_cache_dir": str(root / "index")})


@pytest.fixture(scope="module")
def tfds_cfg(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  examples = [{"image": hd.image_bytes(i), "captions": [hd.caption(i, v) for v in range(2)]}
              for i in range(11)]
  name = hd.write_tfds(data_dir, examples)
  return ml_collections.ConfigDict(
      {"source": "tfds", "name": name, "split": "train", "data_dir": data_dir, "num_workers": 0})


def take(source, steps):
  return [next(source) for _ in range(steps)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"]["pixel_values"], y["image"]["pixel_values"])
    np.testing.assert_array_equal(x["text"]["input_ids"], y["text"]["input_ids"])
    np.testing.assert_array_equal(x["text"]["attention_mask"], y["text"]["attention_mask"])


@pytest.mark.parametrize("name", ["manifest_cfg", "wds_cfg"])
def test_order_is_deterministic_per_seed_and_epochs_are_permutations(name, request):
  cfg = request.getfixturevalue(name)
  n = 23 if name == "manifest_cfg" else 21
  a = take(make(cfg, 4, seed=5), 12)
  assert_batches_equal(a, take(make(cfg, 4, seed=5), 12))
  stream = [r for batch in a for r in records_of(batch)]
  assert sorted(stream[:n]) == list(range(n))  # Epoch 0 visits every record once.
  assert sorted(stream[n:2 * n]) == list(range(n))  # So does epoch 1 ...
  assert stream[:n] != stream[n:2 * n]  # ... in a fresh order.
  other = [r for batch in take(make(cfg, 4, seed=6), 6) for r in records_of(batch)]
  assert other != stream[:24]
  batch = a[0]
  assert batch["image"]["pixel_values"].shape == (4, SIZE, SIZE, 3)
  assert batch["image"]["pixel_values"].dtype == np.float32
  assert batch["text"]["input_ids"].dtype == np.int32 and batch["text"]["input_ids"].shape == (4, 8)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_processes_get_contiguous_slices_disjoint_and_complete(count, wds_cfg):
  n, local = 21, 2
  global_batches = take(make(wds_cfg, local * count, seed=1), 9)
  per_process = [take(make(wds_cfg, local * count, seed=1, p=p, n=count), 9) for p in range(count)]
  for t, global_batch in enumerate(global_batches):
    stacked = {"image": {"pixel_values": np.concatenate(
        [per_process[p][t]["image"]["pixel_values"] for p in range(count)])},
               "text": {k: np.concatenate([per_process[p][t]["text"][k] for p in range(count)])
                        for k in ("input_ids", "attention_mask")}}
    assert_batches_equal([global_batch], [stacked])  # Slice p of batch t is process p's batch t.
  first_epoch = []
  for p in range(count):
    for t, batch in enumerate(per_process[p]):
      for o, record in enumerate(records_of(batch)):
        if ((t * count + p) * local + o) < n:
          first_epoch.append(record)
  assert sorted(first_epoch) == list(range(n))  # Disjoint (no repeats) and complete.


@pytest.mark.parametrize("name,workers", [("manifest_cfg", 0), ("wds_cfg", 0), ("tfds_cfg", 0),
                                          ("wds_cfg", 2)])
def test_exact_resume(name, workers, request):
  cfg = request.getfixturevalue(name).copy_and_resolve_references()
  reference = take(make(cfg, 6, seed=3, p=1, n=2, randaugment=True), 7)
  first = make(cfg, 6, seed=3, p=1, n=2, randaugment=True)
  assert_batches_equal(take(first, 4), reference[:4])
  state = json.loads(json.dumps(first.get_state()))  # Must survive a JSON checkpoint.
  cfg.num_workers = workers  # The worker count may change across a restart.
  resumed = make(cfg, 6, seed=3, p=1, n=2, randaugment=True)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), reference[4:])
  assert resumed.get_state()["position"] == 7 * 3


def test_set_state_rejects_other_layout(wds_cfg):
  state = make(wds_cfg, 4, seed=0, p=0, n=2).get_state()
  with pytest.raises(ValueError, match="process_count=2"):
    make(wds_cfg, 2, seed=0, p=0, n=1).set_state(state)
  with pytest.raises(ValueError, match="local_batch=2"):
    make(wds_cfg, 8, seed=0, p=0, n=2).set_state(state)
  with pytest.raises(ValueError, match="seed"):
    make(wds_cfg, 4, seed=1, p=0, n=2).set_state(state)


def test_one_caption_sampled_per_step_deterministically(manifest_cfg):
  batches = take(make(manifest_cfg, 4, seed=2), 30)  # ~5 epochs of 23 records.
  seen: dict[int, set[str]] = {}
  for batch in batches:
    for record, ids in zip(records_of(batch), batch["text"]["input_ids"]):
      variants = [v for v in range(3)
                  if np.array_equal(hd.fake_tokenize([hd.caption(record, v)])["input_ids"][0], ids)]
      assert len(variants) == 1
      seen.setdefault(record, set()).add(variants[0])
  assert sum(len(v) > 1 for v in seen.values()) > 15  # Captions vary across epochs.
  assert_batches_equal(batches, take(make(manifest_cfg, 4, seed=2), 30))


@pytest.mark.parametrize("name,n,caps", [("manifest_cfg", 23, 3), ("tfds_cfg", 11, 2)])
def test_eval_yields_every_image_once_with_all_captions(name, n, caps, request):
  cfg = request.getfixturevalue(name)
  sources = [make(cfg, 6, p=p, n=2, train=False) for p in range(2)]
  assert len(sources[0]) == len(sources[1]) == -(-n // 6)
  seen = []
  for source in sources:
    batches = list(source)
    assert len(batches) == len(source)
    for batch in batches:
      assert batch["image"]["pixel_values"].shape == (3, SIZE, SIZE, 3)
      assert batch["text"]["input_ids"].shape == (3, 8)
      for row, image_id in enumerate(batch["image_id"]):
        if image_id < 0:
          assert not batch["valid"][row] and batch["captions"][row] == []
          assert not batch["image"]["pixel_values"][row].any()
          continue
        record = int(batch["captions"][row][0].split()[1])
        assert batch["captions"][row] == [hd.caption(record, v) for v in range(caps)]
        if name == "manifest_cfg":
          want = transforms.make_image_transform(SIZE, train=False)(
              hd.Image.fromarray(hd.pattern_array(record)), None)
          # The stored file is a JPEG: compare with the decoded file, not the raw pattern.
          assert np.abs(batch["image"]["pixel_values"][row] - want).mean() < 0.2
        seen.append(record)
    # text_to_image points each caption at the row of its image among this process's images.
    rows = [c for batch in batches for c, ok in zip(batch["captions"], batch["valid"]) if ok]
    assert len(rows) == len(source.image_ids)
    assert source.captions_flat == [c for cs in rows for c in cs]
    for caption, row in zip(source.captions_flat, source.text_to_image):
      assert caption in rows[row]
    assert len(source.captions_flat) == caps * len(source.image_ids)
  assert sorted(seen) == list(range(n))


def test_text_batches_pad_to_fixed_shape():
  texts = [hd.caption(i) for i in range(5)]
  out = list(pipeline.text_batches(texts, hd.fake_tokenize, 4))
  assert [v.tolist() for _, v in out] == [[True] * 4, [True, False, False, False]]
  np.testing.assert_array_equal(
      out[1][0]["input_ids"][0], hd.fake_tokenize(texts[4:])["input_ids"][0])
  assert out[1][0]["input_ids"].shape == (4, 8) and not out[1][0]["attention_mask"][1:].any()


def test_config_errors(wds_cfg, tmp_path):
  with pytest.raises(ValueError, match="multiple of the process count"):
    make(wds_cfg, 5, p=0, n=2)
  with pytest.raises(ValueError, match="unknown data.source"):
    make(ml_collections.ConfigDict({"source": "bogus"}), 4)
  with pytest.raises(ValueError, match="no shard matched"):
    make(ml_collections.ConfigDict({"source": "webdataset", "urls": str(tmp_path / "*.tar")}), 4)
  with pytest.raises(ValueError, match="neither a local path nor a URL"):  # gs://: test_cloud_storage
    make(ml_collections.ConfigDict({"source": "webdataset", "urls": "pipe:curl -s x/{0..3}.tar"}), 4)
  with pytest.raises(ValueError, match="does not exist"):
    make(ml_collections.ConfigDict({"source": "manifest", "path": str(tmp_path / "x.jsonl")}), 4)
  with pytest.raises(ValueError, match="no TFDS dataset named 'nonexistent_ds_xyz' \\(data.name\\)"):
    make(ml_collections.ConfigDict({"source": "tfds", "name": "nonexistent_ds_xyz",
                                    "data_dir": str(tmp_path)}), 4)

  def bad_tokenize(texts):
    return {"input_ids": np.zeros((len(texts), 3, 1)), "attention_mask": np.zeros((len(texts), 3))}

  source = pipeline.make_pair_source(
      wds_cfg, global_batch_size=2, seed=0, tokenize=bad_tokenize, process_index=0, process_count=1,
      image_transform=transforms.make_image_transform(SIZE, train=True))
  with pytest.raises(ValueError, match="fixed max_length"):
    next(source)
