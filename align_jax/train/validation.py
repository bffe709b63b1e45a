"""Config validation with every package's checks: what the commands, the trainer and AOT call.

:mod:`align_jax.config.checks` runs the checks registered with it, and a check module registers
when it is imported; this module imports all of them (:data:`MODULES`), so calling
:func:`validate` or :func:`check_choices` here never silently skips a group. A new check module
is added to :data:`MODULES` (tests/test_config.py fails until it is).
"""

from __future__ import annotations

import ml_collections

from align_jax.config import checks
from align_jax.data import config_checks as data_checks
from align_jax.evaluate import config_checks as evaluate_checks
from align_jax.objectives import config_checks as objective_checks
from align_jax.parallel import config_checks as parallel_checks
from align_jax.run import config_checks as run_checks
from align_jax.train import config_checks as train_checks

MODULES = (data_checks, objective_checks, train_checks, parallel_checks, run_checks,
           evaluate_checks)


def check_choices(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line) if a key with a fixed set of values has another one; needs no
  devices, so the command line runs it for every mode before anything is built."""
  checks.check_choices(config)


def validate(config: ml_collections.ConfigDict, num_batch_devices: int,
             num_processes: int = 1) -> None:
  """Checks values against each other, the mesh and the processes; raises one ValueError naming
  the fix of each problem.

  ``num_batch_devices`` is how many ways the mesh splits the batch
  (``align_jax.parallel.mesh.num_batch_shards``: the batch axes' sizes, ICI x DCN on a
  multi-slice mesh).
  """
  checks.validate(config, num_batch_devices, num_processes)
