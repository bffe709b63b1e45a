"""Image–caption batches for training and evaluation: order, sharding, workers, skipping, resume.

Order. The global stream is the concatenation of epochs; epoch ``e`` visits every record once in a
permutation seeded by ``(seed, e)`` (:mod:`align_jax.data.order`, shared with the array sources).
Stream position ``k`` is cut into chunks of ``b`` (the per-process batch); chunk ``c`` belongs to
process ``c % P``. Without bad records, global batch ``t`` is chunks ``tP … tP+P−1``, so each
process holds a contiguous slice of every global batch, and within an epoch the processes' records
are disjoint and together complete.

Bad records. A process that meets a bad record takes the next record of its own chunks, so it
never needs another process's data, and the batch keeps its fixed shape. Skips are counted
(``data/skipped_<reason>``); the first few per reason are logged with the file or key, then only
counts (:class:`align_jax.data.records.SkipCounter`).

Determinism. Example ``k`` is decoded, captioned and augmented with a generator seeded by
``(seed, k, record)``: independent of the number of workers. The state is the number of local
stream positions consumed (plus the counters), so a restored source continues exactly where an
uninterrupted run would; positions prefetched but not consumed are simply recomputed.

Evaluation. The same chunking over one unshuffled pass (record order): each image once, with all
its captions, and every process yields ``ceil(N / global_batch)`` batches (padding rows have
``image_id == -1``), so multi-host evaluation steps stay in lock-step.

Workers. Decoding and augmentation run in grain: threads when ``num_workers == 0`` (tests),
``num_workers`` processes otherwise; tokenisation runs batched in the main process.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
from PIL import Image

from align_jax.data import order as order_lib
from align_jax.data import reader_factory as readers
from align_jax.data import records

_log = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], dict[str, np.ndarray]]


class StreamPlan:
  """Maps a process's local stream position to a global stream position and a record index.

  The order is :mod:`align_jax.data.order`'s (the same as the array sources'); chunk ``c`` of
  ``local_batch`` local positions is this process's slice of global batch ``c``.
  """

  def __init__(self, num_records: int, local_batch: int, process_index: int, process_count: int,
               seed: int, shuffle: bool):
    self.num_records = num_records
    self.local_batch = local_batch
    self.process_index = process_index
    self.process_count = process_count
    self.seed = seed
    self.shuffle = shuffle
    self._order = order_lib.EpochOrder(num_records, seed, shuffle)

  def global_position(self, local: int) -> int:
    chunk, offset = divmod(local, self.local_batch)
    global_start = chunk * self.process_count * self.local_batch
    return order_lib.process_start(global_start, self.local_batch, self.process_index) + offset

  def record(self, position: int) -> int:
    return self._order.record(position)


class ExampleLoader:
  """Local position → decoded, augmented example, or a skip marker (runs in grain workers)."""

  def __init__(self, reader: records.RecordReader, plan: StreamPlan,
               image_transform: Callable[..., np.ndarray], *, train: bool,
               limits: records.DecodeLimits, captions_per_image: int = 1):
    self.reader, self.plan, self.transform = reader, plan, image_transform
    self.train, self.limits = train, limits
    self.captions_per_image = captions_per_image

  def __call__(self, local: int) -> dict[str, Any]:
    position = self.plan.global_position(local)
    if not self.train and position >= self.plan.num_records:
      return {"pad": True}
    record = self.plan.record(position)
    rng = np.random.default_rng([self.plan.seed, position, record])
    key = f"{self.reader.name}#{record}"
    try:
      raw = self.reader.read(record)
      key = raw.key
      image, captions = records.decode(raw, self.limits)
    except records.SkipRecord as e:
      return {"skip": e.reason, "detail": e.detail, "key": key}
    if self.train:  # k cyclically consecutive captions from a random start (k = 1: one)
      start = int(rng.integers(len(captions)))
      captions = [captions[(start + i) % len(captions)] for i in range(self.captions_per_image)]
    pixels = np.asarray(self.transform(image, rng), np.float32)
    return {"pixels": pixels, "captions": captions, "record": record}


def _tokenize(tokenize: Tokenize, texts: list[str], batch: int) -> dict[str, np.ndarray]:
  out = tokenize(texts)
  for name in ("input_ids", "attention_mask"):
    if name not in out or np.ndim(out[name]) != 2 or np.shape(out[name])[0] != batch:
      raise ValueError(f"tokenize must return {name!r} of shape [{batch}, L], got "
                       f"{ {k: np.shape(v) for k, v in out.items()} }; pad to a fixed max_length")
  return {"input_ids": np.asarray(out["input_ids"], np.int32),
          "attention_mask": np.asarray(out["attention_mask"], np.int32)}


class _BaseSource:
  """Shared machinery: the grain iterator from a position, skip accounting, state."""

  def __init__(self, reader: records.RecordReader, plan: StreamPlan, loader: ExampleLoader,
               tokenize: Tokenize, *, num_workers: int, num_threads: int, prefetch: int,
               stop: int, max_consecutive_skips: int):
    self.reader, self._plan, self._loader, self._tokenize = reader, plan, loader, tokenize
    self._num_workers, self._num_threads, self._prefetch = num_workers, num_threads, prefetch
    self._stop = stop
    self._max_consecutive_skips = max_consecutive_skips
    self._position = 0
    self._consecutive_skips = 0
    self._skips = records.SkipCounter(reader.name, _log, reader.index_skips)
    self._iterator = None

  def _start(self):
    return records.load_in_order(
        self._loader, range(self._position, self._stop), num_threads=self._num_threads,
        prefetch=self._prefetch, num_workers=self._num_workers)

  def _next_example(self) -> dict[str, Any]:
    """The next usable example of this process's stream (StopIteration at the end of eval)."""
    while True:
      if self._iterator is None:
        self._iterator = self._start()
      example = next(self._iterator)
      self._position += 1
      if "skip" not in example:
        self._consecutive_skips = 0
        return example
      self._record_skip(example)

  def _record_skip(self, example: dict[str, Any]) -> None:
    self._skips.add(example["skip"], example["detail"])
    self._consecutive_skips += 1
    if self._consecutive_skips >= self._max_consecutive_skips:
      raise ValueError(
          f"{self.reader.name}: the last {self._consecutive_skips} records read were all bad "
          f"(skip counts: {self._skips.counts}); fix or replace the data (see the warnings above)")

  def skipped(self) -> dict[str, int]:
    return dict(self._skips.counts)

  def _base_state(self) -> dict[str, Any]:
    return {"position": self._position, "skipped": dict(self._skips.counts),
            "consecutive_skips": self._consecutive_skips,
            "num_records": self._plan.num_records, "local_batch": self._plan.local_batch,
            "process_index": self._plan.process_index,
            "process_count": self._plan.process_count, "seed": self._plan.seed}

  def _restore_base(self, state: dict[str, Any]) -> None:
    mine = self._base_state()
    for name in ("num_records", "local_batch", "process_index", "process_count", "seed"):
      if state.get(name) != mine[name]:
        raise ValueError(f"{self.reader.name}: data state was saved with {name}={state.get(name)} "
                         f"but this source has {mine[name]}; resume with the same data, seed, "
                         "batch size and process layout")
    self._position = int(state["position"])
    self._skips = records.SkipCounter(self.reader.name, _log, state["skipped"])
    self._consecutive_skips = int(state.get("consecutive_skips", 0))
    self._iterator = None  # Restarted lazily from the restored position.

  def close(self) -> None:
    """Drops the iterator (and its worker processes)."""
    self._iterator = None

  def __iter__(self):
    return self


class PairSource(_BaseSource):
  """Endless training batches of this process's share: one sampled caption per image.

  With ``data.captions_per_image`` k > 1: k captions per image, text rows [b * k] image-major.
  """

  def __next__(self) -> dict[str, Any]:
    b = self._plan.local_batch
    examples = [self._next_example() for _ in range(b)]
    texts = [caption for e in examples for caption in e["captions"]]
    return {
        "image": {"pixel_values": np.stack([e["pixels"] for e in examples])},
        "text": _tokenize(self._tokenize, texts, len(texts)),
    }

  def get_state(self) -> dict[str, Any]:
    return self._base_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._restore_base(state)


class EvalPairSource(_BaseSource):
  """One pass: every image once with all its captions, padded to a fixed number of batches.

  Each batch: ``image`` / ``text`` (the first caption, for an evaluation loss) as in training,
  ``image_id`` (int32 record index, −1 for padding rows), ``valid`` (bool) and ``captions``
  (a list of ``b`` lists of strings, empty for padding). ``captions_flat`` and
  ``text_to_image`` (caption → row among this process's valid images, in yield order) grow as the
  pass proceeds; they are what retrieval needs. ``len(source)`` batches, the same on every process.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.num_batches = self._stop // self._plan.local_batch
    self._shape = self._loader.transform(
        Image.new("RGB", (32, 32)), np.random.default_rng(0)).shape
    self._batches_done = 0
    self.image_ids: list[int] = []
    self.captions_flat: list[str] = []
    self._text_to_image: list[int] = []

  @property
  def text_to_image(self) -> np.ndarray:
    return np.asarray(self._text_to_image, np.int32)

  def __len__(self) -> int:
    return self.num_batches

  def __next__(self) -> dict[str, Any]:
    if self._batches_done >= self.num_batches:
      if self._iterator is not None:
        self._skips.summary(f"data: {self.reader.name}: evaluation pass")
      self.close()  # Lets the worker processes go as soon as the pass is over.
      raise StopIteration
    b = self._plan.local_batch
    examples = []
    while len(examples) < b:
      try:
        example = self._next_example()
      except StopIteration:
        if not self.image_ids and not examples and self._skips.total:
          raise ValueError(f"{self.reader.name}: no readable image in this process's share of "
                           f"the evaluation set (skip counts: {self._skips.counts}); fix the data")
        break
      if "pad" in example:
        continue
      examples.append(example)
    pixels = np.zeros((b,) + self._shape, np.float32)
    image_id = np.full((b,), -1, np.int32)
    captions: list[list[str]] = [[] for _ in range(b)]
    for row, example in enumerate(examples):
      pixels[row] = example["pixels"]
      image_id[row] = example["record"]
      captions[row] = list(example["captions"])
      for caption in example["captions"]:
        self.captions_flat.append(caption)
        self._text_to_image.append(len(self.image_ids))
      self.image_ids.append(int(example["record"]))
    self._batches_done += 1
    return {"image": {"pixel_values": pixels}, "image_id": image_id, "valid": image_id >= 0,
            "captions": captions,
            "text": _tokenize(self._tokenize, [c[0] if c else "" for c in captions], b)}

  def get_state(self) -> dict[str, Any]:
    return {**self._base_state(), "batches_done": self._batches_done,
            "image_ids": list(self.image_ids), "captions_flat": list(self.captions_flat),
            "text_to_image": list(self._text_to_image)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._restore_base(state)
    self._batches_done = int(state["batches_done"])
    self.image_ids = [int(i) for i in state["image_ids"]]
    self.captions_flat = [str(c) for c in state["captions_flat"]]
    self._text_to_image = [int(i) for i in state["text_to_image"]]


def make_pair_source(data_config: Any, *, global_batch_size: int, seed: int,
                     image_transform: Callable[..., np.ndarray], tokenize: Tokenize,
                     process_index: int | None = None, process_count: int | None = None,
                     train: bool = True) -> PairSource | EvalPairSource:
  """Builds the training (``train=True``) or evaluation source described by ``data_config``.

  Args:
    data_config: ConfigDict with ``source`` ("tfds" | "webdataset" | "manifest" |
      "synthetic_shapes") and its keys (see ``readers.make_reader``), plus ``num_workers``
      (0: threads only), ``num_threads`` (per worker), ``prefetch`` (examples buffered per
      worker and per worker's threads; each is ~0.8 MB at 256 px, so not a whole batch),
      ``max_image_pixels``, ``min_image_size`` and ``max_consecutive_skips`` (0: min(records,
      10,000); that many bad records in a row means the source is broken, and the run stops with
      a ValueError naming it). Keys it leaves out take the schema's values (``align_jax.config.schema``).
    global_batch_size: examples per step over all processes; divisible by the process count.
    seed: fixes the per-epoch order, caption choice and augmentation.
    image_transform: from ``transforms.make_image_transform`` (train or eval to match ``train``).
    tokenize: texts → ``{'input_ids', 'attention_mask'}`` of shape ``[len(texts), L]``.
    process_index, process_count: default to ``jax.process_index()`` / ``jax.process_count()``.
    train: endless shuffled batches if True; one ordered pass with all captions if False.
  """
  if process_index is None or process_count is None:
    import jax  # Only here: grain workers import this module and should not pay for jax.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  data = readers.with_schema(data_config)
  reader = readers.make_reader(data)
  if len(reader) == 0:
    raise ValueError(f"{reader.name}: no records (skipped while indexing: {reader.index_skips}); "
                     "check the data paths")
  local_batch = global_batch_size // process_count
  plan = StreamPlan(len(reader), local_batch, process_index, process_count, seed, shuffle=train)
  loader = ExampleLoader(
      reader, plan, image_transform, train=train, limits=readers.decode_limits(data),
      captions_per_image=int(data.captions_per_image) if train else 1)
  if train:
    stop = 2**62  # Endless: positions are consumed lazily.
  else:
    stop = -(-len(reader) // global_batch_size) * local_batch
  kwargs = dict(num_workers=int(data.num_workers), num_threads=int(data.num_threads),
                prefetch=int(data.prefetch), stop=stop,
                max_consecutive_skips=int(data.max_consecutive_skips) or min(len(reader), 10_000))
  cls = PairSource if train else EvalPairSource
  return cls(reader, plan, loader, tokenize, **kwargs)


def text_batches(captions: list[str], tokenize: Tokenize, batch_size: int):
  """Yields ``(text dict, valid mask)`` of fixed shape over ``captions`` (last batch padded)."""
  for start in range(0, len(captions), batch_size):
    chunk = captions[start:start + batch_size]
    valid = np.arange(batch_size) < len(chunk)
    yield _tokenize(tokenize, chunk + [""] * (batch_size - len(chunk)), batch_size), valid
