"""Zero-shot classification accuracy and image-text retrieval recall, computed blockwise in JAX.

Both metrics reduce to one question per query: how many keys score *strictly* higher than the
query's best correct key? A query counts as a hit at ``k`` when fewer than ``k`` keys do.

- zero-shot top-k: queries are images, keys are class embeddings, the correct key is the label;
  the top-1 hits are also counted per class, for the mean per-class recall (clip_benchmark's
  ``mean_per_class_recall``).
- retrieval image->text: queries are images, keys are texts, the correct keys are the image's
  captions (a hit if ANY caption is in the top ``k``, the COCO-5k / Flickr30k-1k protocol).
- retrieval text->image: queries are texts, keys are images, the correct key is the text's image.

The strictly-higher rule makes ties count in the query's favour and gives the same answer on
every backend (an ``argsort`` breaks ties by position, which depends on the key order).

Scaling: the queries never sit on a device all at once. They are cut into blocks of
``block_size`` rows (the last one padded and masked); each block is a fixed shape, so one
compilation serves them all. With a ``mesh``, each block's rows are split over ALL the mesh's
devices (all axes, the data axis first: keys are replicated, so no device repeats another's
work) and per-device counts are summed with a ``psum``. A device then holds
``block_size / mesh.size`` rows of scores against all keys: for COCO image->text (25k
captions) at the default block size on 8 devices that is 512 x 25k floats (51 MB).

Inputs may be numpy arrays or jax Arrays (gathered to the host first: the embeddings of an
evaluation set are small next to the score matrix, which is never materialised whole).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_PAD_ID = -1  # query id of padding rows; never equals a key owner, and masks the row out.


def _count_hits(queries: jax.Array, query_ids: jax.Array, keys: jax.Array,
                key_owner: jax.Array, ks: tuple[int, ...],
                per_key: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Counts the queries of one block that are hits at each ``k`` in ``ks``.

  Args:
    queries: [B, D] query embeddings.
    query_ids: [B] int32; the id that marks a query's correct keys, ``_PAD_ID`` for padding.
    keys: [K, D] key embeddings.
    key_owner: [K] int32; key j is correct for every query whose id equals ``key_owner[j]``.
    ks: the cut-offs.
    per_key: also count, for each key, the real queries it is correct for that are top-1 hits
      (zero-shot: key j is class j, so these are the correctly classified images per class).

  Returns:
    [len(ks)] int32: for each k, the number of real queries with fewer than k keys scoring
    strictly higher than their best correct key; with ``per_key``, also the [K] int32 counts.
  """
  # HIGHEST: on TPU/GPU the default matmul precision is bf16-like, which would create ties
  # and flips that a float32 evaluation does not have.
  scores = jnp.dot(queries, keys.T, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
  correct = key_owner[None, :] == query_ids[:, None]
  best_correct = jnp.max(jnp.where(correct, scores, -jnp.inf), axis=1)
  n_above = jnp.sum(scores > best_correct[:, None], axis=1, dtype=jnp.int32)
  real = query_ids != _PAD_ID
  hits = (n_above[:, None] < jnp.asarray(ks, jnp.int32)[None, :]) & real[:, None]
  counts = jnp.sum(hits, axis=0, dtype=jnp.int32)
  if not per_key:
    return counts
  top1 = (n_above == 0) & real
  return counts, jnp.sum(correct & top1[:, None], axis=0, dtype=jnp.int32)


@functools.lru_cache(maxsize=32)
def _block_fn(mesh: Mesh | None, ks: tuple[int, ...], per_key: bool = False):
  """Returns the jitted per-block counter; with a mesh, rows are split over all its devices."""
  count = functools.partial(_count_hits, ks=ks, per_key=per_key)
  if mesh is None:
    return jax.jit(count)
  axes = tuple(mesh.axis_names)

  def local(queries, query_ids, keys, key_owner):
    # Each device counts its rows; the psum makes the result identical on every device.
    return jax.lax.psum(count(queries, query_ids, keys, key_owner), axes)

  out_specs = (P(), P()) if per_key else P()
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                               out_specs=out_specs))


def _put(array: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
  """Moves a host array to the default device, or lays it out by ``sharding``.

  ``make_array_from_callback`` copies to each addressable device only its slice, which is also
  correct on multi-host meshes (where ``device_put`` of a global array is not).
  """
  if sharding is None:
    return jax.device_put(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _hit_counts(queries: np.ndarray, query_ids: np.ndarray, keys: np.ndarray,
                key_owner: np.ndarray, ks: tuple[int, ...], mesh: Mesh | None,
                block_size: int, per_key: bool = False):
  """Runs ``_count_hits`` over all queries block by block; returns int64 [len(ks)] totals
  (with ``per_key``, also the int64 [K] top-1 hits per key)."""
  n = queries.shape[0]
  n_shards = 1 if mesh is None else mesh.size
  rows = min(block_size, n)
  rows = -(-rows // n_shards) * n_shards  # every device gets the same number of rows.
  if mesh is None:
    row_sharding = replicated = None
  else:
    row_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    replicated = NamedSharding(mesh, P())
  fn = _block_fn(mesh, ks, per_key)
  keys_dev = _put(keys, replicated)
  owner_dev = _put(key_owner, replicated)
  partials = []
  for start in range(0, n, rows):
    block = queries[start:start + rows]
    ids = query_ids[start:start + rows]
    pad = rows - block.shape[0]
    if pad:
      block = np.concatenate([block, np.zeros((pad, block.shape[1]), block.dtype)])
      ids = np.concatenate([ids, np.full((pad,), _PAD_ID, ids.dtype)])
    # Dispatch is asynchronous: blocks queue up on the devices while the host slices the next.
    partials.append(fn(_put(block, row_sharding), _put(ids, row_sharding), keys_dev, owner_dev))
  partials = jax.device_get(partials)
  if not per_key:
    return np.sum(np.stack(partials), axis=0, dtype=np.int64)
  return tuple(np.sum(np.stack(part), axis=0, dtype=np.int64) for part in zip(*partials))


def _host(x) -> np.ndarray:
  """Returns ``x`` as a host numpy array; a multi-host jax Array is all-gathered first."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _embeddings(x, name: str) -> np.ndarray:
  """Validates a [N, D] embedding matrix and returns it as float32."""
  array = _host(x)
  if array.ndim != 2:
    raise ValueError(f"{name} must be a 2-D [count, width] array, got shape {array.shape}.")
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise ValueError(f"{name} is empty (shape {array.shape}); pass at least one row.")
  array = array.astype(np.float32)
  if not np.all(np.isfinite(array)):
    # A NaN score compares False with everything, which would count the query as a hit.
    raise ValueError(f"{name} holds NaN or inf values; check the encoder outputs.")
  return array


def _ids(x, name: str, length: int, upper: int, upper_name: str) -> np.ndarray:
  """Validates a 1-D integer id array of ``length`` entries in [0, upper)."""
  array = _host(x)
  if array.ndim != 1 or array.shape[0] != length:
    raise ValueError(f"{name} must be 1-D with {length} entries (one per row), got shape "
                     f"{array.shape}.")
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"{name} must hold integers, got dtype {array.dtype}.")
  bad = (array < 0) | (array >= upper)
  if np.any(bad):
    first = int(np.argmax(bad))
    raise ValueError(f"{name}[{first}] = {int(array[first])} is outside [0, {upper}) "
                     f"({upper_name}); fix the ids or pass the matching embeddings.")
  return array.astype(np.int32)


def cutoffs(k, name: str = "k") -> tuple[int, ...]:
  """Validates ``k`` (an int or a sequence of ints >= 1); returns them deduplicated, in order."""
  values = (k,) if isinstance(k, numbers.Integral) else k
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise ValueError(f"{name} must be a positive int or a non-empty sequence of them, got {k!r}.")
  for value in values:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} values must be ints >= 1, got {value!r} in {k!r}.")
  return tuple(dict.fromkeys(int(v) for v in values))


def _check_run_args(mesh, block_size) -> None:
  if mesh is not None and not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
  if (isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
      or block_size < 1):
    raise ValueError(f"block_size must be an int >= 1, got {block_size!r}.")


def _check_widths(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"{a_name} has width {a.shape[1]} but {b_name} has width {b.shape[1]}; "
                     "both must come from the same joint embedding space.")


def zero_shot_accuracy(image_emb, labels, class_emb, k: int | Sequence[int] = (1, 5), *,
                       mesh: Mesh | None = None, block_size: int = 4096,
                       mean_per_class: bool = False) -> dict[str, float]:
  """Zero-shot top-k classification accuracy (and the mean per-class recall).

  An image is correct at ``k`` when fewer than ``k`` classes score strictly higher than its
  true class (so a tie with the true class counts as correct, and any ``k`` above the number
  of classes gives 1.0). Scores are plain dot products: pass L2-normalised embeddings.

  ``mean_per_class``: also ``mean_per_class_recall``, the top-1 accuracy of each class that has
  images, averaged over those classes (classes weigh the same whatever their size: what
  clip_benchmark reports, as scikit-learn's ``balanced_accuracy_score`` of the top-1 class).

  Args:
    image_emb: [N, D] image embeddings.
    labels: [N] integer true class of each image, in [0, C).
    class_emb: [C, D] class embeddings (e.g. from ``prompts.class_embeddings``).
    k: a cut-off or a sequence of them.
    mesh: optional mesh; each image block is split over all its devices, classes replicated.
    block_size: images per block (rounded up to a multiple of the mesh's device count).

  Returns:
    ``{"top{k}": accuracy}`` for each ``k`` (and ``"mean_per_class_recall"``), as Python floats
    in [0, 1].
  """
  ks = cutoffs(k)
  _check_run_args(mesh, block_size)
  images = _embeddings(image_emb, "image_emb")
  classes = _embeddings(class_emb, "class_emb")
  _check_widths(images, "image_emb", classes, "class_emb")
  ids = _ids(labels, "labels", images.shape[0], classes.shape[0], "the number of classes")
  owner = np.arange(classes.shape[0], dtype=np.int32)
  if not mean_per_class:
    hits = _hit_counts(images, ids, classes, owner, ks, mesh, block_size)
    return {f"top{kk}": float(h) / images.shape[0] for kk, h in zip(ks, hits)}
  hits, per_class = _hit_counts(images, ids, classes, owner, ks, mesh, block_size, per_key=True)
  result = {f"top{kk}": float(h) / images.shape[0] for kk, h in zip(ks, hits)}
  sizes = np.bincount(ids, minlength=classes.shape[0])
  present = sizes > 0
  result["mean_per_class_recall"] = float(np.mean(per_class[present] / sizes[present]))
  return result


def retrieval_recall(image_emb, text_emb, text_to_image, k: int | Sequence[int] = (1, 5, 10), *,
                     mesh: Mesh | None = None, block_size: int = 4096) -> dict[str, float]:
  """Image->text and text->image recall@k (COCO 5k / Flickr30k 1k protocol).

  Text j is a caption of image ``text_to_image[j]``; an image may have several captions and
  must have at least one. Image->text: an image counts at ``k`` when ANY of its captions is
  among its ``k`` most similar texts, i.e. fewer than ``k`` texts score strictly higher than
  its best caption. Text->image: a text counts when its image is among its ``k`` most similar
  images (fewer than ``k`` images strictly higher). Scores are plain dot products: pass
  L2-normalised embeddings; they are not renormalised here.

  Args:
    image_emb: [N, D] image embeddings.
    text_emb: [T, D] text embeddings.
    text_to_image: [T] integer image index of each text, in [0, N).
    k: a cut-off or a sequence of them.
    mesh: optional mesh; each query block (images for i2t, texts for t2i) is split over all
      its devices, the other modality replicated.
    block_size: queries per block (rounded up to a multiple of the mesh's device count).

  Returns:
    ``{"i2t@{k}": recall, ..., "t2i@{k}": recall, ...}`` as Python floats in [0, 1].
  """
  ks = cutoffs(k)
  _check_run_args(mesh, block_size)
  images = _embeddings(image_emb, "image_emb")
  texts = _embeddings(text_emb, "text_emb")
  _check_widths(images, "image_emb", texts, "text_emb")
  n_images = images.shape[0]
  owner = _ids(text_to_image, "text_to_image", texts.shape[0], n_images, "the number of images")
  captions = np.bincount(owner, minlength=n_images)
  if np.any(captions == 0):
    missing = np.flatnonzero(captions == 0)
    raise ValueError(f"{missing.size} image(s) have no caption in text_to_image (first: "
                     f"{missing[:5].tolist()}); drop them from image_emb or add their captions.")
  image_ids = np.arange(n_images, dtype=np.int32)
  i2t = _hit_counts(images, image_ids, texts, owner, ks, mesh, block_size)
  t2i = _hit_counts(texts, owner, images, image_ids, ks, mesh, block_size)
  result = {f"i2t@{kk}": float(h) / n_images for kk, h in zip(ks, i2t)}
  result.update({f"t2i@{kk}": float(h) / texts.shape[0] for kk, h in zip(ks, t2i)})
  return result
