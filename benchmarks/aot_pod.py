"""Ahead-of-time compiles of the paper recipe for TPU pods, from encoder config files alone.

    PYTHONPATH=/path/to/libtpu-site python benchmarks/aot_pod.py --out aot_pod.jsonl
    python benchmarks/aot_pod.py --table aot_pod.jsonl      # the markdown table of a results file

For ``configs/dinov2_roberta.py`` (frozen DINOv2-L/14 at 256 px + RoBERTa-L at 77 tokens, token
projectors, encoder and projector micro-batches of 64 rows per device, bf16 encoders) at each
global batch and topology, compiles the real train step with
``align_jax.train.aot.compile_train_step`` and records XLA's per-device memory, the compile time and
analytic FLOPs. The encoder folders are written here: DINOv2-L's and RoBERTa-L's ``config.json``
(the published hub configs' shapes) and a small RoBERTa tokenizer (only the ids' shapes matter); no
weights exist, and none are needed.

Every row records the commit it was measured on (``commit``: the short hash, ``+dirty`` when
tracked files differ from it), printed and shown in the table, so a row older than the code is
visible as such.

Each (topology, batch) compiles in its own subprocess, one at a time, and its result is appended to
``--out`` as one JSON line as soon as it finishes, so a long run keeps what it has done and a
second run with the same ``--out`` skips what is already there. Compiling for TPU needs libtpu
(``pip install 'jax[tpu]==0.10.2'``, or ``pip install --target DIR libtpu==0.0.42.*`` and
``PYTHONPATH=DIR``); no TPU is needed.

FLOPs are counted from the model shapes, per sample (XLA's ``cost_analysis`` counts a micro-batch
loop's body once, so it undercounts a micro-batched step by the number of micro-batches): the
frozen encoders forward only (matmuls ``2 * tokens * (4 d^2 + 2 d ff)`` and attention
``4 * tokens^2 * d`` per layer, plus DINOv2's patch embedding), the projectors forward + backward
(3x their forward matmuls: model FLOPs; the rematerialised micro-batches execute one more forward,
not counted), and the softmax loss's logits (``2 B^2 E`` forward, ``4 B^2 E`` backward per step).
LayerNorms, GELUs and softmaxes are left out (<1 %).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TOPOLOGIES = ("v5e-64", "v5e-256", "v5p-128", "2xv5e-256")
BATCHES = (16384, 32768, 65536)
# Peak bf16 matmul rate and HBM per chip, by accelerator family (Cloud TPU documentation).
PEAK_FLOPS = {"v5e": 197e12, "v5litepod": 197e12, "v5p": 459e12, "v4": 275e12, "v6e": 918e12}
HBM_GIB = {"v5e": 16, "v5litepod": 16, "v5p": 95, "v4": 32, "v6e": 32}
PAPER_SAMPLES = 255e6  # ~15 epochs of the paper's 17M pairs
MFU = 0.4

# facebook/dinov2-large and sentence-transformers/all-roberta-large-v1 config.json shapes.
DINOV2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                    patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
                    qkv_bias=True, use_swiglu_ffn=False)
ROBERTA_LARGE = dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                     num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                     type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     layer_norm_eps=1e-5)


def source_commit(repo: str = REPO) -> str:
  """The short commit hash of ``repo``, with ``+dirty`` when tracked files differ from it.

  "unknown" outside a git checkout (e.g. an exported copy of the tree).
  """
  def git(*args):
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=60)
  head = git("rev-parse", "--short", "HEAD")
  if head.returncode:
    return "unknown"
  dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
  return head.stdout.strip() + ("+dirty" if dirty else "")


def write_config_folders(root: str) -> tuple[str, str]:
  """DINOv2-L and RoBERTa-L folders holding only config.json (+ tokenizer files for text)."""
  import transformers
  from align_jax.testing import tiny_checkpoints as tiny
  image, text = os.path.join(root, "dinov2-large"), os.path.join(root, "roberta-large")
  transformers.Dinov2Config(**DINOV2_LARGE).save_pretrained(image)
  tiny.save_roberta_tokenizer(text)
  transformers.RobertaConfig(**ROBERTA_LARGE).save_pretrained(text)
  return image, text


def recipe_config(batch: int, image: str, text: str):
  from configs import dinov2_roberta
  config = dinov2_roberta.get_config(f"batch={batch}")
  config.model.image_encoder, config.model.text_encoder = image, text
  return config


def _transformer_forward(layers: int, tokens: int, width: int, ff: int) -> float:
  """Matmul FLOPs of a transformer encoder's forward pass over one sequence."""
  return layers * (2 * tokens * (4 * width * width + 2 * width * ff) + 4 * tokens * tokens * width)


def analytic_flops(config, batch: int) -> dict:
  """FLOPs of one train step of the recipe, from the model shapes (see the module docstring)."""
  m = config.model
  e = m.embed_dim
  patch, d_i = DINOV2_LARGE["patch_size"], DINOV2_LARGE["hidden_size"]
  patches = (m.image_size // patch) ** 2
  t_i, t_t, d_t = patches + 1, m.max_text_length, ROBERTA_LARGE["hidden_size"]
  image_encoder = (2 * patches * patch * patch * 3 * d_i + _transformer_forward(
      DINOV2_LARGE["num_hidden_layers"], t_i, d_i, DINOV2_LARGE["mlp_ratio"] * d_i))
  text_encoder = _transformer_forward(ROBERTA_LARGE["num_hidden_layers"], t_t, d_t,
                                      ROBERTA_LARGE["intermediate_size"])
  # freeze-align token projector per token: linear d->E, mlp_in d->E, mlp_out E->E; text head 2 E^2
  image_projector = t_i * 2 * (2 * d_i * e + e * e)
  text_projector = t_t * 2 * (2 * d_t * e + e * e) + 2 * 2 * e * e
  per_sample = {"image_encoder": image_encoder, "text_encoder": text_encoder,
                "projectors_train": 3 * (image_projector + text_projector)}
  loss = 6 * batch * batch * e
  step = batch * sum(per_sample.values()) + loss
  return {**per_sample, "loss_per_step": loss, "step": step, "per_sample": step / batch}


def analytic_row(topology: str, batch: int, config=None) -> dict:
  """The entry's numbers that need no compile: chips, FLOPs, roofline step time and run time."""
  from align_jax.train import aot
  config = recipe_config(batch, "", "") if config is None else config
  spec = aot.tpu_topology(topology)
  family = re.sub(r"^\d+x", "", topology).split("-")[0]
  flops = analytic_flops(config, batch)
  peak_rate = PEAK_FLOPS[family] * spec.num_devices  # one jax device per chip (megacore on v5p)
  step_seconds = flops["step"] / peak_rate
  return {"topology": topology, "batch": batch, "num_devices": spec.num_devices,
          "num_slices": spec.num_slices, "hbm_gib": HBM_GIB[family],
          "analytic_flops_per_step": flops["step"], "analytic_flops": flops,
          "roofline_step_seconds": step_seconds, "roofline_samples_per_second": batch / step_seconds,
          "paper_hours_at_mfu": PAPER_SAMPLES * flops["per_sample"] / (MFU * peak_rate) / 3600}


def run_one(topology: str, batch: int, image: str, text: str) -> dict:
  """Compiles one entry in this process; the row for the results file."""
  from align_jax.train import aot
  aot.prepare_process(topology)
  config = recipe_config(batch, image, text)
  row = {**analytic_row(topology, batch, config), "commit": source_commit(),
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  start = time.perf_counter()
  try:
    report = aot.compile_train_step(config, topology, check_memory=False)
  except aot.DoesNotFitError as error:
    return {**row, "compile_seconds": time.perf_counter() - start, "fits": False,
            "error": str(error)}
  return {**row, "num_processes": report.num_processes, "device_kind": report.device_kind,
          "mesh": report.mesh_shape, "compile_seconds": report.compile_seconds,
          "argument_bytes": report.argument_bytes, "output_bytes": report.output_bytes,
          "temp_bytes": report.temp_bytes, "alias_bytes": report.alias_bytes,
          "peak_bytes": report.peak_bytes, "xla_peak_bytes": report.xla_peak_bytes,
          "hbm_bytes": report.hbm_bytes, "fits": report.fits, "xla_flops_per_device": report.flops}


def _gib(n) -> str:
  return "—" if n is None else f"{n / 2**30:.2f}"


def table(rows: list[dict], entries: list[tuple[str, int]] = ()) -> str:
  """The markdown table of the results rows, plus analytic-only rows for ``entries`` not compiled."""
  compiled = {(r["topology"], r["batch"]) for r in rows}
  rows = [{**analytic_row(r["topology"], r["batch"]), **r} for r in rows]
  rows += [analytic_row(t, b) for t, b in entries if (t, b) not in compiled]
  order = {t: i for i, t in enumerate(TOPOLOGIES)}
  rows = sorted(rows, key=lambda r: (order.get(r["topology"], len(order)), r["batch"]))
  lines = ["| topology | chips | global batch | rows/chip | compile s | args GiB | temp GiB | "
           "peak GiB | HBM GiB | fits | PFLOP/step (analytic) | XLA TFLOP/chip (1 loop body) | "
           "roofline step s | roofline samples/s | 255M samples at 40 % MFU | commit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    chips = r["num_devices"]
    head = f"| {r['topology']} | {chips} | {r['batch']:,} | {r['batch'] // chips} | "
    tail = (f"{r['analytic_flops_per_step'] / 1e15:.2f} | {{xla}} | "
            f"{r['roofline_step_seconds']:.3f} | {r['roofline_samples_per_second']:,.0f} | "
            f"{r['paper_hours_at_mfu']:.2f} h | {r.get('commit', '—')} |")
    if "compile_seconds" not in r:  # not compiled (yet)
      lines.append(head + f"not compiled | — | — | — | {r['hbm_gib']} | — | "
                   + tail.format(xla="—"))
    elif r.get("error"):
      lines.append(head + f"{r['compile_seconds']:.0f} | — | — | — | {r['hbm_gib']} | "
                   f"**no**: {r['error']} | " + tail.format(xla="—"))
    else:
      xla = r["xla_flops_per_device"]
      lines.append(head + f"{r['compile_seconds']:.0f} | {_gib(r['argument_bytes'])} | "
                   f"{_gib(r['temp_bytes'])} | {_gib(r['peak_bytes'])} | {r['hbm_gib']} | "
                   f"{'yes' if r['fits'] else '**no**'} | "
                   + tail.format(xla="—" if xla is None else f"{xla / 1e12:.1f}"))
  return "\n".join(lines)


def _read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _entries(args) -> list[tuple[str, int]]:
  if args.entries:
    return [(e.rsplit(":", 1)[0], int(e.rsplit(":", 1)[1])) for e in args.entries.split(",")]
  # every topology at the first batch first
  return [(t, int(b)) for b in args.batches.split(",") for t in args.topologies.split(",")]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="aot_pod.jsonl", help="results file (JSON lines)")
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
  parser.add_argument("--entries", default="",
                      help="TOPOLOGY:BATCH,... to compile, in this order (default: every batch "
                      "of --batches on every topology of --topologies, batch by batch)")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
  parser.add_argument("--table", metavar="RESULTS", help="print the table of a results file")
  parser.add_argument("--one", nargs=4, metavar=("TOPOLOGY", "BATCH", "IMAGE", "TEXT"),
                      help=argparse.SUPPRESS)  # one entry, in this process (the driver's child)
  args = parser.parse_args()
  if args.table:
    print(table(_read(args.table), _entries(args)))
    return
  if args.one:
    topology, batch, image, text = args.one
    print("RESULT " + json.dumps(run_one(topology, int(batch), image, text)), flush=True)
    return
  entries = _entries(args)
  print(f"measuring commit {source_commit()}", flush=True)
  done = {(r["topology"], r["batch"]) for r in _read(args.out)}
  with tempfile.TemporaryDirectory() as root:
    image, text = write_config_folders(root)
    for topology, batch in entries:
      if (topology, batch) in done:
        continue
      print(f"{time.strftime('%H:%M:%S')} compiling {topology} at batch {batch} ...", flush=True)
      try:
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", topology, str(batch), image,
             text], capture_output=True, text=True, timeout=args.timeout,
            env=dict(os.environ, XLA_FLAGS=""))
      except subprocess.TimeoutExpired:
        print(f"  timed out after {args.timeout:.0f} s", flush=True)
        continue
      found = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
      if result.returncode or not found:
        print(f"  failed (exit {result.returncode}): {result.stderr[-3000:]}", flush=True)
        continue
      row = json.loads(found[-1][len("RESULT "):])
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
      print(f"  {row.get('error') or 'compiled'} in {row['compile_seconds']:.0f} s; peak "
            f"{_gib(row.get('peak_bytes'))} GiB, temporaries {_gib(row.get('temp_bytes'))} GiB "
            f"(commit {row['commit']})", flush=True)
  print(table(_read(args.out), entries))


if __name__ == "__main__":
  main()
