"""Where SAIL's GLU step spends its time on CPU: one GLU projector's gradient, JAX vs PyTorch.

The image head of ``benchmarks/train_step_vs_torch.py``'s GLU step alone (batch 4,096, 2,048 ->
8 x 2,048 -> 1,024, float32, gradient of a sum of squares w.r.t. every parameter), three ways:
``jax folded`` (align_jax's ``GLUProjector``: LayerNorm's scale and shift folded into the two
Dense layers, so no backward matmul to the LayerNorm output), ``jax plain LN`` (the textbook form
in JAX) and ``torch`` (eager, ``nn.LayerNorm`` + three ``nn.Linear``). Alternated, median CPU
seconds of 3 after one warm-up call each; also one forward matmul of the largest shape, to
separate the matmul library from the gradient's transposed matmuls.

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

from align_jax import projectors  # noqa: E402

B, D, E, MULT = 4096, 2048, 1024, 8


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
      "jax folded (align_jax GLUProjector), grad": lambda: jax.block_until_ready(folded(params, jx)),
      "jax plain LN, grad": lambda: jax.block_until_ready(plain(plain_params, jx)),
      "torch, grad": torch_grad,
      f"jax matmul [{B}, {D}] @ [{D}, {MULT * D}]": lambda: jax.block_until_ready(matmul(jx, jw)),
      f"torch matmul [{B}, {D}] @ [{D}, {MULT * D}]": lambda: tx @ tw,
  }
  times = {name: [] for name in variants}
  for name, fn in variants.items():  # warm-up (compilation)
    fn()
  for _ in range(3):
    for name, fn in variants.items():
      start = time.process_time()
      fn()
      times[name].append(time.process_time() - start)
  print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.1f}")
  print("| variant | median CPU-s |\n|---|---|")
  for name, values in times.items():
    print(f"| {name} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
  main()
