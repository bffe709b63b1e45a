"""Every sharding decision in one place: the mesh, the batch layout and the parameter rule table.

* The mesh comes from ``config.mesh`` (axis names and sizes, ``-1`` = the remaining devices). Its
  axes are ``Auto`` so GSPMD propagates shardings through the projectors (jax 0.10's
  ``make_mesh`` would otherwise make them ``Explicit``).
* Several TPU slices (multi-slice, joined by the data-centre network, DCN): ``mesh.shape`` is the
  mesh inside one slice (ICI) and ``mesh.dcn_shape`` the mesh of slices, over the same axes; each
  axis of the mesh is ``shape * dcn_shape`` long, built by
  ``mesh_utils.create_hybrid_device_mesh`` so that only the axes with a DCN size > 1 cross slices.
  Slices are the devices' ``slice_index`` on TPU; devices of one slice (multi-node GPU, CPU) are
  grouped by process (``process_is_granule``). An empty ``dcn_shape`` (the default) is one slice,
  except on multi-slice TPU devices, where all slices go along the first batch axis (data
  parallelism across slices: only the gradient all-reduce and the loss's gathers cross the DCN).
* The batch dimension is split over ``config.mesh.batch_axes`` (both levels: ICI x DCN); every
  other dimension is whole.
* Parameters are replicated unless a rule ``(regex, spec)`` matches their "/"-joined path (first
  match wins), as big_vision's rule table. A rule that does not divide the dimension raises.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _fill(shape: Sequence[int], total: int, what: str, key: str) -> tuple[int, ...]:
  """``shape`` (config key ``key``) with its one ``-1`` filled so that the product is ``total``."""
  shape, name = list(shape), key.replace("mesh.shape", "mesh shape")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one {key} entry may be -1, got {tuple(shape)}")
  if any(s < 1 and s != -1 for s in shape):
    raise ValueError(f"{key} {tuple(shape)} has sizes below 1; use positive sizes or one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if total % known:
      raise ValueError(f"{total} {what} cannot be split into {name} {tuple(shape)}")
    shape[shape.index(-1)] = total // known
  if math.prod(shape) != total:
    raise ValueError(f"{name} {tuple(shape)} needs {math.prod(shape)} {what}, but {total} are "
                     f"present; fix config.{key} (use -1 for 'the rest')")
  return tuple(shape)


def num_slices(devices: Sequence[Any]) -> int:
  """How many slices (distinct ``slice_index``) the devices span; 1 where they have none."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def granules(devices: Sequence[Any]) -> tuple[str, list[list[Any]]]:
  """The devices grouped by slice (``slice_index``) or, within one slice, by process.

  Multi-slice TPU devices differ in ``slice_index``; CPU and GPU devices have none, or (several
  processes) all the same one, so there each process is a granule (``process_is_granule``).
  Returns ``(attribute, groups)``: the attribute grouped by and the groups in its order.
  """
  attr = "slice_index" if num_slices(devices) > 1 else "process_index"
  groups = collections.defaultdict(list)
  for device in devices:
    groups[getattr(device, attr)].append(device)
  return attr, [groups[key] for key in sorted(groups)]


def hybrid_device_array(axes: Sequence[str], shape: Sequence[int], dcn_shape: Sequence[int],
                        devices: Sequence[Any]) -> np.ndarray:
  """The [shape * dcn_shape] device array of a multi-slice mesh (``create_hybrid_device_mesh``).

  Args:
    axes: mesh axis names (for messages).
    shape: per-slice (ICI) sizes; one may be -1 (the rest of a slice's devices).
    dcn_shape: across-slice sizes over the same axes; one may be -1 (the rest of the slices).
    devices: all devices; grouped into slices by :func:`granules`.
  """
  axes, shape, dcn_shape = tuple(axes), tuple(shape), tuple(dcn_shape)
  if len(dcn_shape) != len(axes):
    raise ValueError(f"mesh.dcn_shape {dcn_shape} must have one size per mesh axis {axes} "
                     "(or be () for one slice)")
  attr, groups = granules(devices)
  kind = "slices" if attr == "slice_index" else "processes (one slice: each process a granule)"
  try:
    dcn_shape = _fill(dcn_shape, len(groups), kind, "mesh.dcn_shape")
  except ValueError as error:
    raise ValueError(f"{error}; the {len(devices)} devices form {len(groups)} {kind}") from None
  sizes = sorted({len(g) for g in groups})
  if len(sizes) != 1:
    raise ValueError(f"the {len(groups)} {kind} hold different numbers of devices {sizes}; a "
                     "multi-slice mesh needs equal slices")
  shape = _fill(shape, sizes[0], "devices per slice", "mesh.shape")
  return mesh_utils.create_hybrid_device_mesh(
      shape, dcn_shape, devices, process_is_granule=attr == "process_index")


def dcn_shape_for(axes: Sequence[str], dcn_shape: Sequence[int], devices: Sequence[Any],
                  slices_axis: str | None = None) -> tuple[int, ...]:
  """The across-slice shape :func:`make_mesh` uses; () or all 1s means a single-slice mesh.

  ``dcn_shape`` as given, except that an empty one on multi-slice TPU devices puts all slices along
  ``slices_axis`` (default: the first axis). All 1s on multi-slice TPU devices is an error.
  """
  axes, dcn_shape = tuple(axes), tuple(dcn_shape)
  if dcn_shape and any(s != 1 for s in dcn_shape):
    return dcn_shape
  slices = num_slices(devices)
  if slices == 1:  # one slice (processes are granules only when dcn_shape says so)
    return dcn_shape
  if dcn_shape:
    raise ValueError(f"mesh.dcn_shape {dcn_shape} is one slice, but the {len(devices)} devices "
                     f"form {slices} slices; set --config.mesh.dcn_shape with a product of {slices} "
                     "(or () for all slices along the first batch axis)")
  along = axes.index(slices_axis) if slices_axis in axes else 0
  return tuple(slices if i == along else 1 for i in range(len(axes)))


def make_mesh(axes: Sequence[str], shape: Sequence[int],
              devices: Sequence[jax.Device] | None = None,
              dcn_shape: Sequence[int] = (), slices_axis: str | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all) with at most one ``-1`` size filled in.

  ``dcn_shape`` (same axes) makes it a multi-slice mesh of ``shape * dcn_shape`` (module
  docstring; :func:`dcn_shape_for` for an empty one on multi-slice TPU devices).
  """
  devices = list(jax.devices() if devices is None else devices)
  axes, shape = tuple(axes), tuple(shape)
  if len(axes) != len(shape):
    raise ValueError(f"mesh.axes {axes} and mesh.shape {shape} differ in length")
  axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
  dcn_shape = dcn_shape_for(axes, dcn_shape, devices, slices_axis)
  if any(s != 1 for s in dcn_shape):
    return Mesh(hybrid_device_array(axes, shape, dcn_shape, devices), axes, axis_types=axis_types)
  shape = _fill(shape, len(devices), "devices", "mesh.shape")
  return jax.make_mesh(shape, axes, axis_types=axis_types, devices=devices)


def mesh_from_config(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh ``config.mesh`` describes, over ``devices`` (default: all)."""
  batch_axes = tuple(mesh_config.batch_axes)
  return make_mesh(mesh_config.axes, mesh_config.shape, devices=devices,
                   dcn_shape=mesh_config.dcn_shape, slices_axis=batch_axes[0] if batch_axes else None)


def num_batch_shards(mesh: Mesh, batch_axes: Sequence[str]) -> int:
  """How many ways the batch dimension is split: the product of the batch axes' sizes (on a
  multi-slice mesh each is already ICI x DCN, so this counts the devices of every slice)."""
  unknown = [a for a in batch_axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"mesh.batch_axes {tuple(batch_axes)} names axes {unknown} that the mesh "
                     f"{tuple(mesh.axis_names)} does not have")
  return math.prod(mesh.shape[a] for a in batch_axes)


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str]) -> NamedSharding:
  """Leading (batch) dimension split over ``batch_axes``; the rest replicated."""
  return NamedSharding(mesh, P(tuple(batch_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Sequence]]) -> Any:
  """A NamedSharding for each leaf of ``tree`` (arrays or ShapeDtypeStructs) from the rule table."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def leaf_sharding(path, leaf):
    name = _path_name(path)
    for pattern, spec in compiled:
      if pattern.search(name):
        spec = tuple(spec)
        shape = np.shape(leaf)
        if len(spec) > len(shape):
          raise ValueError(f"rule {pattern.pattern!r} gives spec {spec} to {name} of shape {shape}")
        for dim, axis in zip(shape, spec):
          if axis is not None:
            names = (axis,) if isinstance(axis, str) else tuple(axis)
            missing = [a for a in names if a not in mesh.shape]
            if missing:
              raise ValueError(f"rule {pattern.pattern!r} names mesh axes {missing} that the mesh "
                               f"{tuple(mesh.axis_names)} does not have (config.mesh.axes)")
            size = math.prod(mesh.shape[a] for a in names)
            if dim % size:
              raise ValueError(f"rule {pattern.pattern!r}: {name} dimension {dim} is not "
                               f"divisible by mesh axis {axis!r} of size {size}")
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def host_to_global(local_batch: Any, sharding: NamedSharding) -> Any:
  """This process's rows of the batch -> one global jax.Array per leaf, split as ``sharding``.

  Works unchanged on one host and on many: each process passes only its own rows.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def map_micro_batches(fn: Callable, inputs: Any, *, micro_batch: int, mesh: Mesh,
                      batch_axes: Sequence[str]) -> Any:
  """``fn(inputs)`` computed ``micro_batch`` rows per device at a time (``lax.map``), same result.

  Frozen encoders run this way inside the train step, so their activation memory is that of one
  micro-batch whatever the global batch. The batch [B] is viewed as [shards, k, micro_batch]
  (each device's rows stay on it) and the loop runs over k; no data moves between devices.
  ``micro_batch <= 0`` or >= the rows per device calls ``fn`` once.
  """
  shards = num_batch_shards(mesh, batch_axes)
  rows = jax.tree.leaves(inputs)[0].shape[0]
  per_shard = rows // shards
  if micro_batch <= 0 or micro_batch >= per_shard:
    return fn(inputs)
  if per_shard % micro_batch:
    raise ValueError(f"{per_shard} rows per device are not divisible by micro-batch "
                     f"{micro_batch}: set config.model.encoder_micro_batch to a divisor")
  steps = per_shard // micro_batch
  spec = NamedSharding(mesh, P(None, tuple(batch_axes)))

  def split(x):  # [B, ...] -> [k, shards * micro_batch, ...], device-local
    x = x.reshape(shards, steps, micro_batch, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x.reshape(steps, shards * micro_batch, *x.shape[3:]),
                                            spec)

  def merge(y):  # inverse of split
    y = y.reshape(steps, shards, micro_batch, *y.shape[2:]).swapaxes(0, 1)
    return y.reshape(rows, *y.shape[3:])

  return jax.tree.map(merge, jax.lax.map(fn, jax.tree.map(split, inputs)))


def _device_varying(x: Any, axes: tuple[str, ...]) -> Any:
  """``x`` (inside ``shard_map``) typed as varying over ``axes``; non-float leaves as they are."""
  if not jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
    return x
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; older: aval.vma
  varying = manual.varying if manual is not None else getattr(aval, "vma", frozenset())
  missing = tuple(a for a in axes if a not in varying)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def map_micro_batches_per_device(fn: Callable, shared: Any, inputs: Any, *, micro_batch: int,
                                 mesh: Mesh, batch_axes: Sequence[str]) -> Any:
  """``fn(shared, inputs)`` computed on each device's own rows, ``micro_batch`` at a time.

  ``fn`` must be row-wise (row i of the result depends on row i of ``inputs`` only); ``shared``
  (parameters, keys) is the same on every device. Under ``jax.shard_map`` each device loops
  (``lax.map``) over micro-batches of its rows, so every value ``fn`` computes is one device's
  micro-batch by construction. :func:`map_micro_batches` instead partitions one global loop
  with GSPMD, which keeps that promise only for ops XLA can partition: XLA's RngBitGenerator
  (the rbg dropout PRNG) it computes whole on every device, so a dropout mask of all devices'
  micro-batches ([devices x micro_batch, T, D] uint32) sat on each chip (issue 24). The
  trainable projectors run here for that reason.

  ``shared``'s float leaves are marked device-varying once, before the loop: the gradient of
  replicated parameters is then summed across devices once after the loop, not once per
  micro-batch. ``micro_batch <= 0`` or >= the rows per device: one call per device.
  """
  axes = tuple(batch_axes)
  shards = num_batch_shards(mesh, axes)
  rows = jax.tree.leaves(inputs)[0].shape[0]
  if rows % shards:
    raise ValueError(f"batch of {rows} rows does not split over the {shards} devices of "
                     f"mesh.batch_axes {axes}: use a batch size that is a multiple of {shards}")
  per_shard = rows // shards
  steps = per_shard // micro_batch if 0 < micro_batch < per_shard else 1
  if steps > 1 and per_shard % micro_batch:
    raise ValueError(f"{per_shard} rows per device are not divisible by micro-batch "
                     f"{micro_batch}: set config.model.projector_micro_batch to a divisor")

  def per_device(shared, local):
    shared = jax.tree.map(lambda x: _device_varying(x, axes), shared)
    if steps == 1:
      return fn(shared, local)
    chunks = jax.tree.map(lambda x: x.reshape(steps, micro_batch, *x.shape[1:]), local)
    out = jax.lax.map(lambda chunk: fn(shared, chunk), chunks)
    return jax.tree.map(lambda y: y.reshape(per_shard, *y.shape[2:]), out)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axes)),
                       out_specs=P(axes))(shared, inputs)
