"""STRUCTURE: keeps each unimodal space's neighbourhood geometry (``loss.structure_weight``).

Gröger et al., "With Limited Data for Multimodal Alignment, Let the STRUCTURE Guide You",
NeurIPS 2025, Sec. 3; ``loss.structure_weight`` = 0 is off, ``loss.structure_levels`` the
hierarchy levels, ``loss.structure_temperature`` the similarity temperature. The objective
(:mod:`align_jax.objectives.objective`) adds it on top of whichever contrastive loss the run uses.

Written on the global (sharded) arrays inside the jitted step: the ``[B, B]`` similarity
matrices and their matrix powers are formed whole (replicated on every device), O(B^2) memory
per device, which suits the batch sizes the regulariser is used with (its paper's are of order
10^3). The values and gradients equal one device's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax.model import ops

_EPS = 1e-12


def _structure_matrix(x: jnp.ndarray, temperature: float) -> jnp.ndarray:
  """softmax_rows(X̂ X̂ᵀ / τ) with X̂ the L2-normalised rows, mean-centred over the batch."""
  x = ops.l2_normalize(x)
  x = x - jnp.mean(x, axis=0, keepdims=True)
  return jax.nn.softmax(x @ x.T / temperature, axis=1)


def _js_rows(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
  """Mean over rows of the Jensen-Shannon divergence between row distributions p_i and q_i."""
  m = 0.5 * (p + q)
  kl_pm = jnp.sum(p * (jnp.log(p + _EPS) - jnp.log(m + _EPS)), axis=1)
  kl_qm = jnp.sum(q * (jnp.log(q + _EPS) - jnp.log(m + _EPS)), axis=1)
  return jnp.mean(0.5 * (kl_pm + kl_qm))


def structure_regularizer(frozen: jnp.ndarray, projected: jnp.ndarray, levels: int = 1,
                          temperature: float = 0.07) -> jnp.ndarray:
  """STRUCTURE (Gröger et al. 2025, Sec. 3) for one modality: frozen X [B, d], projected Z [B, D].

      X̂ = normalise(X) − mean_rows(normalise(X)),   P = softmax_rows(X̂ X̂ᵀ / τ)   (same for Z → Q)
      R(X, Z) = (1/L) Σ_{l=1..L} (1/B) Σ_i JS(P^l_i ‖ Q^l_i)
      JS(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = ½ (p + q)

  P^l is the l-th matrix power of the row-stochastic P: the l-step random-walk neighbourhoods,
  the paper's hierarchy levels (levels weighted equally; logs take +1e-12 as the authors' code).
  The training objective adds ``weight · ½ (R(x, z_image) + R(y, z_text))``; X is fixed (frozen
  features), gradients flow through Z only.
  """
  p_base = jax.lax.stop_gradient(_structure_matrix(frozen, temperature))
  q_base = _structure_matrix(projected, temperature)
  p, q, total = p_base, q_base, 0.0
  for level in range(1, levels + 1):
    if level > 1:
      p, q = p @ p_base, q @ q_base
    total = total + _js_rows(p, q)
  return total / levels
