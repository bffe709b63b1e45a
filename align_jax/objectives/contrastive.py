"""Contrastive losses over a global batch: softmax (CLIP / InfoNCE) and sigmoid (SigLIP).

Both losses take L2-normalised image and text embeddings ``[B, D]`` (pair ``i`` is ``img[i]``,
``txt[i]``) and compute logits in float32 whatever the input dtype.

Three ways to call them:
  * ``axis_name=None``: the arrays are the whole global batch (possibly globally sharded under
    ``jax.jit``); plain computation.
  * ``axis_name=<mesh axis or tuple of axes>``: called inside ``jax.shard_map``; the arrays are this
    device's rows. Each device computes only its rows of the similarity matrix and returns the
    global loss, identical on every device, with the same values and gradients as one device.
  * ``shard_loss(loss_fn, mesh, batch_axes, ...)`` wraps the second form in ``jax.shard_map``.

Two implementations (``impl``):
  * ``"gathered"``: all-gather the other tower and materialise this device's ``[B/n, B]`` logits
    (twice under ``shard_map``: one per direction). Memory O(B^2 / n).
  * ``"blockwise"``: never materialises the matrix. Square tiles of ``block_size`` rows are
    processed with an online log-sum-exp in both directions (softmax) or running sums (sigmoid).
    Softmax's backward pass recomputes the tiles (``jax.custom_vjp``) instead of storing them;
    the sigmoid loss is a plain sum over pairs, so its forward pass (under differentiation)
    accumulates the gradients tile by tile and the backward pass only scales them. Across
    devices, a ring (``lax.ppermute``) passes the other tower's rows, with their column
    statistics and gradient accumulators, block by block: each block goes on to the next device
    as soon as it has been used and the received one takes its slot, so a device holds its own
    share, one copy of the visiting share and one block in flight (no second copy to receive
    into). Memory O(B D / n + block_size^2).

``DEFAULT_IMPL`` is ``"blockwise"``: its memory grows with the rows a device holds, not with the
square of the global batch, so the batch sizes the recipes train at fit where the gathered logits
would not, at a step time no slower than gathered's. ``DEFAULT_BLOCK_SIZE`` = 1024 is the tile
the CPU measurements favoured, and accelerators favour the larger tile. The measurements are in
benchmarks/README.md, "Loss memory and speed" (``benchmarks/loss_memory.py``).

The gathered pieces the other objectives build on (:mod:`align_jax.objectives.multi_positive`,
:mod:`align_jax.objectives.cwcl`) are public here: :func:`similarities`, :func:`row_sharded`
and :func:`soft_target_softmax_loss`.
"""

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

IMPLS = ("gathered", "blockwise")
DEFAULT_IMPL = "blockwise"
DEFAULT_BLOCK_SIZE = 1024

AxisName = str | tuple[str, ...] | None
_NEG = -1e30  # finite "minus infinity": keeps exp/max free of inf - inf NaNs in masked tiles


# --------------------------------------------------------------------------- helpers


def _axes(axis_name: AxisName) -> tuple[str, ...] | None:
  if axis_name is None:
    return None
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _check(img: jax.Array, txt: jax.Array, impl: str, block_size: int | None) -> None:
  if impl not in IMPLS:
    raise ValueError(f"Unknown loss impl {impl!r}; valid names are {IMPLS}.")
  if img.ndim != 2 or img.shape != txt.shape:
    raise ValueError(
        f"img and txt must both be [batch, dim] with the same shape; got {img.shape} and "
        f"{txt.shape}. Pair i must be img[i], txt[i].")
  if block_size is not None and block_size < 1:
    raise ValueError(f"block_size must be a positive int or None (default); got {block_size}.")


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b.T`` accumulated and returned in float32 (bf16 operands stay bf16 for speed)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _psum(x: jax.Array, axes: tuple[str, ...] | None) -> jax.Array:
  return x if axes is None else lax.psum(x, axes)


def _vary(x: jax.Array, axes: tuple[str, ...] | None) -> jax.Array:
  """Marks a replicated value as device-varying before it enters a custom_vjp.

  The custom backward returns this device's partial gradient for the scalar; marking the input
  varying lets shard_map's own transpose (a psum) sum those partials across devices.
  """
  if axes is None:
    return x
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  varying = mat.varying if mat is not None else getattr(aval, "vma", frozenset())
  missing = tuple(a for a in axes if a not in varying)
  return lax.pcast(x, missing, to="varying") if missing else x


# --------------------------------------------------------------------------- gathered


def _softmax_gathered(img, txt, scale, axes):
  if axes is None:
    logits = _dot_t(img, txt) * scale  # [B, B], used in both directions
    row_lse = jax.nn.logsumexp(logits, axis=1)
    col_lse = jax.nn.logsumexp(logits, axis=0)
  else:
    all_img = lax.all_gather(img, axes, tiled=True)
    all_txt = lax.all_gather(txt, axes, tiled=True)
    row_lse = jax.nn.logsumexp(_dot_t(img, all_txt) * scale, axis=1)  # local img -> all txt
    col_lse = jax.nn.logsumexp(_dot_t(txt, all_img) * scale, axis=1)  # local txt -> all img
  pos = jnp.sum(img.astype(jnp.float32) * txt.astype(jnp.float32), axis=1) * scale
  return 0.5 * (jnp.sum(row_lse) + jnp.sum(col_lse)) - jnp.sum(pos)


def _sigmoid_gathered(img, txt, scale, bias, axes):
  all_txt = txt if axes is None else lax.all_gather(txt, axes, tiled=True)
  logits = _dot_t(img, all_txt) * scale + bias  # [b, B]
  offset = 0 if axes is None else lax.axis_index(axes) * img.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, logits.shape, 0) + offset
  cols = lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  labels = jnp.where(rows == cols, 1.0, -1.0)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


# --------------------------------------------------------------------------- blockwise
#
# Layout: a device's b rows are padded to nb * bs and reshaped to [nb, bs, D]; `valid` [nb, bs]
# marks real rows. Every device has the same b, so a visiting block shares the local mask.
# Tiles are (img sub-block i) x (visiting txt sub-block j); logits = scale * raw + bias.


def _blocked(x: jax.Array, bs: int) -> jax.Array:
  b, d = x.shape
  nb = -(-b // bs)
  return jnp.pad(x, ((0, nb * bs - b), (0, 0))).reshape(nb, bs, d)


def _valid(b: int, bs: int) -> jax.Array | None:
  nb = -(-b // bs)
  return None if nb * bs == b else (jnp.arange(nb * bs) < b).reshape(nb, bs)


def _mask(tile, valid, i_idx, j_idx, fill):
  if valid is None:
    return tile
  both = valid[i_idx][:, None] & valid[j_idx][None, :]
  return jnp.where(both, tile, fill)


def _ring(axes):
  """(send, size) for a ring over `axes`: device k sends to k + 1."""
  if axes is None:
    return None, 1
  n = lax.axis_size(axes)
  perm = [(k, (k + 1) % n) for k in range(n)]
  return (lambda tree: jax.tree.map(lambda x: lax.ppermute(x, axes, perm), tree)), n


def _at(tree, j):
  return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, j, keepdims=False), tree)


def _set_at(tree, piece, j):
  return jax.tree.map(lambda x, p: lax.dynamic_update_index_in_dim(x, p, j, 0), tree, piece)


def _ring_loop(block_step, carry, moving, axes, last_home):
  """Runs `block_step(carry, piece, j) -> (carry, piece)` on every block of every device's rows.

  `moving` is a tuple of pytrees whose arrays are blocked ([nb, ...]); `piece` holds their j-th
  blocks. The ring passes them on block by block: as soon as block j has been processed it is
  sent to the next device, and the block received from the previous device takes its slot (an
  in-place update). A device therefore holds one copy of the moving arrays plus one block in
  flight, where sending the arrays whole needs a second full copy to receive into (the scratch
  this saves: benchmarks/README.md, "Loss memory and speed"). Every row's and column's
  arithmetic runs in the same order as before (only the scalar sums visit the tiles in another
  order), so results agree to float rounding. After the last device's blocks only the
  `last_home` entries travel, one more hop, which brings them back to the device that owns them;
  they are returned.
  """
  send, n = _ring(axes)
  nb = jax.tree.leaves(moving)[0].shape[0]

  def sweep(state, keys):
    def body(j, state):
      carry, moving = state
      carry, piece = block_step(carry, _at(moving, j), j)
      if send is not None:
        piece = dict(zip(keys, send(tuple(piece[k] for k in keys))))
      moving = tuple(_set_at(m, piece[k], j) if k in keys else m for k, m in enumerate(moving))
      return carry, moving

    return lax.fori_loop(0, nb, body, state)

  state = (carry, moving)
  if n > 1:
    state = lax.fori_loop(0, n - 1, lambda _, st: sweep(st, tuple(range(len(moving)))), state)
  carry, moving = sweep(state, tuple(last_home))
  return carry, tuple(moving[k] for k in last_home)


def _softmax_block_fwd(img_b, txt_j, valid, j, scale, row_stats, col_stat):
  """Online log-sum-exp over the tiles (every local img block) x (visiting txt block j)."""

  def row_step(carry, i):
    (rm_all, rs_all), (cm, cs) = carry
    rm, rs = rm_all[i], rs_all[i]
    s = _mask(_dot_t(img_b[i], txt_j) * scale, valid, i, j, _NEG)
    rm_new = jnp.maximum(rm, s.max(axis=1))
    rs = rs * jnp.exp(rm - rm_new) + jnp.exp(s - rm_new[:, None]).sum(axis=1)
    cm_new = jnp.maximum(cm, s.max(axis=0))
    cs = cs * jnp.exp(cm - cm_new) + jnp.exp(s - cm_new[None, :]).sum(axis=0)
    return ((rm_all.at[i].set(rm_new), rs_all.at[i].set(rs)), (cm_new, cs)), None

  return lax.scan(row_step, (row_stats, col_stat), jnp.arange(img_b.shape[0]))[0]


def _sigmoid_block_fwd(img_b, txt_j, valid, j, scale, bias):
  """Sum of softplus(logits) over the valid tiles (local img) x (txt block j) (no gradients)."""

  def row_step(acc, i):
    sp = jax.nn.softplus(_dot_t(img_b[i], txt_j) * scale + bias)
    return acc + jnp.sum(_mask(sp, valid, i, j, 0.0)), None

  return lax.scan(row_step, jnp.zeros_like(scale), jnp.arange(img_b.shape[0]))[0]


def _block_grad(img_b, txt_j, valid, j, scale, bias, logit_fn, row_aux, col_aux_j, acc, d_txt_j):
  """Accumulates gradients (and a value) over the tiles (every local img block) x (txt block j).

  `logit_fn(logits, row_aux_i, col_aux_j) -> (d value / d logits, value or None)` for a
  tile. `acc` = (d_img [nb, bs, D], d_scale, d_bias, value); returns it updated and the visiting
  block's d_txt_j.
  """

  def row_step(carry, i):
    (d_img, d_scale, d_bias, value), d_txt_j = carry
    raw = _dot_t(img_b[i], txt_j)
    g, v = logit_fn(raw * scale + bias, _at(row_aux, i), col_aux_j)
    g = _mask(g, valid, i, j, 0.0)
    d_raw = g * scale
    d_img = d_img.at[i].add(d_raw @ txt_j.astype(jnp.float32))
    d_txt_j = d_txt_j + d_raw.T @ img_b[i].astype(jnp.float32)
    if v is not None:
      value = value + jnp.sum(_mask(v, valid, i, j, 0.0))
    return ((d_img, d_scale + jnp.sum(g * raw), d_bias + jnp.sum(g), value), d_txt_j), None

  return lax.scan(row_step, (acc, d_txt_j), jnp.arange(img_b.shape[0]))[0]


def _unblock(d_b: jax.Array, like: jax.Array) -> jax.Array:
  return d_b.reshape(-1, like.shape[1])[: like.shape[0]].astype(like.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _softmax_lse_sum(img, txt, scale, axes, bs):
  """Sum of this device's row log-sum-exps (img -> txt) and column ones (txt -> img)."""
  return _softmax_lse_sum_fwd(img, txt, scale, axes, bs)[0]


def _softmax_lse_sum_fwd(img, txt, scale, axes, bs):
  img_b, txt_b, valid = _blocked(img, bs), _blocked(txt, bs), _valid(img.shape[0], bs)
  init = jnp.full_like(img_b[..., 0], _NEG, jnp.float32), jnp.zeros_like(img_b[..., 0], jnp.float32)

  def block_step(row_stats, piece, j):
    txt_j, col_stat = piece
    row_stats, col_stat = _softmax_block_fwd(img_b, txt_j, valid, j, scale, row_stats, col_stat)
    return row_stats, (txt_j, col_stat)

  (rm, rs), ((cm, cs),) = _ring_loop(block_step, init, (txt_b, init), axes, last_home=(1,))
  row_lse, col_lse = rm + jnp.log(rs), cm + jnp.log(cs)
  keep = jnp.ones_like(row_lse, bool) if valid is None else valid
  total = jnp.sum(jnp.where(keep, row_lse, 0.0)) + jnp.sum(jnp.where(keep, col_lse, 0.0))
  return total, (img, txt, scale, row_lse, col_lse)


def _softmax_lse_sum_bwd(axes, bs, res, g):
  img, txt, scale, row_lse, col_lse = res
  img_b, txt_b, valid = _blocked(img, bs), _blocked(txt, bs), _valid(img.shape[0], bs)

  def logit_fn(logits, row_aux, col_aux):
    (lse_r, g_r), (lse_c, g_c) = row_aux, col_aux
    p_sum = g_r * jnp.exp(logits - lse_r[:, None]) + g_c * jnp.exp(logits - lse_c[None, :])
    return p_sum, None

  g_rows = jnp.broadcast_to(g, row_lse.shape)

  def block_step(acc, piece, j):
    txt_j, lse_c, g_c, d_txt_j = piece
    acc, d_txt_j = _block_grad(img_b, txt_j, valid, j, scale, 0.0, logit_fn,
                               (row_lse, g_rows), (lse_c, g_c), acc, d_txt_j)
    return acc, (txt_j, lse_c, g_c, d_txt_j)

  zero = jnp.zeros_like(scale)
  acc = (jnp.zeros_like(img_b, jnp.float32), zero, zero, zero)
  moving = (txt_b, col_lse, g_rows, jnp.zeros_like(txt_b, jnp.float32))
  (d_img, d_scale, *_), (d_txt,) = _ring_loop(block_step, acc, moving, axes, last_home=(3,))
  return _unblock(d_img, img), _unblock(d_txt, txt), d_scale


_softmax_lse_sum.defvjp(_softmax_lse_sum_fwd, _softmax_lse_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sigmoid_softplus_sum(img, txt, scale, bias, axes, bs):
  """Sum of softplus(logits) over this device's rows x all columns (the all-negative loss)."""
  img_b, txt_b, valid = _blocked(img, bs), _blocked(txt, bs), _valid(img.shape[0], bs)

  def block_step(acc, piece, j):
    (txt_j,) = piece
    return acc + _sigmoid_block_fwd(img_b, txt_j, valid, j, scale, bias), piece

  return _ring_loop(block_step, jnp.zeros_like(scale), (txt_b,), axes, last_home=())[0]


def _sigmoid_softplus_sum_fwd(img, txt, scale, bias, axes, bs):
  # The sum is linear in its per-pair terms, so d sum / d logits = sigmoid(logits) is known
  # tile by tile: the gradients are accumulated in the same pass (3 matmuls per tile, as in
  # the gathered form) and the backward pass only scales them by the cotangent.
  img_b, txt_b, valid = _blocked(img, bs), _blocked(txt, bs), _valid(img.shape[0], bs)

  def logit_fn(logits, row_aux, col_aux):
    del row_aux, col_aux
    e = jnp.exp(-jnp.abs(logits))  # one exp for both softplus and sigmoid
    sig = jnp.where(logits >= 0, 1.0, e) / (1.0 + e)
    return sig, jnp.maximum(logits, 0.0) + jnp.log1p(e)

  def block_step(acc, piece, j):
    txt_j, d_txt_j = piece
    acc, d_txt_j = _block_grad(img_b, txt_j, valid, j, scale, bias, logit_fn, (), (), acc,
                               d_txt_j)
    return acc, (txt_j, d_txt_j)

  zero = jnp.zeros_like(scale)
  acc = (jnp.zeros_like(img_b, jnp.float32), zero, zero, zero)
  moving = (txt_b, jnp.zeros_like(txt_b, jnp.float32))
  (d_img, d_scale, d_bias, total), (d_txt,) = _ring_loop(block_step, acc, moving, axes,
                                                         last_home=(1,))
  # Kept in float32 until scaled; the empty arrays carry the embeddings' dtypes to the backward.
  d_img = d_img.reshape(-1, img.shape[1])[: img.shape[0]]
  d_txt = d_txt.reshape(-1, txt.shape[1])[: txt.shape[0]]
  dtypes = (jnp.zeros((0,), img.dtype), jnp.zeros((0,), txt.dtype))
  return total, (d_img, d_txt, d_scale, d_bias, dtypes)


def _sigmoid_softplus_sum_bwd(axes, bs, res, g):
  del axes, bs
  d_img, d_txt, d_scale, d_bias, (img_dtype, txt_dtype) = res
  return ((g * d_img).astype(img_dtype.dtype), (g * d_txt).astype(txt_dtype.dtype),
          g * d_scale, g * d_bias)


_sigmoid_softplus_sum.defvjp(_sigmoid_softplus_sum_fwd, _sigmoid_softplus_sum_bwd)


# --------------------------------------------------------------------------- public API


def _global_batch(b: int, axes: tuple[str, ...] | None) -> int:
  return b if axes is None else b * lax.axis_size(axes)


def softmax_loss(img: jax.Array, txt: jax.Array, temperature: Any, *, axis_name: AxisName = None,
                 impl: str = DEFAULT_IMPL, block_size: int | None = None) -> jax.Array:
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

  Args:
    img: L2-normalised image embeddings [B, D] (this device's rows when `axis_name` is given).
    txt: L2-normalised text embeddings [B, D]; txt[i] is the positive of img[i].
    temperature: scalar; logits are img @ txt.T / temperature, in float32.
    axis_name: None for a whole-batch call, or the mesh axis name(s) the batch is sharded over
      when called inside `jax.shard_map` (see `shard_loss`).
    impl: one of `IMPLS`.
    block_size: tile rows for "blockwise" (default `DEFAULT_BLOCK_SIZE`); ignored by "gathered".

  Returns:
    The scalar global loss (identical on every device under `shard_map`).
  """
  _check(img, txt, impl, block_size)
  axes = _axes(axis_name)
  scale = 1.0 / _f32(temperature)
  if impl == "gathered":
    partial = _softmax_gathered(img, txt, scale, axes)
  else:
    bs = min(block_size or DEFAULT_BLOCK_SIZE, img.shape[0])
    pos = jnp.sum(img.astype(jnp.float32) * txt.astype(jnp.float32)) * scale
    partial = 0.5 * _softmax_lse_sum(img, txt, _vary(scale, axes), axes, bs) - pos
  return _psum(partial, axes) / _global_batch(img.shape[0], axes)


def sigmoid_loss(img: jax.Array, txt: jax.Array, scale: Any, bias: Any, *,
                 axis_name: AxisName = None, impl: str = DEFAULT_IMPL,
                 block_size: int | None = None) -> jax.Array:
  """SigLIP: -sum log_sigmoid(label * (scale * img @ txt.T + bias)) / B, label +1 on the diagonal.

  Args:
    img: L2-normalised image embeddings [B, D] (this device's rows when `axis_name` is given).
    txt: L2-normalised text embeddings [B, D]; txt[i] is the positive of img[i].
    scale: scalar logit scale (SigLIP learns log scale; pass exp of it).
    bias: scalar logit bias.
    axis_name: None, or the mesh axis name(s) the batch is sharded over inside `jax.shard_map`.
    impl: one of `IMPLS`.
    block_size: tile rows for "blockwise" (default `DEFAULT_BLOCK_SIZE`); ignored by "gathered".

  Returns:
    The scalar global loss (identical on every device under `shard_map`).
  """
  _check(img, txt, impl, block_size)
  axes = _axes(axis_name)
  scale, bias = _f32(scale), _f32(bias)
  if impl == "gathered":
    partial = _sigmoid_gathered(img, txt, scale, bias, axes)
  else:
    # -log_sigmoid(l) = softplus(l) - l on the diagonal, softplus(l) elsewhere.
    bs = min(block_size or DEFAULT_BLOCK_SIZE, img.shape[0])
    raw_pos = jnp.sum(img.astype(jnp.float32) * txt.astype(jnp.float32))
    pos = scale * raw_pos + bias * img.shape[0]
    sp = _sigmoid_softplus_sum(img, txt, _vary(scale, axes), _vary(bias, axes), axes, bs)
    partial = sp - pos
  return _psum(partial, axes) / _global_batch(img.shape[0], axes)


def shard_loss(loss_fn: Callable[..., jax.Array], mesh: Mesh,
               batch_axes: Sequence[str] | str = ("data",), **loss_kwargs) -> Callable:
  """Runs `loss_fn` under `jax.shard_map` with the batch sharded over `batch_axes`.

  Returns f(img, txt, *scalars) -> scalar loss. img/txt get spec P(batch_axes), the scalars
  (temperature, or scale and bias) are replicated, and `loss_fn` receives
  `axis_name=batch_axes` plus `loss_kwargs` (e.g. impl, block_size). Differentiable with
  `jax.grad` under `jax.jit`.
  """
  axes = _axes(batch_axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"batch_axes {unknown} are not axes of the mesh {mesh.axis_names}; "
                     "pass batch_axes naming the mesh axes the batch is sharded over.")
  if "axis_name" in loss_kwargs:
    raise ValueError("shard_loss sets axis_name itself from batch_axes; do not pass it.")
  n_dev = 1
  for a in axes:
    n_dev *= mesh.shape[a]

  def per_device(img, txt, *scalars):
    return loss_fn(img, txt, *scalars, axis_name=axes, **loss_kwargs)

  def sharded(img, txt, *scalars):
    if img.shape[0] % n_dev:
      raise ValueError(f"Global batch {img.shape[0]} is not divisible by the {n_dev} devices "
                       f"of batch_axes {axes}; use a batch size that is a multiple of {n_dev}.")
    scalars = tuple(_f32(s) for s in scalars)
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(axes), P(axes)) + (P(),) * len(scalars),
                       out_specs=P())
    return fn(img, txt, *scalars)

  return sharded


# --------------------------------------------------------------------------- soft targets, gathered
#
# The losses with several positives per image or soft targets
# (align_jax.objectives.multi_positive, align_jax.objectives.cwcl) are written on the global
# (sharded) arrays inside the jitted step: XLA all-gathers the other tower and the logits are
# constrained to be row-sharded, the "gathered" form above without shard_map.


def similarities(img: jax.Array, txt: jax.Array) -> jax.Array:
  """``img @ txt.T`` in float32: [B, M] cosine similarities of unit rows [B, D] and [M, D]."""
  return img.astype(jnp.float32) @ txt.astype(jnp.float32).T


def row_sharded(x: jax.Array, mesh: Mesh | None, batch_axes: Sequence[str]) -> jax.Array:
  """``x`` constrained to rows sharded over ``batch_axes`` of ``mesh`` (as is without a mesh)."""
  if mesh is None:
    return x
  spec = P(tuple(batch_axes), *([None] * (x.ndim - 1)))
  return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def soft_target_softmax_loss(logits: jax.Array, targets_i2t: jax.Array,
                             targets_t2i: jax.Array) -> jax.Array:
  """Softmax cross-entropy against target distributions, both directions, averaged.

      ½ [ mean_i CE(targets_i2t[i], softmax(logits[i, :]))
          + mean_j CE(targets_t2i[j], softmax(logits[:, j])) ]

  ``logits`` [B, M]; ``targets_i2t`` [B, M] and ``targets_t2i`` [M, B], rows summing to one. With
  one-hot targets on the diagonal it is :func:`softmax_loss` (gathered).
  """
  i2t = -jnp.sum(targets_i2t * jax.nn.log_softmax(logits, axis=1), axis=1)
  t2i = -jnp.sum(targets_t2i * jax.nn.log_softmax(logits.T, axis=1), axis=1)
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))
