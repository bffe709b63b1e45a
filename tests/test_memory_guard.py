"""Memory guard: the train step's temporaries per device stay those of one device's micro-batch.

The paper recipe fits a 32,768 batch on a v5e-256 only because the token projectors run in
rematerialised micro-batches (``config.model.projector_micro_batch``): per chip, activation memory
is one micro-batch of that chip's rows. Issue 24: a dropout PRNG that XLA does not partition
(rbg's RngBitGenerator) put the mask of every chip's micro-batch on each chip, 22 GiB of
temporaries instead of 0.85 GiB, and no test noticed. These tests compile the real train step
ahead of time on the eight simulated CPU devices (no libtpu) and read XLA's memory numbers:

* default suite: token projectors (freeze_align_image / _text), dropout on, train mode, the rbg
  dropout PRNG (unsafe_rbg and threefry2x32 in the slow suite). The same config (batch, rows per
  device) at 2 and at 4 micro-batches per device: the temporaries may grow as they do on a
  one-device mesh (one device's extra micro-batch rows) plus one micro-batch's token features,
  not by the extra rows of every device; and the per-device loop's values and gradients;
* slow suite, with libtpu: the real recipe (configs/dinov2_roberta.py at batch 32,768) compiled
  for a v5e-256 from encoder config files alone, peak <= 4 GiB and temporaries <= 1 GiB per chip.

Every memory-relevant change (projectors, losses, micro-batching, encoders) reruns this file and
its slow test (README, "Memory guard").
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from align_jax.config import schema as config_lib
from align_jax.model import ops, two_tower as model_lib
from align_jax.train import loop as train, optim, step as step_builder
from align_jax.parallel import mesh as sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
ROWS_PER_DEVICE = 32
IMAGE_TOKENS, TEXT_TOKENS, WIDTH, EMBED = 65, 17, 128, 32  # CLS + 8x8 patches; small embed_dim


class _TokenFeatures:
  """A pair source of zero token features (only shapes matter to a compile)."""

  def __init__(self, rows: int):
    self.batch = {
        "image": {"tokens": np.zeros((rows, IMAGE_TOKENS, WIDTH), np.float32),
                  "mask": np.ones((rows, IMAGE_TOKENS), bool)},
        "text": {"tokens": np.zeros((rows, TEXT_TOKENS, WIDTH), np.float32),
                 "mask": np.ones((rows, TEXT_TOKENS), bool)}}

  def get_state(self):
    return 0

  def set_state(self, state):
    del state

  def __next__(self):
    return self.batch


def _token_config(micro_batch: int, rng_impl: str, num_devices: int = DEVICES):
  config = config_lib.default_config()
  config.batch_size = num_devices * ROWS_PER_DEVICE
  m = config.model
  m.image_encoder = m.text_encoder = "features"
  m.image_pooling = m.text_pooling = "tokens"
  m.image_projector, m.text_projector = "freeze_align_image", "freeze_align_text"
  m.embed_dim = EMBED
  m.dropout = 0.1
  m.dropout_rng_impl = rng_impl
  m.projector_micro_batch = micro_batch
  return config


def temp_bytes(config, num_devices: int = DEVICES) -> int:
  """XLA's temporaries per device of the train step compiled ahead of time on the first
  ``num_devices`` simulated devices."""
  mesh = sharding.mesh_from_config(config.mesh, jax.devices()[:num_devices])
  model = model_lib.build_model(config, mesh)
  tx = optim.make_optimizer(config)
  step = train.make_train_step(model, tx, config, mesh)
  built = step_builder.build(config, mesh, model, tx, step,
                             source=_TokenFeatures(config.batch_size), abstract_only=True)
  compiled = built.train_step.lower(built.state, built.frozen, built.batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def micro_batch_token_bytes(rows: int) -> int:
  """One device's micro-batch of ``rows``: its image and text token features in float32."""
  return rows * (IMAGE_TOKENS + TEXT_TOKENS) * WIDTH * 4


@pytest.mark.parametrize("rng_impl", [
    "rbg", pytest.param("unsafe_rbg", marks=pytest.mark.slow),
    pytest.param("threefry2x32", marks=pytest.mark.slow)])
def test_projector_micro_batches_cost_one_devices_micro_batch(devices, rng_impl):
  """2 vs 4 micro-batches per device (same rows): temporaries grow as on one device, no more.

  Doubling the micro-batch adds ROWS_PER_DEVICE // 4 rows of activations per device. On a
  one-device mesh that growth is by construction one device's; on eight devices it must be the
  same (plus at most one micro-batch's token features of slack). Issue 24's bug added the
  other seven devices' dropout masks: +5.5 micro-batches' token features here.
  """
  del devices  # conftest's eight simulated CPU devices
  temps = {(n, k): temp_bytes(_token_config(ROWS_PER_DEVICE // k, rng_impl, n), n)
           for n in (DEVICES, 1) for k in (2, 4)}
  growth = {n: temps[n, 2] - temps[n, 4] for n in (DEVICES, 1)}
  micro_batch = micro_batch_token_bytes(ROWS_PER_DEVICE // 4)
  numbers = ", ".join(f"{n} device(s): {temps[n, 2] / 2**20:.3f} MiB at 2 and "
                      f"{temps[n, 4] / 2**20:.3f} MiB at 4 micro-batches per device"
                      for n in (DEVICES, 1))
  assert growth[1] > 0, f"the micro-batch size does not change the temporaries ({numbers})"
  assert growth[DEVICES] <= growth[1] + micro_batch, (
      f"temporaries grow by {growth[DEVICES] / micro_batch:.2f} micro-batches' token features "
      f"per device on {DEVICES} devices but {growth[1] / micro_batch:.2f} on one ({numbers}): "
      "something in the projector micro-batch loop is computed for every device's rows")


def test_rbg_dropout_without_micro_batches_costs_one_devices_rows(devices):
  """projector_micro_batch=0 with rbg dropout: each device's temporaries are one device's.

  The same rows per device on 8 devices and on 1 must give the same temporaries (within one
  micro-batch's worth of token features, a quarter of the rows). Before the projectors ran per
  device in this case, the 8-device step held every device's dropout mask: 14.6 vs 5.55 MiB.
  """
  eight = temp_bytes(_token_config(0, "rbg"))
  one = temp_bytes(_token_config(0, "rbg", num_devices=1), num_devices=1)
  slack = micro_batch_token_bytes(ROWS_PER_DEVICE // 4)
  assert eight <= one + slack, (
      f"{eight / 2**20:.2f} MiB of temporaries per device on {DEVICES} devices vs "
      f"{one / 2**20:.2f} MiB on one, same rows per device: a value of every device's rows")


def test_per_device_micro_batches_are_each_rows_projector_with_its_key(devices):
  """The per-device loop's numbers: each micro-batch of each device is the projector of those rows
  with dropout key ``fold_in(key, global index of its first row)``; values and parameter
  gradients equal that reference computed chunk by chunk on one device. The mesh has a second
  axis the batch is not split over: its copies draw the same masks."""
  del devices
  rows, per_device, micro = 16, 4, 2  # batch over "data" (4 devices), 2 micro-batches each
  mesh = sharding.make_mesh(("data", "model"), (4, 2))
  config = _token_config(micro, "rbg")
  config.mesh.axes, config.mesh.shape = ("data", "model"), (4, 2)
  model = model_lib.build_model(config, mesh)
  rng = np.random.default_rng(0)

  def tower(tokens):
    mask = rng.random((rows, tokens)) < 0.7
    mask[:, 0] = True
    return {"tokens": rng.normal(size=(rows, tokens, 8)).astype(np.float32), "mask": mask}

  image, text = tower(5), tower(4)
  params = model.init(jax.random.PRNGKey(1), model.frozen_params(), {"image": image, "text": text})
  weights = [rng.normal(size=(rows, EMBED)).astype(np.float32) for _ in range(2)]
  key = jax.random.PRNGKey(3)

  def objective(params, image, text):
    z = model.project(params, image, text, train=True, rng=key)
    return sum((zi * w).sum() for zi, w in zip(z, weights)), z

  split = sharding.batch_sharding(mesh, ("data",))
  (value, z), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      params, jax.device_put(image, split), jax.device_put(text, split))

  def reference(params):
    keys = jax.random.split(model_lib.dropout_key(key, "rbg"))
    z = []
    for module, p, features, k in zip((model.image_projector, model.text_projector),
                                      (params["image"], params["text"]), (image, text), keys):
      chunks = [module.apply({"params": p}, jax.tree.map(lambda x: x[i:i + micro], features),
                             train=True, rngs={"dropout": jax.random.fold_in(k, i)})
                for i in range(0, rows, micro)]  # device i // per_device, its chunk
      z.append(ops.l2_normalize(jax.numpy.concatenate(chunks)))
    return sum((zi * w).sum() for zi, w in zip(z, weights)), z

  assert per_device == rows // sharding.num_batch_shards(mesh, ("data",))
  (expected, expected_z), expected_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(
      params)
  for got, want in zip(z, expected_z):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, expected_grads)
  # dropout is on: without it the embeddings differ
  plain = model.project(params, image, text)
  assert not np.allclose(plain[0], expected_z[0], atol=1e-3)


def _libtpu_missing() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH")


@pytest.mark.slow
@pytest.mark.skipif(_libtpu_missing(), reason="needs libtpu to compile for a v5e-256: "
                    "pip install 'jax[tpu]==0.10.2' (no TPU needed)")
def test_paper_recipe_fits_a_v5e_256_at_32k(tmp_path):
  """configs/dinov2_roberta.py at batch 32,768 on a v5e-256, compiled from encoder config files
  alone (benchmarks/aot_pod.py, the README's AOT recipe): <= 4 GiB peak, <= 1 GiB temporaries."""
  out = tmp_path / "aot_pod.jsonl"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "aot_pod.py"), "--entries",
       "v5e-256:32768", "--out", str(out), "--timeout", "2400"],
      cwd=REPO, capture_output=True, text=True, timeout=2700,
      env=dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))  # compile-only: beside other users
  assert result.returncode == 0 and out.exists(), result.stdout[-2000:] + result.stderr[-2000:]
  row = json.loads(out.read_text().splitlines()[-1])
  assert not row.get("error"), row["error"]
  gib = 2**30
  print(f"v5e-256 at 32,768: temporaries {row['temp_bytes'] / gib:.2f} GiB, peak "
        f"{row['peak_bytes'] / gib:.2f} GiB (commit {row['commit']})")
  assert row["fits"] and row["peak_bytes"] <= 4 * gib, row
  assert row["temp_bytes"] <= 1 * gib, row
