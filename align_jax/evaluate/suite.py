"""The paper's evaluation as one command: freeze-align's zero-shot table and its retrieval sets.

    python -m align_jax.cli.eval_suite --workdir=RUN [--data_dir=TFDS_DIR] [--manifests=DIR]
        [--prompts=DIR] [--step=N] [--only=imagenet,pets] [--templates=simple] [--batch_size=1024]

restores the run's trainable params (its latest checkpoint, or ``--step``) with the config it
wrote (``RUN/config.json``), rebuilds the frozen encoders, and evaluates every benchmark of
:data:`BENCHMARKS` whose data it finds: zero-shot top-1 / top-5 on the 13 classification sets of
freeze-align's table (ImageNet-1k, ImageNet-V2, Caltech-101, Pets, Cars, Flowers, Food-101,
Aircraft, SUN397, DTD, CUB, EuroSAT, UCF101) and image<->text recall@1/5/10 on Flickr30k (1k
test) and COCO (5k Karpathy test). It prints one table with the numbers freeze-align reported
beside the run's, one line per benchmark it did not find, and writes the table to
``RUN/suite_results.md`` and ``RUN/suite_results.json``.

It also writes one JSON per benchmark in clip_benchmark's result format,
``RUN/clip_benchmark/<dataset>.json`` (:func:`clip_benchmark_result`), so that ``clip_benchmark
build RUN/clip_benchmark/*.json other_models/*.json`` puts the run in one CSV beside other models:
``{"dataset", "model", "pretrained", "task", "metrics", "language"}`` with clip_benchmark's dataset
names (``imagenet1k``, ``vtab/caltech101``, ``flickr30k``, ``mscoco_captions``, ...), tasks
(``zeroshot_classification`` / ``zeroshot_retrieval``) and metric names (``acc1``, ``acc5``,
``mean_per_class_recall``; ``image_retrieval_recall@k`` = text->image, ``text_retrieval_recall@k``
= image->text). ``model`` is ``align_jax:<image encoder>+<text encoder>`` and ``pretrained``
``<run folder>@<step>``, unless ``--model_name`` / ``--pretrained_name`` say otherwise.

Where a benchmark's data is looked for, first match wins:

* ``--manifests=DIR``: ``DIR/<key>.jsonl``, ``DIR/<key>.csv`` or ``DIR/<key>.parquet`` (``key`` as
  in :data:`BENCHMARKS`: ``imagenet``, ``pets``, ``aircraft``, ``ucf101``, ``flickr30k``, ...).
  Classification rows are ``{"image": path, "label": class name or index}``, retrieval rows
  ``{"image": path, "caption": [captions]}``, paths relative to the manifest (the formats of
  :mod:`align_jax.evaluate.datasets` and :mod:`align_jax.data.tfds_manifest_readers`); a Parquet file (as the
  Hugging Face Hub publishes these sets) has the same columns, its images as bytes or paths
  (:mod:`align_jax.data.parquet`). FGVC-Aircraft, UCF101 (mid-video frames) and Flickr30k have no
  TFDS image builder: they come only from here.
* ``--data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``): the TFDS builder of
  the benchmark (``imagenet2012``, ``oxford_iiit_pet``, ``eurosat/rgb``, ``coco_captions``, ...)
  prepared there as ``array_record`` (``tfds build NAME --data_dir=DIR
  --file_format=array_record``), read on its evaluation split (:data:`datasets.SUITE`).

A benchmark found nowhere is skipped with one line. One that is found but cannot be read (e.g. a
TFRecord build, or ``caltech_birds2011``, whose TFDS labels are bare numbers, without a class-name
file) is reported as an error line, the others still run, and the command exits with status 1.

Prompts, as in the paper: each class is the average embedding of CLIP's templates for that
dataset (:data:`align_jax.evaluate.templates.DATASET_TEMPLATES`; ``imagenet80`` for ImageNet;
``--templates`` uses one set everywhere, e.g. ``simple`` for a quick check), or, where
``--prompts=DIR`` holds ``DIR/<key>.json`` (``{class name: [sentences]}``, e.g. LLM-written
descriptions), the average of those sentences instead. ``DIR/<key>_classes.txt`` (one name per
line, in label order; also looked for in ``--manifests``) replaces a dataset's class names.
ImageNet-1k and ImageNet-V2, whose TFDS labels are WordNet ids, use the 1,000 readable names that
ship with align_jax (:data:`IMAGENET_CLASSES_FILE`): CLIP's list (OpenAI's
``Prompt_Engineering_for_ImageNet`` notebook), except that CLIP's two repeated names are told
apart, as the metric needs distinct classes: class 744 (n04008634, "projectile, missile") is
``projectile`` and class 836 (n04355933) is ``sunglass``.

The evaluation itself is the evaluators' (:mod:`align_jax.evaluate.zero_shot`,
:class:`align_jax.evaluate.evaluators.RetrievalEvaluator`): images embedded once, sharded over
every device (and process, with ``--distributed``), ties counted in the query's favour.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

from align_jax.model import interfaces
from align_jax.run import storage
from align_jax.evaluate import datasets
from align_jax.evaluate.templates import TEMPLATES

logger = logging.getLogger("align_jax")

IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     "imagenet_classes.txt")
RESULTS_JSON = "suite_results.json"
RESULTS_MD = "suite_results.md"
CLIP_BENCHMARK_DIR = "clip_benchmark"  # RUN/clip_benchmark/<dataset>.json, one per benchmark
CLIP_BENCHMARK_TASKS = {"zero_shot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}
PAPER = "freeze-align"  # Maniparambil et al., CVPR 2025 (arXiv 2409.19425)

ZERO_SHOT, RETRIEVAL = "zero_shot", "retrieval"
# Metric keys of the evaluators, in table order, with the table's names for them.
METRICS = {ZERO_SHOT: (("top1", "top-1"), ("top5", "top-5")),
           RETRIEVAL: (("i2t@1", "I→T R@1"), ("t2i@1", "T→I R@1"), ("i2t@5", "I→T R@5"),
                       ("t2i@5", "T→I R@5"), ("i2t@10", "I→T R@10"), ("t2i@10", "T→I R@10"))}


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One row group of the table: where its data lives, its prompts and the paper's numbers.

  Attributes:
    key: short name: result keys, and the stem of its manifest / prompt files.
    title: the name in the table.
    task: ``"zero_shot"`` or ``"retrieval"``.
    tfds: zero-shot: a key of :data:`datasets.SUITE`; retrieval: a TFDS builder ("" = none).
    templates: the :data:`TEMPLATES` set its class prompts average.
    class_names: a class-name file shipped with align_jax ("" = the dataset's own names).
    paper: (metric, value in %) that freeze-align reported; absent metrics print "n/a".
    split, image_key, caption_key: retrieval through TFDS: the split and feature paths.
    clip_benchmark: the dataset's name in clip_benchmark (its ``--dataset``), which its ``build``
      command and result tables group by.
  """
  key: str
  title: str
  task: str = ZERO_SHOT
  tfds: str = ""
  templates: str = "imagenet80"
  class_names: str = ""
  paper: tuple[tuple[str, float], ...] = ()
  split: str = ""
  image_key: str = "image"
  caption_key: str = ""
  clip_benchmark: str = ""


# freeze-align's numbers as /work/shared/RECIPES.md quotes them from the paper; the paper's other
# per-dataset numbers are not quoted there, so they print as "n/a" rather than from memory.
# clip_benchmark names: its torchvision sets where their test split is TFDS's (pets, cars,
# flowers, food101, dtd, sun397, eurosat), its VTAB (TFDS) ones otherwise; it has no UCF101.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("imagenet", "ImageNet-1k", tfds="imagenet2012", class_names=IMAGENET_CLASSES_FILE,
              paper=(("top1", 76.3),), clip_benchmark="imagenet1k"),
    Benchmark("imagenet_v2", "ImageNet-V2", tfds="imagenet_v2", class_names=IMAGENET_CLASSES_FILE,
              clip_benchmark="imagenetv2"),
    Benchmark("caltech101", "Caltech-101", tfds="caltech101", templates="caltech101",
              clip_benchmark="vtab/caltech101"),
    Benchmark("pets", "Oxford Pets", tfds="oxford_iiit_pet", templates="pets",
              clip_benchmark="pets"),
    Benchmark("cars", "Stanford Cars", tfds="cars196", templates="cars", clip_benchmark="cars"),
    Benchmark("flowers", "Flowers-102", tfds="oxford_flowers102", templates="flowers",
              clip_benchmark="flowers"),
    Benchmark("food101", "Food-101", tfds="food101", templates="food", clip_benchmark="food101"),
    Benchmark("aircraft", "FGVC-Aircraft", templates="aircraft", clip_benchmark="fgvc_aircraft"),
    Benchmark("sun397", "SUN397", tfds="sun397", templates="sun397", clip_benchmark="sun397"),
    Benchmark("dtd", "DTD", tfds="dtd", templates="dtd", clip_benchmark="dtd"),
    Benchmark("cub", "CUB-200", tfds="caltech_birds2011", templates="birds",
              clip_benchmark="vtab/cub"),
    Benchmark("eurosat", "EuroSAT", tfds="eurosat", templates="eurosat", clip_benchmark="eurosat"),
    Benchmark("ucf101", "UCF101", templates="ucf101", clip_benchmark="ucf101"),
    Benchmark("flickr30k", "Flickr30k (1k test)", task=RETRIEVAL,
              paper=(("i2t@1", 87.5), ("t2i@1", 74.1)), clip_benchmark="flickr30k"),
    Benchmark("coco", "COCO (5k test)", task=RETRIEVAL, tfds="coco_captions", split="test",
              caption_key="captions/text", paper=(("i2t@1", 60.1), ("t2i@1", 45.1)),
              clip_benchmark="mscoco_captions"),
)
BY_KEY = {b.key: b for b in BENCHMARKS}


def default_data_dir() -> str:
  """TFDS's own default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _first_file(folders: Sequence[str], names: Sequence[str]) -> str:
  for folder in folders:
    for name in names:
      if folder and storage.isfile(storage.join(folder, name)):
        return storage.join(folder, name)
  return ""


def locate(benchmark: Benchmark, data_dir: str, manifests: str) -> tuple[dict | None, str]:
  """(``data`` overrides for its evaluator, "") where the benchmark's data is; (None, why not)."""
  manifest = _first_file([manifests], [benchmark.key + ext for ext in (".jsonl", ".csv",
                                                                       ".parquet")])
  if manifest:
    keys = ({"label_key": "label"} if benchmark.task == ZERO_SHOT else {"caption_key": "caption"})
    source = "parquet" if manifest.endswith(".parquet") else "manifest"
    return dict(source=source, path=manifest, image_root="", image_key="image", **keys), ""
  looked = [f"{benchmark.key}.jsonl / .csv / .parquet in {manifests}"] if manifests else []
  builder = benchmark.tfds
  if builder:
    entry = datasets.SUITE.get(builder) if benchmark.task == ZERO_SHOT else None
    folder = entry.name if entry else builder
    if storage.isdir(storage.join(data_dir, folder)):
      if benchmark.task == ZERO_SHOT:
        return dict(source="tfds", name=builder, data_dir=data_dir, split="",
                    image_key=entry.image_key, label_key=entry.label_key), ""
      return dict(source="tfds", name=builder, data_dir=data_dir, split=benchmark.split,
                  image_key=benchmark.image_key, caption_key=benchmark.caption_key), ""
    looked.append(f"TFDS {folder} in {data_dir}")
  elif not manifests:
    looked.append(f"no TFDS builder; give --manifests=DIR with {benchmark.key}.jsonl")
  return None, "not found (" + "; ".join(looked) + ")"


def prompt_keys(benchmark: Benchmark, *, prompts: str = "", manifests: str = "",
                templates: str = "") -> dict:
  """The zero-shot evaluator's ``templates`` / ``descriptions`` / ``class_names`` for a benchmark."""
  found = {"templates": templates or benchmark.templates}
  descriptions = _first_file([prompts], [benchmark.key + ".json"])
  if descriptions:
    found["descriptions"] = descriptions
  class_names = (_first_file([prompts, manifests], [benchmark.key + "_classes.txt"])
                 or benchmark.class_names)
  if class_names:
    found["class_names"] = class_names
  return found


def load_run_config(workdir: str):
  """The config a run wrote to ``WORKDIR/config.json`` (its encoders, projectors, mesh, data)."""
  path = storage.join(workdir, "config.json")
  if not storage.isfile(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's folder (every "
                            "run writes config.json next to checkpoints/).")
  from align_jax.run import reader as run_dir  # orbax and jax: only once a run is read
  return run_dir.read_config(workdir)


def _percent(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.2f}"


def table(rows: Sequence[dict]) -> str:
  """The markdown table of result rows (values in %, as the paper reports them)."""
  lines = [f"| benchmark | metric | {PAPER} (paper) | this run | data |", "|---|---|---|---|---|"]
  for row in rows:
    paper = "n/a" if row["paper"] is None else f"{row['paper']:.1f}"
    lines.append(f"| {row['benchmark']} | {row['metric']} | {paper} | {_percent(row['value'])} "
                 f"| {row['data']} |")
  return "\n".join(lines)


def _rows(benchmark: Benchmark, values: dict[str, float], data: str) -> list[dict]:
  paper = dict(benchmark.paper)
  return [{"key": benchmark.key, "benchmark": benchmark.title, "metric": label,
           "metric_key": metric, "paper": paper.get(metric), "value": values[metric],
           "data": data} for metric, label in METRICS[benchmark.task] if metric in values]


def _evaluate(benchmark: Benchmark, evaluator, run) -> tuple[dict[str, float], str]:
  """(metric -> value, data description) of one built evaluator."""
  if benchmark.task == ZERO_SHOT:
    result = evaluator.run(run.params, run.frozen)
    values = {k[len(benchmark.key) + 1:]: v for k, v in result.items()}  # "<key>_top1" -> "top1"
    images = len(evaluator.reader) - sum(evaluator.skipped.values())
    return values, (f"{evaluator.reader.name}: {images:,} images, "
                    f"{len(evaluator.class_names):,} classes")
  from align_jax.evaluate import metrics
  image, text, text_to_image = evaluator.embeddings(run.params, run.frozen)
  values = metrics.retrieval_recall(image, text, text_to_image, k=evaluator.ks, mesh=run.mesh)
  data = evaluator.data
  where = (f"{data.source} {data.path}" if data.source in ("manifest", "parquet")
           else f"tfds {data.name}[{data.split}]")
  return {k: float(v) for k, v in values.items()}, (f"{where}: {len(image):,} images, "
                                                     f"{len(text):,} captions")


def clip_benchmark_result(benchmark: Benchmark, values: dict[str, float], *, model: str,
                          pretrained: str, num_classes: int = 0, language: str = "en") -> dict:
  """One benchmark's result as clip_benchmark's ``eval`` writes it (its ``--output`` JSON).

  Args:
    benchmark: the benchmark (its clip_benchmark dataset name and task).
    values: the evaluator's metrics: ``top1``, ``top5``, ``mean_per_class_recall`` (zero-shot)
      or ``i2t@k`` / ``t2i@k`` (retrieval).
    model, pretrained: what clip_benchmark's ``build`` joins into ``model_fullname``.
    num_classes: zero-shot: below 5 classes ``acc5`` is NaN, as clip_benchmark writes it.
    language: of the class names, prompts and captions.

  Returns:
    ``{"dataset", "model", "pretrained", "task", "metrics", "language"}``. Retrieval metrics are
    named by what is retrieved: ``image_retrieval_recall@k`` is text->image (``t2i@k``),
    ``text_retrieval_recall@k`` image->text (``i2t@k``).
  """
  if benchmark.task == ZERO_SHOT:
    metrics = {"acc1": values["top1"],
               "acc5": values["top5"] if num_classes >= 5 else float("nan"),
               "mean_per_class_recall": values["mean_per_class_recall"]}
  else:
    ks = sorted(int(key.split("@")[1]) for key in values if key.startswith("t2i@"))
    metrics = {}
    for k in ks:
      metrics[f"image_retrieval_recall@{k}"] = values[f"t2i@{k}"]
      metrics[f"text_retrieval_recall@{k}"] = values[f"i2t@{k}"]
  return {"dataset": benchmark.clip_benchmark, "model": model, "pretrained": pretrained,
          "task": CLIP_BENCHMARK_TASKS[benchmark.task], "metrics": metrics, "language": language}


def clip_benchmark_path(workdir: str, benchmark: Benchmark) -> str:
  """``WORKDIR/clip_benchmark/<dataset>.json`` ('/' in the dataset name becomes '_')."""
  return storage.join(workdir, CLIP_BENCHMARK_DIR,
                      benchmark.clip_benchmark.replace("/", "_") + ".json")


def default_model_names(config, workdir: str, step: int) -> tuple[str, str]:
  """(``model``, ``pretrained``) for clip_benchmark: the encoders, and the run and step."""
  towers = "+".join(storage.basename(str(config.model[tower]))
                    for tower in ("image_encoder", "text_encoder"))
  return f"align_jax:{towers}", f"{storage.basename(storage.normalize(workdir))}@{step}"


# Exceptions that mean "this benchmark's data or prompts are unusable", reported per benchmark;
# anything else is a bug and propagates.
_DATA_ERRORS = (ValueError, OSError, ImportError, NotImplementedError)


def run_suite(workdir: str, *, data_dir: str = "", manifests: str = "", prompts: str = "",
              step: int | None = None, only: Sequence[str] = (), templates: str = "",
              batch_size: int = 1024, mesh=None, model_name: str = "",
              pretrained_name: str = "", echo: Callable[[str], None] = print) -> dict:
  """Evaluates a run on every benchmark found; prints and writes the table (see module doc).

  Args:
    workdir: the training run's folder (``config.json`` + ``checkpoints/``); results go here.
    data_dir: the TFDS data_dir ("" = :func:`default_data_dir`).
    manifests: a folder of ``<key>.jsonl`` / ``.csv`` manifests ("" = none).
    prompts: a folder of ``<key>.json`` descriptions / ``<key>_classes.txt`` names ("" = none).
    step: checkpoint step; None for the latest.
    only: benchmark keys to consider (empty: all of :data:`BENCHMARKS`).
    templates: a :data:`TEMPLATES` name used for every classification set ("" = each its own).
    batch_size: global batch for embedding images and texts.
    mesh: defaults to the one the run's ``config.mesh`` describes over all devices.
    model_name, pretrained_name: clip_benchmark's ``model`` / ``pretrained`` in the per-benchmark
      JSON files ("" = :func:`default_model_names`).
    echo: where the skip lines and the table go (process 0 only).

  Returns:
    The report written to ``suite_results.json``: ``{"workdir", "step", "checkpoint", "rows",
    "results" (key -> metric -> value, fractions), "skipped" / "errors" (key -> reason),
    "clip_benchmark" (key -> path of its clip_benchmark JSON)}``.

  Raises:
    ValueError / FileNotFoundError: bad flags, no run, or no benchmark found at all.
  """
  import jax

  from align_jax.evaluate import evaluators as evaluators_lib
  from align_jax.evaluate import standalone

  unknown = sorted(set(only) - set(BY_KEY))
  if unknown:
    raise ValueError(f"--only: unknown benchmarks {unknown}; choose from {sorted(BY_KEY)}.")
  if templates and templates not in TEMPLATES:
    raise ValueError(f"--templates={templates!r} is not a template set; use one of "
                     f"{sorted(TEMPLATES)}.")
  for flag, folder in (("--manifests", manifests), ("--prompts", prompts)):
    if folder and not storage.isdir(folder):
      raise FileNotFoundError(f"{flag}={folder}: no such folder.")
  data_dir = data_dir or default_data_dir()
  config = load_run_config(workdir)
  chosen = [b for b in BENCHMARKS if not only or b.key in only]
  found, skipped = {}, {}
  for benchmark in chosen:
    data, reason = locate(benchmark, data_dir, manifests)
    if data is None:
      skipped[benchmark.key] = reason
    else:
      found[benchmark.key] = data
  say = echo if jax.process_index() == 0 else (lambda _: None)
  for key, reason in skipped.items():
    say(f"skipped {BY_KEY[key].title} ({key}): {reason}")
  if not found:
    raise FileNotFoundError(
        f"none of the benchmarks {[b.key for b in chosen]} found under --data_dir={data_dir} or "
        f"--manifests={manifests or '(none)'}; prepare TFDS sets with `tfds build NAME "
        "--data_dir=DIR --file_format=array_record` or write manifests (see --help).")

  config.evals = {}  # the run's own evaluators are not the suite's
  run = standalone.restore_for_evaluation(config, workdir, step, mesh)
  for tower in ("image_encoder", "text_encoder"):
    if getattr(run.model, tower).input_kind != interfaces.RAW:
      raise ValueError(f"the suite embeds raw images and class names, so the run's "
                       f"model.{tower} must be a Hugging Face encoder, not "
                       f"{getattr(run.model, tower).name!r}; for a run trained on stored "
                       "features, write a config.json naming the encoders the store was made "
                       "with into a copy of the workdir.")
  built, errors = {}, {}
  for key, data in found.items():  # every reader opens before any evaluation
    benchmark = BY_KEY[key]
    eval_config = {"type": benchmark.task, "data": data, "batch_size": batch_size, "prefix": ""}
    if benchmark.task == ZERO_SHOT:
      eval_config.update(ks=(1, 5), **prompt_keys(benchmark, prompts=prompts,
                                                  manifests=manifests, templates=templates))
    else:
      eval_config["ks"] = (1, 5, 10)
    try:
      built[key] = evaluators_lib.EVALUATORS[benchmark.task](key, eval_config, config, run.model,
                                                             run.mesh)
    except _DATA_ERRORS as error:
      message = str(error)
      if benchmark.task == ZERO_SHOT and "pass class_names" in message:
        message += f" For the suite: a {key}_classes.txt in --prompts or --manifests."
      errors[key] = message
      say(f"error in {benchmark.title} ({key}): {message}")
  rows, results, clip_results = [], {}, {}
  defaults = default_model_names(config, workdir, run.step)
  model_name, pretrained_name = model_name or defaults[0], pretrained_name or defaults[1]
  for key, evaluator in built.items():
    benchmark, start = BY_KEY[key], time.time()
    try:
      values, data = _evaluate(benchmark, evaluator, run)
    except _DATA_ERRORS as error:
      errors[key] = str(error)
      say(f"error in {benchmark.title} ({key}): {error}")
      continue
    logger.info("suite %s: %s (%.0f s)", key,
                " ".join(f"{k}={v:.4f}" for k, v in values.items()), time.time() - start)
    results[key] = values
    rows += _rows(benchmark, values, data)
    clip_results[key] = clip_benchmark_result(
        benchmark, values, model=model_name, pretrained=pretrained_name,
        num_classes=len(getattr(evaluator, "class_names", ())))
  paths = {key: clip_benchmark_path(workdir, BY_KEY[key]) for key in clip_results}
  report = {"workdir": workdir, "step": run.step, "checkpoint": run.checkpoint, "paper": PAPER,
            "rows": rows, "results": results, "skipped": skipped, "errors": errors,
            "clip_benchmark": paths}
  text = table(rows)
  if jax.process_index() == 0:
    for key, result in clip_results.items():
      storage.write_text(paths[key], json.dumps(result) + "\n")
    storage.write_text(storage.join(workdir, RESULTS_JSON), json.dumps(report, indent=2) + "\n")
    storage.write_text(storage.join(workdir, RESULTS_MD),
                       f"# Evaluation suite: {workdir}, step {run.step}\n\n{text}\n")
  say(f"{workdir}: step {run.step} ({run.checkpoint})\n{text}")
  if paths:
    say(f"clip_benchmark results ({len(paths)}): {storage.join(workdir, CLIP_BENCHMARK_DIR)}/"
        "*.json (combine with `clip_benchmark build FILES --output=benchmark.csv`)")
  return report
