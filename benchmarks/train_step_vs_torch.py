"""Train-step speed on stored features: align_jax's jitted step vs an eager PyTorch peer.

Two steps, each the whole update (projectors forward + backward, loss, gradient clipping at norm
1.0, AdamW with weight decay on matrices only, warm-up + cosine schedule, clamped logit params,
grad-norm and param-norm metrics), on random stored features in float32:

  * ``freeze_align``: the freeze-align token projectors (configs/dinov2_roberta.py with
    ``features`` encoders: d = 1024, dropout 0.1, softmax loss with learnable temperature) on 17
    image tokens (CLS + 16 patches) and 16 text tokens (random lengths 4-16) of width 1,024.
  * ``glu``: SAIL's GLU heads (LayerNorm, two Linear(D -> 8D) branches, relu6(a) * b,
    Linear(8D -> 1024)) on pooled features (2,048 image / 1,024 text) with the sigmoid loss.

JAX runs the real step: ``align_jax.train.loop.make_train_step`` and ``step_builder.init_state`` on
a config, jitted with shardings and the state donated as ``build_trainer`` does, on one CPU device.
PyTorch runs the same model and optimiser eagerly (``torch.optim.AdamW``, ``clip_grad_norm_``); its
token projector is written as the paper's module is (every branch on every token), and a second
PyTorch variant applies the same pooling trick as align_jax (``lin`` and ``fc2`` once per example),
so the table separates the algorithm from the framework. Before timing, the initial JAX params are
copied into PyTorch and the two losses compared with dropout off (same model).

Every variant runs one step per round, in turn (JAX, PyTorch, JAX, ...), so load from other
processes hits them alike; after ``--warmup`` rounds (compilation), the median of ``--steps``
rounds is reported as examples/s. The JAX variants differ only in ``model.dropout_rng_impl``.

Run: python benchmarks/train_step_vs_torch.py [--case freeze_align|glu|both] [--steps 5]
Needs torch (CPU). Results are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from align_jax.objectives import kinds as loss_kinds  # noqa: E402
from align_jax.model import two_tower as model_lib
from align_jax.train import loop as train, optim, step as step_builder
from align_jax.parallel import mesh as sharding
from configs import dinov2_roberta  # noqa: E402

LN_EPS = 1e-6  # flax.linen.LayerNorm's default


# ----------------------------------------------------------------------------- configs and data

def freeze_align_config(batch: int, rng_impl: str, projector_micro_batch: int = 0):
  """The recipe config (configs/dinov2_roberta.py) on stored token features."""
  config = dinov2_roberta.get_config(f"batch={batch},micro={projector_micro_batch}")
  config.model.image_encoder = "features"
  config.model.text_encoder = "features"
  config.model.encoder_micro_batch = 0
  config.model.dropout_rng_impl = rng_impl
  config.evals = {}
  return config


def glu_config(batch: int, rng_impl: str):
  """SAIL's heads: GLU projectors on pooled features, sigmoid loss, embed 1024, AdamW defaults."""
  config = dinov2_roberta.get_config(f"batch={batch},micro=0,loss=sigmoid")
  m = config.model
  m.image_encoder = m.text_encoder = "features"
  m.image_pooling = "cls+mean_patch"
  m.text_pooling = "mean"
  m.encoder_micro_batch = m.projector_micro_batch = 0
  m.image_projector = m.text_projector = "glu"
  m.glu_hidden_mult = 8
  m.embed_dim = 1024
  m.dropout_rng_impl = rng_impl
  config.loss.scale_init = 20.0  # SAIL
  config.evals = {}
  return config


def freeze_align_batch(batch: int, width: int = 1024, image_tokens: int = 17,
                       text_tokens: int = 16, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, text_tokens + 1, size=batch)
  return {"image": {"tokens": rng.normal(size=(batch, image_tokens, width)).astype(np.float32),
                    "mask": np.ones((batch, image_tokens), bool)},
          "text": {"tokens": rng.normal(size=(batch, text_tokens, width)).astype(np.float32),
                   "mask": np.arange(text_tokens)[None] < lengths[:, None]}}


def glu_batch(batch: int, image_width: int = 2048, text_width: int = 1024, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": {"pooled": rng.normal(size=(batch, image_width)).astype(np.float32)},
          "text": {"pooled": rng.normal(size=(batch, text_width)).astype(np.float32)}}


# ----------------------------------------------------------------------------- JAX

class JaxStep:
  """align_jax's train step for ``config`` on one device, jitted and donated as build_trainer does."""

  def __init__(self, config, host_batch: dict):
    self.config = config
    mesh = sharding.make_mesh(("data",), (1,), jax.devices()[:1])
    model = model_lib.build_model(config, mesh)
    tx = optim.make_optimizer(config)
    batch_sharding = sharding.batch_sharding(mesh, tuple(config.mesh.batch_axes))
    frozen = jax.device_put(model.frozen_params(), sharding.replicated(mesh))
    self.batch = sharding.host_to_global(host_batch, batch_sharding)
    self.state, state_shardings = step_builder.init_state(model, tx, config, mesh, frozen,
                                                          self.batch)
    self.frozen = frozen
    self.model = model
    self.step_fn = jax.jit(
        train.make_train_step(model, tx, config, mesh),
        in_shardings=(state_shardings, None, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  def initial_params(self) -> dict:
    return jax.tree.map(np.asarray, self.state.params)

  def loss_without_dropout(self) -> float:
    model = self.model
    kind = loss_kinds.get(self.config.loss)
    loss_fn = kind.sharded_loss(model.mesh, self.config.mesh.batch_axes)
    image, text = model.encode(self.frozen, self.batch)
    z_image, z_text = model.project(self.state.params, image, text, train=False)
    return float(loss_fn(z_image, z_text, kind.loss_args(self.state.params["logit"])))

  def __call__(self) -> float:
    self.state, metrics = self.step_fn(self.state, self.frozen, self.batch)
    return float(metrics["train/loss"])  # waits for the step


# ----------------------------------------------------------------------------- PyTorch

def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  w = mask.to(x.dtype).unsqueeze(-1)
  return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def _gelu(x):
  return F.gelu(x, approximate="tanh")  # flax.linen.gelu's default


class TorchTokenProjector(torch.nn.Module):
  """LN -> Dropout -> Linear(d) + Linear(GELU(Linear(d))), every token (the paper's module)."""

  def __init__(self, dim: int, embed: int, dropout: float):
    super().__init__()
    self.norm = torch.nn.LayerNorm(dim, eps=LN_EPS)
    self.drop = torch.nn.Dropout(dropout)
    self.linear = torch.nn.Linear(dim, embed)
    self.mlp_in = torch.nn.Linear(dim, embed)
    self.mlp_out = torch.nn.Linear(embed, embed)

  def forward(self, x):
    d = self.drop(self.norm(x))
    return self.linear(d) + self.mlp_out(_gelu(self.mlp_in(d)))

  def pooled(self, x, mask):
    """masked_mean(forward(x)), with linear and mlp_out once per example (align_jax's form)."""
    d = self.drop(self.norm(x))
    h = _gelu(self.mlp_in(d))
    out = self.linear(_masked_mean(d, mask)) + self.mlp_out(_masked_mean(h, mask))
    return out * mask.any(-1, keepdim=True).to(out.dtype)


class TorchGlobalHead(torch.nn.Module):
  def __init__(self, embed: int, dropout: float):
    super().__init__()
    self.proj = torch.nn.Linear(embed, embed)
    self.mlp = torch.nn.Linear(embed, embed)
    self.drop = torch.nn.Dropout(dropout)
    self.norm = torch.nn.LayerNorm(embed, eps=LN_EPS)

  def forward(self, x):
    p = self.proj(x)
    return self.norm(p + self.drop(self.mlp(_gelu(p))))


class TorchFreezeAlign(torch.nn.Module):
  """Image: cls(CLS) + mean over patches of patch(patch); text: masked mean of token(tok) -> head."""

  def __init__(self, dim: int, embed: int, dropout: float, pooled: bool):
    super().__init__()
    self.cls = TorchTokenProjector(dim, embed, dropout)
    self.patch = TorchTokenProjector(dim, embed, dropout)
    self.token = TorchTokenProjector(dim, embed, dropout)
    self.head = TorchGlobalHead(embed, dropout)
    self.use_pooled = pooled

  def forward(self, batch):
    image, text = batch["image"], batch["text"]
    x, mask = image["tokens"], image["mask"]
    if self.use_pooled:
      patches = self.patch.pooled(x[:, 1:], mask[:, 1:])
      tokens = self.token.pooled(text["tokens"], text["mask"])
    else:
      patches = _masked_mean(self.patch(x[:, 1:]), mask[:, 1:])
      tokens = _masked_mean(self.token(text["tokens"]), text["mask"])
    return self.cls(x[:, 0]) + patches, self.head(tokens)


class TorchGLU(torch.nn.Module):
  def __init__(self, dim: int, embed: int, mult: int):
    super().__init__()
    self.norm = torch.nn.LayerNorm(dim, eps=LN_EPS)
    self.gate = torch.nn.Linear(dim, mult * dim)
    self.value = torch.nn.Linear(dim, mult * dim)
    self.out = torch.nn.Linear(mult * dim, embed)

  def forward(self, x):
    x = self.norm(x)
    return self.out(F.relu6(self.gate(x)) * self.value(x))


class TorchGLUHeads(torch.nn.Module):
  def __init__(self, image_dim: int, text_dim: int, embed: int, mult: int):
    super().__init__()
    self.image = TorchGLU(image_dim, embed, mult)
    self.text = TorchGLU(text_dim, embed, mult)

  def forward(self, batch):
    return self.image(batch["image"]["pooled"]), self.text(batch["text"]["pooled"])


class TorchStep:
  """The same update in eager PyTorch: towers, loss, clip_grad_norm_, AdamW, schedule, clamping."""

  def __init__(self, config, towers: torch.nn.Module, host_batch: dict):
    self.config = config
    self.towers = towers
    loss = config.loss
    self.softmax = loss.name == "softmax"
    if self.softmax:
      self.log_t = torch.nn.Parameter(torch.tensor(math.log(loss.temperature_init)))
      logit = [self.log_t]
    else:
      self.log_s = torch.nn.Parameter(torch.tensor(math.log(loss.scale_init)))
      self.bias = torch.nn.Parameter(torch.tensor(loss.bias_init))
      logit = [self.log_s, self.bias]
    decay = [p for p in towers.parameters() if p.ndim >= 2]
    no_decay = [p for p in towers.parameters() if p.ndim < 2] + logit
    opt = config.optim
    self.params = decay + no_decay
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps, foreach=True)
    schedule = optim.learning_rate_schedule(config)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, lambda step: float(schedule(step)) / opt.learning_rate)
    self.batch = jax.tree.map(torch.from_numpy, host_batch)

  def load_jax_params(self, params: dict) -> None:
    """Copies align_jax's params (Dense kernels are [in, out], torch weights [out, in])."""
    def load(module: torch.nn.Module, tree: dict):
      for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
          child.weight.data = torch.from_numpy(np.ascontiguousarray(tree[name]["kernel"].T))
          child.bias.data = torch.from_numpy(np.array(tree[name]["bias"]))
        elif isinstance(child, torch.nn.LayerNorm):
          child.weight.data = torch.from_numpy(np.array(tree[name]["scale"]))
          child.bias.data = torch.from_numpy(np.array(tree[name]["bias"]))
        elif isinstance(child, torch.nn.Dropout):
          continue
        else:
          load(child, tree[name] if name in tree else tree)
    for tower in ("image", "text"):
      tree = params[tower]
      module = getattr(self.towers, tower, None)
      if module is None:  # freeze-align: cls/patch for images, token/head for text
        for name in tree:
          load(getattr(self.towers, name), tree[name])
      else:
        load(module, tree)

  def loss(self) -> torch.Tensor:
    z_image, z_text = self.towers(self.batch)
    z_image = F.normalize(z_image, dim=-1, eps=1e-6)
    z_text = F.normalize(z_text, dim=-1, eps=1e-6)
    if self.softmax:
      logits = z_image @ z_text.T / self.log_t.exp()
      labels = torch.arange(logits.shape[0])
      return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    logits = z_image @ z_text.T * self.log_s.exp() + self.bias
    signs = 2 * torch.eye(logits.shape[0]) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]

  def loss_without_dropout(self) -> float:
    self.towers.eval()
    with torch.no_grad():
      value = float(self.loss())
    self.towers.train()
    return value

  def __call__(self) -> float:
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip_norm)
    self.optimizer.step()
    self.scheduler.step()
    with torch.no_grad():
      cfg = self.config.loss
      if self.softmax:
        self.log_t.clamp_(math.log(cfg.temperature_min), math.log(cfg.temperature_max))
      else:
        self.log_s.clamp_(max=math.log(cfg.scale_max))
      param_norm = torch.sqrt(sum((p * p).sum() for p in self.params))
    del grad_norm, param_norm  # computed, as the JAX step's metrics are
    return float(loss.detach())


# ----------------------------------------------------------------------------- timing

def time_round_robin(variants: dict, warmup: int, steps: int) -> dict[str, tuple[float, float]]:
  """(median wall seconds, median process CPU seconds) per step of each variant, in turn per round.

  CPU seconds (all threads of this process, ``time.process_time``) are the work a step took,
  less sensitive than wall time to other processes taking the cores.
  """
  times = {name: [] for name in variants}
  for round_ in range(warmup + steps):
    for name, step in variants.items():
      start, cpu = time.perf_counter(), time.process_time()
      loss = step()
      elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
      if not math.isfinite(loss):
        raise FloatingPointError(f"{name}: non-finite loss at round {round_}")
      if round_ >= warmup:
        times[name].append((elapsed, cpu))
    label = "warm-up" if round_ < warmup else "timed"
    print(f"  round {round_ + 1}/{warmup + steps} ({label}): " + ", ".join(
        f"{n} {t[-1][0]:.2f}s ({t[-1][1]:.2f} cpu-s)" for n, t in times.items() if t)
        + f"; load {os.getloadavg()[0]:.1f}", flush=True)
  return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
          for name, t in times.items()}


def time_dropout_masks(shape: tuple, impls: list[str], rounds: int = 7) -> dict:
  """(median wall s, median CPU-s) of one jitted Flax-style dropout mask of ``shape`` per impl."""
  import flax.linen as nn
  x = jnp.ones(shape)
  fns = {}
  for impl in impls:
    key = model_lib.dropout_key(jax.random.PRNGKey(0), impl)
    fn = jax.jit(lambda k, v: nn.Dropout(0.1).apply({}, v, deterministic=False,
                                                   rngs={"dropout": k}))
    fns[impl] = (fn, key)
    jax.block_until_ready(fn(key, x))
  times = {impl: [] for impl in impls}
  for round_ in range(rounds):
    for impl, (fn, key) in fns.items():
      key = jax.random.fold_in(key, round_)
      start, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(key, x))
      times[impl].append((time.perf_counter() - start, time.process_time() - cpu))
  return {impl: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
          for impl, t in times.items()}


def run_case(case: str, batch: int, impls: list[str], steps: int, warmup: int,
             micro_batches: list[int]) -> list[tuple]:
  if case == "freeze_align":
    host = freeze_align_batch(batch)
    configs = {f"jax {impl}" + (f" micro {m}" if m else ""): freeze_align_config(batch, impl, m)
               for m in micro_batches for impl in impls}
    torch_towers = {
        "torch per-token (paper)": lambda c: TorchFreezeAlign(1024, 1024, c.model.dropout, False),
        "torch pooled (same trick)": lambda c: TorchFreezeAlign(1024, 1024, c.model.dropout,
                                                                True)}
  else:
    host = glu_batch(batch)
    configs = {f"jax {impl}": glu_config(batch, impl) for impl in impls[:1]}
    torch_towers = {"torch": lambda c: TorchGLUHeads(2048, 1024, 1024, c.model.glu_hidden_mult)}

  variants = {name: JaxStep(config, host) for name, config in configs.items()}
  reference_config = next(iter(configs.values()))
  first_jax = next(iter(variants.values()))
  params = first_jax.initial_params()
  jax_loss = first_jax.loss_without_dropout()
  for name, make in torch_towers.items():
    peer = TorchStep(reference_config, make(reference_config), host)
    peer.load_jax_params(params)
    torch_loss = peer.loss_without_dropout()
    print(f"{case}: initial loss without dropout: jax {jax_loss:.6f}, {name} {torch_loss:.6f} "
          f"(diff {abs(jax_loss - torch_loss):.2e})", flush=True)
    variants[name] = peer
  medians = time_round_robin(variants, warmup, steps)
  wall0, cpu0 = medians[next(iter(torch_towers))]
  return [(case, batch, name, wall, batch / wall, wall0 / wall, cpu, cpu0 / cpu)
          for name, (wall, cpu) in medians.items()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", choices=("freeze_align", "glu", "both"), default="both")
  parser.add_argument("--batch", type=int, default=1024, help="freeze-align global batch")
  parser.add_argument("--glu-batch", type=int, default=4096, help="GLU global batch")
  parser.add_argument("--rng-impls", default="rbg,threefry2x32,unsafe_rbg",
                      help="model.dropout_rng_impl values to time (the first is the default)")
  parser.add_argument("--projector-micro", default="0",
                      help="model.projector_micro_batch values for the freeze-align JAX step")
  parser.add_argument("--steps", type=int, default=5, help="timed rounds (median)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (compilation)")
  args = parser.parse_args()

  impls = args.rng_impls.split(",")
  micro = [int(m) for m in args.projector_micro.split(",")]
  start = time.time()
  print(f"`python benchmarks/train_step_vs_torch.py {' '.join(sys.argv[1:])}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, jax {jax.__version__} "
        f"({jax.devices()[0].platform}, 1 device), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} host cores, "
        f"{platform.processor() or platform.machine()}; load average "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
  rows = []
  cases = ["freeze_align", "glu"] if args.case == "both" else [args.case]
  for case in cases:
    batch = args.batch if case == "freeze_align" else args.glu_batch
    rows += run_case(case, batch, impls, args.steps, args.warmup, micro)
  masks = None
  if "freeze_align" in cases:  # the dropout masks of one freeze-align step: every token feature
    shape = (args.batch, 33, 1024)
    masks = time_dropout_masks(shape, impls)
  print()
  print("| step | batch | variant | median s/step | examples/s | vs first torch row "
        "| median CPU-s/step | vs first torch row (CPU-s) |")
  print("|---|---|---|---|---|---|---|---|")
  for case, batch, name, wall, rate, ratio, cpu, cpu_ratio in rows:
    print(f"| {case} | {batch:,} | {name} | {wall:.2f} | {rate:,.0f} | **{ratio:.2f}x** "
          f"| {cpu:.2f} | {cpu_ratio:.2f}x |")
  if masks:
    print(f"\nDropout mask alone (flax.linen.Dropout(0.1) on [{args.batch:,}, 33, 1,024], "
          "jitted, median of 7 alternated calls):\n")
    print("| model.dropout_rng_impl | median s | median CPU-s |")
    print("|---|---|---|")
    for impl, (wall, cpu) in masks.items():
      print(f"| {impl} | {wall:.3f} | {cpu:.3f} |")
  print(f"\nload average at the end {' / '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
