"""Where SAIL's GLU step spends its time on CPU: one GLU projector's gradient, JAX vs PyTorch.

The image head of ``benchmarks/train_step_vs_torch.py``'s GLU step alone (batch 4,096, 2,048 ->
8 x 2,048 -> 1,024, float32, gradient of a sum of squares w.r.t. every parameter), four ways:
``GLUProjector`` (align_jax's: LayerNorm's scale and shift folded into the two Dense layers, so
no backward matmul to the LayerNorm output, and ``ops.matmul`` for every product), the same
folded form with plain ``@`` (autodiff's kernel gradients), ``plain LN`` (the textbook form in
JAX) and ``torch`` (eager, ``nn.LayerNorm`` + three ``nn.Linear``); also one forward matmul of
the largest shape, to separate the matmul library from the gradient's transposed matmuls.

A second table times the kernel gradient's product ``x^T @ g`` (x [K, M], g [K, N]) in XLA:CPU
as autodiff writes it and with ``x^T`` copied first (what ``ops.matmul`` does on CPU when
N >= ``ops.CPU_TRANSPOSE_COPY_MIN_COLUMNS``), over shapes of the GLU and freeze-align steps.
Alternated, median CPU seconds of 3 after one warm-up call each.

Run: python benchmarks/glu_projector_grad.py   (needs torch; results in benchmarks/README.md)
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from align_jax.model import ops, projectors  # noqa: E402

B, D, E, MULT = 4096, 2048, 1024, 8
# (K, M, N) of x^T @ g: GLU gate/value and out kernels, narrower and taller ones (tokens x width)
TRANSPOSED_SHAPES = ((4096, 2048, 16384), (4096, 16384, 1024), (4096, 1024, 2048),
                     (16384, 1024, 4096), (17408, 1024, 1024), (32768, 1024, 1024))


def median_cpu_seconds(variants: dict, rounds: int = 3) -> dict:
  """Median CPU seconds per variant, called in turn each round after one warm-up call each."""
  for fn in variants.values():  # warm-up (compilation)
    fn()
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, fn in variants.items():
      start = time.process_time()
      fn()
      times[name].append(time.process_time() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def transposed_matmul_table() -> None:
  rng = np.random.default_rng(1)
  autodiff = jax.jit(lambda x, g: x.T @ g)
  copied = jax.jit(lambda x, g: jax.lax.optimization_barrier(x.T) @ g)
  print(f"| x^T @ g, (K, M, N) | autodiff CPU-s | x^T copied CPU-s | copied / autodiff | "
        f"ops.matmul copies (N >= {ops.CPU_TRANSPOSE_COPY_MIN_COLUMNS}) |\n|---|---|---|---|---|")
  for k, m, n in TRANSPOSED_SHAPES:
    x = jnp.asarray(rng.random((k, m), dtype=np.float32))
    g = jnp.asarray(rng.random((k, n), dtype=np.float32))
    t = median_cpu_seconds({"autodiff": lambda: jax.block_until_ready(autodiff(x, g)),
                            "copied": lambda: jax.block_until_ready(copied(x, g))})
    copies = "yes" if n >= ops.CPU_TRANSPOSE_COPY_MIN_COLUMNS else "no"
    print(f"| ({k}, {m}, {n}) | {t['autodiff']:.3f} | {t['copied']:.3f} | "
          f"{t['copied'] / t['autodiff']:.2f}x | {copies} |", flush=True)


def main() -> None:
  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  x = rng.random((B, D), dtype=np.float32)
  jx, tx = jnp.asarray(x), torch.from_numpy(x)

  head = projectors.GLUProjector(E, MULT)
  params = head.init(jax.random.key(0), {"pooled": jx[:2]})
  folded = jax.jit(jax.grad(lambda p, x: jnp.sum(head.apply(p, {"pooled": x}) ** 2)))

  def plain_loss(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    n = (x - mean) / jnp.sqrt(var + 1e-6) * p["g"] + p["b"]
    return jnp.sum(((jax.nn.relu6(n @ p["w1"]) * (n @ p["w2"])) @ p["w3"]) ** 2)
  small = lambda *shape: jnp.asarray(0.01 * rng.standard_normal(shape, dtype=np.float32))
  plain_params = {"g": jnp.ones(D), "b": jnp.zeros(D), "w1": small(D, MULT * D),
                  "w2": small(D, MULT * D), "w3": small(MULT * D, E)}
  plain = jax.jit(jax.grad(plain_loss))

  def folded_autodiff_loss(p, x):  # GLUProjector's folded form, written with @
    mean = x.mean(-1, keepdims=True)
    n = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    a = n @ (p["g"][:, None] * p["w1"]) + p["b"] @ p["w1"]
    b = n @ (p["g"][:, None] * p["w2"]) + p["b"] @ p["w2"]
    return jnp.sum(((jax.nn.relu6(a) * b) @ p["w3"]) ** 2)
  folded_autodiff = jax.jit(jax.grad(folded_autodiff_loss))

  norm, lin1, lin2 = torch.nn.LayerNorm(D, eps=1e-6), torch.nn.Linear(D, MULT * D), torch.nn.Linear(
      D, MULT * D)
  lin3 = torch.nn.Linear(MULT * D, E)

  def torch_grad():
    n = norm(tx)
    (lin3(torch.nn.functional.relu6(lin1(n)) * lin2(n)) ** 2).sum().backward()

  w = rng.random((D, MULT * D), dtype=np.float32)
  jw, tw = jnp.asarray(w), torch.from_numpy(w)
  matmul = jax.jit(lambda a, b: a @ b)
  variants = {
      "jax GLUProjector (folded, ops.matmul), grad":
          lambda: jax.block_until_ready(folded(params, jx)),
      "jax folded, autodiff @, grad":
          lambda: jax.block_until_ready(folded_autodiff(plain_params, jx)),
      "jax plain LN, grad": lambda: jax.block_until_ready(plain(plain_params, jx)),
      "torch, grad": torch_grad,
      f"jax matmul [{B}, {D}] @ [{D}, {MULT * D}]": lambda: jax.block_until_ready(matmul(jx, jw)),
      f"torch matmul [{B}, {D}] @ [{D}, {MULT * D}]": lambda: tx @ tw,
  }
  times = median_cpu_seconds(variants)
  print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.1f}")
  print("| variant | median CPU-s | vs torch grad |\n|---|---|---|")
  for name, value in times.items():
    ratio = f"{times['torch, grad'] / value:.2f}x" if name.endswith("grad") else "—"
    print(f"| {name} | {value:.2f} | {ratio} |")
  print(flush=True)
  transposed_matmul_table()


if __name__ == "__main__":
  main()
