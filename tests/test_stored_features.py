"""The array-backed source: process shards, exact resume, epochs, memory-mapped stored features."""

import numpy as np
import pytest

from align_jax.data import array_sources as features


def _source(n=10, batch=4, **kw):
  image = {"pooled": np.arange(n, dtype=np.float32)[:, None]}
  text = {"pooled": -np.arange(n, dtype=np.float32)[:, None]}
  return features.ArrayPairSource(image, text, global_batch_size=batch, seed=3,
                                  process_index=kw.pop("process_index", 0),
                                  process_count=kw.pop("process_count", 1), **kw)


def _ids(batch):
  ids = batch["image"]["pooled"][:, 0].astype(int)
  np.testing.assert_array_equal(batch["text"]["pooled"][:, 0], -ids)  # pairs stay paired
  return ids


def test_each_epoch_is_a_permutation_and_batches_cross_epochs():
  source = _source(n=10, batch=4)
  seen = np.concatenate([_ids(next(source)) for _ in range(5)])  # 20 = two epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  assert list(seen[:10]) != list(seen[10:])  # reshuffled per epoch


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_processes_split_every_global_batch_disjointly_and_completely(processes):
  batch = 12
  single = _source(n=30, batch=batch)
  shards = [_source(n=30, batch=batch, process_index=p, process_count=processes)
            for p in range(processes)]
  for _ in range(6):
    parts = [_ids(next(s)) for s in shards]
    np.testing.assert_array_equal(np.concatenate(parts), _ids(next(single)))


def test_resume_gives_the_batches_an_uninterrupted_run_sees():
  uninterrupted = _source(n=13, batch=4)
  expected = [_ids(next(uninterrupted)) for _ in range(9)]
  first = _source(n=13, batch=4)
  for _ in range(4):
    next(first)
  resumed = _source(n=13, batch=4)
  resumed.set_state(first.get_state())
  np.testing.assert_array_equal(np.stack([_ids(next(resumed)) for _ in range(5)]),
                                np.stack(expected[4:]))


def test_tower_batches_cover_everything_once_with_padding():
  source = _source(n=10, batch=4, shuffle=False)
  batches = list(source.tower_batches("image", 4))
  ids = np.concatenate([b["pooled"][:, 0][valid] for b, valid in batches]).astype(int)
  np.testing.assert_array_equal(ids, np.arange(10))
  assert [valid.sum() for _, valid in batches] == [4, 4, 2]


def test_several_captions_per_image_one_sampled_per_step():
  image = {"pooled": np.arange(4, dtype=np.float32)[:, None]}
  text_to_image = np.array([0, 0, 0, 1, 2, 2, 3])
  text = {"pooled": text_to_image.astype(np.float32)[:, None] + np.arange(7)[:, None] / 100}
  source = features.ArrayPairSource(image, text, global_batch_size=4, seed=0,
                                    text_to_image=text_to_image, process_index=0,
                                    process_count=1)
  chosen = set()
  for _ in range(30):
    batch = next(source)
    owner = np.floor(batch["text"]["pooled"][:, 0]).astype(int)
    np.testing.assert_array_equal(owner, batch["image"]["pooled"][:, 0].astype(int))
    chosen.update(np.round(batch["text"]["pooled"][:, 0] % 1 * 100).astype(int).tolist())
  assert chosen == set(range(7))  # every caption gets used
  texts = np.concatenate([b["pooled"][:, 0][v] for b, v in source.tower_batches("text", 4)])
  assert len(texts) == 7


def test_memory_mapped_stored_features(tmp_path):
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(20, 3, 4)).astype(np.float16)
  mask = rng.random((20, 3)) > 0.3
  pooled = rng.normal(size=(20, 5)).astype(np.float16)
  np.save(tmp_path / "image.npy", tokens)
  np.save(tmp_path / "image_mask.npy", mask)
  np.save(tmp_path / "text.npy", pooled)
  image, text, text_to_image = features.load_stored_features(str(tmp_path))
  assert text_to_image is None
  assert isinstance(image["tokens"], np.memmap)
  source = features.ArrayPairSource(image, text, global_batch_size=8, seed=0, process_index=0,
                                    process_count=1)
  idx = np.sort(source.indices(0, 8))  # a batch's rows come sorted (the module docstring)
  batch = next(source)
  np.testing.assert_array_equal(batch["image"]["tokens"], tokens[idx])
  np.testing.assert_array_equal(batch["image"]["mask"], mask[idx])
  np.testing.assert_array_equal(batch["text"]["pooled"], pooled[idx])


def test_stored_feature_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="image.npy"):
    features.load_stored_features(str(tmp_path))
  np.save(tmp_path / "image.npy", np.zeros((4, 2, 3), np.float32))
  np.save(tmp_path / "text.npy", np.zeros((4, 3), np.float32))
  with pytest.raises(ValueError, match="image_mask.npy"):
    features.load_stored_features(str(tmp_path))
  with pytest.raises(ValueError, match="different numbers of pairs"):
    features.ArrayPairSource({"pooled": np.zeros((4, 2))}, {"pooled": np.zeros((5, 2))},
                             global_batch_size=2, seed=0)


def _block_permutation(n, block, seed, epoch):
  """Epoch ``epoch``'s records: a permutation of the blocks of ``block`` consecutive records."""
  blocks = np.random.default_rng([seed, epoch]).permutation(-(-n // block))
  records = np.concatenate([np.arange(b * block, min((b + 1) * block, n)) for b in blocks])
  assert block > 1 or np.array_equal(records, np.random.default_rng([seed, epoch]).permutation(n))
  return records


def _reference_batches(n, batch, seed, steps, processes, process_index, block=1):
  """The documented order, from scratch: epoch permutations, each epoch's part of a batch sorted."""
  stream = np.concatenate([_block_permutation(n, block, seed, e)
                           for e in range(steps * batch // n + 2)])
  epoch = np.arange(len(stream)) // n
  local = batch // processes
  out = []
  for step in range(steps):
    rows, epochs = stream[step * batch:(step + 1) * batch], epoch[step * batch:(step + 1) * batch]
    rows = np.concatenate([np.sort(rows[epochs == e]) for e in np.unique(epochs)])
    out.append(rows[process_index * local:(process_index + 1) * local])
  return out


@pytest.mark.parametrize("n,batch,processes", [(10, 4, 1), (13, 6, 2), (7, 12, 3), (50, 8, 4)])
def test_order_is_the_documented_function_of_seed_and_position(n, batch, processes):
  for p in range(processes):
    source = _source(n=n, batch=batch, process_index=p, process_count=processes)
    got = [_ids(next(source)) for _ in range(9)]
    want = _reference_batches(n, batch, 3, 9, processes, p)
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    resumed = _source(n=n, batch=batch, process_index=p, process_count=processes)
    resumed.set_state({"position": 5 * batch})  # a fresh process: nothing cached
    np.testing.assert_array_equal(_ids(next(resumed)), want[5])


@pytest.mark.parametrize("n,block,batch,processes",
                         [(64, 8, 16, 1), (64, 8, 16, 2), (61, 8, 16, 1), (50, 4, 12, 3)])
def test_block_shuffle_is_the_documented_function_of_seed_and_position(n, block, batch, processes):
  for p in range(processes):
    source = _source(n=n, batch=batch, process_index=p, process_count=processes,
                     shuffle_block_rows=block)
    got = [_ids(next(source)) for _ in range(9)]
    want = _reference_batches(n, batch, 3, 9, processes, p, block=block)
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    resumed = _source(n=n, batch=batch, process_index=p, process_count=processes,
                      shuffle_block_rows=block)
    resumed.set_state({"position": 5 * batch})
    np.testing.assert_array_equal(_ids(next(resumed)), want[5])


def test_block_shuffle_visits_every_pair_once_and_keeps_blocks_in_one_batch():
  n, block, batch = 640, 16, 64
  source = _source(n=n, batch=batch, shuffle_block_rows=block)
  epochs = [np.concatenate([_ids(next(source)) for _ in range(n // batch)]) for _ in range(2)]
  for seen in epochs:
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    for ids in seen.reshape(-1, batch):  # whole blocks, each of its rows in ascending order
      assert np.all(np.bincount(ids // block, minlength=n // block)[np.unique(ids // block)]
                    == block)
  assert not np.array_equal(epochs[0], epochs[1])  # blocks reshuffled per epoch
  with pytest.raises(ValueError, match="at least one record"):
    _source(shuffle_block_rows=0)


def test_batches_are_sorted_and_hold_the_permuted_pairs():
  source = _source(n=1000, batch=100)
  for step in range(10):
    ids = _ids(next(source))
    assert np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(ids, np.sort(source.indices(step * 100, 100)))


def test_recycled_batch_memory_is_never_overwritten_while_held():
  source = _source(n=64, batch=8)
  held = [next(source) for _ in range(5)]  # more than the pool's buffers: all stay intact
  copies = [{t: {k: v.copy() for k, v in a.items()} for t, a in b.items()} for b in held]
  for _ in range(6):
    next(source)
  for batch, copy in zip(held, copies):
    np.testing.assert_array_equal(batch["image"]["pooled"], copy["image"]["pooled"])
    np.testing.assert_array_equal(batch["text"]["pooled"], copy["text"]["pooled"])
  # A batch that is dropped gives its memory to a later one (no fresh pages every step).
  addresses = set()
  for _ in range(6):
    addresses.add(next(source)["image"]["pooled"].ctypes.data)
  assert len(addresses) == 1


def test_recycled_memory_survives_a_jax_array_made_from_it():
  import jax
  source = _source(n=64, batch=8)
  batch = next(source)
  want = batch["image"]["pooled"].copy()
  on_device = jax.device_put(batch["image"]["pooled"], jax.devices("cpu")[0])
  del batch  # only the jax array (zero-copy on CPU when aligned) may still read the buffer
  for _ in range(8):
    next(source)
  np.testing.assert_array_equal(np.asarray(on_device), want)


def test_concatenated_array_take_equals_numpy_for_any_index(tmp_path):
  rng = np.random.default_rng(1)
  whole = rng.normal(size=(23, 3, 2)).astype(np.float16)
  np.save(tmp_path / "a.npy", whole)
  mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
  joined = features.ConcatenatedArray([mapped[:5], mapped[5:6], mapped[6:20], mapped[20:]])
  for index in (np.sort(rng.integers(0, 23, 40)), rng.integers(0, 23, 40), np.array([], int),
                np.array([22, 0, 0, 5])):
    np.testing.assert_array_equal(joined[index], whole[index])
    out = np.empty((len(index), 3, 2), np.float16)
    assert features.take_rows(joined, index, out) is out
    np.testing.assert_array_equal(out, whole[index])
    np.testing.assert_array_equal(features.take_rows(mapped, index), whole[index])
  for bad in (np.array([23]), np.array([-1, 2])):
    with pytest.raises(IndexError, match="outside 0..22"):
      joined[bad]
    with pytest.raises(IndexError, match="outside 0..22"):
      features.take_rows(mapped, bad)
