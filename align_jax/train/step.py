"""The jitted train step and its inputs, built one way for training and for the AOT compile check.

Training (:func:`align_jax.train.loop.build_trainer`) and ``python -m align_jax.cli.aot`` (which
compiles the same step for a pod it does not have) share every piece here, as MaxText's trainer and
its compile test share one definition; evaluation, feature extraction and inference place the frozen
and trainable params by the same rules:

* :func:`place_frozen`: the frozen encoders' params on the mesh by ``config.mesh.frozen_param_rules``
  (real arrays, or ``jax.ShapeDtypeStruct`` with shardings when ``abstract``);
* :func:`params_shardings` / :func:`init_state`: the train state (trainable params, optimiser
  state, step, RNG key) laid out by ``config.mesh.param_rules``, from one ``init`` function:
  created directly on its shardings by a jitted init (no host copy), or only its shapes;
* :func:`batch_spec`: the global batch's shapes and sharding, from a peek at the input source or,
  without one, from the config (one row of an array source, or the encoders' input sizes);
* :func:`jit_step`: ``train_step(state, frozen, batch) -> (state, metrics)`` jitted with in/out
  shardings, the state donated;
* :func:`build`: all of them, in that order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from align_jax.parallel import mesh as sharding
from align_jax.data import factory as data_factory
from align_jax.data import array_sources as features_data


@flax.struct.dataclass
class TrainState:
  """Everything that is trained or advances: step, trainable params, optimiser state, RNG key."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def abstract(tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` of each leaf of ``tree`` (arrays or shapes), with its sharding."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


# --- params on the mesh ---------------------------------------------------------------------


def frozen_shardings(frozen: Any, mesh, config: ml_collections.ConfigDict) -> Any:
  """The frozen params' shardings, by ``config.mesh.frozen_param_rules``."""
  return sharding.param_shardings(frozen, mesh, config.mesh.frozen_param_rules)


def place_frozen(model, mesh, config: ml_collections.ConfigDict, *,
                 abstract_only: bool = False) -> tuple[Any, Any]:
  """(frozen params, their shardings) of ``model``'s encoders.

  ``mesh=None``: on the default device, no shardings (one-device inference). ``abstract_only``:
  ``jax.ShapeDtypeStruct`` with shardings, nothing placed (for AOT compilation).
  """
  host = model.frozen_params()
  if mesh is None:
    return jax.device_put(host), None
  shardings = frozen_shardings(host, mesh, config)
  if abstract_only:
    return abstract(host, shardings), shardings
  return jax.device_put(host, shardings), shardings


def state_shardings(state: Any, mesh, config: ml_collections.ConfigDict) -> Any:
  """The train state's shardings (of a TrainState of arrays or shapes), by ``param_rules``."""
  return sharding.param_shardings(state, mesh, config.mesh.param_rules)


def params_shardings(params: Any, mesh, config: ml_collections.ConfigDict) -> Any:
  """The trainable params' shardings alone, exactly as they are laid out inside the train state.

  The rules match paths of the train state, whose params sit under ``params/``.
  """
  return sharding.param_shardings({"params": params}, mesh, config.mesh.param_rules)["params"]


# --- the batch ------------------------------------------------------------------------------


def peek(source) -> dict:
  """The source's next batch (this process's rows), without moving the source."""
  position = source.get_state()
  batch = next(source)
  source.set_state(position)
  return batch


def batch_spec(config: ml_collections.ConfigDict, model, batch_sharding, source=None) -> dict:
  """The global batch as ``jax.ShapeDtypeStruct`` with ``batch_sharding``.

  With ``source`` (training): the shapes of its next batch (peeked, the source does not move),
  every process's rows together. Without (AOT): the rows of ``config.batch_size``, each shaped
  as one row of the array source, or as the encoders' inputs for raw images and captions (no need
  to read possibly remote data to know their shapes).
  """
  if source is not None:
    rows = jax.process_count()  # host_to_global: each process gives its own rows
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * rows, *x.shape[1:]), x.dtype,
                                       sharding=batch_sharding),
        jax.tree.map(np.asarray, peek(source)))
  if data_factory.is_array_source(config.data):
    one = features_data.make_array_source(config.data, split="train", global_batch_size=1,
                                          seed=config.seed, process_index=0, process_count=1)
    row = jax.tree.map(np.asarray, next(one))
  else:
    size, length = model.image_encoder.image_size, model.text_encoder.max_length
    row = {"image": {"pixel_values": np.zeros((1, size, size, 3), np.float32)},
           "text": {"input_ids": np.zeros((1, length), np.int32),
                    "attention_mask": np.zeros((1, length), np.int32)}}
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((config.batch_size, *x.shape[1:]), x.dtype,
                                     sharding=batch_sharding), row)


# --- the train state ------------------------------------------------------------------------


def make_init(model, tx: optax.GradientTransformation) -> Callable:
  """``init(rng, frozen, batch) -> TrainState``: the one definition of the initial state."""
  def init(rng, frozen, batch):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init(params_rng, frozen, batch)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)
  return init


def init_state(model, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, mesh,
               frozen: Any, batch: Any, *, abstract_only: bool = False) -> tuple[Any, Any]:
  """(initial train state, its shardings), from ``init`` at ``PRNGKey(config.seed)``.

  ``batch`` gives the shapes the projectors are initialised from: arrays or ShapeDtypeStructs
  (only shapes and dtypes matter: the initial params depend on the key and the shapes alone).
  Real: the state is created directly on its shardings by a jitted init. ``abstract_only``: its
  ``jax.ShapeDtypeStruct`` with shardings, nothing computed (``frozen`` may be shapes too).
  """
  init = make_init(model, tx)
  batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), batch)
  if abstract_only:
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(config.seed))
  else:
    rng = jax.random.PRNGKey(config.seed)
  shapes = jax.eval_shape(init, rng, frozen, batch_shapes)
  shardings = state_shardings(shapes, mesh, config)
  if abstract_only:
    return abstract(shapes, shardings), shardings
  # The batch is zeros of its shapes, made inside the computation: the encoders' forward pass it
  # feeds only gives the projectors' input shapes, and XLA drops it as dead code.
  state = jax.jit(
      lambda rng, frozen: init(rng, frozen, jax.tree.map(
          lambda s: jnp.zeros(s.shape, s.dtype), batch_shapes)),
      out_shardings=shardings)(rng, frozen)
  return state, shardings


# --- the step -------------------------------------------------------------------------------


def jit_step(step_fn: Callable, mesh, state_shardings_: Any, frozen_shardings_: Any,
             batch_sharding) -> Callable:
  """``step_fn(state, frozen, batch) -> (state, metrics)`` jitted over the mesh, state donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings_, frozen_shardings_, batch_sharding),
                 out_shardings=(state_shardings_, sharding.replicated(mesh)),
                 donate_argnums=(0,))


@dataclasses.dataclass
class Step:
  """The jitted step and its inputs (real arrays, or shapes with shardings for AOT)."""
  frozen: Any
  frozen_shardings: Any
  batch: dict  # ShapeDtypeStructs of the global batch
  batch_sharding: Any
  state: Any
  state_shardings: Any
  train_step: Callable  # jitted: (state, frozen, global batch) -> (state, metrics); donates state


def build(config: ml_collections.ConfigDict, mesh, model, tx: optax.GradientTransformation,
          step_fn: Callable, *, source=None, abstract_only: bool = False) -> Step:
  """Frozen params, batch spec, train state and jitted ``step_fn`` of a (validated) config.

  Args:
    config: the training config.
    mesh: the device mesh (real devices, or compile-only ones for AOT).
    model: the :class:`align_jax.model.two_tower.AlignModel` (built with ``abstract=True`` for AOT).
    tx: the optimiser.
    step_fn: the pure ``train_step(state, frozen, batch)`` (:func:`align_jax.train.loop.make_train_step`).
    source: the training input, whose next batch gives the batch's shapes (default: the config's).
    abstract_only: shapes with shardings only (frozen params, state): for ``jit(...).lower``.
  """
  batch_sharding = sharding.batch_sharding(mesh, tuple(config.mesh.batch_axes))
  frozen, frozen_shardings_ = place_frozen(model, mesh, config, abstract_only=abstract_only)
  batch = batch_spec(config, model, batch_sharding, source)
  state, state_shardings_ = init_state(model, tx, config, mesh, frozen, batch,
                                       abstract_only=abstract_only)
  train_step = jit_step(step_fn, mesh, state_shardings_, frozen_shardings_, batch_sharding)
  return Step(frozen=frozen, frozen_shardings=frozen_shardings_, batch=batch,
              batch_sharding=batch_sharding, state=state, state_shardings=state_shardings_,
              train_step=train_step)
