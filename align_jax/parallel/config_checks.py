"""The mesh's config checks (:mod:`align_jax.config.checks`): the global batch splits evenly over
the devices and processes, and a multi-slice ``mesh.dcn_shape`` fits the mesh axes."""

from __future__ import annotations

import ml_collections

from align_jax.config import checks


@checks.register
def check_mesh(config: ml_collections.ConfigDict, context: checks.Context) -> list[str]:
  problems = []
  devices, processes = context.num_batch_devices, context.num_processes
  if config.batch_size % devices:
    nearest = max(devices, config.batch_size // devices * devices)
    problems.append(
        f"batch_size {config.batch_size} is not divisible by the {devices} devices "
        f"that split the batch (mesh axes {tuple(config.mesh.batch_axes)}); use a multiple of "
        f"{devices}, e.g. --config.batch_size={nearest}")
  if config.batch_size % processes:
    problems.append(f"batch_size {config.batch_size} is not divisible by the {processes} "
                    "processes; use a multiple of the process count")
  dcn_shape, axes = tuple(config.mesh.dcn_shape), tuple(config.mesh.axes)
  if dcn_shape and (len(dcn_shape) != len(axes) or dcn_shape.count(-1) > 1
                    or any(s < 1 and s != -1 for s in dcn_shape)):
    example = (2,) + (1,) * (len(axes) - 1)
    problems.append(f"mesh.dcn_shape {dcn_shape} must be () or one positive size (at most one -1) "
                    f"per mesh axis {axes}, e.g. --config.mesh.dcn_shape='{example}' for 2 slices "
                    f"along {axes[0]!r}")
  return problems
