"""The persistent compilation cache: a restarted process loads the compiled program (a cache hit,
counted by JAX's monitoring events) instead of compiling it, and compiles faster."""

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json, sys, time
import jax, jax.numpy as jnp
from align_jax.train import compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
assert compilation_cache.enable(sys.argv[1], min_compile_seconds=0.0)

def step(w, x):  # a deep unrolled program: compiling it takes a while
  for i in range(15):
    x = jnp.tanh(x @ w + i) * jnp.cos(x)
  return jax.grad(lambda w: jnp.sum(jnp.sin(x @ w)))(w)

w = jnp.ones((64, 64)); x = jnp.ones((8, 64))
start = time.perf_counter()
compiled = jax.jit(step).lower(w, x).compile()
seconds = time.perf_counter() - start
compiled(w, x).block_until_ready()
print(json.dumps({"hits": len(hits), "seconds": seconds}))
"""


def _run(cache: str) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SCRIPT, cache], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_restart_loads_the_compiled_program_from_the_cache(tmp_path):
  cache = str(tmp_path / "xla_cache")
  first = _run(cache)
  assert first["hits"] == 0 and os.listdir(cache)  # compiled, then stored
  second = _run(cache)  # "the restart"
  assert second["hits"] >= 1
  assert second["seconds"] < first["seconds"]
  print(f"compile before {first['seconds']:.2f} s, after restart {second['seconds']:.2f} s")


def test_empty_path_leaves_the_cache_off():
  import jax
  from align_jax.train import compilation_cache
  before = jax.config.jax_compilation_cache_dir
  assert compilation_cache.enable("") is False
  assert jax.config.jax_compilation_cache_dir == before
