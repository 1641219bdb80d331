"""JAX wrappers of the native kernels: an FFI call primitive inside `jax.custom_vjp`.

Every op works on ONE view. Under `jax.vmap` the batch is folded into a single
launch (the batching rule moves every batch axis to the front; the kernels
treat all leading axes as views). The calls are lowered as batch-partitionable
custom calls (XLA's `num_batch_dims` attribute and a Shardy rule sharing the
leading axes), so under a sharded `jit` each device runs its own views and no
collectives are inserted around them.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

from kaojax.render import tiles
from kaojax.render.tiles import TileGrid

log = logging.getLogger("kaojax.render")

# JAX's Shardy (sdy) MLIR bindings and private helpers move between releases (the
# supported range is jax>=0.10.2,<0.12). Nothing here is imported from jax._src at
# module import time; each lookup tries the public spelling first and falls back,
# so an API move degrades one feature (the sharding rule) instead of the import.
try:
  from jaxlib.mlir.dialects import sdy as _sdy_dialect   # the bindings jax itself uses
except ImportError:  # pragma: no cover - every supported jaxlib has them
  _sdy_dialect = None


def _use_shardy() -> bool:
  """Whether jit partitions with Shardy (the default since JAX 0.7)."""
  try:
    return bool(jax.config.jax_use_shardy_partitioner)
  except AttributeError:
    pass
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    return bool(jax_config.use_shardy_partitioner.value)
  except (ImportError, AttributeError):
    return True


def _shaped_array():
  """jax.core.ShapedArray, wherever this JAX keeps it."""
  found = getattr(jax.core, "ShapedArray", None)
  if found is None:  # pragma: no cover - moved in a later JAX
    from jax._src.core import ShapedArray as found  # pylint: disable=g-import-not-at-top
  return found


_ShapedArray = _shaped_array()

# One primitive for every kernel: `target` names the FFI handler, `outputs`
# the per-view result (shape, dtype) pairs, `view_rank` the per-view rank of
# the first operand (its extra leading axes are views), `attrs` the kernel's
# integer attributes.
ffi_call_p = jex_core.Primitive("kaojax_native_call")
ffi_call_p.multiple_results = True


def _abstract_eval(*args, target, outputs, view_rank, attrs):
  batch = args[0].shape[:args[0].ndim - view_rank]
  return [_ShapedArray(batch + shape, dtype) for shape, dtype in outputs]


def _batch_rule(args, dims, **params):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  front = [jnp.broadcast_to(a, (size,) + a.shape) if d is None
           else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
  return ffi_call_p.bind(*front, **params), [0] * len(params["outputs"])


def _sharding_rule_sdy(operand_types, result_types, num_batch):
  """`_sharding_rule`'s rule built with the sdy dialect's bindings: factors 0..num_batch-1
  are the shared leading axes, then one factor per remaining axis of each value."""
  sizes = list(mlir.ir.RankedTensorType(operand_types[0]).shape[:num_batch])
  mappings = []
  for t in list(operand_types) + list(result_types):
    shape = mlir.ir.RankedTensorType(t).shape
    dims = [[i] for i in range(num_batch)]
    for d in shape[num_batch:]:
      dims.append([len(sizes)])
      sizes.append(d)
    mappings.append(_sdy_dialect.TensorMappingAttr.get(
        dim_mappings=[_sdy_dialect.DimMappingAttr.get(factor_indices=f) for f in dims]))
  n = len(operand_types)
  return _sdy_dialect.OpShardingRuleAttr.get(
      factor_sizes=sizes, operand_mappings=mappings[:n], result_mappings=mappings[n:],
      is_custom=True)


def _sharding_rule_jax(operand_types, result_types, num_batch):
  """The same rule through JAX's private einsum-like rule parser (fallback)."""
  from jax._src import custom_partitioning_sharding_rule as sdy  # pylint: disable=g-import-not-at-top
  letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
  def spec(t):
    rank = mlir.ir.RankedTensorType(t).rank
    return " ".join(["..."] + [next(letters) for _ in range(rank - num_batch)])
  rule = sdy.str_to_sdy_sharding_rule(", ".join(spec(t) for t in operand_types) + " -> "
                                      + ", ".join(spec(t) for t in result_types))
  return sdy.sdy_sharding_rule_to_mlir(rule, list(operand_types), list(result_types))


_RULE_BUILDERS = (_sharding_rule_sdy, _sharding_rule_jax)
_warned_no_rule = []


def _sharding_rule(ctx, num_batch):
  """Shardy rule: every operand and result shares the leading `num_batch` axes;
  the per-view axes are independent factors. None (with one warning) where no
  builder works on this JAX: the call is then lowered without a rule, which stays
  correct but lets a sharded jit gather the views around it."""
  operand_types = [mlir.aval_to_ir_type(ctx.module_context, a) for a in ctx.avals_in]
  result_types = [mlir.aval_to_ir_type(ctx.module_context, a) for a in ctx.avals_out]
  errors = []
  for build in _RULE_BUILDERS:
    try:
      return build(operand_types, result_types, num_batch)
    except Exception as e:  # pylint: disable=broad-except  (an API moved: try the next)
      errors.append(f"{build.__name__}: {type(e).__name__}: {e}")
  if not _warned_no_rule:
    _warned_no_rule.append(True)
    log.warning("kaojax.render.native: no Shardy sharding rule could be built on jax %s "
                "(%s); native calls are lowered without one (correct, but a sharded jit "
                "may gather the views)", jax.__version__, "; ".join(errors))
  return None


def _lowering(ctx, *args, target, outputs, view_rank, attrs):
  num_batch = ctx.avals_in[0].ndim - view_rank
  extra = None
  if num_batch:
    extra = {"mhlo.frontend_attributes": mlir.ir_attribute({"num_batch_dims": str(num_batch)})}
    sharding_rule = _sharding_rule(ctx, num_batch) if _use_shardy() else None
    if sharding_rule is not None:
      extra["sdy.sharding_rule"] = sharding_rule
  lower = jax.ffi.ffi_lowering(target, extra_attributes=extra)
  return lower(ctx, *args, **{name: np.int32(value) for name, value in attrs})


ffi_call_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[ffi_call_p] = _batch_rule
mlir.register_lowering(ffi_call_p, _lowering)


def _call(target, outputs, grid: TileGrid, *args):
  """One view's kernel call; outputs: ((shape, dtype), ...) per view."""
  attrs = (("width", grid.width), ("height", grid.height), ("tile_size", grid.tile_size))
  outputs = tuple((tuple(int(d) for d in shape), np.dtype(dtype)) for shape, dtype in outputs)
  return ffi_call_p.bind(*args, target=target, outputs=outputs, view_rank=args[0].ndim,
                         attrs=attrs)

# The primitive layout of each compositing kernel (kaojax.render.tiles).
KINDS = {"surfel": tiles.SURFEL_LAYOUT, "gaussian": tiles.GAUSSIAN_LAYOUT}


def _forward(kind, grid, prims, keys, rects):
  num_p, num_f = KINDS[kind].params, KINDS[kind].features
  if prims.shape[-1] != num_p:
    raise ValueError(f"kaojax.render.native: {kind} primitives must be [..., N, {num_p}], "
                     f"got {prims.shape}")
  h, w = grid.height, grid.width
  out = (((h, w, num_f), jnp.float32), ((h, w), jnp.float32), ((grid.num_tiles,), jnp.int32),
         ((h, w), jnp.int32))
  return _call(f"kaojax_{kind}_forward", out, grid, prims, keys, rects)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def composite(kind: str, grid: TileGrid, prims, keys, rects):
  """Bin (sort-based, no per-tile cap), depth-sort and composite projected
  primitives for one view.

  prims: [N, P] float32 (layout of `kind`, see csrc/raster_math.h)
  keys:  [N] float32 depth sort keys (no gradient); rects: [N, 4] int32 tile
  rectangle (x0, y0, x1, y1), upper corner exclusive, empty for culled primitives.
  Returns feats [H, W, F] = sum_i w_i f_i, transmittance [H, W] and counts
  [num_tiles] (primitives covering each tile, all of them composited).
  """
  feats, trans, counts, _ = _forward(kind, grid, prims, keys, rects)
  return feats, trans, counts


def _composite_fwd(kind, grid, prims, keys, rects):
  feats, trans, counts, last = _forward(kind, grid, prims, keys, rects)
  return (feats, trans, counts), (prims, keys, rects, last, trans)


def _composite_bwd(kind, grid, res, cotangents):
  prims, keys, rects, last, trans = res
  grad_feats, grad_trans, _ = cotangents
  out = ((prims.shape, jnp.float32),)
  (grad_prims,) = _call(f"kaojax_{kind}_backward", out, grid, prims, keys, rects, last, trans,
                        grad_feats.astype(jnp.float32), grad_trans.astype(jnp.float32))
  return grad_prims, None, None


composite.defvjp(_composite_fwd, _composite_bwd)


def mesh_visibility(grid: TileGrid, tris, keys, rects):
  """Nearest face per pixel for one view (no gradient).

  tris: [F, 9] (x, y, camera z) of the three corners; keys [F]; rects [F, 4].
  Returns face_id [H, W] int32 (-1 = background) and counts [num_tiles].
  """
  out = (((grid.height, grid.width), jnp.int32), ((grid.num_tiles,), jnp.int32))
  return _call("kaojax_mesh_visibility", out, grid, jax.lax.stop_gradient(tris),
               jax.lax.stop_gradient(keys), rects)
