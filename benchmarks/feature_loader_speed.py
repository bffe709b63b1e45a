"""Pairs per second of the stored-feature loader, alone and feeding the train step.

    python benchmarks/feature_loader_speed.py [--pairs 200000] [--dim 1024] [--batches 4096,32768]
        [--token-pairs 16384] [--tokens 17,16] [--token-batch 1024] [--train-batch 4096]

Writes float16 stores to a temporary folder (pooled [N, D], the SAIL layout; tokens [N, T, D] with
masks, the freeze-align layout), then times ``ArrayPairSource`` (``data.source = "features"``)
producing shuffled global batches for one process. Every table interleaves its loaders step by
step (a, b, c, a, b, c, ...) so that load from other users of the machine hits all alike, and
gives the median step's rate (wall clock) and pairs per CPU-second of the process
(``time.process_time``: what one dedicated core delivers; the loader is single-threaded numpy).

* ``align_jax``: this version (sorted ``np.take`` per file into recycled buffers), every pair
  shuffled independently (``data.shuffle_block_rows = 1``, the default).
* ``align_jax, blocks of R``: the same loader shuffling blocks of ``R`` consecutive pairs
  (``data.shuffle_block_rows = R``, ``--block-rows``): contiguous 2R KiB reads.
* ``previous``: the loader as it was before (commit 0b7400b, kept here as the baseline): the
  epoch's permutation recomputed every batch, a sorted fancy index per file, then a second copy
  to undo the sort, into fresh arrays.
* ``ceiling``: a contiguous slice of each file copied into a reused buffer: the memory bandwidth
  the gather cannot beat.

A small table times one tower's gather alone (scattered rows, runs of ``--block-rows``, and a
contiguous copy; into one reused buffer and into six rotating ones).

Each loader opens the files once (its own memory maps, so page-table faults are counted) and the
first batch is not timed. The files were just written, so the OS page cache holds them (RAM
speed); on data larger than RAM the disk bounds the first epoch instead. The last table runs the
real train step (``train.build_trainer``, stored pooled features, MLP heads, blockwise softmax)
with the loader in the loop as ``train_and_evaluate`` runs it, against the same step on one
fixed batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from align_jax.data import array_sources as features  # noqa: E402

MIB = 2**20


class PreviousLoader:
  """The loader before this change, for the side-by-side baseline (one caption per image)."""

  def __init__(self, image: dict, text: dict, batch: int, seed: int = 0):
    self.image, self.text, self.batch, self.seed = image, text, batch, seed
    self.num_pairs, self.position = len(next(iter(image.values()))), 0

  def _indices(self, start: int, count: int) -> np.ndarray:
    epochs, offsets = np.divmod(np.arange(start, start + count), self.num_pairs)
    out = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = np.random.default_rng([self.seed, int(epoch)]).permutation(
          self.num_pairs)[offsets[sel]]
    return out

  @staticmethod
  def _rows(arrays: dict, index: np.ndarray) -> dict:
    order = np.argsort(index, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return {k: np.asarray(v[index[order]])[inverse] for k, v in arrays.items()}

  def __next__(self) -> dict:
    index = self._indices(self.position, self.batch)
    self.position += self.batch
    return {"image": self._rows(self.image, index), "text": self._rows(self.text, index)}


class ContiguousCopy:
  """Consecutive rows of every file copied into one reused buffer per array: the ceiling."""

  def __init__(self, image: dict, text: dict, batch: int):
    self.arrays = {"image": image, "text": text}
    self.out = {t: {k: np.empty((batch, *v.shape[1:]), v.dtype) for k, v in a.items()}
                for t, a in self.arrays.items()}
    self.batch, self.position = batch, 0
    self.num_rows = len(image[next(iter(image))])

  def __next__(self) -> dict:
    start = self.position % (self.num_rows - self.batch + 1)
    for tower, arrays in self.arrays.items():
      for k, v in arrays.items():
        np.copyto(self.out[tower][k], v[start:start + self.batch])
    self.position += self.batch
    return self.out


def write_store(folder: str, towers: dict, rng: np.random.Generator) -> None:
  """towers: {name: (shape, with_mask)} -> float16 .npy files (and bool masks) in ``folder``."""
  os.makedirs(folder, exist_ok=True)
  for tower, (shape, with_mask) in towers.items():
    array = np.lib.format.open_memmap(os.path.join(folder, f"{tower}.npy"), mode="w+",
                                      dtype=np.float16, shape=shape)
    chunk = max(1, (64 * MIB) // (int(np.prod(shape[1:])) * 4))
    for start in range(0, shape[0], chunk):
      stop = min(start + chunk, shape[0])
      array[start:stop] = rng.standard_normal((stop - start, *shape[1:]), np.float32)
    array.flush()
    del array
    if with_mask:
      lengths = rng.integers(1, shape[1] + 1, shape[0])
      np.save(os.path.join(folder, f"{tower}_mask.npy"),
              np.arange(shape[1])[None, :] < lengths[:, None])


def _batch_bytes(batch: dict) -> int:
  return sum(v.nbytes for tower in batch.values() for v in tower.values())


def interleaved(loaders: dict, batch: int, steps: int) -> dict:
  """{name: (median wall pairs/s, pairs per CPU-second, bytes per batch)}, interleaved steps."""
  wall = {name: [] for name in loaders}
  cpu = dict.fromkeys(loaders, 0.0)
  nbytes = {name: _batch_bytes(next(loader)) for name, loader in loaders.items()}  # untimed
  names = list(loaders)
  for step in range(steps):
    for name in names[step % len(names):] + names[:step % len(names)]:
      w, c = time.perf_counter(), time.process_time()
      result = next(loaders[name])
      del result  # freed before the next loader runs, as a training loop would
      wall[name].append(time.perf_counter() - w)
      cpu[name] += time.process_time() - c
  return {name: (batch / np.median(wall[name]), batch * steps / max(cpu[name], 1e-9),
                 nbytes[name]) for name in loaders}


def print_rates(label: str, rates: dict, batch: int) -> None:
  base = rates["previous"][0] if "previous" in rates else None
  for name, (wall, per_cpu, nbytes) in rates.items():
    ratio = f"{wall / base:.2f}x" if base else "—"
    gib_s = wall * nbytes / batch / 2**30
    print(f"| {label} | {batch:,} | {name} | {wall:,.0f} | {per_cpu:,.0f} | {gib_s:.2f} | "
          f"{ratio} |", flush=True)


def _source(image, text, batch, text_to_image=None, block_rows=1):
  return features.ArrayPairSource(image, text, global_batch_size=batch, seed=0,
                                  text_to_image=text_to_image, process_index=0, process_count=1,
                                  shuffle_block_rows=block_rows)


def pooled_tables(folder: str, batches: list[int], steps: int, block_rows: int) -> None:
  print("| store | batch | loader | pairs/s (median step, wall) | pairs per CPU-s | GiB/s "
        "| vs previous |")
  print("|---|---|---|---|---|---|---|")
  for batch in batches:
    opened = [features.load_stored_features(folder)[:2] for _ in range(4)]
    loaders = {"align_jax": _source(*opened[0], batch),
               f"align_jax, blocks of {block_rows}": _source(*opened[3], batch,
                                                             block_rows=block_rows),
               "previous": PreviousLoader(*opened[1], batch),
               "ceiling": ContiguousCopy(*opened[2], batch)}
    print_rates("pooled [N, D]", interleaved(loaders, batch, steps), batch)
    del loaders, opened
  # A sharded store (8 parts, the feature store's layout) with 2 captions per image.
  batch = batches[0]
  image, text, _ = features.load_stored_features(folder)
  n = len(image["pooled"]) // 2
  cuts = np.linspace(0, n, 9).astype(int)
  image = {"pooled": features.ConcatenatedArray(
      [image["pooled"][a:b] for a, b in zip(cuts[:-1], cuts[1:])])}
  text = {"pooled": features.ConcatenatedArray(
      [text["pooled"][2 * a:2 * b] for a, b in zip(cuts[:-1], cuts[1:])])}
  loaders = {"align_jax": _source(image, text, batch, np.arange(2 * n) // 2)}
  print_rates("8 shards, 2 captions/image", interleaved(loaders, batch, steps), batch)


def gather_table(folder: str, batch: int, block_rows: int, steps: int) -> None:
  """One tower's ``np.take`` alone: scattered rows vs runs of ``block_rows``, into one reused
  buffer vs six rotating ones (a loader whose earlier batches are still held writes fresh memory),
  against a contiguous copy; median CPU ms per batch."""
  pooled = np.load(os.path.join(folder, "image.npy"), mmap_mode="r")
  n, rng = len(pooled), np.random.default_rng(1)
  outs = [np.zeros((batch, *pooled.shape[1:]), pooled.dtype) for _ in range(6)]

  def rows(r):
    starts = rng.choice(n // r, batch // r, replace=False)[:, None] * r
    return np.sort((starts + np.arange(r)).reshape(-1))

  def timed(copy, buffers):
    times = []
    for step in range(steps):
      c = time.process_time()
      copy(step, outs[step % buffers])
      times.append(time.process_time() - c)
    return 1e3 * float(np.median(times))

  print("| gather of one tower (batch {:,}) | one reused buffer, ms | six rotating buffers, ms |"
        .format(batch))
  print("|---|---|---|")
  for r in (1, block_rows):
    index = [rows(r) for _ in range(steps)]

    def take(step, out, index=index):
      np.take(pooled, index[step], axis=0, out=out, mode="clip")
    print(f"| np.take, runs of {r} row(s) | {timed(take, 1):.2f} | {timed(take, 6):.2f} |")

  def copy(step, out):
    np.copyto(out, pooled[(step * batch) % (n - batch):][:batch])
  print(f"| contiguous copy | {timed(copy, 1):.2f} | {timed(copy, 6):.2f} |", flush=True)


def token_table(folder: str, batch: int, steps: int) -> None:
  opened = [features.load_stored_features(folder)[:2] for _ in range(3)]
  loaders = {"align_jax": _source(*opened[0], batch),
             "previous": PreviousLoader(*opened[1], batch),
             "ceiling": ContiguousCopy(*opened[2], batch)}
  print_rates("tokens [N, T, D] + masks", interleaved(loaders, batch, steps), batch)


def train_step_table(folder: str, dim: int, batch: int, steps: int) -> None:
  """The train step fed by the loader vs the same step on one fixed batch, interleaved."""
  import jax

  from align_jax.config import schema as config_lib
  from align_jax.train import loop as train

  config = config_lib.default_config()
  config.batch_size = batch
  config.data.source, config.data.path = "features", folder
  config.model.image_projector = config.model.text_projector = "mlp"
  config.model.hidden_dim, config.model.embed_dim = dim, 512
  trainer = train.build_trainer(config)
  state, frozen = trainer.state, trainer.frozen
  fixed = trainer.next_batch()
  state, _ = trainer.train_step(state, frozen, fixed)  # compile
  jax.block_until_ready(state)
  times = {"fixed batch": [], "loader in the loop": []}
  loader_s = []
  for _ in range(steps):
    for name in times:
      start = time.perf_counter()
      if name == "fixed batch":
        batch_arrays = fixed
      else:
        batch_arrays = trainer.next_batch()
        loader_s.append(time.perf_counter() - start)
      state, metrics = trainer.train_step(state, frozen, batch_arrays)
      jax.block_until_ready((state, metrics))
      times[name].append(time.perf_counter() - start)
  print("| train step | median step s | examples/s | loader s (next_batch, median) |")
  print("|---|---|---|---|")
  for name, values in times.items():
    med = float(np.median(values))
    print(f"| {name} | {med:.3f} | {batch / med:,.0f} | "
          f"{f'{np.median(loader_s):.4f}' if name != 'fixed batch' else '—'} |", flush=True)
  ratio = np.median(times["loader in the loop"]) / np.median(times["fixed batch"])
  print(f"\nloader in the loop / fixed batch step time: {ratio:.3f}x "
        f"(jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", type=int, default=200_000)
  parser.add_argument("--dim", type=int, default=1024)
  parser.add_argument("--batches", default="4096,32768", help="pooled batch sizes, comma-separated")
  parser.add_argument("--steps", type=int, default=30, help="timed batches per loader and table")
  parser.add_argument("--token-pairs", type=int, default=16_384)
  parser.add_argument("--tokens", default="17,16", help="image,text tokens per example")
  parser.add_argument("--token-batch", type=int, default=1024)
  parser.add_argument("--train-batch", type=int, default=4096, help="0 skips the train step table")
  parser.add_argument("--train-steps", type=int, default=5)
  parser.add_argument("--block-rows", type=int, default=16,
                      help="data.shuffle_block_rows of the block-shuffled pooled loader")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  batches = [int(b) for b in args.batches.split(",")]
  image_tokens, text_tokens = (int(t) for t in args.tokens.split(","))
  with tempfile.TemporaryDirectory() as root:
    pooled, tokens = os.path.join(root, "pooled"), os.path.join(root, "tokens")
    write_store(pooled, {t: ((args.pairs, args.dim), False) for t in ("image", "text")}, rng)
    write_store(tokens, {"image": ((args.token_pairs, image_tokens, args.dim), True),
                         "text": ((args.token_pairs, text_tokens, args.dim), True)}, rng)
    pooled_gib = 2 * args.pairs * args.dim * 2 / 2**30
    token_gib = args.token_pairs * (image_tokens + text_tokens) * args.dim * 2 / 2**30
    command = " ".join(["python benchmarks/feature_loader_speed.py", *sys.argv[1:]])
    print(f"`{command}` — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{os.cpu_count()} host cores, numpy {np.__version__}; pooled store {args.pairs:,} "
          f"pairs x {args.dim} ({pooled_gib:.2f} GiB), token store {args.token_pairs:,} pairs x "
          f"({image_tokens} + {text_tokens}) x {args.dim} ({token_gib:.2f} GiB), float16\n")
    pooled_tables(pooled, batches, args.steps, args.block_rows)
    token_table(tokens, args.token_batch, args.steps)
    print()
    gather_table(pooled, batches[0], args.block_rows, args.steps)
    if args.train_batch:
      print()
      train_step_table(pooled, args.dim, args.train_batch, args.train_steps)


if __name__ == "__main__":
  main()
