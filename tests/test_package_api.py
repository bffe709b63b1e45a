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
  from align_jax.analysis import curation_files as curate, select
  assert isinstance(curate, types.ModuleType) and isinstance(select, types.ModuleType)


def test_data_exports_resolve_to_their_modules():
  import align_jax.data as data
  from align_jax.data import array_sources as features, manifest, order, records
  assert data.ArrayPairSource is features.ArrayPairSource
  assert data.read_manifest_rows is manifest.read_rows and data.EpochOrder is order.EpochOrder
  assert data.SkipCounter is records.SkipCounter
  for name in data.__all__:
    assert callable(getattr(data, name)), name
  import pytest
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    data.nope  # pylint: disable=pointless-statement


def test_subpackages_export_their_public_api():
  from align_jax import encoders, evaluate
  from align_jax.encoders import image, text
  from align_jax.evaluate import metrics
  assert encoders.ImageEncoder is image.ImageEncoder and encoders.TextEncoder is text.TextEncoder
  assert evaluate.retrieval_recall is metrics.retrieval_recall
  for package in (encoders, evaluate):
    for name in package.__all__:
      getattr(package, name)
