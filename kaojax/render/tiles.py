"""Screen-tile binning with a static per-tile capacity, and front-to-back
alpha compositing over each tile's depth-sorted list.

Shared by the surfel (2DGS) and 3D Gaussian renderers (and, for the binning,
by the mesh rasterizer). Everything here works on ONE view; the renderers vmap
over views.

Binning: every primitive owns a rectangle of tiles [tile_min, tile_max)
(exclusive upper corner, in tile units). Each tile keeps the `capacity`
primitives with the smallest sort key (depth) among those whose rectangle
covers it, found with `jax.lax.top_k` on a [tiles, N] key matrix built in
chunks of tiles, so memory scales as tiles x N, never pixels x N. Primitives
beyond the capacity are dropped (the farthest ones) and counted in
`overflow`.

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
class TileBins:
  """Per-tile primitive lists for one view.

  ids:      [num_tiles, K] int32 primitive indices, nearest first, with
            K = min(capacity, N)
  valid:    [num_tiles, K] bool (False for unused slots)
  counts:   [num_tiles] int32 primitives covering each tile (before capping)
  overflow: [] int32 number of (tile, primitive) pairs dropped by the cap
  """
  ids: jax.Array
  valid: jax.Array
  counts: jax.Array
  overflow: jax.Array


def bin_to_tiles(grid: TileGrid, tile_min, tile_max, active, sort_key, capacity: int,
                 tile_chunk: int = 64) -> TileBins:
  """Assign primitives to tiles, keeping the `capacity` smallest `sort_key`s.

  tile_min, tile_max: [N, 2] int (x, y) tile rectangle, max exclusive
  active: [N] bool; sort_key: [N] float (depth; no gradient flows through it).
  """
  n = sort_key.shape[0]
  capacity = int(capacity)
  if capacity <= 0:
    raise ValueError(f"kaojax/render/tiles.py: tile capacity must be positive, got {capacity}")
  k = min(capacity, n)
  key = jax.lax.stop_gradient(sort_key)
  tile_ids = jnp.arange(grid.num_tiles)

  def one_tile(t):
    tx, ty = t % grid.tiles_x, t // grid.tiles_x
    hit = (active & (tx >= tile_min[:, 0]) & (tx < tile_max[:, 0])
           & (ty >= tile_min[:, 1]) & (ty < tile_max[:, 1]))
    score = jnp.where(hit, -key, -jnp.inf)
    top, ids = jax.lax.top_k(score, k)
    return ids.astype(jnp.int32), top > -jnp.inf, jnp.sum(hit, dtype=jnp.int32)

  ids, valid, counts = jax.lax.map(one_tile, tile_ids, batch_size=min(tile_chunk, grid.num_tiles))
  return TileBins(ids=ids, valid=valid, counts=counts, overflow=count_overflow(counts, capacity))


def count_overflow(counts, capacity: int):
  """(tile, primitive) pairs beyond the per-tile capacity: counts [num_tiles] -> []."""
  return jnp.sum(jnp.maximum(counts - capacity, 0))


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
