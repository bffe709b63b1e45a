"""The evaluation suite command: a tiny trained run on tiny TFDS builds and manifests.

The TFDS sets are written through the real TFDS builders' own code (their features and class
names, e.g. ImageNet's 1,000 WordNet ids, Pets' 37 breeds), with a handful of rendered images, so
the suite reads them exactly as it reads prepared datasets. Labels are chosen from an independent
reference (``AlignedModel``: its own preprocessing, one device) so that the accuracy is known
exactly: an image labelled with its reference top-1 class is a hit, one labelled with its lowest
scoring class a miss. The end-to-end tests train a run first (~1 min on a shared 2-core CPU,
mostly XLA compiles), so they are in the slow suite.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import align_jax
import helpers_cli
import helpers_data as hd
from helpers_tfds import write_tfds
from align_jax.cli import eval_suite as eval_suite_cli
from align_jax.config import schema as config_lib
from align_jax.train import loop as train
from align_jax.data import synthetic_images
from align_jax.testing import tiny_checkpoints as tiny
from align_jax.evaluate import datasets, suite
from align_jax.evaluate.templates import DATASET_TEMPLATES, TEMPLATES
from train_utils import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- data files, no model


def test_imagenet_class_names_ship_with_the_package():
  names = datasets.load_class_names(suite.IMAGENET_CLASSES_FILE)  # also: unique, non-empty
  assert len(names) == 1000
  assert names[:3] == ["tench", "goldfish", "great white shark"]
  assert (names[207], names[281], names[409], names[999]) == (
      "Golden Retriever", "tabby cat", "analog clock", "toilet paper")
  # CLIP's two repeated names, told apart: 657/744 missile, 836/837 sunglasses.
  assert (names[657], names[744], names[836], names[837]) == (
      "missile", "projectile", "sunglass", "sunglasses")
  assert len({n.lower() for n in names}) == 1000
  import tensorflow_datasets as tfds
  synsets = tfds.builder_cls("imagenet2012")().info.features["label"].names
  assert (synsets[0], synsets[744], synsets[836], synsets[999]) == (
      "n01440764", "n04008634", "n04355933", "n15075141")  # the order the names follow


def test_dataset_templates_are_clips():
  counts = {"caltech101": 34, "pets": 1, "cars": 8, "flowers": 1, "food": 1, "aircraft": 2,
            "sun397": 2, "dtd": 8, "birds": 1, "eurosat": 3, "ucf101": 48, "cifar": 18}
  assert {k: len(v) for k, v in DATASET_TEMPLATES.items()} == counts
  assert TEMPLATES["pets"] == ("a photo of a {}, a type of pet.",)
  assert TEMPLATES["food"] == ("a photo of {}, a type of food.",)
  assert TEMPLATES["eurosat"][0] == "a centered satellite photo of {}."
  assert TEMPLATES["ucf101"][-1] == "a demonstration of the person practicing {}."
  for templates in DATASET_TEMPLATES.values():
    assert all(t.count("{}") == 1 for t in templates) and len(set(templates)) == len(templates)
  for benchmark in suite.BENCHMARKS:
    assert benchmark.templates in TEMPLATES
    assert benchmark.tfds == "" or benchmark.task == "retrieval" or benchmark.tfds in (
        datasets.SUITE)


def test_locate_prefers_manifests_and_names_what_it_looked_for(tmp_path):
  data_dir, manifests, prompts = tmp_path / "tfds", tmp_path / "manifests", tmp_path / "prompts"
  for folder in (data_dir / "oxford_iiit_pet" / "4.0.0", data_dir / "eurosat" / "rgb", manifests,
                 prompts):
    folder.mkdir(parents=True)
  (manifests / "aircraft.jsonl").write_text("{}\n")
  (manifests / "pets.csv").write_text("image,label\n")
  (prompts / "dtd.json").write_text("{}")
  (manifests / "dtd_classes.txt").write_text("a\n")
  by = suite.BY_KEY
  data, why = suite.locate(by["pets"], str(data_dir), str(manifests))
  assert data["source"] == "manifest" and data["path"].endswith("pets.csv") and not why
  data, _ = suite.locate(by["eurosat"], str(data_dir), str(manifests))
  assert data == dict(source="tfds", name="eurosat", data_dir=str(data_dir), split="",
                      image_key="image", label_key="label")
  data, why = suite.locate(by["dtd"], str(data_dir), str(manifests))
  assert data is None and why == (f"not found (dtd.jsonl / .csv / .parquet in {manifests}; TFDS "
                                  f"dtd in {data_dir})")
  (manifests / "flickr30k.parquet").write_bytes(b"")
  data, _ = suite.locate(by["flickr30k"], str(data_dir), str(manifests))
  assert data == dict(source="parquet", path=str(manifests / "flickr30k.parquet"), image_root="",
                      image_key="image", caption_key="caption")
  _, why = suite.locate(by["ucf101"], str(data_dir), "")
  assert why == "not found (no TFDS builder; give --manifests=DIR with ucf101.jsonl)"
  data, _ = suite.locate(by["coco"], str(data_dir), "")
  assert data is None
  (data_dir / "coco_captions").mkdir()
  data, _ = suite.locate(by["coco"], str(data_dir), "")
  assert data == dict(source="tfds", name="coco_captions", data_dir=str(data_dir), split="test",
                      image_key="image", caption_key="captions/text")
  keys = suite.prompt_keys(by["dtd"], prompts=str(prompts), manifests=str(manifests))
  assert keys == {"templates": "dtd", "descriptions": str(prompts / "dtd.json"),
                  "class_names": str(manifests / "dtd_classes.txt")}
  assert suite.prompt_keys(by["imagenet"], templates="simple") == {
      "templates": "simple", "class_names": suite.IMAGENET_CLASSES_FILE}


def _clip_benchmark_build(paths):
  """What `clip_benchmark build FILES` does with result files (its cli.main_build): one CSV row
  per file, the metrics beside the other fields, and model_fullname = model + ' ' + pretrained."""
  rows = []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    row = {**data["metrics"], **{k: v for k, v in data.items() if k != "metrics"}}
    row["model_fullname"] = row["model"] + " " + row["pretrained"]
    rows.append(row)
  return rows


def test_clip_benchmark_results_in_its_format(tmp_path):
  by = suite.BY_KEY
  names = [b.clip_benchmark for b in suite.BENCHMARKS]
  assert len(set(names)) == len(names) and all(names)
  assert (by["imagenet"].clip_benchmark, by["coco"].clip_benchmark) == ("imagenet1k",
                                                                        "mscoco_captions")
  pets = suite.clip_benchmark_result(
      by["pets"], {"top1": 0.5, "top5": 0.75, "mean_per_class_recall": 0.25}, model="m",
      pretrained="p", num_classes=37)
  assert pets == {"dataset": "pets", "model": "m", "pretrained": "p",
                  "task": "zeroshot_classification", "language": "en",
                  "metrics": {"acc1": 0.5, "acc5": 0.75, "mean_per_class_recall": 0.25}}
  tiny = suite.clip_benchmark_result(by["pets"], {"top1": 1.0, "top5": 1.0,
                                                  "mean_per_class_recall": 1.0},
                                     model="m", pretrained="p", num_classes=4)
  assert np.isnan(tiny["metrics"]["acc5"])  # clip_benchmark: no acc5 below 5 classes
  recall = {"i2t@1": 0.1, "t2i@1": 0.2, "i2t@5": 0.3, "t2i@5": 0.4, "i2t@10": 0.5, "t2i@10": 0.6}
  flickr = suite.clip_benchmark_result(by["flickr30k"], recall, model="m", pretrained="p")
  # image retrieval = text -> image; text retrieval = image -> text
  assert flickr["task"] == "zeroshot_retrieval" and flickr["metrics"] == {
      "image_retrieval_recall@1": 0.2, "text_retrieval_recall@1": 0.1,
      "image_retrieval_recall@5": 0.4, "text_retrieval_recall@5": 0.3,
      "image_retrieval_recall@10": 0.6, "text_retrieval_recall@10": 0.5}
  assert suite.clip_benchmark_path("run", by["caltech101"]) == (
      "run/clip_benchmark/vtab_caltech101.json")
  config = config_lib.default_config()
  config.model.image_encoder, config.model.text_encoder = ("facebook/dinov2-large",
                                                           "/models/all-roberta-large-v1")
  assert suite.default_model_names(config, str(tmp_path / "runs" / "glu"), 600) == (
      "align_jax:dinov2-large+all-roberta-large-v1", "glu@600")
  # beside another model's file, as clip_benchmark eval writes it: the same columns
  other = {"dataset": "pets", "model": "ViT-B-32-quickgelu", "pretrained": "laion400m_e32",
           "task": "zeroshot_classification", "language": "en",
           "metrics": {"acc1": 0.87, "acc5": 0.99, "mean_per_class_recall": 0.86}}
  paths = [str(tmp_path / "other.json"), suite.clip_benchmark_path(str(tmp_path), by["pets"])]
  for path, result in zip(paths, (other, pets)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f)
  theirs, ours = _clip_benchmark_build(paths)
  assert set(ours) == set(theirs) and ours["model_fullname"] == "m p" and ours["acc1"] == 0.5


def test_help_runs_as_a_module():
  out = subprocess.run([sys.executable, "-m", "align_jax.cli.eval_suite", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=True).stdout
  words = " ".join(out.split())  # absl wraps lines
  assert out.startswith("usage: python -m align_jax.cli.eval_suite [flags]")
  assert "--workdir: The training run's folder." in words
  assert "flickr30k (Flickr30k (1k test))" in words


# ----------------------------------------------------------------------- tiny trained run + data


def _png(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  return buf.getvalue()


def _scenes(count: int, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  colours, shapes = list(synthetic_images.COLORS), synthetic_images.SHAPES
  return [synthetic_images.render(colours[i % len(colours)], shapes[(i // 2) % 4],
                                  synthetic_images.POSITIONS[i % 4], synthetic_images.SIZES[i % 2],
                                  rng, image_size=24) for i in range(count)]


def _known_labels(scores: np.ndarray) -> tuple[list[int], float]:
  """Even images: their top class (a hit); odd: their lowest (a miss). Returns labels, top-1."""
  order = np.argsort(-scores, axis=1)
  rows = np.arange(len(scores))
  gap = scores[rows, order[:, 0]] - scores[rows, order[:, 1]]
  spread = scores[rows, order[:, 0]] - scores[rows, order[:, -1]]
  # Preconditions of a known answer: no near-tie at the top, and the lowest class far below it.
  assert gap.min() > 1e-4 and spread.min() > 1e-3, (gap, spread)
  labels = [int(order[i, 0] if i % 2 == 0 else order[i, -1]) for i in range(len(scores))]
  return labels, len(range(0, len(scores), 2)) / len(scores)


def _recall(image, text, text_to_image, ks):
  """Numpy recall@k: a query hits when fewer than k keys score strictly above its best match."""
  s = np.asarray(image, np.float64) @ np.asarray(text, np.float64).T
  out = {}
  for k in ks:
    i2t = [(s[i] > s[i, text_to_image == i].max()).sum() < k for i in range(len(image))]
    t2i = [(s[:, t] > s[text_to_image[t], t]).sum() < k for t in range(len(text))]
    out[f"i2t@{k}"], out[f"t2i@{k}"] = float(np.mean(i2t)), float(np.mean(t2i))
  return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A 2-step online run on tiny encoders, and datasets whose answers the reference knows."""
  root = tmp_path_factory.mktemp("suite")
  image_encoder = tiny.make_tiny_dinov2(f"{root}/dinov2", image_size=16, patch_size=4,
                                        save_format="flax")
  # Every letter, digit and the punctuation of the class names: no name tokenizes to [UNK]s.
  corpus = [" ".join(synthetic_images.vocabulary())] * 4 + [
      "abcdefghijklmnopqrstuvwxyz 0123456789 ' ( ) / - . , !"]
  text_encoder = tiny.make_tiny_bert(f"{root}/bert", save_format="flax", corpus=corpus)
  config = tiny_config(**{
      "data.source": "synthetic_shapes", "data.num_pairs": 40, "batch_size": 16,
      "model.image_encoder": image_encoder, "model.text_encoder": text_encoder,
      "model.image_pooling": "cls", "model.text_pooling": "mean",
      "model.max_text_length": 48, "model.image_projector": "mlp",
      "model.text_projector": "mlp", "model.dropout": 0.0,
      "total_steps": 2, "eval_every": 2, "checkpoint_every": 2, "optim.learning_rate": 0.05})
  config.evals = {}
  workdir = str(root / "run")
  train.train_and_evaluate(config, workdir)
  model = align_jax.AlignedModel.load(workdir)

  import tensorflow_datasets as tfds
  data_dir, manifests, prompts = (str(root / name) for name in ("tfds", "manifests", "prompts"))
  os.makedirs(manifests)
  os.makedirs(prompts)
  expected, names = {}, {}

  def classification(key, builder, split, count, seed, class_names, templates):
    pixels = _scenes(count, seed)
    scores = model.embed_images(pixels) @ model.class_embeddings(class_names, templates).T
    labels, top1 = _known_labels(scores)
    write_tfds(data_dir, builder, {split: ([_png(p) for p in pixels], labels)})
    expected[key], names[key] = top1, class_names
    return scores, labels

  pet_names = [datasets.readable_class_name(n) for n in
               tfds.builder_cls("oxford_iiit_pet")().info.features["label"].names]
  pets = classification("pets", "oxford_iiit_pet", "test", 12, 1, pet_names, "simple")
  classification("imagenet", "imagenet2012", "validation", 8, 2,
                 datasets.load_class_names(suite.IMAGENET_CLASSES_FILE), "simple")
  # CUB's TFDS labels are bare numbers: an error, unless a class-name file is given.
  bird_names = [f"bird species {i}" for i in range(200)]
  classification("cub", "caltech_birds2011", "test", 6, 3, bird_names, "birds")

  # Flickr30k: a caption manifest, 6 images with 2 captions each.
  rows, images, captions = [], _scenes(6, 4), []
  reader = synthetic_images.ShapesReader(split="heldout", seed=0)
  for i, pixels in enumerate(images):
    Image.fromarray(pixels).save(os.path.join(manifests, f"f{i}.png"))
    record_captions = list(reader.read(i).captions)[:2]
    rows.append({"image": f"f{i}.png", "caption": record_captions})
    captions += record_captions
  hd.write_manifest(os.path.join(manifests, "flickr30k.jsonl"), rows)
  expected["flickr30k"] = _recall(model.embed_images(images), model.embed_texts(captions),
                                  np.repeat(np.arange(6), 2), (1, 5, 10))
  return dict(workdir=workdir, model=model, data_dir=data_dir, manifests=manifests,
              prompts=prompts, expected=expected, names=names, pets=pets)


@pytest.mark.slow
def test_suite_prints_the_table_with_known_answers(world, capsys):
  """All 15 benchmarks considered: 11 absent (a line each), CUB an error, 3 evaluated exactly."""
  args = [f"--workdir={world['workdir']}", f"--data_dir={world['data_dir']}",
          f"--manifests={world['manifests']}", "--templates=simple"]
  status = helpers_cli.run_command(eval_suite_cli, args)
  out = capsys.readouterr().out
  assert status == 1  # the CUB error
  expected, data_dir, manifests = world["expected"], world["data_dir"], world["manifests"]
  skipped = [line for line in out.splitlines() if line.startswith("skipped ")]
  assert len(skipped) == 11, out
  assert (f"skipped Caltech-101 (caltech101): not found (caltech101.jsonl / .csv / .parquet in "
          f"{manifests}; TFDS caltech101 in {data_dir})") in skipped
  assert (f"skipped FGVC-Aircraft (aircraft): not found (aircraft.jsonl / .csv / .parquet in "
          f"{manifests})") in skipped
  assert f"skipped EuroSAT (eurosat): not found (eurosat.jsonl / .csv / .parquet in " \
         f"{manifests}; TFDS eurosat/rgb in {data_dir})" in skipped
  assert "error in CUB-200 (cub): tfds caltech_birds2011[test] labels are bare numbers (0, 1, " \
         "...), not class names" in out
  assert "For the suite: a cub_classes.txt in --prompts or --manifests." in out

  with open(os.path.join(world["workdir"], suite.RESULTS_JSON)) as f:
    report = json.load(f)
  results = report["results"]
  assert set(results) == {"imagenet", "pets", "flickr30k"} and report["step"] == 2
  assert results["pets"]["top1"] == expected["pets"] == 0.5
  assert results["imagenet"]["top1"] == expected["imagenet"] == 0.5
  assert results["flickr30k"] == expected["flickr30k"]
  assert set(report["skipped"]) | set(report["errors"]) | set(results) == set(suite.BY_KEY)
  # clip_benchmark's files, one per benchmark, as its `build` command reads them
  _, labels = world["pets"]
  hits = np.arange(len(labels)) % 2 == 0  # even images: labelled with their top class
  per_class = [hits[np.asarray(labels) == c].mean() for c in sorted(set(labels))]
  assert results["pets"]["mean_per_class_recall"] == pytest.approx(np.mean(per_class), abs=1e-12)
  clip = report["clip_benchmark"]
  assert sorted(clip) == ["flickr30k", "imagenet", "pets"]
  assert clip["imagenet"] == os.path.join(world["workdir"], "clip_benchmark", "imagenet1k.json")
  rows = {row["dataset"]: row for row in _clip_benchmark_build(sorted(clip.values()))}
  assert rows["imagenet1k"]["acc1"] == expected["imagenet"] and rows["pets"]["acc5"] == (
      results["pets"]["top5"])
  assert rows["pets"]["mean_per_class_recall"] == results["pets"]["mean_per_class_recall"]
  assert rows["pets"]["task"] == "zeroshot_classification" and rows["pets"]["language"] == "en"
  assert rows["flickr30k"]["task"] == "zeroshot_retrieval"
  for k in (1, 5, 10):
    assert rows["flickr30k"][f"image_retrieval_recall@{k}"] == expected["flickr30k"][f"t2i@{k}"]
    assert rows["flickr30k"][f"text_retrieval_recall@{k}"] == expected["flickr30k"][f"i2t@{k}"]
  assert {row["model_fullname"] for row in rows.values()} == {"align_jax:dinov2+bert run@2"}
  assert f"clip_benchmark results (3): {world['workdir']}/clip_benchmark/*.json" in out

  table_lines = [line for line in out.splitlines() if line.startswith("|")]
  assert table_lines[0] == "| benchmark | metric | freeze-align (paper) | this run | data |"
  assert (f"| ImageNet-1k | top-1 | 76.3 | 50.00 | tfds imagenet2012[validation]: 8 images, "
          "1,000 classes |") in table_lines
  assert ("| Oxford Pets | top-1 | n/a | 50.00 | tfds oxford_iiit_pet[test]: 12 images, 37 "
          "classes |") in table_lines
  flickr = expected["flickr30k"]
  source = f"manifest {manifests}/flickr30k.jsonl: 6 images, 12 captions"
  assert (f"| Flickr30k (1k test) | I→T R@1 | 87.5 | {100 * flickr['i2t@1']:.2f} | {source} |"
          in table_lines)
  assert (f"| Flickr30k (1k test) | T→I R@10 | n/a | {100 * flickr['t2i@10']:.2f} | {source} |"
          in table_lines)
  assert len(table_lines) == 2 + 2 + 2 + 6  # header, imagenet and pets top-1/5, 6 recalls
  with open(os.path.join(world["workdir"], suite.RESULTS_MD)) as f:
    assert "\n".join(table_lines) in f.read()


@pytest.mark.slow
def test_descriptions_and_class_name_files(world, capsys):
  """``--prompts``: Pets described by shifted sentences; CUB named by a file (and CLIP's bird
  templates, the benchmark's default)."""
  pet_names = world["names"]["pets"]
  scores, labels = world["pets"]
  # Class c is described by the prompt of class c+1: its embedding is the reference's column c+1.
  shift = {name: [f"a photo of a {pet_names[(c + 1) % len(pet_names)]}."]
           for c, name in enumerate(pet_names)}
  with open(os.path.join(world["prompts"], "pets.json"), "w") as f:
    json.dump(shift, f)
  with open(os.path.join(world["prompts"], "cub_classes.txt"), "w") as f:
    f.write("\n".join(world["names"]["cub"]) + "\n")
  report = suite.run_suite(world["workdir"], data_dir=world["data_dir"],
                           manifests=world["manifests"], prompts=world["prompts"],
                           only=["pets", "cub"], batch_size=8)
  assert "skipped" not in capsys.readouterr().out and not report["errors"]
  shifted = np.roll(scores, -1, axis=1)  # column c = the reference's score of class c+1
  assert report["results"]["pets"]["top1"] == float(np.mean(shifted.argmax(1) == labels))
  assert report["results"]["cub"]["top1"] == world["expected"]["cub"] == 0.5
  assert [r["data"] for r in report["rows"] if r["key"] == "cub"][0].endswith("200 classes")


def test_bad_flags_and_missing_data_are_one_line_errors(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_lib.default_config().to_json())
  for argv, message in [
      ([f"--workdir={tmp_path}"], f"{tmp_path}/config.json not found"),
      ([f"--workdir={workdir}", f"--data_dir={tmp_path}", "--only=aircraft"],
       "none of the benchmarks ['aircraft'] found"),
      ([f"--workdir={workdir}", "--only=imagenet,mnist"], "unknown benchmarks ['mnist']"),
      ([f"--workdir={workdir}", "--templates=fancy"], "--templates='fancy' is not a template set"),
      ([f"--workdir={workdir}", f"--manifests={tmp_path}/none"], "no such folder"),
      ([f"--workdir={workdir}", f"--data_dir={tmp_path}", "--only=pets,coco"],
       "none of the benchmarks ['pets', 'coco'] found")]:
    status = helpers_cli.run_command(eval_suite_cli, argv)
    assert str(status).startswith("error: ") and message in str(status), status
    assert "\n" not in str(status)
  capsys.readouterr()
