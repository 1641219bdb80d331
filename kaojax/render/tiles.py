"""Screen-tile binning by one sort (no per-tile cap), and front-to-back alpha
compositing over each tile's depth-sorted range.

Shared by the surfel (2DGS) and 3D Gaussian renderers (and, for the binning,
by the mesh rasterizer). Everything here works on ONE view; the renderers vmap
over views.

Binning (gsplat's scheme): every primitive owns a rectangle of tiles
[tile_min, tile_max) (exclusive upper corner, in tile units) and expands into one
intersection per tile of it; the intersections are sorted once by (tile, depth)
(ties by primitive index) and every tile reads its contiguous range of the sorted
list. XLA needs static shapes, so the intersections live in a static `Budget`:
`intersections` slots for the list and `per_tile` slots for the longest range. The
renderers take the budget from `plan_budget`: counted exactly in a cheap first pass
(`tile_counts`, a 2D difference array: O(N + tiles)) and rounded up to a power of
two, so that recompiles are rare; inside a trace, where nothing can be counted, the
worst case (every primitive on every tile). Nothing is ever dropped silently: an
intersection that does not fit is counted in `overflow` and the renderers raise.

Compositing follows gsplat's forward pass: alpha below 1/255 (or a negative
exponent) is skipped, and a pixel stops at the first primitive that would push
its transmittance to <= 1e-4 (that primitive is not composited).
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

ALPHA_THRESHOLD = 1.0 / 255.0
TRANSMITTANCE_THRESHOLD = 1e-4


@dataclasses.dataclass(frozen=True)
class PrimitiveLayout:
  """How a compositing kernel sees one projected primitive: `params` numbers per
  primitive and `features` composited per pixel (the native kernels' layouts are
  written out in render/native/csrc/raster_math.h)."""
  params: int
  features: int


# 2DGS surfel: means2d (2), ray transform (9), opacity, rgb (3), normal (3);
# features (r, g, b, depth, nx, ny, nz).
SURFEL_LAYOUT = PrimitiveLayout(params=18, features=7)
# 3D Gaussian: means2d (2), conic (3), opacity, rgb (3), depth; features (r, g, b, depth).
GAUSSIAN_LAYOUT = PrimitiveLayout(params=10, features=4)


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """Static tiling of a width x height image into tile_size^2 tiles."""
  width: int
  height: int
  tile_size: int = 16

  def __post_init__(self):
    for name in ("width", "height", "tile_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"kaojax/render/tiles.py: {name} must be a positive int, got {value!r}")

  @property
  def tiles_x(self) -> int:
    return math.ceil(self.width / self.tile_size)

  @property
  def tiles_y(self) -> int:
    return math.ceil(self.height / self.tile_size)

  @property
  def num_tiles(self) -> int:
    return self.tiles_x * self.tiles_y

  @property
  def pixels_per_tile(self) -> int:
    return self.tile_size * self.tile_size

  def pixel_centres(self) -> jax.Array:
    """[num_tiles, pixels_per_tile, 2] pixel-centre coordinates (x + 0.5, y + 0.5),
    tiles row-major, pixels row-major inside a tile."""
    ts = self.tile_size
    ty, tx, py, px = jnp.meshgrid(jnp.arange(self.tiles_y), jnp.arange(self.tiles_x),
                                  jnp.arange(ts), jnp.arange(ts), indexing="ij")
    x = (tx * ts + px).astype(jnp.float32) + 0.5
    y = (ty * ts + py).astype(jnp.float32) + 0.5
    return jnp.stack([x, y], -1).reshape(self.num_tiles, ts * ts, 2)

  def untile(self, values: jax.Array) -> jax.Array:
    """[num_tiles, pixels_per_tile, ...] -> image [height, width, ...]."""
    ts = self.tile_size
    rest = values.shape[2:]
    v = values.reshape((self.tiles_y, self.tiles_x, ts, ts) + rest)
    v = jnp.moveaxis(v, 2, 1).reshape((self.tiles_y * ts, self.tiles_x * ts) + rest)
    return v[:self.height, :self.width]


def gaussian_tile_rect(grid: TileGrid, means2d, radii):
  """gsplat's tile rectangle of a splat. means2d [N, 2], radii [N, 2] (integer
  valued floats, 0 = culled) -> tile_min [N, 2] int32, tile_max [N, 2] int32
  (exclusive), active [N] bool."""
  t_means = means2d / grid.tile_size
  t_radii = radii / grid.tile_size
  limit = jnp.array([grid.tiles_x, grid.tiles_y])
  tile_min = jnp.clip(jnp.floor(t_means - t_radii).astype(jnp.int32), 0, limit)
  tile_max = jnp.clip(jnp.ceil(t_means + t_radii).astype(jnp.int32), 0, limit)
  active = jnp.all(radii > 0, axis=-1)
  return tile_min, tile_max, active


def tile_rects(tile_min, tile_max, active):
  """[N, 4] int32 (x0, y0, x1, y1) rectangles for the native kernels; inactive
  primitives get an empty one."""
  rect = jnp.concatenate([tile_min, tile_max], -1).astype(jnp.int32)
  return jnp.where(active[:, None], rect, 0)


@dataclasses.dataclass(frozen=True)
class Budget:
  """Static sizes of the binning of one view: `intersections` slots for the list
  of (tile, primitive) pairs and `per_tile` slots for one tile's range."""
  intersections: int
  per_tile: int


def bucket(count: int, smallest: int = 64) -> int:
  """The power of two >= max(count, smallest)."""
  return 1 << max(int(count) - 1, int(smallest) - 1, 0).bit_length()


def worst_case_budget(grid: TileGrid, num: int) -> Budget:
  """Every primitive on every tile: never overflows (for traced calls)."""
  num = max(int(num), 1)
  return Budget(intersections=num * grid.num_tiles, per_tile=num)


def tile_counts(grid: TileGrid, tile_min, tile_max, active):
  """Primitives covering each tile: [N, 2] rectangles -> counts [num_tiles] int32.
  A 2D difference array (+1 / -1 at the rectangle's corners) summed along both
  axes: O(N + tiles), no intersection list."""
  tx, ty = grid.tiles_x, grid.tiles_y
  x0, y0 = tile_min[:, 0], tile_min[:, 1]
  x1, y1 = tile_max[:, 0], tile_max[:, 1]
  live = (active & (x1 > x0) & (y1 > y0)).astype(jnp.int32)
  corner = lambda y, x: y * (tx + 1) + x
  diff = jnp.zeros(((ty + 1) * (tx + 1),), jnp.int32)
  diff = diff.at[corner(y0, x0)].add(live).at[corner(y0, x1)].add(-live)
  diff = diff.at[corner(y1, x0)].add(-live).at[corner(y1, x1)].add(live)
  diff = diff.reshape(ty + 1, tx + 1)
  counts = jnp.cumsum(jnp.cumsum(diff, 0), 1)[:ty, :tx]
  return counts.reshape(-1)


@dataclasses.dataclass(frozen=True)
class TileBins:
  """Per-tile primitive lists for one view.

  ids:      [num_tiles, K] int32 primitive indices, nearest first (K = the
            budget's per_tile slots)
  valid:    [num_tiles, K] bool (False for unused slots)
  counts:   [num_tiles] int32 primitives covering each tile
  overflow: [] int32 intersections that did not fit the budget (0 unless the
            budget was too small, which the renderers turn into an error)
  """
  ids: jax.Array
  valid: jax.Array
  counts: jax.Array
  overflow: jax.Array


def bin_to_tiles(grid: TileGrid, tile_min, tile_max, active, sort_key,
                 budget: Budget) -> TileBins:
  """Expand primitives into (tile, primitive) intersections, sort them once by
  (tile, sort_key, index) and cut the sorted list into per-tile ranges.

  tile_min, tile_max: [N, 2] int (x, y) tile rectangle, max exclusive
  active: [N] bool; sort_key: [N] float (depth; no gradient flows through it).
  """
  n = sort_key.shape[0]
  slots = max(int(budget.intersections), 1)
  per_tile = max(int(budget.per_tile), 1)
  if n == 0:
    zeros = jnp.zeros((grid.num_tiles, per_tile), jnp.int32)
    return TileBins(ids=zeros, valid=zeros > 0, counts=jnp.zeros((grid.num_tiles,), jnp.int32),
                    overflow=jnp.zeros((), jnp.int32))
  key = jax.lax.stop_gradient(sort_key)
  width = jnp.maximum(tile_max[:, 0] - tile_min[:, 0], 0)
  height = jnp.maximum(tile_max[:, 1] - tile_min[:, 1], 0)
  size = jnp.where(active, width * height, 0)                       # tiles per primitive
  ends = jnp.cumsum(size)                                           # [N] inclusive
  total = ends[-1]
  # Slot s belongs to the primitive whose range [ends - size, ends) holds it, at
  # position k of its rectangle (row-major).
  slot = jnp.arange(slots, dtype=ends.dtype)
  prim = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), n - 1)
  k = slot - (ends[prim] - size[prim])
  w = jnp.maximum(width[prim], 1)
  tile = (tile_min[prim, 1] + k // w) * grid.tiles_x + tile_min[prim, 0] + k % w
  used = slot < total
  tile = jnp.where(used, tile, grid.num_tiles).astype(jnp.int32)   # unused slots sort last
  depth = jnp.where(used, key[prim], jnp.inf)
  # Slots are in primitive order, so a stable sort keeps ties by index.
  tile, _, prim = jax.lax.sort((tile, depth, prim.astype(jnp.int32)), num_keys=2,
                               is_stable=True)
  tile_ids = jnp.arange(grid.num_tiles, dtype=jnp.int32)
  starts = jnp.searchsorted(tile, tile_ids, side="left")
  stored = jnp.searchsorted(tile, tile_ids, side="right") - starts   # [T] in the list
  j = jnp.arange(per_tile)
  ids = prim[jnp.minimum(starts[:, None] + j, slots - 1)]
  valid = j < jnp.minimum(stored, per_tile)[:, None]
  counts = tile_counts(grid, tile_min, tile_max, active)
  kept = jnp.sum(jnp.minimum(stored, per_tile))
  return TileBins(ids=jnp.where(valid, ids, 0), valid=valid, counts=counts,
                  overflow=(jnp.sum(counts) - kept).astype(jnp.int32))


def check_overflow(overflow):
  """Raise (at run time, also under jit) when intersections did not fit."""
  def fail(value):
    if int(jnp.max(value)) > 0:
      raise RuntimeError(
          f"kaojax.render: {int(jnp.sum(value))} tile intersections did not fit the "
          "intersection budget; leave intersection_budget=None (counted exactly) or "
          "pass a larger one")
  jax.debug.callback(fail, overflow)


def plan_budget(budget, count_fn, num: int, grid: TileGrid, *args) -> Budget:
  """The budget of a renderer call: `budget` when given (a Budget or an int number
  of intersections per view), else counted with `count_fn(*args)` -> (intersections
  per view [...], busiest tile per view [...]) when the arguments are concrete, and
  rounded up to powers of two; the worst case for traced arguments."""
  if isinstance(budget, Budget):
    return budget
  if budget is not None:
    return Budget(intersections=int(budget), per_tile=min(int(budget), max(int(num), 1)))
  leaves = jax.tree_util.tree_leaves(args)
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    return worst_case_budget(grid, num)
  totals, busiest = count_fn(*args)
  return Budget(intersections=bucket(int(jnp.max(totals))),
                per_tile=min(bucket(int(jnp.max(busiest)), 16), max(int(num), 1)))


# eval_fn(params_block, pixels) -> (alpha [B, P], features [B, P, F]); alpha must
# already be zero where gsplat skips the primitive (alpha < 1/255, sigma < 0).
EvalFn = Callable[[object, jax.Array], tuple]


def composite_tiles(grid: TileGrid, bins: TileBins, params, eval_fn: EvalFn,
                    num_features: int, block_size: int = 16):
  """Front-to-back compositing of each tile's sorted list.

  params: pytree of per-primitive arrays with leading axis N.
  Returns features [height, width, F] = sum_i w_i f_i and transmittance
  [height, width] = prod over composited (1 - alpha_i).
  """
  num_tiles, capacity = bins.ids.shape
  block = max(1, min(int(block_size), capacity))
  num_blocks = -(-capacity // block)
  pad = num_blocks * block - capacity
  ids = jnp.pad(bins.ids, ((0, 0), (0, pad)))
  valid = jnp.pad(bins.valid, ((0, 0), (0, pad)))
  ids = ids.reshape(num_tiles, num_blocks, block).transpose(1, 0, 2)      # [nb, T, B]
  valid = valid.reshape(num_tiles, num_blocks, block).transpose(1, 0, 2)
  pixels = grid.pixel_centres()                                           # [T, P, 2]
  p = grid.pixels_per_tile

  def tile_block(carry, ids_b, valid_b, pix):
    trans, done, acc = carry                       # [P], [P], [P, F]
    prim = jax.tree_util.tree_map(lambda a: a[ids_b], params)
    alpha, feats = eval_fn(prim, pix)              # [B, P], [B, P, F]
    alpha = jnp.where(valid_b[:, None], alpha, 0.0)
    one_minus = 1.0 - alpha
    cum = jnp.cumprod(one_minus, axis=0)
    before = trans[None] * jnp.concatenate([jnp.ones_like(cum[:1]), cum[:-1]], 0)  # T_i
    after = before * one_minus
    stop = (alpha > 0) & (after <= TRANSMITTANCE_THRESHOLD)
    stopped = jnp.cumsum(stop.astype(jnp.int32), axis=0) > 0          # inclusive
    contrib = (alpha > 0) & ~stopped & ~done[None]
    weights = jnp.where(contrib, alpha * before, 0.0)
    acc = acc + jnp.einsum("bp,bpf->pf", weights, feats)
    trans = trans * jnp.prod(jnp.where(contrib, one_minus, 1.0), axis=0)
    done = done | jnp.any(stop, axis=0)
    return trans, done, acc

  block_fn = jax.checkpoint(jax.vmap(tile_block, in_axes=(0, 0, 0, 0)))

  def step(carry, xs):
    ids_b, valid_b = xs
    return block_fn(carry, ids_b, valid_b, pixels), None

  dtype = jax.tree_util.tree_leaves(params)[0].dtype
  init = (jnp.ones((num_tiles, p), dtype), jnp.zeros((num_tiles, p), bool),
          jnp.zeros((num_tiles, p, num_features), dtype))
  (trans, _, acc), _ = jax.lax.scan(step, init, (ids, valid))
  return grid.untile(acc), grid.untile(trans)
