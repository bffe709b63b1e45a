"""The seed papers' variants (align_jax.train.fusemix; align_jax.objectives.multi_positive, cwcl,
structure) against plain numpy implementations of the papers' equations.

Values and gradients (float64 numpy references; gradients by central finite differences of the
numpy reference), 8 sharded devices against one, the config errors, and the CPU demo learning
with each variant switched on.
"""

import sys
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.config import schema as config_lib
from align_jax.train import validation
from align_jax.objectives import contrastive as losses, cwcl, multi_positive, structure
from align_jax.parallel import mesh as sharding
from align_jax.train import fusemix
from align_jax.train import loop as train
from align_jax.data import array_sources as features_data
from train_utils import apply_overrides, tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import demo  # noqa: E402  (configs/demo.py)


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numeric_grad(f, x, eps=1e-6):
  """Central finite differences of a float64 numpy function at x."""
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[idx] = eps
    g[idx] = (f(x + e) - f(x - e)) / (2 * eps)
  return g


def _log_softmax(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- FuseMix


def test_fusemix_matches_numpy_per_device_with_shared_lambda_and_perm(devices):
  mesh = sharding.make_mesh(("data",), (8,))
  config = tiny_config(**{"model.fusemix_alpha": 0.4, "data.captions_per_image": 2})
  rng = np.random.default_rng(0)
  image = {"pooled": rng.normal(size=(32, 5)).astype(np.float32)}
  text = {"pooled": rng.normal(size=(64, 3)).astype(np.float32)}  # 2 captions per image
  put = lambda t: sharding.host_to_global(t, sharding.batch_sharding(mesh, ("data",)))
  state_rng, step = jax.random.PRNGKey(7), jnp.asarray(3)
  mixer = jax.jit(fusemix.make_feature_mixer(config, mesh))
  got_image, got_text = mixer(state_rng, step, put(image), put(text))

  key = jax.random.fold_in(jax.random.fold_in(state_rng, 3), 0x46D)
  want_image, want_text = np.zeros((32, 5)), np.zeros((64, 3))
  lams, draws = [], jax.jit(lambda k: fusemix.fusemix_draws(k, 0.4, 4))
  for d in range(8):  # each device: its 4 images (8 captions), its own λ and permutation
    lam, perm = draws(jax.random.fold_in(key, d))
    lam, perm = float(lam), np.asarray(perm)
    lams.append(lam)
    assert sorted(perm) == [0, 1, 2, 3]
    x = image["pooled"][4 * d:4 * d + 4].astype(np.float64)
    want_image[4 * d:4 * d + 4] = lam * x + (1 - lam) * x[perm]
    y = text["pooled"][8 * d:8 * d + 8].reshape(4, 2, 3).astype(np.float64)
    want_text[8 * d:8 * d + 8] = (lam * y + (1 - lam) * y[perm]).reshape(8, 3)
  np.testing.assert_allclose(np.asarray(got_image["pooled"]), want_image, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_text["pooled"]), want_text, rtol=1e-5, atol=1e-6)
  assert len(set(lams)) == 8 and all(0 < lam < 1 for lam in lams)
  # Another step mixes differently.
  other, _ = mixer(state_rng, jnp.asarray(4), put(image), put(text))
  assert not np.allclose(np.asarray(other["pooled"]), want_image)


def test_fusemix_gradient_and_beta_distribution():
  x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
  w = np.random.default_rng(2).normal(size=(6, 4))
  lam, perm = 0.3, np.array([2, 0, 1, 5, 3, 4])
  grad = jax.grad(lambda x: jnp.sum(w * fusemix.mix_rows({"pooled": x}, lam, perm)["pooled"]))(x)
  f = lambda x: np.sum(w * (lam * x + (1 - lam) * x[perm]))
  np.testing.assert_allclose(np.asarray(grad), _numeric_grad(f, x.astype(np.float64)), atol=1e-5)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  lams = np.asarray(jax.jit(jax.vmap(lambda k: fusemix.fusemix_draws(k, 0.4, 3)[0]))(keys))
  # Beta(α, α): mean 1/2, variance 1 / (4 (2α + 1)) = 0.1389 at α = 0.4.
  assert abs(lams.mean() - 0.5) < 0.02
  assert abs(lams.var() - 1 / (4 * 1.8)) < 0.012
  with pytest.raises(ValueError, match="fusemix_alpha needs pooled"):
    fusemix.mix_rows({"tokens": x[None], "mask": np.ones((1, 6), bool)}, lam, perm)


# --------------------------------------------------------------------------- demo runs


def _demo_recall(steps=100, **overrides):
  """The CPU demo (configs/demo.py) on one device for ``steps``; held-out recall@1 of both ways."""
  config = demo.get_config(f"steps={steps}")
  config.eval_at_start = False
  config.async_checkpointing = False
  config.eval_every = config.checkpoint_every = steps
  apply_overrides(config, overrides)
  with tempfile.TemporaryDirectory() as workdir:
    last = train.train_and_evaluate(
        config, workdir, mesh=sharding.make_mesh(("data",), (1,), jax.devices()[:1]))
  return last["eval/i2t@1"], last["eval/t2i@1"], last


@pytest.mark.slow
def test_demo_learns_with_fusemix(devices):
  i2t, t2i, _ = _demo_recall(**{"model.fusemix_alpha": 1.0})
  assert i2t > 0.5 and t2i > 0.5, (i2t, t2i)  # chance: 0.001


# --------------------------------------------------------------------------- several captions


def _np_multi_softmax(img, txt, tau, k):
  b = img.shape[0]
  logits = img @ txt.T / tau
  pos = (np.arange(b)[:, None] == np.arange(b * k)[None, :] // k)
  i2t = -(_log_softmax(logits, 1) * pos).sum(1) / k
  t2i = -(_log_softmax(logits.T, 1) * pos.T).sum(1)
  return 0.5 * (i2t.mean() + t2i.mean())


def _np_multi_sigmoid(img, txt, scale, bias, k):
  b = img.shape[0]
  labels = np.where(np.arange(b)[:, None] == np.arange(b * k)[None, :] // k, 1.0, -1.0)
  z = labels * (scale * img @ txt.T + bias)
  return np.sum(np.logaddexp(0.0, -z)) / b  # -log σ(z) = log(1 + e^-z)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_multi_positive_losses_match_numpy(devices, name):
  rng = np.random.default_rng(3)
  b, k, d = 8, 3, 5
  img, txt = _unit(rng, b, d), _unit(rng, b * k, d)
  if name == "softmax":
    fn = lambda i, t: multi_positive.multi_positive_softmax_loss(i, t, 0.2, k)
    ref = lambda i, t: _np_multi_softmax(i, t, 0.2, k)
  else:
    fn = lambda i, t: multi_positive.multi_positive_sigmoid_loss(i, t, 4.0, -2.0, k)
    ref = lambda i, t: _np_multi_sigmoid(i, t, 4.0, -2.0, k)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  value, (g_img, g_txt) = jax.value_and_grad(fn, argnums=(0, 1))(f32(img), f32(txt))
  np.testing.assert_allclose(float(value), ref(img, txt), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_img), _numeric_grad(lambda x: ref(x, txt), img),
                             rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_txt), _numeric_grad(lambda x: ref(img, x), txt),
                             rtol=1e-3, atol=1e-5)
  # Sharded over 8 devices (rows of both towers split) = one device, values and gradients.
  mesh = sharding.make_mesh(("data",), (8,))
  put = lambda x: jax.device_put(f32(x), sharding.batch_sharding(mesh, ("data",)))
  if name == "softmax":
    sharded = lambda i, t: multi_positive.multi_positive_softmax_loss(i, t, 0.2, k, mesh=mesh)
  else:
    sharded = lambda i, t: multi_positive.multi_positive_sigmoid_loss(i, t, 4.0, -2.0, k, mesh=mesh)
  value8, grads8 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(put(img), put(txt))
  np.testing.assert_allclose(float(value8), float(value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grads8[1]), np.asarray(g_txt), atol=1e-6)


def test_one_caption_per_image_is_the_plain_loss():
  rng = np.random.default_rng(4)
  img, txt = (jnp.asarray(_unit(rng, 16, 6), jnp.float32) for _ in range(2))
  np.testing.assert_allclose(float(multi_positive.multi_positive_softmax_loss(img, txt, 0.1, 1)),
                             float(losses.softmax_loss(img, txt, 0.1, impl="gathered")), rtol=1e-6)
  np.testing.assert_allclose(float(multi_positive.multi_positive_sigmoid_loss(img, txt, 10.0,
                                                                              -5.0, 1)),
                             float(losses.sigmoid_loss(img, txt, 10.0, -5.0, impl="gathered")),
                             rtol=1e-6)


def test_array_source_serves_k_captions_per_image():
  # 6 images with 1..4 captions each; every caption row holds its image's id.
  counts = np.array([1, 2, 3, 4, 3, 2])
  text_to_image = np.repeat(np.arange(6), counts)
  image = {"pooled": np.arange(6, dtype=np.float32)[:, None]}
  text = {"pooled": text_to_image.astype(np.float32)[:, None],
          "row": np.arange(len(text_to_image))[:, None]}
  source = features_data.ArrayPairSource(image, text, global_batch_size=4, seed=0,
                                         text_to_image=text_to_image, captions_per_image=3,
                                         process_index=0, process_count=1)
  for _ in range(5):
    batch = next(source)
    ids = batch["image"]["pooled"][:, 0]
    caption_ids = batch["text"]["pooled"][:, 0].reshape(4, 3)
    np.testing.assert_array_equal(caption_ids, np.repeat(ids[:, None], 3, axis=1))
    rows = batch["text"]["row"][:, 0].reshape(4, 3)
    for image_id, image_rows in zip(ids.astype(int), rows):
      distinct = len(set(image_rows.tolist()))
      assert distinct == min(3, counts[image_id]), (image_id, image_rows)


def test_synthetic_world_with_several_captions():
  config = tiny_config(**{"data.num_captions": 3})
  image, text, text_to_image = features_data.synthetic_pairs(config.data, "train")
  assert text["values"].shape == (3 * 512, 10)
  np.testing.assert_array_equal(text_to_image, np.repeat(np.arange(512), 3))
  assert not np.allclose(text["values"][0], text["values"][1])  # independent noise per caption
  # One caption (the default) leaves the world exactly as before.
  image1, text1, none = features_data.synthetic_pairs(tiny_config().data, "train")
  assert none is None and text1["values"].shape == (512, 10)
  np.testing.assert_array_equal(image1["values"], image["values"])


def _train_losses(config, mesh, steps=2):
  trainer = train.build_trainer(config, mesh)
  state, out = trainer.state, []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, trainer.frozen, trainer.next_batch())
    out.append({k: float(v) for k, v in metrics.items()})
  return out, state


_SLOW = pytest.mark.slow  # the default suite keeps one multi-positive + STRUCTURE and one CWCL run
VARIANT_CONFIGS = [
    pytest.param({"data.num_captions": 3, "data.captions_per_image": 2,
                  "loss.structure_weight": 2.0, "loss.structure_levels": 2},
                 id="multi_softmax_structure"),
    pytest.param({"loss.cwcl_weight": 1.0}, id="cwcl"),
    pytest.param({"data.num_captions": 3, "data.captions_per_image": 2, "loss.name": "sigmoid"},
                 id="multi_sigmoid", marks=_SLOW),
    pytest.param({"loss.structure_weight": 2.0, "loss.name": "sigmoid", "loss.impl": "blockwise"},
                 id="structure_sigmoid_blockwise", marks=_SLOW),
]


@pytest.mark.parametrize("overrides", VARIANT_CONFIGS)
def test_train_step_eight_devices_equal_one(devices, overrides):
  config = tiny_config(**{"model.dropout": 0.0, **overrides})
  out8, state8 = _train_losses(config, sharding.make_mesh(("data",), (8,)))
  out1, state1 = _train_losses(config, sharding.make_mesh(("data",), (1,), devices[:1]))
  np.testing.assert_allclose([m["train/loss"] for m in out8], [m["train/loss"] for m in out1],
                             rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5),
               state8.params, state1.params)
  assert all(np.isfinite(m["train/loss"]) for m in out8)
  if "loss.structure_weight" in overrides:
    assert out8[0]["train/structure"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_demo_learns_with_several_captions(devices, loss):
  i2t, t2i, _ = _demo_recall(**{"data.num_captions": 3, "data.captions_per_image": 3,
                                "loss.name": loss})
  assert i2t > 0.5 and t2i > 0.3, (i2t, t2i)  # chance: 0.001 (i2t: 3 matches of 3,000)


# --------------------------------------------------------------------------- CWCL


def _np_cwcl(img, txt, x, y, tau, alpha):
  """CWCL eq. 3 both ways, targets (1 - α) one-hot + α w / Σ w, w = (1 + cos) / 2 of the frozen
  features of the candidates' modality (text for image->text, image for text->image)."""
  def weights(f):
    w = 0.5 * (1.0 + _norm(f) @ _norm(f).T)
    return w / w.sum(1, keepdims=True)
  eye = np.eye(img.shape[0])
  logits = img @ txt.T / tau
  i2t = -(((1 - alpha) * eye + alpha * weights(y)) * _log_softmax(logits, 1)).sum(1).mean()
  t2i = -(((1 - alpha) * eye + alpha * weights(x)) * _log_softmax(logits.T, 1)).sum(1).mean()
  return 0.5 * (i2t + t2i)


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_cwcl_matches_numpy(devices, alpha):
  rng = np.random.default_rng(5)
  b, d = 8, 5
  img, txt = _unit(rng, b, d), _unit(rng, b, d)
  x, y = rng.normal(size=(b, 7)), rng.normal(size=(b, 6))  # frozen features (unnormalised)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  fn = lambda i, t: cwcl.cwcl_softmax_loss(i, t, f32(x), f32(y), 0.3, alpha)
  ref = lambda i, t: _np_cwcl(i, t, x, y, 0.3, alpha)
  value, (g_img, g_txt) = jax.value_and_grad(fn, argnums=(0, 1))(f32(img), f32(txt))
  np.testing.assert_allclose(float(value), ref(img, txt), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_img), _numeric_grad(lambda a: ref(a, txt), img),
                             rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_txt), _numeric_grad(lambda a: ref(img, a), txt),
                             rtol=1e-3, atol=1e-5)
  # The weights: (1 + cos) / 2, rows sum to one; and α = 0 is CLIP's loss.
  w = np.asarray(cwcl.cwcl_weights(f32(y)))
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(cwcl.cwcl_softmax_loss(f32(img), f32(txt), f32(x), f32(y),
                                                              0.3, 0.0)),
                             float(losses.softmax_loss(f32(img), f32(txt), 0.3, impl="gathered")),
                             rtol=1e-6)


# --------------------------------------------------------------------------- STRUCTURE


def _np_structure(x, z, levels, tau, eps=1e-12):
  """STRUCTURE: mean over levels l of the row-mean JS(P^l_i || Q^l_i), P = softmax_rows of the
  centred cosine similarities / τ of the frozen features, Q of the projected ones."""
  def walk(a):
    a = _norm(a)
    a = a - a.mean(0, keepdims=True)
    return np.exp(_log_softmax(a @ a.T / tau, 1))
  p_base, q_base = walk(x), walk(z)
  p, q, total = p_base, q_base, 0.0
  for level in range(1, levels + 1):
    if level > 1:
      p, q = p @ p_base, q @ q_base
    m = 0.5 * (p + q)
    js = 0.5 * (p * (np.log(p + eps) - np.log(m + eps))).sum(1) + \
        0.5 * (q * (np.log(q + eps) - np.log(m + eps))).sum(1)
    total += js.mean()
  return total / levels


@pytest.mark.parametrize("levels", [1, 3])
def test_structure_matches_numpy(levels):
  rng = np.random.default_rng(6)
  x, z = rng.normal(size=(10, 7)), rng.normal(size=(10, 4))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  fn = lambda z_: structure.structure_regularizer(f32(x), z_, levels, 0.5)
  value, grad = jax.value_and_grad(fn)(f32(z))
  np.testing.assert_allclose(float(value), _np_structure(x, z, levels, 0.5), rtol=1e-4)
  want = _numeric_grad(lambda a: _np_structure(x, a, levels, 0.5), z)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=2e-3, atol=1e-6)
  assert float(value) > 1e-3
  # Same geometry (any rotation and scale of the frozen features) -> zero.
  rotation = np.linalg.qr(rng.normal(size=(7, 7)))[0]
  same = float(structure.structure_regularizer(f32(x), f32(3.0 * x @ rotation), levels, 0.5))
  assert abs(same) < 1e-6
  # The frozen side gets no gradient.
  g_frozen = jax.grad(lambda x_: structure.structure_regularizer(x_, f32(z), levels, 0.5))(f32(x))
  assert not np.any(np.asarray(g_frozen))


@pytest.mark.slow
def test_demo_learns_with_cwcl(devices):
  # Half CLIP, half CWCL. The demo's random-network features are far from a pretrained space
  # (off-diagonal cosines 0.2-0.4: a pair's own caption gets only ~1.5x the target weight of an
  # average other one over 512), so the paper's pure loss (weight 1) learns only weakly here:
  # R@1 0.019 / 0.004 after 100 steps (chance 0.001).
  i2t, t2i, _ = _demo_recall(**{"loss.cwcl_weight": 0.5})
  assert i2t > 0.5 and t2i > 0.5, (i2t, t2i)  # chance: 0.001


@pytest.mark.slow
def test_demo_learns_with_structure(devices):
  i2t, t2i, last = _demo_recall(**{"loss.structure_weight": 1.0, "loss.structure_levels": 2})
  assert i2t > 0.5 and t2i > 0.5, (i2t, t2i)  # chance: 0.001
  assert last["train/structure"] > 0


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, message", [
    ({"loss.cwcl_weight": 1.0, "loss.impl": "blockwise"}, "set loss.impl=gathered"),
    ({"data.captions_per_image": 2, "loss.impl": "blockwise"}, "set loss.impl=gathered"),
    ({"loss.cwcl_weight": 1.0, "loss.name": "sigmoid"}, "loss.cwcl_weight is for the softmax"),
    ({"loss.cwcl_weight": 1.5}, r"loss.cwcl_weight must be in \[0, 1\]"),
    ({"loss.cwcl_weight": 1.0, "data.captions_per_image": 2}, "cannot be combined"),
    ({"model.fusemix_alpha": 1.0, "model.image_pooling": "tokens"}, "fusemix_alpha needs pooled"),
    ({"model.fusemix_alpha": -1.0}, "fusemix_alpha must be >= 0"),
    ({"data.captions_per_image": 0}, "captions_per_image and data.num_captions must be >= 1"),
    ({"loss.structure_levels": 0}, "structure_levels must be >= 1"),
    ({"loss.structure_weight": -1.0}, "structure_weight must be >= 0"),
])
def test_variant_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    validation.validate(tiny_config(**overrides), 8)


def test_variants_are_off_by_default():
  config = config_lib.default_config()
  assert config.model.fusemix_alpha == 0 and config.data.captions_per_image == 1
  assert config.loss.cwcl_weight == 0 and config.loss.structure_weight == 0
  validation.validate(config, 8)
  # Structure with the (default) blockwise loss is allowed: the regulariser is added on top.
  validation.validate(tiny_config(**{"loss.structure_weight": 1.0, "loss.impl": "blockwise"}), 8)


@pytest.mark.slow
def test_training_from_a_feature_store_with_several_captions(devices, tmp_path):
  """Stored features (manifest + shards, 1-4 captions per image) -> k = 2 positives per image."""
  import json
  from align_jax.data import feature_store as feature_files
  rng = np.random.default_rng(8)
  shards = []
  for s, num_images in enumerate((40, 24)):
    counts = rng.integers(1, 5, num_images)
    latent = rng.normal(size=(num_images, 6))
    folder = tmp_path / f"shard-0-{s}"
    folder.mkdir()
    arrays = {
        "image.npy": (latent @ rng.normal(size=(6, 12))).astype(np.float16),
        "text.npy": (np.repeat(latent, counts, axis=0) @ rng.normal(size=(6, 10))
                     + 0.1 * rng.normal(size=(counts.sum(), 10))).astype(np.float16),
        "text_to_image.npy": np.repeat(np.arange(num_images), counts)}
    files = {}
    for name, array in arrays.items():  # written as the store writes them: listed in the manifest
      data = feature_files.npy_bytes(array)
      (folder / name).write_bytes(data)
      files[name] = feature_files.file_entry(data, array)
    shards.append({"name": folder.name, "num_images": num_images,
                   "num_texts": int(counts.sum()), "files": files})
  (tmp_path / "manifest.json").write_text(json.dumps({"shards": shards}))
  config = tiny_config(**{"data.source": "features", "data.path": str(tmp_path),
                          "model.image_encoder": "features", "model.text_encoder": "features",
                          "data.captions_per_image": 2, "batch_size": 32, "model.dropout": 0.0})
  config.evals = {}
  out8, state8 = _train_losses(config, sharding.make_mesh(("data",), (8,)))
  out1, state1 = _train_losses(config, sharding.make_mesh(("data",), (1,), devices[:1]))
  np.testing.assert_allclose([m["train/loss"] for m in out8], [m["train/loss"] for m in out1],
                             rtol=2e-5)
  trainer = train.build_trainer(config, sharding.make_mesh(("data",), (8,)))
  batch = trainer.next_batch()
  assert batch["image"]["pooled"].shape == (32, 12) and batch["text"]["pooled"].shape == (64, 10)


def test_image_caption_pipeline_serves_k_captions_per_image(tmp_path):
  import helpers_data as hd
  import ml_collections
  from align_jax.data import pipeline, transforms
  names = hd.write_image_folder(str(tmp_path / "images"), 9)
  counts = [1, 2, 3, 4, 5, 1, 2, 3, 4]
  rows = [{"image": name, "caption": [hd.caption(i, v) for v in range(counts[i])]}
          for i, name in enumerate(names)]
  cfg = ml_collections.ConfigDict({
      "source": "manifest", "path": hd.write_manifest(str(tmp_path / "train.jsonl"), rows),
      "image_root": str(tmp_path / "images"), "num_workers": 0, "captions_per_image": 3})
  captured = []

  def tokenize(texts):
    captured.append(list(texts))
    return hd.fake_tokenize(texts)

  source = pipeline.make_pair_source(
      cfg, global_batch_size=4, seed=0, image_transform=transforms.make_image_transform(
          16, train=True), tokenize=tokenize, process_index=0, process_count=1, train=True)
  for _ in range(3):
    batch = next(source)
    assert batch["image"]["pixel_values"].shape[0] == 4
    assert batch["text"]["input_ids"].shape[0] == 12
    texts = captured[-1]
    for row in range(4):  # the 3 captions of an image: all its own, distinct where it has >= 3
      mine = texts[3 * row:3 * row + 3]
      record = {int(c.split()[1]) for c in mine}
      assert len(record) == 1, mine
      assert len(set(mine)) == min(3, counts[record.pop()])
  source.close()


@pytest.mark.slow
def test_online_encoders_with_several_captions_and_structure(devices, tmp_path):
  """Raw images + captions through frozen HF encoders inside the step, k = 2, STRUCTURE on."""
  from train_utils import tiny_online_config
  config = tiny_online_config(str(tmp_path))
  config.data.captions_per_image = 2
  config.loss.structure_weight = 1.0
  trainer = train.build_trainer(config, sharding.make_mesh(("data",), (8,)))
  batch = trainer.next_batch()
  assert batch["text"]["input_ids"].shape[0] == 2 * batch["image"]["pixel_values"].shape[0]
  state, metrics = trainer.train_step(trainer.state, trainer.frozen, batch)
  assert np.isfinite(float(metrics["train/loss"])) and float(metrics["train/structure"]) > 0
  trainer.source.close()
