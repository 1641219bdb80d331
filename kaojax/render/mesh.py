"""Triangle-mesh rasterizer (z-buffer), pure JAX, like PyTorch3D's
MeshRasterizer with blur 0 and one face per pixel.

Two passes per view:
1. Visibility (no gradient): faces are binned into 16x16 screen tiles by one
   sort (kaojax/render/tiles.py: no per-tile cap, every covering face is
   tested); each tile's pixels take the nearest covering face (pixel centres at
   +0.5, inside test on screen-space barycentrics, perspective-correct depth).
2. Shading (differentiable): with the face index held fixed, the pixel's
   screen-space barycentrics are recomputed from the projected vertices and
   made perspective-correct, giving depth, barycentrics and interpolated
   vertex normals that are differentiable w.r.t. vertices and cameras.

Faces with a corner at or behind the near plane are dropped (PyTorch3D clips
them); there is no back-face culling.
"""

import functools

import jax
import jax.numpy as jnp

from kaojax.geometry.mesh import vertex_normals
from kaojax.render import native, tiles, views
from kaojax.render.native import ops as native_ops


def project_vertices(vertices, viewmat, K):
  """vertices [..., V, 3] world, viewmat [..., 4, 4] w2c, K [..., 3, 3]
  -> camera-space points [..., V, 3], pixel coordinates [..., V, 2]."""
  cam = jnp.einsum("...ij,...vj->...vi", viewmat[..., :3, :3], vertices) + viewmat[..., None, :3, 3]
  hom = jnp.einsum("...ij,...vj->...vi", K, cam)
  z = cam[..., 2:3]
  pix = hom[..., :2] / jnp.where(z != 0, z, 1.0)
  return cam, pix


def _edge(a, b, p):
  """2D edge function (b - a) x (p - a); broadcasts over leading axes."""
  return (b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (p[..., 0] - a[..., 0])


def screen_barycentrics(tri_pix, pixels):
  """tri_pix [..., 3, 2] projected corners, pixels [..., 2] -> screen-space
  barycentrics [..., 3] (sum to 1) and the doubled signed area [...]."""
  v0, v1, v2 = tri_pix[..., 0, :], tri_pix[..., 1, :], tri_pix[..., 2, :]
  area = _edge(v0, v1, v2)
  safe = jnp.where(area != 0, area, 1.0)
  b = jnp.stack([_edge(v1, v2, pixels), _edge(v2, v0, pixels), _edge(v0, v1, pixels)], -1)
  return b / safe[..., None], area


def perspective_correct(bary, tri_z):
  """Screen barycentrics [..., 3] + corner depths [..., 3] -> (perspective-correct
  barycentrics [..., 3], depth [...]) with 1/z interpolated linearly on screen."""
  w = bary / tri_z
  inv = jnp.sum(w, -1)
  safe = jnp.where(inv != 0, inv, 1.0)
  return w / safe[..., None], 1.0 / safe


def _face_tiles(grid, tri_pix, tri_z, active):
  """Tile rectangles of faces (tile_min, tile_max [F, 2], max exclusive), their
  sort keys (nearest corner) and which are active (finite, in front)."""
  ts = grid.tile_size
  lo = jnp.min(tri_pix, axis=1)
  hi = jnp.max(tri_pix, axis=1)
  limit = jnp.array([grid.tiles_x, grid.tiles_y])
  finite = jnp.all(jnp.isfinite(lo) & jnp.isfinite(hi), -1)
  lo = jnp.where(finite[:, None], lo, 0.0)
  hi = jnp.where(finite[:, None], hi, 0.0)
  tile_min = jnp.clip(jnp.floor((lo - 0.5) / ts), 0, limit).astype(jnp.int32)
  tile_max = jnp.clip(jnp.floor((hi - 0.5) / ts) + 1, 0, limit).astype(jnp.int32)
  return tile_min, tile_max, jnp.min(tri_z, -1), active & finite


def _visibility_native(grid, tri_pix, tri_z, active):
  """Nearest face per pixel with the native kernel: face_id [H, W], counts."""
  tile_min, tile_max, keys, active = _face_tiles(grid, tri_pix, tri_z, active)
  tris = jnp.concatenate([tri_pix, tri_z[..., None]], -1).reshape(-1, 9)
  return native_ops.mesh_visibility(grid, tris.astype(jnp.float32), keys.astype(jnp.float32),
                                    tiles.tile_rects(tile_min, tile_max, active))


def _visibility(grid, tri_pix, tri_z, active, budget, block_size):
  """Nearest face per pixel. tri_pix [F, 3, 2], tri_z [F, 3], active [F].
  Returns face_id [H, W] int32 (-1 = background), counts [num_tiles] and the
  overflow of the intersection budget []."""
  tile_min, tile_max, keys, active = _face_tiles(grid, tri_pix, tri_z, active)
  bins = tiles.bin_to_tiles(grid, tile_min, tile_max, active, keys, budget)
  tiles.check_overflow(bins.overflow)
  num_tiles, cap = bins.ids.shape
  block = max(1, min(block_size, cap))
  nb = -(-cap // block)
  pad = nb * block - cap
  ids = jnp.pad(bins.ids, ((0, 0), (0, pad))).reshape(num_tiles, nb, block).transpose(1, 0, 2)
  valid = jnp.pad(bins.valid, ((0, 0), (0, pad))).reshape(num_tiles, nb, block).transpose(1, 0, 2)
  pixels = grid.pixel_centres()

  def tile_block(carry, ids_b, valid_b, pix):
    zbuf, fid = carry                                             # [P], [P]
    tp = tri_pix[ids_b][:, None]                                  # [B, 1, 3, 2]
    bary, area = screen_barycentrics(tp, pix[None])               # [B, P, 3]
    _, z = perspective_correct(bary, tri_z[ids_b][:, None])       # [B, P]
    inside = jnp.all(bary >= 0, -1) & (area != 0) & valid_b[:, None] & (z > 0)
    z = jnp.where(inside, z, jnp.inf)
    best = jnp.argmin(z, axis=0)
    zbest = jnp.min(z, axis=0)
    closer = zbest < zbuf
    return jnp.where(closer, zbest, zbuf), jnp.where(closer, ids_b[best], fid)

  def step(carry, xs):
    return jax.vmap(tile_block)(carry, xs[0], xs[1], pixels), None

  init = (jnp.full((num_tiles, grid.pixels_per_tile), jnp.inf, tri_z.dtype),
          jnp.full((num_tiles, grid.pixels_per_tile), -1, jnp.int32))
  (_, fid), _ = jax.lax.scan(step, init, (ids, valid))
  return grid.untile(fid), bins.counts, bins.overflow


def _project_faces(vertices, viewmat, K, faces, near_plane):
  """Projected corners tri_pix [F, 3, 2], their camera z tri_z [F, 3] and which
  faces are in front of the near plane [F]."""
  cam, pix = project_vertices(vertices, viewmat, K)
  tri_z = cam[faces][..., 2]
  return pix[faces], tri_z, jnp.all(tri_z > near_plane, -1)


def _count_one_view(vertices, viewmat, K, *, faces, grid, near_plane):
  """(tile intersections, busiest tile's count) of one view: the binning's first pass."""
  tri_pix, tri_z, active = _project_faces(vertices, viewmat, K, faces, near_plane)
  tile_min, tile_max, _, active = _face_tiles(grid, tri_pix, tri_z, active)
  counts = tiles.tile_counts(grid, tile_min, tile_max, active)
  return jnp.sum(counts), jnp.max(counts)


def _rasterize_one_view(vertices, normals, viewmat, K, *, faces, grid, near_plane, budget,
                        block_size, backend):
  cam, pix = project_vertices(vertices, viewmat, K)
  tri_pix = pix[faces]                                            # [F, 3, 2]
  tri_z = cam[faces][..., 2]                                      # [F, 3]
  active = jnp.all(tri_z > near_plane, -1)
  if backend == "native":
    face_id, counts = _visibility_native(grid, jax.lax.stop_gradient(tri_pix),
                                         jax.lax.stop_gradient(tri_z), active)
    overflow = jnp.zeros((), jnp.int32)
  else:
    face_id, counts, overflow = _visibility(grid, jax.lax.stop_gradient(tri_pix),
                                            jax.lax.stop_gradient(tri_z), active, budget,
                                            block_size)
  face_id = jax.lax.stop_gradient(face_id)
  mask = face_id >= 0
  fid = jnp.maximum(face_id, 0)
  ys, xs = jnp.meshgrid(jnp.arange(grid.height), jnp.arange(grid.width), indexing="ij")
  pixels = jnp.stack([xs, ys], -1).astype(tri_pix.dtype) + 0.5
  bary_s, _ = screen_barycentrics(tri_pix[fid], pixels)           # [H, W, 3]
  # background pixels read face 0, which may sit behind the camera: keep its
  # depths finite so masked-out values cannot turn gradients into NaN
  bary, depth = perspective_correct(bary_s, jnp.where(mask[..., None], tri_z[fid], 1.0))
  n_cam = jnp.einsum("ij,vj->vi", viewmat[:3, :3], normals)
  n = jnp.einsum("hwk,hwkc->hwc", bary, n_cam[faces[fid]])
  n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
  zero = lambda a: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 2)), a, 0)
  return dict(depth=zero(depth), normal=zero(n), mask=mask, face_id=face_id, bary=zero(bary),
              overflow=overflow, max_tile_count=jnp.max(counts))


def _flatten_views(vertices, faces, viewmats, Ks, normals):
  """Checks the inputs and flattens the broadcast batch: (batch, vertices [I, V, 3],
  normals [I, V, 3] or None, viewmats [I, 4, 4], Ks [I, 3, 3], faces)."""
  vertices = jnp.asarray(vertices)
  dtype = vertices.dtype if jnp.issubdtype(vertices.dtype, jnp.floating) else jnp.float32
  vertices = vertices.astype(dtype)
  faces = jnp.asarray(faces)
  if vertices.ndim < 2 or vertices.shape[-1] != 3:
    raise ValueError(f"kaojax/render/mesh.py: vertices must be [..., V, 3], got {vertices.shape}")
  if faces.ndim != 2 or faces.shape[-1] != 3 or not jnp.issubdtype(faces.dtype, jnp.integer):
    raise ValueError(f"kaojax/render/mesh.py: faces must be int [F, 3], got {faces.shape} {faces.dtype}")
  viewmats = jnp.asarray(viewmats, dtype)
  Ks = jnp.asarray(Ks, dtype)
  if viewmats.shape[-2:] != (4, 4) or Ks.shape[-2:] != (3, 3):
    raise ValueError(f"kaojax/render/mesh.py: viewmats must be [..., 4, 4] and Ks [..., 3, 3], "
                     f"got {viewmats.shape} and {Ks.shape}")
  cam_batch = jnp.broadcast_shapes(viewmats.shape[:-2], Ks.shape[:-2])
  batch = views.broadcast_views(vertices.shape[:-2], cam_batch)
  nv = vertices.shape[-2]
  v = views.expand_left_aligned(vertices, batch, 2).reshape(-1, nv, 3)
  nrm = None
  if normals is not None:
    nrm = views.expand_left_aligned(jnp.asarray(normals, dtype), batch, 2).reshape(-1, nv, 3)
  vm = views.expand_left_aligned(viewmats, batch, 2).reshape(-1, 4, 4)
  K = views.expand_left_aligned(Ks, batch, 2).reshape(-1, 3, 3)
  return batch, v, nrm, vm, K, faces


@functools.partial(jax.jit, static_argnames=("grid", "near_plane"))
def count_intersections(vertices, faces, viewmats, Ks, *, grid, near_plane=0.01):
  """(intersections [...], busiest tile's count [...]) per view, as rasterized."""
  batch, v, _, vm, K, faces = _flatten_views(vertices, faces, viewmats, Ks, None)
  fn = functools.partial(_count_one_view, faces=faces, grid=grid, near_plane=near_plane)
  out = jax.vmap(fn)(v, vm, K)
  return jax.tree_util.tree_map(lambda a: a.reshape(tuple(batch)), out)


@functools.partial(jax.jit, static_argnames=("grid", "near_plane", "budget", "block_size",
                                             "backend"))
def _rasterize(vertices, faces, viewmats, Ks, normals, *, grid, near_plane, budget, block_size,
               backend):
  if normals is None:
    normals = vertex_normals(jnp.asarray(vertices), jnp.asarray(faces))
  batch, v, nrm, vm, K, faces = _flatten_views(vertices, faces, viewmats, Ks, normals)
  fn = functools.partial(_rasterize_one_view, faces=faces, grid=grid, near_plane=near_plane,
                         budget=budget, block_size=block_size, backend=backend)
  out = jax.vmap(fn)(v, nrm, vm, K)
  return jax.tree_util.tree_map(lambda a: a.reshape(tuple(batch) + a.shape[1:]), out)


def rasterize_mesh(vertices, faces, viewmats, Ks, width: int, height: int, *,
                   normals=None, near_plane: float = 0.01, tile_size: int = 16,
                   block_size: int = 32, intersection_budget=None,
                   backend: str | None = None):
  """Rasterize a triangle mesh.

  vertices: [v..., V, 3] world positions; faces: [F, 3] int (shared by the batch)
  viewmats: [c..., 4, 4] world-to-camera (OpenCV); Ks: [c..., 3, 3] pixels.
  Batch axes of vertices and cameras are aligned from the left (vertices
  [B, V, 3] with cameras [B, C, 4, 4] give [B, C, H, W]).
  normals: optional [v..., V, 3] world normals (default: area-weighted
  vertex normals of the mesh).
  Returns dict:
    depth   [..., H, W]     camera z of the visible surface, 0 on background
    normal  [..., H, W, 3]  unit camera-space normal interpolated from vertex
                            normals with perspective-correct barycentrics, 0 bg
    mask    [..., H, W]     bool coverage
    face_id [..., H, W]     int32 visible face, -1 on background
    bary    [..., H, W, 3]  perspective-correct barycentrics, 0 on background
    overflow [...]          always 0: no face is dropped (kept for callers)
    max_tile_count [...]    largest number of faces covering one tile
  Differentiable w.r.t. vertices, normals and cameras through the barycentrics
  (visibility held fixed).
  Binning, `intersection_budget` and `backend` as in `rasterize_surfels`: the
  native kernel finds the
  visible face; barycentrics, depth and normals are then recomputed in JAX on
  both paths, which is where the gradient flows.
  """
  grid = tiles.TileGrid(width, height, tile_size)
  dtype = jnp.asarray(vertices).dtype
  backend = native.resolve(backend, dtype if jnp.issubdtype(dtype, jnp.floating) else None)
  budget = None
  if backend == "reference":
    count = functools.partial(count_intersections, grid=grid, near_plane=near_plane)
    budget = tiles.plan_budget(intersection_budget, count, jnp.shape(faces)[0], grid,
                               vertices, faces, viewmats, Ks)
  return _rasterize(vertices, faces, viewmats, Ks, normals, grid=grid, near_plane=near_plane,
                    budget=budget, block_size=block_size, backend=backend)


def interpolate_face_attributes(face_attributes, face_id, bary):
  """Barycentric interpolation of per-face-corner attributes.

  face_attributes: [a..., F, 3, C] (e.g. colours[faces] or uvs[faces_uvs]);
  face_id [..., H, W] int (-1 background), bary [..., H, W, 3] from
  `rasterize_mesh`; attribute batch axes align from the left with face_id's.
  Returns [..., H, W, C], 0 on background.
  """
  face_attributes = jnp.asarray(face_attributes)
  batch = face_id.shape[:-2]
  f, c = face_attributes.shape[-3], face_attributes.shape[-1]
  fa = views.expand_left_aligned(face_attributes, batch, 3).reshape((-1, f, 3, c))
  fid = face_id.reshape((-1,) + face_id.shape[-2:])
  b = bary.reshape((-1,) + bary.shape[-3:])

  def one(fa_i, fid_i, b_i):
    corners = fa_i[jnp.maximum(fid_i, 0)]                         # [H, W, 3, C]
    out = jnp.einsum("hwk,hwkc->hwc", b_i, corners)
    return jnp.where((fid_i >= 0)[..., None], out, 0)

  out = jax.vmap(one)(fa, fid, b)
  return out.reshape(tuple(batch) + out.shape[1:])


def interpolate_vertex_attributes(attributes, faces, face_id, bary):
  """Per-vertex attributes [a..., V, C] (e.g. colours) -> [..., H, W, C]."""
  attributes = jnp.asarray(attributes)
  return interpolate_face_attributes(attributes[..., jnp.asarray(faces), :], face_id, bary)


def sample_texture(texture, uv):
  """Bilinear texture lookup.

  texture: [t..., Ht, Wt, C]; uv: [..., H, W, 2] with u to the right and v UP
  (v = 0 is the bottom row, the OBJ / PyTorch3D TexturesUV convention); texel
  centres at ((i + 0.5) / Wt, 1 - (j + 0.5) / Ht) (align_corners=False); border
  texels are clamped. Texture batch axes align from the left with uv's.
  Returns [..., H, W, C].
  """
  texture = jnp.asarray(texture)
  uv = jnp.asarray(uv)
  batch = uv.shape[:-3]
  ht, wt, c = texture.shape[-3:]
  tex = views.expand_left_aligned(texture, batch, 3).reshape((-1, ht, wt, c))
  uvf = uv.reshape((-1,) + uv.shape[-3:])

  def one(t, q):
    x = q[..., 0] * wt - 0.5
    y = (1.0 - q[..., 1]) * ht - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    xi0 = jnp.clip(x0.astype(jnp.int32), 0, wt - 1)
    xi1 = jnp.clip(x0.astype(jnp.int32) + 1, 0, wt - 1)
    yi0 = jnp.clip(y0.astype(jnp.int32), 0, ht - 1)
    yi1 = jnp.clip(y0.astype(jnp.int32) + 1, 0, ht - 1)
    top = t[yi0, xi0] * (1 - fx) + t[yi0, xi1] * fx
    bottom = t[yi1, xi0] * (1 - fx) + t[yi1, xi1] * fx
    return top * (1 - fy) + bottom * fy

  out = jax.vmap(one)(tex, uvf)
  return out.reshape(tuple(batch) + out.shape[1:])


def render_texture(texture, face_uvs, face_id, bary):
  """UV-textured colours: face_uvs [a..., F, 3, 2] (verts_uvs[faces_uvs]),
  texture [t..., Ht, Wt, C] -> [..., H, W, C], 0 on background."""
  uv = interpolate_face_attributes(face_uvs, face_id, bary)
  colors = sample_texture(texture, uv)
  return jnp.where((face_id >= 0)[..., None], colors, 0)
