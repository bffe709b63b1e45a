"""A persistent XLA compilation cache (``config.compilation_cache_dir``), local or ``gs://``.

A restarted run (after a preemption, or a resumed job) compiles the same train step again; with
the cache on, JAX stores each compiled executable under a key of the program, the devices and
the compiler flags, and the restart loads it instead of compiling (``jax_compilation_cache_dir``;
JAX writes through its own file system layer, so a ``gs://`` bucket shared by every host works).
Programs that compile in under ``min_compile_seconds`` are not stored (JAX's default, 1 s), so
the small helper programs do not fill the cache.
"""

from __future__ import annotations

import jax


def enable(path: str, min_compile_seconds: float = 1.0) -> bool:
  """Turns the cache on at ``path`` (no-op for ""); returns whether it is on.

  Call it before the first compile. ``path`` is a folder (created by JAX) or a ``gs://`` URL.
  """
  if not path:
    return False
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return True
