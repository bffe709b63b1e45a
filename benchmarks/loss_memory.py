"""Memory and step time of the contrastive losses: gathered vs blockwise, 1 vs 8 devices.

Usage (from the repository root):
  python benchmarks/loss_memory.py            # full run, ~10 min on 2 idle CPU cores
  python benchmarks/loss_memory.py --quick    # a smaller grid, ~2 min

Memory is XLA's compiled estimate for loss + grad (`jax.jit(f).lower(...).compile()
.memory_analysis()`), per device: temp (scratch: logits, accumulators, ring buffers) and arguments
(this device's embeddings). Nothing is allocated for memory-only rows, so batches far beyond this
machine's RAM can be checked. Step time is the best of a few runs of the compiled loss + grad on
random normalised embeddings; the 8 devices are simulated on the host's CPU cores, so times are
noisy when the cores are shared: compare the blockwise / gathered ratios measured in this run.
Prints markdown tables; benchmarks/README.md keeps a recorded run.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402  (the XLA flag above must be set before jax is imported)
import datetime  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from align_jax.objectives import contrastive as losses  # noqa: E402

GIB = 2**30
MIB = 2**20
LOSSES = {"softmax": (losses.softmax_loss, (0.07,)),  # temperature
          "sigmoid": (losses.sigmoid_loss, (10.0, -10.0))}  # scale, bias (SigLIP init)


def _mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def compile_step(loss: str, impl: str, n_dev: int, batch: int, dim: int,
                 block_size: int | None = None) -> tuple[Any, Callable[[], tuple]]:
  """AOT-compiles value_and_grad of the loss; returns (compiled, make_inputs)."""
  fn, scalars = LOSSES[loss]
  scalars = tuple(jnp.float32(s) for s in scalars)
  if n_dev == 1:
    f = lambda img, txt, *s: fn(img, txt, *s, impl=impl, block_size=block_size)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  else:
    mesh = _mesh()
    f = losses.shard_loss(fn, mesh, ("data",), impl=impl, block_size=block_size)
    sharding = NamedSharding(mesh, P("data"))
  grad_f = jax.value_and_grad(f, argnums=tuple(range(2 + len(scalars))))
  spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
  compiled = jax.jit(grad_f).lower(spec, spec, *scalars).compile()

  def make_inputs():
    keys = jax.random.split(jax.random.key(batch + dim), 2)
    embs = []
    for key in keys:
      x = jax.random.normal(key, (batch, dim), jnp.float32)
      embs.append(jax.device_put(x / jnp.linalg.norm(x, axis=1, keepdims=True), sharding))
    return (*embs, *scalars)

  return compiled, make_inputs


def temp_bytes(compiled) -> int:
  return compiled.memory_analysis().temp_size_in_bytes


def step_seconds(runs: dict[str, tuple[Any, Callable[[], tuple]]], reps: int,
                 warmup: bool = True) -> dict[str, float]:
  """Best wall time of loss+grad for each compiled entry of `runs`, interleaving the entries.

  Interleaving (a, b, a, b, ...) lets every entry see the same load from whatever else shares
  the cores, so the ratios between entries are fairer than their absolute times.
  """
  inputs = {name: make_inputs() for name, (_, make_inputs) in runs.items()}
  if warmup:  # first-touch allocation and thread-pool start-up are not part of a step
    for name, (compiled, _) in runs.items():
      jax.block_until_ready(compiled(*inputs[name]))
  best = {name: float("inf") for name in runs}
  for _ in range(reps):
    for name, (compiled, _) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*inputs[name]))
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def largest_fitting_batch(loss: str, impl: str, n_dev: int, dim: int, cap: int,
                          rel_tol: float, budget: int = GIB,
                          quantum: int = 1024) -> tuple[int, int | None]:
  """Largest multiple of `quantum` up to `cap` whose loss+grad temp is <= budget per device.

  Doubling then bisection on XLA's memory estimate (temp grows monotonically with batch),
  stopped when the bracket is within `rel_tol`. Returns (fits, smallest tried that does not
  fit, or None when `cap` itself fits).
  """
  fits = lambda b: temp_bytes(compile_step(loss, impl, n_dev, b, dim)[0]) <= budget
  lo, hi = 0, quantum
  while hi <= cap and fits(hi):
    lo, hi = hi, hi * 2
  if hi > cap:
    return lo, None
  while hi - lo > max(quantum, rel_tol * hi):
    mid = (lo + hi) // 2 // quantum * quantum
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo, hi


def _fmt_mib(nbytes: int) -> str:
  return f"{nbytes / MIB:,.0f}"


def _fmt_s(seconds: float | None) -> str:
  return "—" if seconds is None else f"{seconds:.3f}"


def grid_table(batches, dims, timed_max: dict[int, int], reps: int) -> None:
  """Both impls side by side for every (loss, D, batch, devices)."""
  print("| loss | D | batch | devices | gathered temp MiB/dev | blockwise temp MiB/dev "
        "| args MiB/dev | gathered s | blockwise s | blockwise / gathered time |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for loss in LOSSES:
    for dim in dims:
      for batch in batches:
        for n_dev in (1, 8):
          runs = {impl: compile_step(loss, impl, n_dev, batch, dim) for impl in losses.IMPLS}
          row = {impl: compiled.memory_analysis() for impl, (compiled, _) in runs.items()}
          times = dict.fromkeys(runs)
          if batch <= 4096:
            times = step_seconds(runs, reps)
          elif batch <= timed_max.get(n_dev, 0) and dim == dims[0]:
            times = step_seconds(runs, 1, warmup=False)  # ~0.5 min a step here: one each
          del runs  # frees the inputs before the next configuration
          ratio = (f"{times['blockwise'] / times['gathered']:.2f}x"
                   if None not in times.values() else "—")
          print(f"| {loss} | {dim} | {batch:,} | {n_dev} | "
                f"{_fmt_mib(row['gathered'].temp_size_in_bytes)} | "
                f"{_fmt_mib(row['blockwise'].temp_size_in_bytes)} | "
                f"{_fmt_mib(row['blockwise'].argument_size_in_bytes)} | "
                f"{_fmt_s(times['gathered'])} | {_fmt_s(times['blockwise'])} | {ratio} |",
                flush=True)


def blockwise_scaling_table(batches, dims) -> None:
  """Blockwise far past where gathered fits: memory only."""
  print("| loss | D | batch | devices | blockwise temp MiB/dev | args MiB/dev |")
  print("|---|---|---|---|---|---|")
  for loss in LOSSES:
    for dim in dims:
      for batch in batches:
        for n_dev in (1, 8):
          mem = compile_step(loss, "blockwise", n_dev, batch, dim)[0].memory_analysis()
          print(f"| {loss} | {dim} | {batch:,} | {n_dev} | {_fmt_mib(mem.temp_size_in_bytes)} | "
                f"{_fmt_mib(mem.argument_size_in_bytes)} |", flush=True)


def block_size_table(batch: int, dim: int, block_sizes, reps: int) -> None:
  print("| loss | batch | D | block_size | temp MiB | step s |")
  print("|---|---|---|---|---|---|")
  for loss in LOSSES:
    runs = {bs: compile_step(loss, "blockwise", 1, batch, dim, bs) for bs in block_sizes}
    times = step_seconds(runs, reps)
    for block_size, (compiled, _) in runs.items():
      print(f"| {loss} | {batch:,} | {dim} | {block_size} | {_fmt_mib(temp_bytes(compiled))} | "
            f"{_fmt_s(times[block_size])} |", flush=True)


def fit_table(loss_names, dims, cap: int, rel_tol: float) -> None:
  print("| loss | D | impl | largest batch, 1 device | largest batch, 8 devices |")
  print("|---|---|---|---|---|")
  for loss in loss_names:
    for dim in dims:
      for impl in losses.IMPLS:
        cells = []
        for n_dev in (1, 8):
          fits, fails = largest_fitting_batch(loss, impl, n_dev, dim, cap, rel_tol)
          cells.append(f">= {fits:,} (search cap)" if fails is None
                       else f"{fits:,} ({fails:,} does not fit)")
        print(f"| {loss} | {dim} | {impl} | {cells[0]} | {cells[1]} |", flush=True)


def target_table(batch: int, dim: int, budget: int) -> None:
  print("| loss | batch | D | devices | blockwise temp MiB/dev | budget MiB | fits |")
  print("|---|---|---|---|---|---|---|")
  for loss in LOSSES:
    temp = temp_bytes(compile_step(loss, "blockwise", 8, batch, dim)[0])
    print(f"| {loss} | {batch:,} | {dim} | 8 | {_fmt_mib(temp)} | {_fmt_mib(budget)} | "
          f"{'yes' if temp < budget else 'NO'} |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller grid, ~2 minutes")
  args = parser.parse_args()
  start = time.perf_counter()
  print(f"`python benchmarks/loss_memory.py{' --quick' if args.quick else ''}` — "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"jax {jax.__version__}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, {os.cpu_count()} host cores, "
        f"default block_size {losses.DEFAULT_BLOCK_SIZE}\n")
  reps = 2 if args.quick else 3
  dims = (512,) if args.quick else (512, 1024)

  print("#### Loss + grad per device: gathered vs blockwise\n")
  print("Timed up to 4k everywhere" + ("" if args.quick else ", and at 16k for D=512 on 1 device")
        + "; '—': memory only.\n")
  grid_table((1024, 4096, 16384, 32768), dims, {} if args.quick else {1: 16384}, reps)

  print("\n#### Blockwise at large batch (memory only)\n")
  big = (131072, 1 << 20) if args.quick else (65536, 262144, 1 << 20)
  blockwise_scaling_table(big, dims)

  print("\n#### Blockwise block size (1 device)\n")
  block_size_table(4096, 512, (512, 1024) if args.quick else (256, 512, 1024, 2048), reps)

  print("\n#### Largest batch with loss + grad temp <= 1 GiB per device (XLA estimate)\n")
  fit_table(("softmax",) if args.quick else tuple(LOSSES), dims, cap=1 << 22,
            rel_tol=0.25 if args.quick else 0.1)

  print("\n#### Target: 1M pairs on 8 devices at D = 1024, loss + grad scratch < 2 GiB per "
        "device\n")
  target_table(1 << 20, 1024, budget=2 * GIB)
  print(f"\nTotal benchmark time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
