"""The public API of each subpackage is importable from the subpackage itself."""

import numpy as np


def test_analysis_exports_the_similarity_measures():
  from align_jax import analysis
  from align_jax.analysis import cka
  x = np.random.default_rng(0).normal(size=(64, 8))
  y = x @ np.random.default_rng(1).normal(size=(8, 5))
  assert analysis.linear_cka is cka.linear_cka and analysis.rbf_cka is cka.rbf_cka
  assert analysis.mutual_knn is cka.mutual_knn and analysis.minibatch_cka is cka.minibatch_cka
  # Known answers: CKA of a representation with itself is 1, and is invariant to scaling.
  np.testing.assert_allclose(float(analysis.linear_cka(x, 3.0 * x)), 1.0, atol=1e-6)
  assert 0.0 < float(analysis.linear_cka(x, y)) < 1.0
  assert float(analysis.mutual_knn(x, x, k=5)) == 1.0


def test_analysis_submodules_are_not_shadowed_by_exports():
  import types
  from align_jax.analysis import curate, select
  assert isinstance(curate, types.ModuleType) and isinstance(select, types.ModuleType)
