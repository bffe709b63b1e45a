"""One accelerator run that sizes align_jax: losses, stored-feature steps and the online step.

    python benchmarks/accelerator_suite.py --out suite.json            # one GPU/TPU, < 8 minutes
    python benchmarks/accelerator_suite.py --smoke --out smoke.json    # tiny shapes, CPU, seconds

Prints one markdown table (and writes its rows as JSON to ``--out``):

* **loss** — ``jax.value_and_grad`` of ``align_jax.objectives.contrastive`` (softmax and sigmoid,
  ``blockwise``
  and ``gathered``) at 32k, 128k and 1M pairs, D = 1,024, float32 embeddings on one device. A
  case whose compiled memory (XLA's ``memory_analysis``: arguments + outputs + temporaries)
  exceeds the device's memory is reported as not fitting without being run.
* **stored freeze-align** — the real train step (``align_jax.train.loop.make_train_step``) of the
  freeze-align recipe (``configs/dinov2_roberta.py``: token projectors, d = 1,024, dropout 0.1,
  softmax loss, AdamW, projector micro-batches of 64) on stored float16 tokens of DINOv2-L at
  256 px (325 tokens) and RoBERTa-L (77 tokens, random lengths), at the largest batch that fits.
* **stored SAIL GLU** — SAIL's GLU heads (hidden 8x the input width) on pooled float16 features,
  width 2,048 (image) / 1,024 (text), embed 1,024, sigmoid loss: at 32k and at the largest batch.
* **online** — the freeze-align recipe's online step: DINOv2-L/14 (304M) and RoBERTa-L (355M)
  shaped random encoders, bfloat16, inside the step (micro-batches of 64), built from
  transformers configs with random weights (no download), at the largest batch that fits.

"Largest batch that fits": a doubling schedule, each batch compiled (a compiled estimate over the
device's memory counts as not fitting), run, and an out-of-memory error caught; the search stops
at the first batch that does not fit, at its cap, or when the next batch would not finish inside
the case's time budget. Each case runs in its own process with a hard timeout (its budget), so
the whole suite stays under ``--budget-s`` (default 470 s) and one case's out-of-memory or
fragmentation does not touch the next; a case that is killed keeps the rows it finished.

Columns: step time (median of the timed steps after one warm-up step; a single step, without
warm-up, for steps over 5 s), samples/s, analytic TFLOP/s and MFU (analytic FLOPs / step time /
the device's dense bf16 peak, by ``device_kind``: H200/H100 SXM 989, A100 312, TPU v5e 197, v5p
459, v6e 918 TFLOP/s; "—" where unknown, e.g. CPU), the device's ``peak_bytes_in_use`` after the
row (``device.memory_stats()``, where available; cumulative in the case's process, so rows run
in order of growing memory and a peak that did not grow reads "<= X"), and XLA's compiled
temporaries and arguments.

Analytic FLOPs per step (multiply-add = 2): loss 6 B^2 D (logits forward, two gradient
matmuls; the blockwise softmax's recomputed logits are not counted); a linear map d -> e on n
rows 2 n d e forward and 3x that forward + backward (the projectors' inputs are frozen, but
their LayerNorms train, so input gradients are needed); token projectors count lin, fc1 and fc2
on every token (the per-token form of the maths, whatever the implementation computes);
encoders (forward only, frozen) 24 layers x (8 T D^2 + 4 T D F + 4 T^2 D) + the patch
embedding, on every token including padding. The optimiser and norms are not counted.

``--smoke`` runs every case with tiny shapes (tiny random encoders, no micro-batching, one batch
size per search, XLA's cheapest CPU codegen) in this process, for the test
(tests/test_accelerator_suite.py); ``--isolate`` forces a process per case there too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2**30
# Dense bf16 peak FLOP/s by device_kind substring (first match wins; lower-case compare).
PEAK_BF16 = (("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("h800", 989e12),
             ("a100", 312e12), ("l4", 121e12), ("tpu v6", 918e12), ("tpu v5 lite", 197e12),
             ("tpu v5e", 197e12), ("tpu v5", 459e12), ("tpu v4", 275e12))
LOSS_SIZES = {"loss 32k": 32_768, "loss 128k": 131_072, "loss 1M": 1_048_576}
LOSS_VARIANTS = [(loss, impl) for impl in ("blockwise", "gathered")
                 for loss in ("softmax", "sigmoid")]  # growing memory within a case
# case -> (seconds budget, the variants (rows) it reports)
CASES = {
    **{name: (budget, [f"{loss} {impl}" for loss, impl in LOSS_VARIANTS])
       for name, budget in zip(LOSS_SIZES, (40, 45, 100))},
    "stored freeze-align": (70, ["largest batch"]),
    "stored SAIL GLU": (60, ["batch 32k", "largest batch"]),
    "online DINOv2-L + RoBERTa-L": (150, ["largest batch"]),
}
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


# --------------------------------------------------------------------------- rows and timing


@dataclasses.dataclass
class Row:
  case: str
  variant: str
  batch: int | None = None
  status: str = "ok"
  step_s: float | None = None
  samples_per_s: float | None = None
  tflops: float | None = None
  mfu: float | None = None
  peak_gib: float | None = None
  peak_grew: bool = True
  xla_temp_gib: float | None = None
  xla_args_gib: float | None = None
  compile_s: float | None = None
  note: str = ""
  device: str = ""  # device_kind


class Deadline:
  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def remaining(self) -> float:
    return self.end - time.monotonic()


def peak_flops(device) -> float | None:
  kind = device.device_kind.lower()
  return next((peak for name, peak in PEAK_BF16 if name in kind), None)


class _Kind:
  def __init__(self, device_kind: str):
    self.device_kind = device_kind


def device_memory(device) -> tuple[int | None, int | None]:
  """(peak_bytes_in_use, bytes_limit) of the device, or None where it has no memory stats."""
  try:
    stats = device.memory_stats() or {}
  except (AttributeError, NotImplementedError, RuntimeError):
    stats = {}
  return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")


def is_oom(error: BaseException) -> bool:
  return any(marker in str(error) for marker in OOM_MARKERS)


class Recorder:
  """Appends finished rows to a JSON-lines file at once (a killed case keeps them)."""

  def __init__(self, path: str | None):
    self.path, self.rows, self.last_peak = path, [], None

  def add(self, row: Row, device, peak: int | None = None) -> Row:
    """Records ``row``; ``peak``: the device's peak bytes when the row was measured (else now)."""
    row.device = device.device_kind
    peak = device_memory(device)[0] if peak is None else peak
    if peak is not None:
      row.peak_gib = peak / GIB
      row.peak_grew = self.last_peak is None or peak > self.last_peak
      self.last_peak = peak
    self.rows.append(row)
    if self.path:
      with open(self.path, "a") as f:
        f.write(json.dumps(dataclasses.asdict(row)) + "\n")
    return row


def compiled_bytes(compiled) -> tuple[int | None, int | None, int | None]:
  """(temp, arguments, arguments + outputs + temp - aliased) from XLA's memory analysis."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    m = None
  if m is None:
    return None, None, None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return m.temp_size_in_bytes, m.argument_size_in_bytes, total


def time_steps(run: Callable[[], Any], deadline: Deadline, reps: int) -> tuple[float, str]:
  """Median step seconds: one warm-up step, then up to ``reps`` timed ones within the deadline."""
  import jax
  start = time.perf_counter()
  jax.block_until_ready(run())
  first = time.perf_counter() - start
  if first > 5.0 or deadline.remaining() < 2.5 * first:
    return first, "1 step, no warm-up"
  times = []
  for _ in range(reps):
    if times and deadline.remaining() < 1.5 * times[-1]:
      break
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2], f"median of {len(times)}"


def fill_rates(row: Row, flops: float, device) -> Row:
  row.samples_per_s = row.batch / row.step_s
  row.tflops = flops / row.step_s / 1e12
  peak = peak_flops(device)
  row.mfu = None if peak is None else flops / row.step_s / peak
  return row


# --------------------------------------------------------------------------- losses


_PROGRAMS: dict = {}  # (loss, impl, batch, dim) -> program: --smoke's loss cases share sizes


def _loss_program(loss: str, impl: str, batch: int, dim: int, device):
  """AOT-compiled value_and_grad of one loss on [batch, dim] float32 pairs, and its scalars."""
  key = (loss, impl, batch, dim)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = _compile_loss(loss, impl, batch, dim, device)
  return _PROGRAMS[key]


def _compile_loss(loss: str, impl: str, batch: int, dim: int, device):
  import jax
  import jax.numpy as jnp

  from align_jax.objectives import contrastive as losses

  fn, scalars = {"softmax": (losses.softmax_loss, (0.07,)),
                 "sigmoid": (losses.sigmoid_loss, (10.0, -10.0))}[loss]
  scalars = tuple(jnp.float32(x) for x in scalars)
  f = jax.jit(jax.value_and_grad(lambda img, txt, *s: fn(img, txt, *s, impl=impl),
                                 argnums=tuple(range(2 + len(scalars)))))
  spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32,
                              sharding=jax.sharding.SingleDeviceSharding(device))
  return f.lower(spec, spec, *scalars).compile(), scalars


def _pairs(batch: int, dim: int):
  import jax
  import jax.numpy as jnp

  @jax.jit
  def make(key):
    x, y = jax.random.normal(key, (2, batch, dim), jnp.float32)
    y = x + 0.5 * y
    return (x / jnp.linalg.norm(x, axis=1, keepdims=True),
            y / jnp.linalg.norm(y, axis=1, keepdims=True))

  return make(jax.random.key(0))


def _calibrated_seconds(loss: str, impl: str, batch: int, dim: int, device) -> float:
  """One step's seconds at ``batch``, extrapolated (x 64) from a run at ``batch / 8``."""
  import jax
  compiled, scalars = _loss_program(loss, impl, batch // 8, dim, device)
  inputs = _pairs(batch // 8, dim)
  jax.block_until_ready(compiled(*inputs, *scalars))
  start = time.perf_counter()
  jax.block_until_ready(compiled(*inputs, *scalars))
  return 64 * (time.perf_counter() - start)


def loss_case(case: str, batch: int, dim: int, deadline: Deadline, recorder: Recorder) -> None:
  """Every (loss, impl) at ``batch``; a step the case's time left cannot hold is not started."""
  import jax

  device = jax.devices()[0]
  _, limit = device_memory(device)
  peak = peak_flops(device)
  inputs = None  # made once a variant fits (every variant reads the same pairs)
  for loss, impl in LOSS_VARIANTS:
    row = Row(case, f"{loss} {impl}", batch)
    flops = 6.0 * batch * batch * dim
    compiled = None
    try:
      start = time.perf_counter()
      compiled, scalars = _loss_program(loss, impl, batch, dim, device)
      row.compile_s = time.perf_counter() - start
      temp, args, total = compiled_bytes(compiled)
      row.xla_temp_gib, row.xla_args_gib = (None if temp is None else temp / GIB,
                                            None if args is None else args / GIB)
      if limit and total and total > limit:
        row.status = f"does not fit: XLA needs {total / GIB:,.1f} GiB > {limit / GIB:.1f}"
      elif peak and flops / (0.25 * peak) > 10:  # a long step: measure its cost first
        estimate = _calibrated_seconds(loss, impl, batch, dim, device)
        if estimate > deadline.remaining():
          row.status = (f"skipped: ~{estimate:.0f} s a step (64x a {batch // 8:,} step) > "
                        f"{deadline.remaining():.0f} s left")
      if row.status == "ok":
        inputs = _pairs(batch, dim) if inputs is None else inputs
        row.step_s, row.note = time_steps(lambda: compiled(*inputs, *scalars), deadline, reps=3)
        fill_rates(row, flops, device)
    except Exception as error:  # pylint: disable=broad-except
      if not is_oom(error):
        raise
      row.status = "OOM"
    recorder.add(row, device)
    del compiled
    gc.collect()


# --------------------------------------------------------------------------- train steps


def _linear_flops(rows: float, d_in: int, d_out: int) -> float:
  return 3 * 2.0 * rows * d_in * d_out  # forward + backward


def freeze_align_flops(batch: int, image_tokens: int, text_tokens: int, d: int, e: int) -> float:
  per_token = _linear_flops(1, d, e) * 2 + _linear_flops(1, e, e)  # lin, fc1 (d -> e), fc2
  head = 2 * _linear_flops(1, e, e)  # text global head: proj, mlp
  return batch * ((image_tokens + text_tokens) * per_token + head) + 6.0 * batch * batch * e


def glu_flops(batch: int, widths: tuple[int, int], mult: int, e: int) -> float:
  total = 0.0
  for d in widths:
    h = mult * d
    total += 2 * _linear_flops(batch, d, h) + _linear_flops(batch, h, e)
  return total + 6.0 * batch * batch * e


def encoder_flops(layers: int, width: int, mlp: int, tokens: int) -> float:
  return layers * (8.0 * tokens * width**2 + 4.0 * tokens * width * mlp
                   + 4.0 * tokens**2 * width)


class StepBench:
  """The real train step of ``config`` on one device, compiled for each batch size tried."""

  def __init__(self, config, make_batch: Callable[[Any, int], dict]):
    import jax

    from align_jax.model import two_tower as model_lib
    from align_jax.train import loop as train, optim, step as step_builder
    from align_jax.parallel import mesh as sharding

    self.config = config
    self.make_batch = make_batch  # (key, batch) -> dict of arrays (traced under jit)
    self.device = jax.devices()[0]
    self.mesh = sharding.make_mesh(config.mesh.axes, (1,), devices=[self.device])
    self.model = model_lib.build_model(config, self.mesh)
    tx = optim.make_optimizer(config)
    self.batch_sharding = sharding.batch_sharding(self.mesh, tuple(config.mesh.batch_axes))
    self.frozen, frozen_shardings = step_builder.place_frozen(self.model, self.mesh, config)
    # The trainable state does not depend on the batch size: made once from a one-row batch
    # (the frozen encoders' forward in init is dead code for XLA) and copied for each trial.
    example = jax.eval_shape(lambda key: make_batch(key, 1), jax.random.key(0))
    self.state0, state_shardings = step_builder.init_state(self.model, tx, config, self.mesh,
                                                           self.frozen, example)
    self.copy = jax.jit(lambda tree: jax.tree.map(lambda x: x.copy(), tree))
    self.step = step_builder.jit_step(train.make_train_step(self.model, tx, config, self.mesh),
                                      self.mesh, state_shardings, frozen_shardings,
                                      self.batch_sharding)

  def trial(self, row: Row, batch: int, flops: float, deadline: Deadline) -> tuple[Row, Any]:
    """Compiles, checks memory, runs; fills ``row`` ("OOM" / "does not fit" on failure).

    Returns the row and the device's peak bytes in use right after it ran (or None).
    """
    import jax

    row.batch = batch
    key = jax.random.key(1)
    shapes = jax.eval_shape(lambda k: self.make_batch(k, batch), key)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_sharding), shapes)
    holder = {}
    try:
      start = time.perf_counter()
      compiled = self.step.lower(self.state0, self.frozen, abstract).compile()
      row.compile_s = time.perf_counter() - start
      temp, args, total = compiled_bytes(compiled)
      row.xla_temp_gib, row.xla_args_gib = (None if temp is None else temp / GIB,
                                            None if args is None else args / GIB)
      _, limit = device_memory(self.device)
      if limit and total and total > limit:
        row.status = f"does not fit: XLA needs {total / GIB:,.1f} GiB > {limit / GIB:.1f}"
        return row, None
      holder["data"] = jax.jit(lambda k: self.make_batch(k, batch),
                               out_shardings=self.batch_sharding)(key)
      holder["state"] = self.copy(self.state0)

      def run():
        holder["state"], metrics = compiled(holder["state"], self.frozen, holder["data"])
        return metrics

      row.step_s, row.note = time_steps(run, deadline, reps=3)
      fill_rates(row, flops, self.device)
      row.status = "ok"
      return row, device_memory(self.device)[0]
    except Exception as error:  # pylint: disable=broad-except
      if not is_oom(error):
        raise
      row.status = "OOM"
      return row, None
    finally:
      holder.clear()
      gc.collect()


def largest_batch(bench: StepBench, case: str, variant: str, start: int, cap: int,
                  flops_of: Callable[[int], float], deadline: Deadline, recorder: Recorder,
                  first_variant: str = "") -> Row:
  """Doubling from ``start`` to ``cap``; records the largest batch that ran, with the trail.

  ``first_variant``: also record the first trial (at ``start``) as a row of that name.
  """
  best, best_peak, trail, batch = None, None, [], start
  while batch <= cap:
    if best is not None:  # will the next (2x) batch compile and run two steps in time?
      estimate = 1.2 * (best.compile_s or 0) + 2 * 2 * (best.step_s or 0)
      if estimate > deadline.remaining():
        trail.append(f"{batch:,} not tried (time budget)")
        break
    row, peak = bench.trial(Row(case, variant), batch, flops_of(batch), deadline)
    if first_variant and batch == start:
      recorder.add(dataclasses.replace(row, variant=first_variant), bench.device, peak)
    if row.status != "ok":
      trail.append(f"{batch:,} {row.status}")
      break
    trail.append(f"{batch:,} ok")
    best, best_peak = row, peak
    batch *= 2
  else:
    trail.append(f"cap {cap:,} reached")
  if best is None:
    best = Row(case, variant, start, status=trail[-1] if trail else "not run")
  else:
    best.note = "; ".join(trail) + f" ({best.note})"
  return recorder.add(best, bench.device, best_peak)


def _recipe_config(arg: str):
  from configs import dinov2_roberta
  return dinov2_roberta.get_config(arg)


def stored_freeze_align_case(deadline: Deadline, recorder: Recorder, smoke: bool) -> None:
  import jax
  import jax.numpy as jnp

  d, image_tokens, text_tokens = (32, 5, 4) if smoke else (1024, 325, 77)
  config = _recipe_config("micro=0" if smoke else "micro=64")
  m = config.model
  m.image_encoder = m.text_encoder = "features"
  m.encoder_micro_batch = 0
  m.embed_dim = d

  def make_batch(key, batch):
    ki, kt, kl = jax.random.split(key, 3)
    lengths = jax.random.randint(kl, (batch, 1), 1, text_tokens + 1)
    return {"image": {"tokens": jax.random.normal(ki, (batch, image_tokens, d), jnp.float16),
                      "mask": jnp.ones((batch, image_tokens), bool)},
            "text": {"tokens": jax.random.normal(kt, (batch, text_tokens, d), jnp.float16),
                     "mask": jnp.arange(text_tokens)[None, :] < lengths}}

  bench = StepBench(config, make_batch)
  start, cap = (8, 8) if smoke else (2048, 1 << 17)
  largest_batch(bench, "stored freeze-align", "largest batch", start, cap,
                lambda b: freeze_align_flops(b, image_tokens, text_tokens, d, d), deadline,
                recorder)


def stored_sail_case(deadline: Deadline, recorder: Recorder, smoke: bool) -> None:
  import jax
  import jax.numpy as jnp

  from align_jax.config import schema as config_lib

  widths, e = ((64, 32), 32) if smoke else ((2048, 1024), 1024)
  config = config_lib.default_config()
  m = config.model
  m.image_encoder = m.text_encoder = "features"
  m.image_projector = m.text_projector = "glu"
  m.embed_dim, m.glu_hidden_mult = e, 8
  config.loss.name = "sigmoid"

  def make_batch(key, batch):
    ki, kt = jax.random.split(key)
    return {"image": {"pooled": jax.random.normal(ki, (batch, widths[0]), jnp.float16)},
            "text": {"pooled": jax.random.normal(kt, (batch, widths[1]), jnp.float16)}}

  bench = StepBench(config, make_batch)
  first = 64 if smoke else 32_768
  largest_batch(bench, "stored SAIL GLU", "largest batch", first, first if smoke else 1 << 21,
                lambda b: glu_flops(b, widths, 8, e), deadline, recorder,
                first_variant="batch 32k")


def online_case(deadline: Deadline, recorder: Recorder, smoke: bool) -> None:
  import jax
  import jax.numpy as jnp
  import transformers

  from align_jax.testing import tiny_checkpoints as tiny

  root = tempfile.mkdtemp(prefix="align_jax_suite_")
  image_dir, text_dir = os.path.join(root, "dinov2"), os.path.join(root, "roberta")
  image_size = 28 if smoke else 256
  patch = 4 if smoke else 14
  tiny.make_tiny_dinov2(image_dir, image_size=image_size, patch_size=patch, save_format="flax")
  tiny.make_tiny_roberta(text_dir, save_format="flax")
  # DINOv2-L/14 (its config at 518 px, as on the hub) and RoBERTa-L; --smoke: one tiny layer.
  width, layers, heads, mlp = (32, 1, 4, 64) if smoke else (1024, 24, 16, 4096)
  image_cfg = transformers.Dinov2Config(
      hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
      mlp_ratio=mlp // width, patch_size=patch, image_size=image_size if smoke else 518,
      layerscale_value=1.0)
  text_cfg = transformers.RobertaConfig(
      vocab_size=300 if smoke else 50265, hidden_size=width, num_hidden_layers=layers,
      num_attention_heads=heads, intermediate_size=mlp,
      max_position_embeddings=66 if smoke else 514, type_vocab_size=1, pad_token_id=1,
      bos_token_id=0, eos_token_id=2)
  tiny.write_random_weights(image_dir, image_cfg, seed=0)  # the tiny ones' files, these sizes
  tiny.write_random_weights(text_dir, text_cfg, seed=1)
  text_len = 8 if smoke else 77
  config = _recipe_config("micro=0" if smoke else "micro=64")
  m = config.model
  m.image_encoder, m.text_encoder = image_dir, text_dir
  m.image_size, m.max_text_length = image_size, text_len
  if smoke:
    m.embed_dim = 16
  small_vocab = 250  # ids the tiny tokenizer knows (the model's table is larger)

  def make_batch(key, batch):
    kp, ki, kl = jax.random.split(key, 3)
    lengths = jax.random.randint(kl, (batch, 1), 2, text_len + 1)
    mask = jnp.arange(text_len)[None, :] < lengths
    ids = jnp.where(mask, jax.random.randint(ki, (batch, text_len), 3, small_vocab), 1)
    return {"image": {"pixel_values": jax.random.normal(kp, (batch, image_size, image_size, 3))},
            "text": {"input_ids": ids.astype(jnp.int32), "attention_mask": mask.astype(jnp.int32)}}

  try:
    bench = StepBench(config, make_batch)  # loads both encoders into memory
  finally:
    shutil.rmtree(root, ignore_errors=True)  # ~2.6 GB of random checkpoints at full size
  e = m.embed_dim
  image_tokens = 1 + (image_size // patch) ** 2

  def flops_of(batch):
    vision = encoder_flops(image_cfg.num_hidden_layers, image_cfg.hidden_size, mlp, image_tokens)
    vision += 2.0 * (image_tokens - 1) * 3 * patch**2 * image_cfg.hidden_size
    text = encoder_flops(text_cfg.num_hidden_layers, text_cfg.hidden_size,
                         text_cfg.intermediate_size, text_len)
    return batch * (vision + text) + freeze_align_flops(batch, image_tokens, text_len,
                                                        image_cfg.hidden_size, e)

  start, cap = (8, 8) if smoke else (4096, 1 << 16)
  largest_batch(bench, "online DINOv2-L + RoBERTa-L", "largest batch", start, cap, flops_of,
                deadline, recorder)


# --------------------------------------------------------------------------- driver


def run_case(name: str, seconds: float, smoke: bool, rows_path: str | None) -> list[Row]:
  deadline = Deadline(seconds)
  recorder = Recorder(rows_path)
  if name in LOSS_SIZES:
    batch = 256 if smoke else LOSS_SIZES[name]  # --smoke: one size, compiled once
    loss_case(name, batch, 16 if smoke else 1024, deadline, recorder)
  elif name == "stored freeze-align":
    stored_freeze_align_case(deadline, recorder, smoke)
  elif name == "stored SAIL GLU":
    stored_sail_case(deadline, recorder, smoke)
  elif name == "online DINOv2-L + RoBERTa-L":
    online_case(deadline, recorder, smoke)
  else:
    raise ValueError(f"unknown case {name!r}; cases: {sorted(CASES)}")
  return recorder.rows


def _read_rows(path: str) -> list[Row]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(Row(**json.loads(line)))
      except (json.JSONDecodeError, TypeError):  # a line cut short by the kill
        pass
  return rows


def run_isolated(name: str, seconds: float, smoke: bool) -> list[Row]:
  """The case in a child process with a hard timeout; its finished rows survive a kill."""
  with tempfile.TemporaryDirectory() as tmp:
    rows_path = os.path.join(tmp, "rows.jsonl")
    # The child plans to finish a few seconds early; the timeout is the hard limit.
    command = [sys.executable, os.path.abspath(__file__), "--case", name, "--rows", rows_path,
               "--budget-s", str(max(seconds - 5, 1))] + (["--smoke"] if smoke else [])
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the search may use most memory
    status = None
    try:
      done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds)
      if done.returncode:
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        status = f"crashed: {lines[-1] if lines else f'exit code {done.returncode}'}"[:200]
    except subprocess.TimeoutExpired:
      status = f"timed out after {seconds:.0f} s (case budget)"
    rows = _read_rows(rows_path)
  if status:
    have = {r.variant for r in rows}
    rows += [Row(name, v, status=status) for v in CASES[name][1] if v not in have]
  return rows


def _fmt(value, spec: str) -> str:
  return "—" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
  lines = ["| case | variant | batch | status | step s | samples/s | TFLOP/s | MFU | device peak "
           "GiB | XLA temp GiB | XLA args GiB | compile s | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    peak = _fmt(r.peak_gib, ".2f")
    if r.peak_gib is not None and not r.peak_grew:
      peak = f"<= {peak}"
    mfu = "—" if r.mfu is None else f"{100 * r.mfu:.1f}%"
    lines.append(
        f"| {r.case} | {r.variant} | {_fmt(r.batch, ',')} | {r.status} | {_fmt(r.step_s, '.4f')} "
        f"| {_fmt(r.samples_per_s, ',.0f')} | {_fmt(r.tflops, '.1f')} | {mfu} | {peak} | "
        f"{_fmt(r.xla_temp_gib, '.2f')} | {_fmt(r.xla_args_gib, '.2f')} | "
        f"{_fmt(r.compile_s, '.1f')} | {r.note} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, in one process")
  parser.add_argument("--isolate", action="store_true", help="with --smoke: a process per case")
  parser.add_argument("--out", default="", help="write the rows as JSON to this path")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="whole suite (or, with --case, this case) in seconds; default 470, "
                           "none with --smoke")
  parser.add_argument("--cases", default="", help="comma-separated subset of: " + ", ".join(CASES))
  parser.add_argument("--case", default="", help=argparse.SUPPRESS)  # child process: one case
  parser.add_argument("--rows", default="", help=argparse.SUPPRESS)  # child's JSON-lines rows
  args = parser.parse_args()
  if args.smoke:  # (before jax is imported) CPU, and cheap compiles: the shapes are tiny
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()
  if args.budget_s is None:
    args.budget_s = 1e9 if args.smoke else 470.0
  if args.case:
    run_case(args.case, args.budget_s, args.smoke, args.rows or None)
    return
  names = [c.strip() for c in args.cases.split(",") if c.strip()] or list(CASES)
  unknown = [c for c in names if c not in CASES]
  if unknown:
    sys.exit(f"error: unknown --cases {unknown}; choose from {list(CASES)}")
  scale = args.budget_s / sum(CASES[c][0] for c in names)
  start, rows = time.monotonic(), []
  in_process = args.smoke and not args.isolate
  for name in names:
    left = args.budget_s - (time.monotonic() - start)
    seconds = min(CASES[name][0] * min(scale, 1.0) if not args.smoke else left, left)
    if seconds < 5:
      rows += [Row(name, v, status="skipped: suite budget spent") for v in CASES[name][1]]
      continue
    rows += (run_case(name, seconds, args.smoke, None) if in_process
             else run_isolated(name, seconds, args.smoke))
    print(f"# {name}: done at {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
  kinds = [r.device for r in rows if r.device]
  kind = kinds[0] if kinds else "unknown device"  # the parent never starts the accelerator
  header = (f"`python benchmarks/accelerator_suite.py {' '.join(sys.argv[1:])}` — "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax "
            f"{importlib.metadata.version('jax')}, {kind}, "
            f"{time.monotonic() - start:.0f} s in all")
  print(header + "\n\n" + table(rows))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"header": header, "device_kind": kind,
                 "peak_bf16_flops": peak_flops(_Kind(kind)),
                 "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
  main()
