"""AlignedModel and export: the embeddings users get equal the trainer's and a numpy reference.

* A workdir and its export load to bit-identical embeddings; the export holds float32 safetensors
  with "/"-joined names equal to the checkpoint's params, and a model card.
* Demo (random_mlp) embeddings equal a numpy re-implementation of encoder + MLP projector.
* Tiny online model (Hugging Face encoders): embed_images / embed_texts of raw images and strings
  equal AlignModel.embed on the trainer's own preprocessing; zero-shot probabilities equal
  softmax(image @ class.T / temperature) with class embeddings built by prompts.class_embeddings.
* The sigmoid-loss model's probabilities are sigmoid(scale * logits + bias).
* Missing folder, checkpoint, config or step raise FileNotFoundError naming the fix.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import align_jax
import helpers_cli
from align_jax.cli import export as export_cli
from align_jax.serving import export as export_lib
from align_jax.serving import inference
from align_jax.run import reader as run_dir
from align_jax.train import loop as train
from align_jax.evaluate import prompts
from train_utils import tiny_config, tiny_online_config


def _train(config, workdir):
  """Trains on one device: compiling for one is faster, and sharding is tested elsewhere."""
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))
  train.train_and_evaluate(config, str(workdir), mesh=mesh)
  return str(workdir)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  config = tiny_config(evals={})
  return config, _train(config, root / "run")


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("online")
  config = tiny_online_config(str(root / "encoders"))
  config.total_steps = 3
  return config, _train(config, root / "run")


def _flatten(tree, prefix=""):
  if not isinstance(tree, dict):
    return {prefix[:-1]: np.asarray(tree)}
  return {k: v for name, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{name}/").items()}


def _gelu(x):  # flax's default (tanh) approximation
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _numpy_tower(encoder_params, activation, projector, x):
  """Random-MLP encoder -> LN -> Dense -> GELU -> Dense -> L2 normalise, in float64 numpy."""
  e = {k: np.asarray(v, np.float64) for k, v in encoder_params.items()}
  feats = activation(x @ e["w1"] + e["b1"]) @ e["w2"] + e["b2"]
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in projector.items()}
  mean, var = feats.mean(-1, keepdims=True), feats.var(-1, keepdims=True)
  h = (feats - mean) / np.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
  h = _gelu(h @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  z = h @ p["out"]["kernel"] + p["out"]["bias"]
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_demo_embeddings_match_numpy_and_export(demo_run, tmp_path):
  config, workdir = demo_run
  model = align_jax.AlignedModel.load(workdir, batch_size=32)
  assert model.step == config.total_steps
  params = run_dir.restore_params(workdir).params
  rng = np.random.default_rng(0)
  images = rng.normal(size=(45, config.data.image_input_dim)).astype(np.float32)  # 2 batches
  texts = rng.normal(size=(7, config.data.text_input_dim)).astype(np.float32)
  got_i, got_t = model.embed_images(images), model.embed_texts(texts)
  enc = model.model
  np.testing.assert_allclose(got_i, _numpy_tower(enc.image_encoder.params, np.tanh,
                                                 params["image"], images), atol=2e-5)
  np.testing.assert_allclose(got_t, _numpy_tower(enc.text_encoder.params, np.sin,
                                                 params["text"], texts), atol=2e-5)

  card = export_lib.export(workdir, str(tmp_path / "export"))
  tensors = load_file(str(tmp_path / "export" / inference.WEIGHTS_FILE))
  assert set(tensors) >= {"image/norm/scale", "text/out/kernel", "logit/log_temperature"}
  assert all(t.dtype == np.float32 for t in tensors.values())
  flat = {f"{tower}/{path}": value for tower in ("image", "text", "logit")
          for path, value in _flatten(params[tower]).items()}
  assert sorted(tensors) == sorted(flat)
  for name, value in flat.items():
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    assert tensors[name].shape == value.shape, name
  assert card["step"] == config.total_steps and card["embed_dim"] == config.model.embed_dim
  assert card["temperature"] == pytest.approx(float(np.exp(params["logit"]["log_temperature"])))
  with open(tmp_path / "export" / inference.MODEL_FILE) as f:
    assert json.load(f) == card
  exported = align_jax.AlignedModel.load(tmp_path / "export", batch_size=32)
  assert exported.logit_params == model.logit_params
  np.testing.assert_array_equal(exported.embed_images(images), got_i)
  np.testing.assert_array_equal(exported.embed_texts(texts), got_t)


def test_export_cli_and_earlier_step(demo_run, tmp_path, capsys):
  config, workdir = demo_run
  out = tmp_path / "step3"
  assert helpers_cli.run_command(export_cli, [f"--workdir={workdir}", f"--out={out}",
                                             "--step=3"]) in (0, None)
  assert "exported step 3" in capsys.readouterr().out
  early = align_jax.AlignedModel.load(out)
  assert early.step == 3
  x = np.ones((2, config.data.image_input_dim), np.float32)
  np.testing.assert_array_equal(early.embed_images(x),
                                align_jax.AlignedModel.load(workdir, step=3).embed_images(x))
  assert not np.allclose(early.embed_images(x), align_jax.AlignedModel.load(workdir)
                         .embed_images(x))
  status = helpers_cli.run_command(export_cli, [f"--workdir={tmp_path / 'nope'}", f"--out={out}"])
  assert str(status).startswith("error: ") and "is not a folder" in str(status), status


def test_features_encoders_take_features(demo_run):
  config, workdir = demo_run
  demo = align_jax.AlignedModel.load(workdir)
  features_config = tiny_config(**{"model.image_encoder": "features",
                                   "model.text_encoder": "features"})
  model = align_jax.AlignedModel(features_config, run_dir.restore_params(workdir).params, step=6)
  x = np.random.default_rng(2).normal(size=(5, config.data.image_input_dim)).astype(np.float32)
  encoder = demo.model.image_encoder
  pooled = np.asarray(encoder.apply(encoder.params, {"values": x})["pooled"])
  np.testing.assert_allclose(model.embed_images(pooled), demo.embed_images(x), atol=1e-6)
  # Token features: the MLP projector takes their masked mean (the padding token is masked out).
  tokens = np.stack([pooled, np.full_like(pooled, 50.0)], axis=1)
  mask = np.array([[True, False]] * 5)
  np.testing.assert_allclose(model.embed_images({"tokens": tokens, "mask": mask}),
                             demo.embed_images(x), atol=1e-6)
  with pytest.raises(ValueError, match="'tokens' .* and 'mask'"):
    model.embed_images({"tokens": tokens})


def test_sigmoid_probabilities_and_retrieve(demo_run):
  demo_config, workdir = demo_run
  config = tiny_config(**{"loss.name": "sigmoid"})
  params = run_dir.restore_params(workdir).params
  params["logit"] = {"log_scale": np.float32(np.log(7.0)), "bias": np.float32(-2.5)}
  model = align_jax.AlignedModel(config, params, step=6)
  values = model.logit_params
  assert values == pytest.approx({"scale": 7.0, "bias": -2.5})
  rng = np.random.default_rng(1)
  images = rng.normal(size=(5, config.data.image_input_dim))
  classes = model.embed_texts(rng.normal(size=(3, config.data.text_input_dim)))
  probs, names = model.zero_shot_classify(images, ["a", "b", "c"], class_embeddings=classes)
  logits = model.embed_images(images).astype(np.float64) @ classes.T.astype(np.float64)
  want = 1 / (1 + np.exp(-(values["scale"] * logits + values["bias"])))
  np.testing.assert_allclose(probs, want, rtol=1e-5)
  assert names == [["a", "b", "c"][i] for i in np.argmax(logits, axis=1)]
  index, scores = model.retrieve(classes, model.embed_images(images), k=2)
  np.testing.assert_array_equal(index, np.argsort(-logits.T, axis=1)[:, :2])
  np.testing.assert_allclose(scores, np.sort(logits.T, axis=1)[:, ::-1][:, :2], atol=1e-6)
  with pytest.raises(ValueError, match="text encoder that reads strings"):
    model.zero_shot_classify(images, ["a", "b"])
  with pytest.raises(ValueError, match="text_input_dim"):
    model.embed_texts(np.zeros((2, config.data.text_input_dim + 1)))


def test_online_model_matches_trainer_and_zero_shot(online_run):
  from PIL import Image
  from align_jax.data import factory, synthetic_images
  config, workdir = online_run
  model = align_jax.AlignedModel.load(workdir, batch_size=8)
  params = run_dir.restore_params(workdir).params
  align, frozen = model.model, model.frozen  # the same frozen encoders, not a second copy
  embed = jax.jit(align.embed)
  embed_texts = jax.jit(align.embed_texts)
  reader = synthetic_images.ShapesReader(split="heldout")
  records = [reader.read(i) for i in range(0, 256, 23)]  # 12 scenes: two batches of 8
  images = [r.image for r in records]
  captions = [r.captions[0] for r in records]
  # Default: the trainer's evaluation transform, exactly as the retrieval evaluator feeds images.
  transform = factory.make_image_transform(align, config.data, train=False)
  pixels = np.stack([transform(Image.fromarray(image)) for image in images])
  want_i, want_t = embed(params, frozen, {
      "image": {"pixel_values": pixels}, "text": align.text_encoder.preprocess(captions)})
  np.testing.assert_allclose(model.embed_images(images), want_i, atol=1e-5)
  np.testing.assert_allclose(model.embed_texts(captions), want_t, atol=1e-5)
  hf_view = align_jax.AlignedModel(config, params, step=3, batch_size=8,
                                   image_preprocessing="encoder")
  want_hf, _ = embed(params, frozen, {"image": align.image_encoder.preprocess(images),
                                      "text": align.text_encoder.preprocess(captions)})
  np.testing.assert_allclose(hf_view.embed_images(images), want_hf, atol=1e-5)
  assert not np.allclose(want_hf, want_i, atol=1e-3)  # the two views differ (crop margin)

  names = ["red", "green", "blue"]
  templates = ["a small {} circle", "a large {} square"]
  probs, predicted = model.zero_shot_classify(images, names, templates)
  by_hand = prompts.class_embeddings(
      names, lambda texts: embed_texts(params, frozen, align.text_encoder.preprocess(texts)),
      templates)
  logits = np.asarray(want_i, np.float64) @ by_hand.T / model.logit_params["temperature"]
  want = np.exp(logits - logits.max(1, keepdims=True))
  want /= want.sum(1, keepdims=True)
  np.testing.assert_allclose(probs, want, atol=1e-4)
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
  assert predicted == [names[i] for i in np.argmax(want, axis=1)]


def test_clear_errors(demo_run, tmp_path):
  config, workdir = demo_run
  with pytest.raises(FileNotFoundError, match="not a folder"):
    align_jax.AlignedModel.load(tmp_path / "missing")
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first"):
    align_jax.AlignedModel.load(empty)
  no_config = tmp_path / "no_config"
  shutil.copytree(os.path.join(workdir, "checkpoints"), no_config / "checkpoints")
  with pytest.raises(FileNotFoundError, match="config.json is missing: pass the run's config"):
    align_jax.AlignedModel.load(no_config)
  with_config = align_jax.AlignedModel.load(no_config, config=config)  # the fix works
  assert with_config.step == config.total_steps
  export_lib.export(workdir, str(tmp_path / "future"))
  card_path = tmp_path / "future" / inference.MODEL_FILE
  card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "format": "x/9"}))
  with pytest.raises(ValueError, match="format 'x/9'.*upgrade align_jax"):
    align_jax.AlignedModel.load(tmp_path / "future")
  with pytest.raises(ValueError, match="image_preprocessing must be one of"):
    align_jax.AlignedModel.load(workdir, image_preprocessing="hf")
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 4 .* steps: \[3, 6\]"):
    align_jax.AlignedModel.load(workdir, step=4)


def test_export_files_are_readable_by_others(demo_run, tmp_path):
  """Issue 12: projectors.safetensors was written 0600; exports are meant to be shared."""
  _, workdir = demo_run
  old = os.umask(0o022)
  try:
    export_lib.export(workdir, str(tmp_path / "export"))
  finally:
    os.umask(old)
  modes = {name: os.stat(tmp_path / "export" / name).st_mode & 0o777
           for name in os.listdir(tmp_path / "export")}
  assert modes == {inference.WEIGHTS_FILE: 0o644, inference.CONFIG_FILE: 0o644,
                   inference.MODEL_FILE: 0o644}
