"""One of two processes of tests/test_multislice.py: trains the tiny config on a hybrid mesh whose
granules are the two processes (``mesh.dcn_shape=(2,)``, no slice_index on CPU devices).

    python tests/hybrid_mesh_worker.py HOST:PORT PROCESS_ID STEPS OUT.json

Writes the mesh's process order, the rows of the global batch this process's devices hold, the
losses and the final params (flattened) to OUT.json.
"""

import json
import sys
import types

import jax

from align_jax.parallel import processes as distributed


def main(address: str, process_id: int, steps: int, out: str) -> None:
  distributed.initialize(types.SimpleNamespace(  # as main.py's flags: gloo on CPU, bounded wait
      distributed=True, coordinator_address=address, num_processes=2, process_id=process_id,
      initialization_timeout=120),
      # both processes run one config; their command lines differ only in per-process arguments
      identity=distributed.command_identity(config_text=f"hybrid_mesh_worker steps={steps}"))
  from align_jax.parallel import mesh as sharding  # after initialize: jax sees all 8 devices
  from align_jax.train import loop as train
  from train_utils import tiny_config

  config = tiny_config(**{"model.dropout": 0.0, "mesh.dcn_shape": (2,)})
  trainer = train.build_trainer(config)  # mesh from config.mesh: the hybrid mesh
  mesh = trainer.mesh
  indices = trainer.batch_sharding.addressable_devices_indices_map((config.batch_size,))
  starts = sorted(index[0].start for index in indices.values())
  stops = sorted(index[0].stop for index in indices.values())
  state, losses = trainer.state, []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, trainer.frozen, trainer.next_batch())
    losses.append(float(metrics["train/loss"].addressable_data(0)))
  params = [leaf.addressable_data(0).tolist() for leaf in jax.tree.leaves(state.params)]
  with open(out, "w") as f:
    json.dump({"mesh_process_order": [d.process_index for d in mesh.devices.flat],
               "mesh_shape": dict(mesh.shape), "num_batch_shards":
                   sharding.num_batch_shards(mesh, ("data",)),
               "local_rows": [starts[0], stops[-1]], "losses": losses, "params": params}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
