"""Zero-shot accuracy and retrieval recall: known answers, numpy references, 8 devices = 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.evaluate.metrics import retrieval_recall, zero_shot_accuracy

AUTO = jax.sharding.AxisType.Auto


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _meshes():
  """1-D and 2-D meshes, jax 0.10's default axis type (Explicit), and half of the devices."""
  return [
      jax.make_mesh((8,), ("data",), axis_types=(AUTO,)),
      jax.make_mesh((4, 2), ("data", "model"), axis_types=(AUTO, AUTO)),
      jax.make_mesh((8,), ("batch",)),
      jax.sharding.Mesh(np.array(jax.devices()[4:]), ("data",)),
  ]


# ----------------------------------------------------------------------------- references


def _argsort_topk(images, labels, classes, ks):
  """Top-k accuracy from the position of the true class in a descending argsort."""
  order = np.argsort(-(images.astype(np.float64) @ classes.T.astype(np.float64)), axis=1)
  position = np.argmax(order == labels[:, None], axis=1)
  return {f"top{k}": float(np.mean(position < k)) for k in ks}


def _balanced_accuracy(images, labels, classes):
  """Mean per-class recall of the argmax class, as scikit-learn's ``balanced_accuracy_score``
  (clip_benchmark's ``mean_per_class_recall``): a confusion matrix over the classes seen in the
  labels or predictions, its diagonal over its row sums, averaged over the rows with images."""
  pred = np.argmax(images.astype(np.float64) @ classes.T.astype(np.float64), axis=1)
  seen = np.union1d(labels, pred)
  confusion = np.zeros((len(seen), len(seen)))
  np.add.at(confusion, (np.searchsorted(seen, labels), np.searchsorted(seen, pred)), 1)
  rows = confusion.sum(axis=1)
  return float(np.mean(np.diag(confusion)[rows > 0] / rows[rows > 0]))


def _argsort_recall(images, texts, text_to_image, ks):
  """Recall@k from descending argsorts: the first own caption / the true image's position."""
  scores = images.astype(np.float64) @ texts.T.astype(np.float64)
  i2t_order = np.argsort(-scores, axis=1)
  i2t_pos = np.array([np.flatnonzero(text_to_image[row] == i)[0]
                      for i, row in enumerate(i2t_order)])
  t2i_order = np.argsort(-scores.T, axis=1)
  t2i_pos = np.argmax(t2i_order == text_to_image[:, None], axis=1)
  out = {f"i2t@{k}": float(np.mean(i2t_pos < k)) for k in ks}
  out.update({f"t2i@{k}": float(np.mean(t2i_pos < k)) for k in ks})
  return out


def _strict_topk(images, labels, classes, ks):
  """Top-k accuracy by the strictly-higher rule (ties count for the image)."""
  scores = images @ classes.T
  above = np.sum(scores > scores[np.arange(len(labels)), labels][:, None], axis=1)
  return {f"top{k}": float(np.mean(above < k)) for k in ks}


def _strict_recall(images, texts, text_to_image, ks):
  """Recall@k by the strictly-higher rule, one query at a time."""
  scores = images @ texts.T
  i2t = [np.sum(row > row[text_to_image == i].max()) for i, row in enumerate(scores)]
  t2i = [np.sum(col > col[text_to_image[j]]) for j, col in enumerate(scores.T)]
  out = {f"i2t@{k}": float(np.mean(np.array(i2t) < k)) for k in ks}
  out.update({f"t2i@{k}": float(np.mean(np.array(t2i) < k)) for k in ks})
  return out


# ----------------------------------------------------------------------------- known answers


def _ranked_images():
  """16 images over 4 one-hot classes; the true class's rank is 0 twice, 1 5x, 2 6x, 3 3x."""
  ranks = [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3]
  labels = np.array([i % 4 for i in range(16)])
  images = np.zeros((16, 4))
  for i, (rank, label) in enumerate(zip(ranks, labels)):
    others = [c for c in range(4) if c != label]
    values = [4.0 - r for r in range(4) if r != rank]  # the scores the other classes get.
    images[i, label] = 4.0 - rank
    images[i, others] = values[::-1] if i % 2 else values
  return _unit(images), labels, np.eye(4)


def test_zero_shot_known_answer():
  images, labels, classes = _ranked_images()
  got = zero_shot_accuracy(images, labels, classes, k=(1, 2, 3, 4, 10))
  # k=10 exceeds the 4 classes: every image is correct.
  assert got == {"top1": 2 / 16, "top2": 7 / 16, "top3": 13 / 16, "top4": 1.0, "top10": 1.0}
  assert all(type(v) is float for v in got.values())
  assert zero_shot_accuracy(images, labels, classes) == {"top1": 0.125, "top5": 1.0}


def test_mean_per_class_recall_known_answer():
  """Unbalanced classes: class 0 has 1 image (right), class 1 three (one right, one a tie with
  class 0, one wrong), class 2 none. Per-class top-1 recall (1 + 2/3) / 2; top-1 3/4."""
  classes = np.eye(3)
  images = np.array([[1., 0., 0.], [0., 1., 0.], [1., 1., 0.], [0., 0., 1.]])
  labels = np.array([0, 1, 1, 1])
  got = zero_shot_accuracy(images, labels, classes, k=1, mean_per_class=True)
  assert got == {"top1": 0.75, "mean_per_class_recall": (1 + 2 / 3) / 2}
  for mesh in _meshes()[:2]:
    assert zero_shot_accuracy(images, labels, classes, k=1, mesh=mesh, block_size=3,
                              mean_per_class=True) == got
  images, labels, classes = _ranked_images()  # balanced classes: equal to top-1
  got = zero_shot_accuracy(images, labels, classes, k=(1, 2), mean_per_class=True)
  assert got == {"top1": 2 / 16, "top2": 7 / 16, "mean_per_class_recall": 2 / 16}


def test_mean_per_class_recall_matches_numpy_reference():
  rng = np.random.default_rng(3)
  _, _, classes = _random_set(4, n=240, c=9)
  labels = rng.choice(9, 240, p=np.array([30, 1, 2, 3, 4, 5, 6, 7, 0]) / 58)  # class 8: none
  # noisy copies of their class, the large class 0 the noisiest: its recall is the lowest
  noise = np.where(labels == 0, 1.2, 0.5)[:, None] * rng.normal(size=(240, 16))
  images = _unit(classes[labels] + noise).astype(np.float32)
  assert 8 not in labels and np.bincount(labels).max() > 10 * np.bincount(labels)[1:].min()
  scores = images.astype(np.float64) @ classes.T.astype(np.float64)
  assert _min_gap(scores, labels[:, None] == np.arange(9)) > 2e-6  # no near-ties
  expected = _balanced_accuracy(images, labels, classes)
  top1 = _argsort_topk(images, labels, classes, (1,))["top1"]
  assert 0.0 < expected < 1.0 and abs(expected - top1) > 0.01  # the weighting matters here
  for mesh, block_size in ((None, 7), (None, 4096), (_meshes()[0], 64), (_meshes()[1], 5)):
    got = zero_shot_accuracy(images, labels, classes, k=(1, 5), mesh=mesh, block_size=block_size,
                             mean_per_class=True)
    assert got["top1"] == top1
    np.testing.assert_allclose(got["mean_per_class_recall"], expected, rtol=1e-12)


def test_zero_shot_ties_count_for_the_image():
  classes = np.eye(3)
  images = np.array([[1., 1., 0.], [1., 1., 0.], [1., 1., 0.], [1., 1., 1.]])
  labels = np.array([0, 1, 2, 2])
  # Images 0, 1 and 3 tie with the best class (nothing strictly higher); image 2 has 2 above.
  got = zero_shot_accuracy(images, labels, classes, k=(1, 2, 3))
  assert got == {"top1": 0.75, "top2": 0.75, "top3": 1.0}


def _hand_scores():
  """Images = one-hot rows, so image i . text j is exactly S[i, j]."""
  s = np.array([[5, 1, 6, 0, 0, 0],
                [0, 0, 3, 7, 0, 0],
                [2, 2, 2, 2, 2, 0],
                [9, 8, 7, 6, 5, 4]], np.float64)
  return np.eye(4), s.T.copy(), np.array([0, 0, 1, 1, 2, 3])


def test_retrieval_known_answer():
  images, texts, text_to_image = _hand_scores()
  got = retrieval_recall(images, texts, text_to_image, k=(1, 2, 5, 10))
  # i2t ranks of the best own caption: img0 1 (text 2 beats caption 0), img1 0, img2 0 (tie),
  # img3 5. t2i ranks of the true image: 1, 2, 2, 0, 1, 0.
  assert got == {"i2t@1": 0.5, "i2t@2": 0.75, "i2t@5": 0.75, "i2t@10": 1.0,
                 "t2i@1": 2 / 6, "t2i@2": 4 / 6, "t2i@5": 1.0, "t2i@10": 1.0}
  assert got == _strict_recall(images, texts, text_to_image, (1, 2, 5, 10))


def test_known_answers_on_meshes():
  images, labels, classes = _ranked_images()
  r_images, texts, text_to_image = _hand_scores()
  for mesh in _meshes():
    assert zero_shot_accuracy(images, labels, classes, k=(1, 2, 3), mesh=mesh, block_size=5) == {
        "top1": 2 / 16, "top2": 7 / 16, "top3": 13 / 16}
    got = retrieval_recall(r_images, texts, text_to_image, k=(1, 2), mesh=mesh, block_size=3)
    assert got == {"i2t@1": 0.5, "i2t@2": 0.75, "t2i@1": 2 / 6, "t2i@2": 4 / 6}


# ----------------------------------------------------------------------------- random data


def _random_set(seed, n=300, c=37, d=16):
  rng = np.random.default_rng(seed)
  images = _unit(rng.normal(size=(n, d))).astype(np.float32)
  classes = _unit(rng.normal(size=(c, d))).astype(np.float32)
  labels = rng.integers(0, c, n)
  return images, labels, classes


def _min_gap(scores, own):
  """Smallest |score - best own score| over the other keys; float32 error must stay far below."""
  best = np.where(own, scores, -np.inf).max(axis=1)
  return np.abs(scores - best[:, None])[~own].min()


def test_zero_shot_matches_argsort_any_block_and_mesh():
  images, labels, classes = _random_set(0)
  scores = images.astype(np.float64) @ classes.T.astype(np.float64)
  assert _min_gap(scores, labels[:, None] == np.arange(len(classes))) > 2e-6
  ks = (1, 5, 10)
  expected = _argsort_topk(images, labels, classes, ks)
  assert 0.0 < expected["top1"] < expected["top5"] < expected["top10"] < 1.0
  for block_size in (1, 7, 64, 300, 4096):  # 7 and 64 do not divide 300.
    assert zero_shot_accuracy(images, labels, classes, k=ks, block_size=block_size) == expected
  for mesh in _meshes():
    for block_size in (7, 64):  # 7 rounds up to 8 rows, one per device.
      got = zero_shot_accuracy(images, labels, classes, k=ks, mesh=mesh, block_size=block_size)
      assert got == expected


def test_retrieval_matches_argsort_with_several_captions():
  rng = np.random.default_rng(1)
  n, d = 120, 16
  images = _unit(rng.normal(size=(n, d))).astype(np.float32)
  # 1 to 5 captions per image, shuffled, each a noisy copy of its image.
  text_to_image = rng.permutation(np.repeat(np.arange(n), rng.integers(1, 6, n)))
  texts = _unit(images[text_to_image] + 0.9 * rng.normal(size=(len(text_to_image), d)))
  texts = texts.astype(np.float32)
  ks = (1, 5, 10)
  expected = _argsort_recall(images, texts, text_to_image, ks)
  assert 0.0 < expected["i2t@1"] < expected["i2t@10"] < 1.0
  assert 0.0 < expected["t2i@1"] < expected["t2i@10"] < 1.0
  # The float64 argsort and float32 JAX can only disagree on near-ties: check there are none.
  scores = images.astype(np.float64) @ texts.T.astype(np.float64)
  own = text_to_image[None, :] == np.arange(n)[:, None]
  assert min(_min_gap(scores, own), _min_gap(scores.T, own.T)) > 2e-6
  assert retrieval_recall(images, texts, text_to_image, k=ks, block_size=50) == expected
  for mesh in _meshes():
    got = retrieval_recall(images, texts, text_to_image, k=ks, mesh=mesh, block_size=50)
    assert got == expected


def test_ties_match_strict_numpy_reference():
  """Small-integer embeddings: dot products are exact and ties are everywhere."""
  rng = np.random.default_rng(2)
  images = rng.integers(-2, 3, (90, 5)).astype(np.float32)
  classes = rng.integers(-2, 3, (11, 5)).astype(np.float32)
  labels = rng.integers(0, 11, 90)
  ks = (1, 3, 5, 20)
  expected = _strict_topk(images, labels, classes, ks)
  assert expected != _argsort_topk(images, labels, classes, ks)  # ties matter here.
  assert zero_shot_accuracy(images, labels, classes, k=ks, block_size=16) == expected
  texts = rng.integers(-2, 3, (200, 5)).astype(np.float32)
  text_to_image = np.concatenate([np.arange(90), rng.integers(0, 90, 110)])
  expected = _strict_recall(images, texts, text_to_image, ks)
  mesh = _meshes()[0]
  assert retrieval_recall(images, texts, text_to_image, k=ks, block_size=33) == expected
  assert retrieval_recall(images, texts, text_to_image, k=ks, mesh=mesh, block_size=33) == expected


def test_accepts_jax_arrays_and_int_k():
  images, labels, classes = _ranked_images()
  got = zero_shot_accuracy(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(classes), k=2)
  assert got == {"top2": 7 / 16}


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
  images, labels, classes = _ranked_images()
  with pytest.raises(ValueError, match="width"):
    zero_shot_accuracy(images, labels, np.eye(5))
  with pytest.raises(ValueError, match=r"labels\[3\] = 4 is outside \[0, 4\)"):
    zero_shot_accuracy(images, np.where(np.arange(16) == 3, 4, labels), classes)
  with pytest.raises(ValueError, match="16 entries"):
    zero_shot_accuracy(images, labels[:-1], classes)
  with pytest.raises(ValueError, match="integers"):
    zero_shot_accuracy(images, labels.astype(np.float32), classes)
  with pytest.raises(ValueError, match="2-D"):
    zero_shot_accuracy(images[0], labels[:1], classes)
  with pytest.raises(ValueError, match="NaN"):
    zero_shot_accuracy(np.where(images > 0.5, np.nan, images), labels, classes)
  with pytest.raises(ValueError, match=">= 1"):
    zero_shot_accuracy(images, labels, classes, k=(1, 0))
  with pytest.raises(ValueError, match="block_size"):
    zero_shot_accuracy(images, labels, classes, block_size=0)
  with pytest.raises(ValueError, match="Mesh"):
    zero_shot_accuracy(images, labels, classes, mesh="data")

  r_images, texts, text_to_image = _hand_scores()
  with pytest.raises(ValueError, match=r"no caption .*first: \[3\]"):
    retrieval_recall(r_images, texts[:5], text_to_image[:5])
  with pytest.raises(ValueError, match=r"text_to_image\[0\] = 4 is outside \[0, 4\)"):
    retrieval_recall(r_images, texts, np.array([4, 0, 1, 1, 2, 3]))
  with pytest.raises(ValueError, match="width"):
    retrieval_recall(r_images, texts[:, :3], text_to_image)
  with pytest.raises(ValueError, match="6 entries"):
    retrieval_recall(r_images, texts, text_to_image[:5])
