"""Ahead-of-time compile check: compile the real train step for a pod topology without the pod.

    python -m align_jax.cli.aot --config=configs/demo.py --topology=cpu:8
    python -m align_jax.cli.aot --config=configs/demo.py --topology=v5e-256 --config.batch_size=8192
    python -m align_jax.cli.aot --config=configs/dinov2_roberta.py:batch=65536 --topology=2xv5e-256

Before paying for a v5e-256 or v4-32 slice, this builds the run's mesh, model, optimiser, shardings
and the jitted ``train_step`` with the builder :func:`align_jax.train.loop.build_trainer` uses
(:func:`align_jax.train.step.build`), but from abstract shapes only (``jax.eval_shape`` for the
state, ``jax.ShapeDtypeStruct`` with shardings for the frozen params and the batch), lowers and
compiles it for the target devices, and prints what XLA reports: per-device memory
(``memory_analysis``) and FLOPs (``cost_analysis``). A config that does not fit the mesh, a sharding
rule that does not divide a dimension, or a step that does not fit in device memory fails here, on a
laptop, instead of on the pod.

The frozen encoders are never loaded: Hugging Face encoders are built with ``abstract=True``
(:func:`align_jax.model.two_tower.build_model`), so their folders need only ``config.json`` (and the
tokenizer files for text); the params are the shapes and dtypes loading would give, DINOv2's
position embeddings at the resampled grid included.

Topologies:

* ``cpu:N`` — N simulated host devices (works everywhere; the CLI sets ``jax_num_cpu_devices``).
* ``v4-N``, ``v5p-N`` (N TensorCores, two per chip, megacore), ``v5e-N`` / ``v5litepod-N``,
  ``v6e-N`` (N chips) — compile-only TPU devices from
  ``jax.experimental.topologies.get_topology_desc``. This needs libtpu (the TPU compiler), which
  ``pip install 'jax[tpu]==0.10.2'`` provides; it runs on an x86-64 Linux machine with no TPU.
  Without it, :class:`TopologyUnavailableError` says so (the CLI prints one line, no traceback).
* ``SxTYPE`` (e.g. ``2xv5e-256``, or ``--num_slices=2``) — S such slices joined by the data-centre
  network (multi-slice): the mesh is the hybrid ICI x DCN mesh of ``config.mesh.dcn_shape``
  (:mod:`align_jax.parallel.mesh`; by default the slices split the batch).

A step that does not fit in the chip's HBM (v5e 16 GiB, v5p 95 GiB, v4 and v6e 32 GiB) stops with
:class:`DoesNotFitError`, one line with the numbers: either XLA's own "ran out of memory" at
compile time or XLA's reported peak against that table.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import ml_collections

from align_jax.train import validation
from align_jax.model import two_tower as model_lib
from align_jax.train import optim, step as step_builder
from align_jax.parallel import mesh as sharding
from align_jax.train import loop as train_lib

# TPU slice shapes by chip count: 2D tori (v5e, v6e) and 3D tori (v4, v5p).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
# accelerator-type prefix -> (libtpu chip name, TensorCores per accelerator-type unit, 3D torus)
_TPU_FAMILIES = {"v4": ("v4", 2, True), "v5p": ("v5", 2, True), "v5e": ("v5e", 1, False),
                 "v5litepod": ("v5e", 1, False), "v6e": ("v6e", 1, False)}

LIBTPU_MISSING = (
    "compiling for TPU topology {name!r} needs libtpu (the TPU compiler), which this Python "
    "environment does not have ({detail}). Install it with `pip install 'jax[tpu]==0.10.2'` "
    "(x86-64 Linux; no TPU is needed for compile-only use), or set TPU_LIBRARY_PATH to a "
    "libtpu.so; or check the config on simulated devices with --topology=cpu:8")


# HBM per device (one chip; a v4/v5p megacore chip is one device), by jax's device_kind.
HBM_BYTES = {"TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30, "TPU v5": 95 * 2**30,
             "TPU v5p": 95 * 2**30, "TPU v6 lite": 32 * 2**30}
_FIT_HINT = ("lower --config.batch_size or config.model.encoder_micro_batch / "
             "projector_micro_batch, use more chips, or shard the frozen encoders (fsdp)")


class TopologyUnavailableError(RuntimeError):
  """The target topology cannot be described on this machine (e.g. libtpu is not installed)."""


class DoesNotFitError(ValueError):
  """The compiled step needs more memory per device than the target chip has."""


@dataclasses.dataclass(frozen=True)
class TpuTopology:
  """The arguments ``get_topology_desc`` takes for one Cloud TPU accelerator type."""
  name: str
  topology_name: str  # e.g. "v5e:16x16"
  chip_config_name: str  # "megacore" (v4, v5p: one device per chip) or "default"
  chips_per_host_bounds: tuple[int, int, int]
  wrap: tuple[bool, bool, bool]
  num_devices: int  # over all slices
  num_slices: int = 1


@dataclasses.dataclass
class AotReport:
  """What XLA reports for the compiled train step, per device."""
  topology: str
  num_devices: int
  num_processes: int
  device_kind: str
  mesh_shape: dict
  num_slices: int
  hbm_bytes: int | None  # the chip's memory (HBM_BYTES); None for CPU
  compile_seconds: float
  argument_bytes: int | None
  output_bytes: int | None
  temp_bytes: int | None
  alias_bytes: int | None
  generated_code_bytes: int | None
  flops: float | None
  bytes_accessed: float | None
  xla_peak_bytes: int | None = None  # XLA's own peak estimate, where the backend gives one
  compiled: Any = dataclasses.field(repr=False, default=None)

  @property
  def peak_bytes(self) -> int | None:
    """Arguments + outputs + temporaries, less the donated (aliased) buffers counted twice."""
    if self.argument_bytes is None:
      return None
    return (self.argument_bytes + self.output_bytes + self.temp_bytes + self.generated_code_bytes
            - self.alias_bytes)

  @property
  def fits(self) -> bool | None:
    """Whether the peak fits in the chip's HBM (None: unknown chip or no memory numbers)."""
    if self.hbm_bytes is None or self.peak_bytes is None:
      return None
    return self.peak_bytes <= self.hbm_bytes

  def check_fits(self) -> None:
    """Raises DoesNotFitError (one line with the numbers) when the peak exceeds the HBM."""
    if self.fits is False:
      raise DoesNotFitError(
          f"train_step does not fit on {self.topology}: peak ~{self.peak_bytes / 2**30:.2f} GiB "
          f"per device (arguments {self.argument_bytes / 2**30:.2f} GiB, temporaries "
          f"{self.temp_bytes / 2**30:.2f} GiB) > {self.hbm_bytes / 2**30:g} GiB HBM of a "
          f"{self.device_kind}; {_FIT_HINT}")

  def summary(self) -> str:
    def size(n):
      return "n/a" if n is None else f"{n / 2**20:,.2f} MiB"
    flops = "n/a" if self.flops is None else f"{self.flops:.4g}"
    moved = "n/a" if self.bytes_accessed is None else f"{self.bytes_accessed:.4g}"
    hbm = "" if self.hbm_bytes is None else f" of {self.hbm_bytes / 2**30:.0f} GiB HBM"
    slices = f" in {self.num_slices} slices" if self.num_slices > 1 else ""
    return "\n".join([
        f"topology {self.topology}: {self.num_devices} devices ({self.device_kind}){slices}, "
        f"{self.num_processes} host(s), mesh {self.mesh_shape}",
        f"compiled train_step in {self.compile_seconds:.1f} s",
        f"memory per device: arguments {size(self.argument_bytes)}, outputs "
        f"{size(self.output_bytes)}, temporaries {size(self.temp_bytes)}, donated "
        f"{size(self.alias_bytes)}, code {size(self.generated_code_bytes)}; "
        f"peak ~{size(self.peak_bytes)}{hbm}",
        f"cost per device per step: {flops} FLOPs, {moved} bytes accessed (XLA counts a "
        "micro-batch loop's body once)",
    ])


def tpu_topology(name: str) -> TpuTopology:
  """Parses a Cloud TPU accelerator type such as ``v4-32`` or ``v5e-256``, or ``2xv5e-256``."""
  match = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if not match:
    raise ValueError(f"unknown topology {name!r}: use cpu:N or a Cloud TPU accelerator type such "
                     f"as v4-32, v5p-128, v5e-256 or v6e-64 (2xv5e-256: two slices)")
  slices = int(match.group(1) or 1)
  if slices < 1:
    raise ValueError(f"topology {name!r} has {slices} slices; use SxTYPE with S >= 1")
  family, units = match.group(2), int(match.group(3))
  chip, cores_per_chip, is_3d = _TPU_FAMILIES[family]
  chips, rest = divmod(units, cores_per_chip)
  shapes = _SHAPES_3D if is_3d else _SHAPES_2D
  if rest or chips not in shapes:
    sizes = sorted(c * cores_per_chip for c in shapes)
    raise ValueError(f"unsupported size {name!r}: {family} slices here are {family}-N with N in "
                     f"{sizes}")
  shape = shapes[chips]
  if is_3d:
    wrap = (chips >= 64,) * 3  # full 4x4x4 cubes and larger are tori in every dimension
    bounds = (2, 2, 1)
  else:
    wrap = tuple(d == 16 for d in shape) + (False,)
    bounds = {1: (1, 1, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))
  return TpuTopology(name=name, topology_name=f"{chip}:{'x'.join(map(str, shape))}",
                     chip_config_name="megacore" if is_3d else "default",
                     chips_per_host_bounds=bounds, wrap=wrap, num_devices=chips * slices,
                     num_slices=slices)


def with_slices(topology: str, num_slices: int) -> str:
  """``topology`` as S slices (``--num_slices``): ``v5e-256``, 2 -> ``2xv5e-256``."""
  if num_slices == 1:
    return topology
  if num_slices < 1 or topology.startswith("cpu:") or re.match(r"\d+x", topology):
    raise ValueError(f"--num_slices={num_slices} needs a single-slice TPU --topology such as "
                     f"v5e-256 (got {topology!r}; or write 2xv5e-256)")
  return f"{num_slices}x{topology}"


def topology_devices(topology: str) -> list:
  """The devices of ``topology``: real CPU devices for ``cpu:N``, compile-only TPU devices else."""
  cpu = re.fullmatch(r"cpu:(\d+)", topology)
  if cpu:
    count = int(cpu.group(1))
    available = jax.devices("cpu")
    if count < 1 or count > len(available):
      raise ValueError(
          f"--topology={topology} needs {count} CPU devices but {len(available)} exist in this "
          "process; run `python -m align_jax.cli.aot` (it sets jax_num_cpu_devices) or set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax starts")
    return available[:count]
  spec = tpu_topology(topology)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=spec.topology_name, chip_config_name=spec.chip_config_name,
        chips_per_host_bounds=spec.chips_per_host_bounds, num_slices=spec.num_slices,
        wrap=spec.wrap)
  except (RuntimeError, NotImplementedError) as error:
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "not installed" in detail:
      raise TopologyUnavailableError(LIBTPU_MISSING.format(name=topology, detail=detail)) from None
    raise TopologyUnavailableError(f"libtpu could not describe TPU topology {topology!r} "
                                   f"({spec.topology_name}): {detail}") from None
  return list(description.devices)


def _memory_stats(compiled) -> dict:
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    stats = None
  names = ("argument", "output", "temp", "alias", "generated_code")
  result = {f"{n}_bytes": (None if stats is None else int(getattr(stats, f"{n}_size_in_bytes")))
            for n in names}
  peak = getattr(stats, "peak_memory_in_bytes", 0) if stats is not None else 0
  result["xla_peak_bytes"] = int(peak) if peak else None
  return result


def _cost_stats(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):
    cost = None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  cost = cost or {}
  return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def compile_train_step(config: ml_collections.ConfigDict, topology: str,
                       check_memory: bool = True) -> AotReport:
  """Compiles ``train_step`` for ``topology`` from abstract inputs; returns XLA's report.

  The frozen encoders are shapes only (no weights read). ``check_memory``: raise
  DoesNotFitError when XLA's peak exceeds the chip's HBM (XLA's own out-of-memory at compile time
  always raises it).

  Raises:
    ValueError: the config does not fit the topology (mesh shape, batch divisibility, rules).
    DoesNotFitError: the step needs more memory per device than the chip has.
    TopologyUnavailableError: the topology cannot be described here (libtpu missing).
  """
  devices = topology_devices(topology)
  mesh = sharding.mesh_from_config(config.mesh, devices)
  batch_axes = tuple(config.mesh.batch_axes)
  num_processes = len({d.process_index for d in devices})
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  validation.validate(config, sharding.num_batch_shards(mesh, batch_axes), num_processes)
  model = model_lib.build_model(config, mesh, abstract=True)
  tx = optim.make_optimizer(config)
  built = step_builder.build(config, mesh, model, tx,
                             train_lib.make_train_step(model, tx, config, mesh),
                             abstract_only=True)
  kind = devices[0].device_kind
  start = time.perf_counter()
  try:
    compiled = built.train_step.lower(built.state, built.frozen, built.batch).compile()
  except jax.errors.JaxRuntimeError as error:
    first = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else ""
    if "RESOURCE_EXHAUSTED" not in first:
      raise
    raise DoesNotFitError(f"train_step does not fit on {topology} ({kind}): XLA: {first}; "
                          f"{_FIT_HINT}") from None
  seconds = time.perf_counter() - start
  report = AotReport(topology=topology, num_devices=len(devices), num_processes=num_processes,
                     device_kind=kind, mesh_shape=dict(mesh.shape), num_slices=num_slices,
                     hbm_bytes=HBM_BYTES.get(kind), compile_seconds=seconds,
                     **_memory_stats(compiled), **_cost_stats(compiled), compiled=compiled)
  if check_memory:
    report.check_fits()
  return report


def prepare_process(topology: str) -> None:
  """Sets up this process to compile for ``topology``; call before jax's backends start.

  Compile-only: jax runs on the CPU backend (TPU devices come from libtpu's description), with
  ``cpu:N``'s N devices; for TPU topologies, the environment libtpu reads off a TPU VM.
  """
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_threefry_partitionable", True)
  cpu = re.fullmatch(r"cpu:(\d+)", topology)
  if cpu:
    try:
      jax.config.update("jax_num_cpu_devices", int(cpu.group(1)))
    except RuntimeError:  # backends already started: topology_devices() names the fix
      pass
    return
  # Off a TPU VM there is no metadata server to say what this host is; without these, libtpu
  # logs misleading errors while describing the (compile-only) target slice.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  accelerator = re.sub(r"^\d+x", "", topology).replace("v5e-", "v5litepod-")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
