"""The shared data pieces: one order, one manifest parser, one record layer, the schema's values.

The order is checked against the two implementations it replaced (written out here as they
were) and against exact values they produced; the manifest parser against the rows of known
files; the record layer's skip counting against hand-counted bad records; and the package's
import graph for cycles and private imports.
"""

import ast
import io
import logging
import os
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from align_jax.config import schema as config_lib
from align_jax.data import array_sources as features, manifest, order, pipeline, reader_factory as readers, records, skip_log
from align_jax.data import tfds_manifest_readers as sources
from align_jax.evaluate import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------- order


def _old_stream_record(position, num_records, seed, shuffle):
  """pipeline.StreamPlan.record before the shared order."""
  epoch, slot = divmod(position, num_records)
  if not shuffle:
    return slot
  return int(np.random.default_rng([seed, epoch]).permutation(num_records)[slot])


def _old_array_indices(start, count, num_pairs, seed, shuffle):
  """features.ArrayPairSource.indices before the shared order."""
  out = []
  for q in range(start, start + count):
    epoch, offset = divmod(q, num_pairs)
    perm = (np.random.default_rng([seed, epoch]).permutation(num_pairs) if shuffle
            else np.arange(num_pairs))
    out.append(int(perm[offset]))
  return out


@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_order_equals_both_old_orders(shuffle):
  for num_records, seed in ((11, 5), (10, 7), (1, 0)):
    o = order.EpochOrder(num_records, seed, shuffle)
    want = [_old_stream_record(q, num_records, seed, shuffle) for q in range(5 * num_records)]
    assert [o.record(q) for q in range(5 * num_records)] == want
    np.testing.assert_array_equal(o.records(3, 4 * num_records),
                                  _old_array_indices(3, 4 * num_records, num_records, seed,
                                                     shuffle))
    for e in range(4):  # every epoch visits each record exactly once
      assert sorted(o.records(e * num_records, num_records)) == list(range(num_records))


def test_sources_use_the_one_order_with_the_old_values():
  # Exact values the two sources gave before they shared the order (seed 7, 10 pairs, 3 processes
  # of batch 2; seed 5, 11 records, local batch 2).
  batches = []
  for p in range(3):
    source = features.ArrayPairSource({"x": np.arange(10)[:, None]}, {"y": np.arange(10)[:, None]},
                                      global_batch_size=6, seed=7, process_index=p,
                                      process_count=3)
    batches.append([source.batch_indices(q).tolist() for q in range(0, 30, 6)])
  assert batches == [[[0, 1], [2, 4], [1, 3], [2, 5], [0, 2]],
                     [[3, 6], [5, 9], [4, 6], [1, 3], [6, 7]],
                     [[7, 8], [0, 9], [7, 8], [4, 5], [8, 9]]]
  plan = pipeline.StreamPlan(11, 2, 1, 3, 5, shuffle=True)
  positions = [plan.global_position(local) for local in range(6)]
  assert positions == [2, 3, 8, 9, 14, 15]
  assert [plan.record(q) for q in positions] == [
      _old_stream_record(q, 11, 5, True) for q in positions]
  # Both sources read the same records at the same positions: one order.
  array = features.ArrayPairSource({"x": np.zeros((11, 1))}, {"y": np.zeros((11, 1))},
                                   global_batch_size=6, seed=5, process_index=0, process_count=1)
  np.testing.assert_array_equal(array.indices(0, 40), [plan.record(q) for q in range(40)])


def test_processes_read_each_record_once_per_epoch():
  num_records, local_batch, count = 12, 2, 3
  plans = [pipeline.StreamPlan(num_records, local_batch, p, count, 9, True) for p in range(count)]
  per_epoch = num_records // count  # local positions of one epoch, per process
  for epoch in range(3):
    seen = [plan.record(plan.global_position(local)) for plan in plans
            for local in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
    assert sorted(seen) == list(range(num_records))
  assert order.process_start(12, 2, 2) == 16


def test_order_cache_is_not_pickled():
  o = order.EpochOrder(1000, 3)
  first = o.record(1500)
  copy = pickle.loads(pickle.dumps(o))
  assert copy._cache == () and copy.record(1500) == first
  with pytest.raises(ValueError, match="at least one record"):
    order.EpochOrder(0, 0)


# ------------------------------------------------------------------------------- manifest parser


def test_manifest_rows_jsonl(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_bytes(b'{"image": "a.png", "caption": "x"}\n\n'
                   b'{"image": "b.png"\n'
                   b'\xff\xfe\n'
                   b'[1, 2]\n'
                   b'{"image": 3}\n'
                   b'{"image": "c.png", "label": 2}\n')
  rows = list(manifest.read_rows(str(path), image_key="image"))
  assert [(r.line, r.fields, r.error and r.error[0]) for r in rows] == [
      (1, {"image": "a.png", "caption": "x"}, None),
      (3, None, "bad_manifest_row"), (4, None, "bad_encoding"), (5, None, "bad_manifest_row"),
      (6, None, "bad_manifest_row"), (7, {"image": "c.png", "label": 2}, None)]
  assert rows[1].error[1].startswith("invalid JSON")
  assert rows[3].error[1] == "no string field 'image'"


def test_manifest_rows_csv_and_bad_files(tmp_path):
  path = tmp_path / "m.csv"
  path.write_text("image,label,caption\na.png,cat,one\nb.png\n")
  rows = list(manifest.read_rows(str(path), image_key="image", columns={"label": "data.label_key"}))
  assert [(r.line, r.fields) for r in rows] == [
      (2, {"image": "a.png", "label": "cat", "caption": "one"}),
      (3, {"image": "b.png", "label": None, "caption": None})]
  with pytest.raises(ValueError, match=r"m.csv' has no column 'kind' \(columns: \['image', "
                     r"'label', 'caption'\]\); set data.label_key$"):
    list(manifest.read_rows(str(path), image_key="image", columns={"kind": "data.label_key"}))
  with pytest.raises(ValueError, match="no column 'img'.*set data.image_key"):
    list(manifest.read_rows(str(path), image_key="img"))
  (tmp_path / "m.txt").write_text("x")
  with pytest.raises(ValueError, match=r"unsupported extension '.txt'; use .jsonl or .csv"):
    list(manifest.read_rows(str(tmp_path / "m.txt"), image_key="image"))


def test_caption_and_label_readers_parse_one_manifest_alike(tmp_path):
  for name in ("a.png", "b.png"):
    Image.new("RGB", (8, 8)).save(tmp_path / name)
  path = tmp_path / "m.jsonl"
  path.write_text('{"image": "a.png", "caption": "a cat", "label": "cat"}\n'
                  '{"image": "b.png", "caption": "a dog", "label": "dog"}\n'
                  '{"image": "a.png", "caption": "the cat", "label": "cat"}\n')
  captions = sources.ManifestReader(str(path))
  labels = datasets.ManifestClassificationReader(str(path))
  assert [captions.read(i).captions for i in range(len(captions))] == [["a cat", "the cat"],
                                                                         ["a dog"]]
  assert [labels.read(i).label for i in range(len(labels))] == [0, 1, 0]
  assert captions.read(0).key == labels.read(0).key == str(tmp_path / "a.png")
  # A row the caption reader skips (and counts) stops the classification reader at its line.
  path.write_text('{"image": "a.png", "label": "cat"}\n{"image": "b.png"\n')
  with pytest.raises(records.SkipRecord, match="bad_manifest_row"):
    sources.ManifestReader(str(path)).read(1)
  with pytest.raises(ValueError, match=r"m.jsonl' line 2: invalid JSON"):
    datasets.ManifestClassificationReader(str(path))
  path.write_text('{"image": "a.png", "label": "cat"}\n{"image": "b.png"}\n')
  with pytest.raises(ValueError, match=r"line 2: no 'label' value"):
    datasets.ManifestClassificationReader(str(path))


# ---------------------------------------------------------------------------------- record layer


def _png(size) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
  return buf.getvalue()


def test_decode_checks_captions_then_image_within_limits():
  limits = records.DecodeLimits(max_pixels=100, min_size=4)
  image, captions = records.decode(records.RawRecord("k", _png((8, 8)), [b" hi "]), limits)
  assert image.size == (8, 8) and image.mode == "RGB" and captions == ["hi"]
  with pytest.raises(records.SkipRecord, match="empty_caption"):  # both bad: captions first
    records.decode(records.RawRecord("k", b"junk", [""]), limits)
  with pytest.raises(records.SkipRecord, match="too_large: k: 11x10 exceeds max_image_pixels=100"):
    records.decode(records.RawRecord("k", _png((11, 10)), ["a"]), limits)
  with pytest.raises(records.SkipRecord, match="too_small"):
    records.decode(records.RawRecord("k", _png((3, 9)), ["a"]), limits)
  labelled = datasets.LabeledRecord("k", _png((8, 8)), 3)
  image, captions = records.decode(labelled, limits, captions=False)
  assert image.size == (8, 8) and captions is None


def test_read_file_skips_missing_and_unreadable(tmp_path):
  (tmp_path / "f.bin").write_bytes(b"abc")
  assert records.read_file(str(tmp_path / "f.bin")) == b"abc"
  with pytest.raises(records.SkipRecord) as missing:
    records.read_file(str(tmp_path / "nope.png"))
  assert missing.value.reason == "missing_file"
  with pytest.raises(records.SkipRecord) as folder:
    records.read_file(str(tmp_path))
  assert folder.value.reason == "unreadable_file"


def test_skip_counter_counts_and_caps_the_log(caplog):
  skip_log.reset()
  logger = logging.getLogger("test_data_records")
  counter = records.SkipCounter("src", logger, {"unreadable_shard": 2})
  with caplog.at_level(logging.WARNING, logger="test_data_records"):
    for i in range(12):
      counter.add("corrupt_image", f"file{i}")
    counter.add("missing_file", "m0")
  assert counter.counts == {"data/skipped_unreadable_shard": 2, "data/skipped_corrupt_image": 12,
                            "data/skipped_missing_file": 1}
  assert counter.total == 15
  lines = [r.getMessage() for r in caplog.records]
  # corrupt_image: the first LOG_FIRST one by one, then the 10th as a count; missing_file: one.
  assert len(lines) == skip_log.LOG_FIRST + 1 + 1
  assert lines[0] == "data: skipped_corrupt_image (#1) file0"
  assert lines[skip_log.LOG_FIRST] == "data: skipped_corrupt_image: 10 records of src so far"
  restored = records.SkipCounter("src", logger, counter.counts)  # a saved state's names
  assert restored.counts == counter.counts
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="test_data_records"):
    restored.summary("pass")
  assert [r.getMessage() for r in caplog.records] == [
      "pass: 15 records skipped (data/skipped_corrupt_image=12, data/skipped_missing_file=1, "
      "data/skipped_unreadable_shard=2)"]
  skip_log.reset()


def test_load_in_order_keeps_the_order():
  items = list(range(50))
  assert list(records.load_in_order(lambda i: i * i, items, num_threads=4, prefetch=8)) == [
      i * i for i in items]
  assert list(records.load_in_order(lambda i: -i, range(5, 9), num_threads=2, prefetch=2)) == [
      -5, -6, -7, -8]
  assert list(records.load_in_order(lambda i: i, [], num_threads=2, prefetch=2)) == []


# ------------------------------------------------------------------------------ schema's values


def test_readers_take_the_schema_values():
  schema = config_lib.default_config().data
  partial = ml_collections.ConfigDict({"source": "synthetic_shapes", "split": "train"})
  data = readers.with_schema(partial)
  assert (data.num_pairs, data.data_seed) == (schema.num_pairs, schema.data_seed) == (8192, 1234)
  assert readers.decode_limits(partial) == records.DecodeLimits(89_478_485, 8)
  reader = readers.make_reader(partial)
  assert len(reader) == 8192 and reader.seed == 1234
  # The reader's own defaults are the schema's too: one synthetic world.
  from align_jax.data import synthetic_images
  default = synthetic_images.ShapesReader()
  assert (default.num_records, default.seed) == (schema.num_pairs, schema.data_seed)
  np.testing.assert_array_equal(default.read(5).image, reader.read(5).image)
  kept = readers.with_schema({"source": "manifest", "label_key": "y", "num_pairs": 3})
  assert (kept.label_key, kept.num_pairs, kept.min_image_size) == ("y", 3, 8)


def test_no_private_defaults_in_the_data_readers():
  """Readers take values from the schema: no ``data.get(key, default)`` of a schema key."""
  schema_keys = set(config_lib.default_config().data.keys())
  found = []
  for folder in ("data", "evaluate", "analysis"):
    for name in sorted(os.listdir(os.path.join(ROOT, "align_jax", folder))):
      if not name.endswith(".py"):
        continue
      tree = ast.parse(open(os.path.join(ROOT, "align_jax", folder, name)).read())
      for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get" and len(node.args) == 2
            and "data" in ast.unparse(node.func.value)  # data_config, self.data, config.data
            and isinstance(node.args[0], ast.Constant) and node.args[0].value in schema_keys):
          found.append(f"{folder}/{name}:{node.lineno} .get({node.args[0].value!r}, ...)")
  assert found == []


# --------------------------------------------------------------------------------- import graph


def _modules(with_configs: bool = False):
  """Module name -> path of align_jax's modules (and, ``with_configs``, the clone's ``configs/``,
  installed as ``align_jax.configs``, named ``configs.NAME`` here)."""
  out = {}
  for top in ("align_jax", "configs") if with_configs else ("align_jax",):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          out[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
  return out


def _config_alias(name: str) -> str:
  """``align_jax.configs.X`` (the installed name of ``configs/X.py``) as ``configs.X``."""
  return name[len("align_jax."):] if name.startswith("align_jax.configs") else name


def _imports(path, modules):
  """Modules of align_jax that ``path`` imports (anywhere, function-local imports too), or names
  as a string (``importlib.import_module("align_jax.x")``, a command table of module names)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found.update(_config_alias(a.name) for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        full = _config_alias(f"{node.module}.{a.name}")
        found.add(full if full in modules else _config_alias(node.module))
    elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
          and _config_alias(node.value) in modules
          and not modules[_config_alias(node.value)].endswith("__init__.py")):
      found.add(_config_alias(node.value))  # a module loaded by name: importlib, a command table
      # (a package's name is not: the logger "align_jax", find_spec("align_jax.configs"))
    elif (isinstance(node, ast.JoinedStr) and node.values
          and isinstance(node.values[0], ast.Constant) and node.values[0].value.endswith(".")):
      prefix = _config_alias(node.values[0].value)  # f"configs.{name}": any module in there
      found.update(m for m in modules if m.startswith(prefix))
  return {m for m in found if m in modules}


def test_no_import_cycle_inside_align_jax():
  """Imports, function-local ones and modules loaded by name (importlib, the command table, an
  f-string such as ``f"configs.{name}"``: every module it can name) included, over align_jax and
  the config files."""
  modules = _modules(with_configs=True)
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  ours = list(modules)
  cycles = []
  for start in ours:  # a path from start back to itself
    stack, seen = [(start, (start,))], set()
    while stack:
      node, path = stack.pop()
      for nxt in graph[node]:
        if nxt == start:
          cycles.append(" -> ".join(path + (start,)))
        elif nxt not in seen:
          seen.add(nxt)
          stack.append((nxt, path + (nxt,)))
  assert cycles == []


def test_the_library_imports_no_command_config_file_or_test_helper():
  """align_jax's library modules import nothing of align_jax.cli (the commands), configs/ (the
  config files) or align_jax.testing (tiny checkpoints, demos), not even by name."""
  modules = _modules(with_configs=True)
  outer = ("align_jax.cli", "align_jax.testing", "configs")
  found = []
  for module, path in sorted(modules.items()):
    if any(module == o or module.startswith(o + ".") for o in outer):
      continue
    found += [f"{module} -> {name}" for name in sorted(_imports(path, modules))
              if any(name == o or name.startswith(o + ".") for o in outer)]
  assert found == []


def test_the_import_graph_sees_modules_loaded_by_name():
  """The two checks above would miss an import they cannot see: the graph has the command
  table's modules and the config files an f-string can name."""
  modules = _modules(with_configs=True)
  table = _imports(os.path.join(ROOT, "align_jax", "cli", "main.py"), modules)
  assert {"align_jax.cli.train", "align_jax.cli.export", "align_jax.cli.plot"} <= table
  by_name = _imports(os.path.join(ROOT, "align_jax", "testing", "demos.py"), modules)
  assert {"configs.demo", "configs.demo_online"} <= by_name


def test_no_module_uses_another_modules_private_names():
  modules = _modules()
  found = []
  for module, path in modules.items():
    tree = ast.parse(open(path).read())
    imported = {}  # local name -> align_jax module
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("align_jax"):
        for a in node.names:
          if a.name.startswith("_") and not a.name.startswith("__"):
            found.append(f"{module}: from {node.module} import {a.name}")
          if f"{node.module}.{a.name}" in modules:
            imported[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in imported and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        found.append(f"{module}: {node.value.id}.{node.attr}")
  assert found == []
