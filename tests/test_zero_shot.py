"""Zero-shot evaluator: exact answers with a fake model; tiny encoders against a reference."""

import dataclasses
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import helpers_data as hd
from align_jax.config import schema as config_lib
from align_jax.model import interfaces, ops
from align_jax.model import two_tower as model_lib
from align_jax.run import reader as run_dir
from align_jax.parallel import mesh as sharding
from align_jax.train import loop as train
from align_jax.data import factory, synthetic_images
from align_jax.evaluate import datasets, metrics, prompts, standalone
from align_jax.evaluate.zero_shot import ZeroShotEvaluator
from train_utils import tiny_online_config

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
WORDS = ("red", "green", "blue")


@dataclasses.dataclass(frozen=True)
class _FakeImageEncoder:
  image_size: int = 4
  mean: tuple = (0.0, 0.0, 0.0)
  std: tuple = (1.0, 1.0, 1.0)
  input_kind: str = interfaces.RAW  # reads raw images (the evaluator checks this)


@dataclasses.dataclass(frozen=True)
class _FakeTextEncoder:
  """Token 0/1/2 for the first colour word of a text, 3 for none (padding)."""
  input_kind: str = interfaces.RAW

  def preprocess(self, texts):
    ids = [next((WORDS.index(w) for w in t.lower().replace(".", " ").split() if w in WORDS), 3)
           for t in texts]
    return {"input_ids": np.asarray(ids)[:, None], "attention_mask": np.ones((len(ids), 1))}


@dataclasses.dataclass(frozen=True)
class ColourModel:
  """Image embedding: its mean RGB (0-1); text embedding: one-hot of its colour word."""
  image_encoder: _FakeImageEncoder = _FakeImageEncoder()
  text_encoder: _FakeTextEncoder = _FakeTextEncoder()

  def embed_images(self, params, frozen, inputs):
    return ops.l2_normalize(jnp.mean(inputs["pixel_values"], axis=(1, 2)) * params["gain"])

  def embed_texts(self, params, frozen, inputs):
    return jax.nn.one_hot(inputs["input_ids"][:, 0], 3) * params["gain"]


def _png(rgb, size=10) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (size, size), rgb).save(buf, "PNG")
  return buf.getvalue()


# (true colour, label in the manifest): the blue image is labelled "red" (wrong at top-1; at
# top-2 right, as the "red" and "green" scores tie at 0 and ties count for the image).
ROWS = [("red", "red")] * 4 + [("green", "green")] * 3 + [("blue", "red")]


def _colour_manifest(root) -> str:
  rows = []
  for i, (colour, label) in enumerate(ROWS):
    (root / f"{i}.png").write_bytes(_png(COLOURS[colour]))
    rows.append({"image": f"{i}.png", "label": label})
  (root / "bad.png").write_bytes(b"not an image")
  rows += [{"image": "bad.png", "label": "green"}, {"image": "gone.png", "label": "blue"}]
  return hd.write_manifest(str(root / "colours.jsonl"), rows)


def _evaluator(model, mesh, data, **keys):
  config = config_lib.default_config()
  eval_config = dict(type="zero_shot", data=data, batch_size=4, **keys)
  return ZeroShotEvaluator("colours", eval_config, config, model, mesh)


@pytest.fixture(scope="module")
def mesh8(devices):
  return sharding.make_mesh(("data",), (8,))


def test_exact_accuracy_with_skips_on_eight_devices(tmp_path, mesh8):
  manifest = _colour_manifest(tmp_path)
  evaluator = _evaluator(ColourModel(), mesh8, dict(source="manifest", path=manifest),
                         templates="simple", ks=(1, 2))
  assert evaluator.class_names == ["blue", "green", "red"]  # sorted label names
  result = evaluator.run({"gain": jnp.float32(1.0)}, {})
  # per class: red 4 of 5 (the blue image is labelled red), green 3 of 3, blue has no image
  assert result == {"eval/colours_top1": 7 / 8, "eval/colours_top2": 1.0,
                    "eval/colours_mean_per_class_recall": (4 / 5 + 1.0) / 2}
  assert evaluator.skipped == {"data/skipped_corrupt_image": 1, "data/skipped_missing_file": 1}
  # 10 records, batch 4 rounded up to the 8 devices: two batches, the second padded.
  assert evaluator.embedder.batch_size == 8


def test_parquet_set_gives_the_manifest_answer(tmp_path, mesh8):
  """The colour set as a Hugging Face Parquet file (image bytes, ClassLabel indices and names in
  the metadata, the two bad images as bad bytes / a missing path): the same numbers and skips."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  manifest = _colour_manifest(tmp_path)
  want = _evaluator(ColourModel(), mesh8, dict(source="manifest", path=manifest),
                    templates="simple", ks=(1, 2))
  names = ["blue", "green", "red"]
  rows = [{"image": {"bytes": (tmp_path / f"{i}.png").read_bytes(), "path": None},
           "label": names.index(label)} for i, (_, label) in enumerate(ROWS)]
  rows += [{"image": {"bytes": b"not an image", "path": None}, "label": 1},
           {"image": {"bytes": None, "path": "gone.png"}, "label": 0}]
  features = {"label": {"_type": "ClassLabel", "names": names}}
  schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("label", pa.int64())],
                     metadata={b"huggingface": json.dumps({"info": {"features": features}})})
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "colours.parquet",
                 row_group_size=3)
  got = _evaluator(ColourModel(), mesh8,
                   dict(source="parquet", path=str(tmp_path / "colours.parquet")),
                   templates="simple", ks=(1, 2))
  assert got.class_names == want.class_names == names
  params = {"gain": jnp.float32(1.0)}
  assert got.run(params, {}) == want.run(params, {}) == {
      "eval/colours_top1": 7 / 8, "eval/colours_top2": 1.0,
      "eval/colours_mean_per_class_recall": (4 / 5 + 1.0) / 2}
  assert got.skipped == want.skipped == {"data/skipped_corrupt_image": 1,
                                         "data/skipped_missing_file": 1}


def test_descriptions_replace_templates(tmp_path, mesh8):
  manifest = _colour_manifest(tmp_path)
  swapped = tmp_path / "descriptions.json"
  swapped.write_text(json.dumps({"red": ["a green thing"], "green": ["a red thing"],
                                 "blue": ["something blue", "blue again"]}))
  evaluator = _evaluator(ColourModel(), mesh8, dict(source="manifest", path=manifest),
                         descriptions=str(swapped), ks=(1,))
  # Red images now match "green" and green images "red"; the blue image (labelled red) "blue".
  assert evaluator.run({"gain": jnp.float32(1.0)}, {}) == {
      "eval/colours_top1": 0.0, "eval/colours_mean_per_class_recall": 0.0}


def test_integer_labels_need_class_names(tmp_path, mesh8):
  for i in range(3):
    (tmp_path / f"{i}.png").write_bytes(_png(COLOURS[WORDS[i]]))
  manifest = hd.write_manifest(str(tmp_path / "ids.jsonl"),
                               [{"image": f"{i}.png", "label": i} for i in (0, 1, 2)])
  with pytest.raises(ValueError, match="integer labels; pass class_names"):
    _evaluator(ColourModel(), mesh8, dict(source="manifest", path=manifest))
  names = tmp_path / "names.txt"
  names.write_text("red\ngreen\nblue\n")
  evaluator = _evaluator(ColourModel(), mesh8, dict(source="manifest", path=manifest),
                         class_names=str(names), templates=["{} colour"], ks=(1,))
  assert evaluator.run({"gain": jnp.float32(1.0)}, {}) == {
      "eval/colours_top1": 1.0, "eval/colours_mean_per_class_recall": 1.0}


def test_readable_class_names():
  assert datasets.readable_class_name("american_pit_bull_terrier") == "american pit bull terrier"
  assert datasets.readable_class_name("/b/bakery/shop") == "bakery shop"
  assert datasets.readable_class_name("001.Black_footed_Albatross") == "Black footed Albatross"
  assert datasets.readable_class_name("AnnualCrop") == "annual crop"
  assert datasets.readable_class_name("AM General Hummer SUV 2000") == "AM General Hummer SUV 2000"


def _write_tfds_classes(data_dir, name, names, images, labels):
  import tensorflow_datasets as tfds

  class TinyClasses(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="png"),
          "label": tfds.features.ClassLabel(names=names)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"image": image, "label": label}

  TinyClasses.name = name
  TinyClasses(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_classes_and_missing_dataset_errors(tmp_path, mesh8):
  data_dir = str(tmp_path / "tfds")
  images = [_png(COLOURS[c]) for c, _ in ROWS]
  labels = [WORDS.index(label) for _, label in ROWS]
  raw = ["red_thing", "Green_Thing", "/b/blue"]
  _write_tfds_classes(data_dir, "tiny_classes", raw, images, labels)
  evaluator = _evaluator(ColourModel(), mesh8,
                         dict(source="tfds", name="tiny_classes", data_dir=data_dir),
                         templates="simple", ks=(1, 2))
  assert evaluator.class_names == ["red thing", "Green Thing", "blue"]
  assert evaluator.run({"gain": jnp.float32(1.0)}, {}) == {
      "eval/colours_top1": 7 / 8, "eval/colours_top2": 1.0,
      "eval/colours_mean_per_class_recall": (4 / 5 + 1.0) / 2}
  _write_tfds_classes(data_dir, "tiny_synsets", ["n01440764", "n01443537", "n01484850"],
                      images, labels)
  with pytest.raises(ValueError, match="WordNet ids.*pass class_names"):
    _evaluator(ColourModel(), mesh8, dict(source="tfds", name="tiny_synsets", data_dir=data_dir))
  evaluator = _evaluator(ColourModel(), mesh8,
                         dict(source="tfds", name="tiny_synsets", data_dir=data_dir),
                         class_names=["red", "green", "blue"])
  assert evaluator.class_names == ["red", "green", "blue"]
  with pytest.raises(ValueError, match="class_names has 2 names but .* has 3 classes"):
    _evaluator(ColourModel(), mesh8, dict(source="tfds", name="tiny_synsets", data_dir=data_dir),
               class_names=["red", "green"])
  empty = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError) as error:
    _evaluator(ColourModel(), mesh8, dict(source="tfds", name="caltech101", data_dir=empty))
  message = str(error.value)
  assert "'caltech101'" in message and empty in message and "tfds build caltech101" in message
  assert "tfds caltech101[test]" in message  # the suite's evaluation split
  with pytest.raises(FileNotFoundError, match=r"manifest .*nowhere\.jsonl.* not found.*label"):
    _evaluator(ColourModel(), mesh8, dict(source="manifest", path=str(tmp_path / "nowhere.jsonl")))
  with pytest.raises(ValueError, match="use 'tfds'.*'manifest'.*or 'parquet'"):
    _evaluator(ColourModel(), mesh8, dict(source="webdataset"))


# ---- tiny Hugging Face encoders: training eval, standalone eval and a reference agree ------------

SHAPE_CLASSES = ["red", "green", "blue", "yellow", "purple"]


@pytest.fixture(scope="module")
def online(tmp_path_factory):
  root = tmp_path_factory.mktemp("zero_shot_online")
  config = tiny_online_config(root / "models")
  rng = np.random.default_rng(0)
  rows = []
  for i in range(21):
    colour = SHAPE_CLASSES[i % len(SHAPE_CLASSES)]
    shape = synthetic_images.SHAPES[i % 4]
    pixels = synthetic_images.render(colour, shape, "top left", "large", rng, image_size=24)
    Image.fromarray(pixels).save(root / f"{i}.png")
    rows.append({"image": f"{i}.png", "label": colour})
  manifest = hd.write_manifest(str(root / "shapes.jsonl"), rows)
  config.evals.shapes = dict(type="zero_shot", data=dict(source="manifest", path=manifest),
                             class_names=SHAPE_CLASSES, templates=["a {} square", "{} circle"],
                             batch_size=8, ks=(1, 3))
  return config, root


def _reference(config, model, params, frozen):
  """Top-k by hand: eval transform + towers on one device, whole set at once + metrics."""
  transform = factory.make_image_transform(model, config.data, train=False)
  with open(config.evals.shapes.data.path) as f:
    rows = [json.loads(line) for line in f]
  root = os.path.dirname(config.evals.shapes.data.path)
  pixels = np.stack([transform(Image.open(os.path.join(root, r["image"])).convert("RGB"))
                     for r in rows])
  image_emb = np.asarray(jax.jit(model.embed_images)(params, frozen, {"pixel_values": pixels}))
  labels = np.asarray([SHAPE_CLASSES.index(r["label"]) for r in rows])
  embed_texts = jax.jit(model.embed_texts)

  def encode(texts):
    return np.asarray(embed_texts(params, frozen, model.text_encoder.preprocess(texts)))

  class_emb = prompts.class_embeddings(SHAPE_CLASSES, encode, ["a {} square", "{} circle"])
  return metrics.zero_shot_accuracy(image_emb, labels, class_emb, k=(1, 3), mean_per_class=True)


def test_training_eval_standalone_eval_and_reference_agree(online, tmp_path):
  """A 2-step run on tiny encoders: the in-training zero-shot eval (8 devices), the standalone
  evaluation of its checkpoint and a single-device reference from the restored params agree."""
  config, _ = online
  config = config.copy_and_resolve_references()
  config.total_steps, config.eval_every, config.checkpoint_every = 2, 2, 2
  config.optim.learning_rate = 0.05  # move the projectors away from their init in 2 steps
  workdir = str(tmp_path / "run")
  last = train.train_and_evaluate(config, workdir)
  in_training = {k: last[k] for k in ("eval/shapes_top1", "eval/shapes_top3",
                                      "eval/shapes_mean_per_class_recall")}
  report = standalone.evaluate_checkpoint(config, workdir)
  assert report["step"] == 2
  assert report["results"] == in_training
  with open(os.path.join(workdir, "eval_results.json")) as f:
    assert json.load(f)["results"] == in_training
  params, _, _ = run_dir.restore_params(workdir)
  model = model_lib.build_model(config)
  expected = _reference(config, model, params, model.frozen_params())
  assert in_training == {f"eval/shapes_{k}": v for k, v in expected.items()}
  assert 0 < expected["top1"] < expected["top3"] < 1, expected  # a non-trivial answer
