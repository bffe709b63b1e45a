"""Encoder-pair selection and data curation on frozen features.

* :mod:`align_jax.analysis.cka` — representation similarity: :func:`linear_cka` (sharded over a
  mesh), :func:`rbf_cka`, the unbiased :func:`minibatch_cka` / :class:`MinibatchCKA` for
  features streamed in batches, and :func:`mutual_knn` (mutual k-nearest-neighbour alignment).
* :mod:`align_jax.analysis.curation` — concept-balanced curation (running top-K per concept,
  quota filling); :mod:`align_jax.analysis.select` and :mod:`align_jax.analysis.curation_files` do what
  the commands ``python -m align_jax.cli.select`` / ``... .curate`` run.
"""

from align_jax.analysis.cka import MinibatchCKA, linear_cka, minibatch_cka, mutual_knn, rbf_cka
# (curation.curate is not re-exported: `align_jax.analysis.curation_files` runs it over files)
from align_jax.analysis.curation import RunningTopK, select_balanced

__all__ = ["MinibatchCKA", "RunningTopK", "linear_cka", "minibatch_cka", "mutual_knn",
           "rbf_cka", "select_balanced"]
