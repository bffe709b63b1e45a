"""Multi-slice (hybrid ICI x DCN) meshes: the device layout create_hybrid_device_mesh gives, the
batch split over both levels, clear errors for a dcn_shape that does not match the slices, and the
train step on a hybrid mesh equal to the plain mesh (one process with devices grouped into two
slices, and two real processes as the two granules)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from align_jax.train import aot
from align_jax.train import validation
from align_jax.parallel import mesh as sharding
import multihost
from train_utils import run_train_steps, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeDevice:
  """What create_hybrid_device_mesh reads of a device: id, platform, kind, slice or process."""

  def __init__(self, id_, process_index=0, slice_index=None):
    self.id = id_
    self.platform = self.device_kind = "cpu"
    self.process_index = process_index
    if slice_index is not None:  # devices without slices have no such attribute at all
      self.slice_index = slice_index

  def __repr__(self):
    return f"D{self.id}"


class SlicedDevice:
  """A real CPU device seen as part of a slice (grouping only; unwrapped before use)."""

  def __init__(self, device, slice_index):
    self.device, self.slice_index = device, slice_index
    self.id, self.platform, self.device_kind = device.id, device.platform, device.device_kind
    self.process_index = device.process_index


def _ids(array):
  return np.vectorize(lambda d: d.id)(array)


def test_hybrid_layout_puts_each_slice_in_its_own_block():
  rng = np.random.default_rng(0)
  ids = rng.permutation(16)
  devices = [FakeDevice(int(i), slice_index=int(i) % 2) for i in ids]  # slices interleaved
  slice0 = [d.id for d in devices if d.slice_index == 0]
  slice1 = [d.id for d in devices if d.slice_index == 1]
  # slices along data: rows 0-3 are slice 0 (its devices in order, reshaped), rows 4-7 slice 1
  array = sharding.hybrid_device_array(("data", "model"), (-1, 2), (2, 1), devices)
  np.testing.assert_array_equal(_ids(array), np.concatenate(
      [np.reshape(slice0, (4, 2)), np.reshape(slice1, (4, 2))], axis=0))
  # slices along model: columns 0-1 slice 0, columns 2-3 slice 1
  array = sharding.hybrid_device_array(("data", "model"), (4, 2), (1, -1), devices)
  np.testing.assert_array_equal(_ids(array), np.concatenate(
      [np.reshape(slice0, (4, 2)), np.reshape(slice1, (4, 2))], axis=1))


@pytest.mark.parametrize("slice_index", [None, 0])  # no attribute (CPU), or one slice (GPU)
def test_devices_of_one_slice_are_grouped_by_process(slice_index):
  devices = [FakeDevice(i, process_index=(i // 2) % 2, slice_index=slice_index)
             for i in range(8)]  # processes 0,0,1,1,0,0,1,1
  assert sharding.granules(devices)[0] == "process_index"
  array = sharding.hybrid_device_array(("data",), (-1,), (2,), devices)
  np.testing.assert_array_equal(_ids(array), [0, 1, 4, 5, 2, 3, 6, 7])


def test_dcn_shape_that_does_not_match_the_slices_is_one_clear_line():
  devices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
  cases = [
      (("data",), (4,), r"mesh.dcn_shape \(4,\) needs 4 slices, but 2 are present.*8 devices form 2"),
      (("data",), (2, 1), r"mesh.dcn_shape \(2, 1\) must have one size per mesh axis \('data',\)"),
      (("data", "model"), (3, -1), r"2 slices cannot be split into mesh.dcn_shape \(3, -1\)"),
      (("data",), (0,), r"mesh.dcn_shape \(0,\) has sizes below 1"),
  ]
  for axes, dcn_shape, message in cases:
    with pytest.raises(ValueError, match=message) as error:
      sharding.hybrid_device_array(axes, (-1,) * len(axes), dcn_shape, devices)
    assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match=r"mesh shape \(3,\) needs 3 devices per slice, but 4"):
    sharding.hybrid_device_array(("data",), (3,), (2,), devices)
  uneven = devices[:7]
  with pytest.raises(ValueError, match=r"hold different numbers of devices \[3, 4\]"):
    sharding.hybrid_device_array(("data",), (-1,), (2,), uneven)
  with pytest.raises(ValueError, match=r"dcn_shape \(1,\) is one slice, but the 8 devices form 2"):
    sharding.dcn_shape_for(("data",), (1,), devices)


def test_empty_dcn_shape_is_one_slice_or_all_slices_along_the_batch_axis():
  sliced = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
  assert sharding.dcn_shape_for(("data", "model"), (), sliced, "data") == (2, 1)
  assert sharding.dcn_shape_for(("data", "model"), (), sliced, "model") == (1, 2)
  one_slice = [FakeDevice(i, slice_index=0) for i in range(8)]
  assert sharding.dcn_shape_for(("data",), (), one_slice) == ()
  processes = [FakeDevice(i, process_index=i // 4) for i in range(8)]  # GPU nodes: as asked
  assert sharding.dcn_shape_for(("data",), (), processes) == ()
  assert sharding.dcn_shape_for(("data",), (2,), processes) == (2,)


def test_validate_checks_the_dcn_shape_form():
  config = tiny_config(**{"mesh.dcn_shape": (2, 1)})
  with pytest.raises(ValueError, match=r"mesh.dcn_shape \(2, 1\) must be \(\) or one positive"):
    validation.validate(config, 8)
  validation.validate(tiny_config(**{"mesh.dcn_shape": (2,)}), 8)


def _hybrid_cpu_mesh(devices):
  """The 8 CPU devices as 2 interleaved slices of 4: data = 2 (ICI) x 2 (DCN), model = 2."""
  sliced = [SlicedDevice(d, d.id % 2) for d in devices]
  array = sharding.hybrid_device_array(("data", "model"), (2, 2), (2, 1), sliced)
  return Mesh(np.vectorize(lambda d: d.device)(array), ("data", "model"),
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_batch_is_split_over_both_levels_and_the_step_equals_the_plain_mesh(devices):
  mesh = _hybrid_cpu_mesh(devices)
  np.testing.assert_array_equal(_ids(mesh.devices), [[0, 2], [4, 6], [1, 3], [5, 7]])
  assert sharding.num_batch_shards(mesh, ("data",)) == 4  # 2 within a slice x 2 slices
  rows = sharding.batch_sharding(mesh, ("data",)).devices_indices_map((64,))
  for device, (index,) in rows.items():  # slice 0 (even ids) holds the first half of the batch
    half = device.id % 2
    assert half * 32 <= index.start < index.stop <= (half + 1) * 32, (device, index)
    assert index.stop - index.start == 16
  config = tiny_config(**{"model.dropout": 0.0, "mesh.axes": ("data", "model"),
                          "mesh.shape": (-1, 2)})
  _, hybrid_losses, hybrid_state, _ = run_train_steps(config, mesh, 4)
  plain_mesh = sharding.make_mesh(("data", "model"), (4, 2))
  _, plain_losses, plain_state, _ = run_train_steps(config, plain_mesh, 4)
  np.testing.assert_allclose(hybrid_losses, plain_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               hybrid_state.params, plain_state.params)


def _tpu_description_available() -> bool:
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another libtpu process
  try:
    aot.topology_devices("v5e-4")
  except aot.TopologyUnavailableError:
    return False
  return True


@pytest.mark.skipif(not _tpu_description_available(), reason="needs libtpu (jax[tpu])")
def test_two_tpu_slices_split_the_batch_over_dcn():
  devices = aot.topology_devices("2xv5e-16")
  mesh = sharding.mesh_from_config(tiny_config().mesh, devices)  # dcn_shape () on 2 slices
  assert dict(mesh.shape) == {"data": 32}
  assert [d.slice_index for d in mesh.devices] == [0] * 16 + [1] * 16
  rows = sharding.batch_sharding(mesh, ("data",)).devices_indices_map((1024,))
  assert {d.slice_index for d, (index,) in rows.items() if index.start < 512} == {0}



@pytest.mark.slow
def test_two_processes_as_granules_equal_one_process(devices, tmp_path):
  """2 processes x 4 CPU devices, mesh.dcn_shape=(2,) (processes are the granules) vs 1 x 8."""
  port, steps = multihost.free_port(), 4
  env = multihost.cpu_env(4, {"PYTHONPATH": os.pathsep.join([REPO,
                                                             os.path.join(REPO, "tests")])})
  worker = os.path.join(REPO, "tests", "hybrid_mesh_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, f"127.0.0.1:{port}", str(i), str(steps),
                             str(tmp_path / f"out{i}.json")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
  results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  for i, result in enumerate(results):
    assert result["mesh_process_order"] == [0] * 4 + [1] * 4
    # each process's devices hold one contiguous half of the global batch
    assert result["local_rows"] == [i * 32, (i + 1) * 32]
  config = tiny_config(**{"model.dropout": 0.0})
  _, losses, state, _ = run_train_steps(config, sharding.make_mesh(("data",), (8,)), steps)
  for result in results:
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-6)
    flat = jax.tree.leaves(state.params)
    assert len(flat) == len(result["params"])
    for got, want in zip(result["params"], flat):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
