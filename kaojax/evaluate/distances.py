"""Exact unsigned distances from points to a triangle mesh's surface, in float64.

    point_to_mesh(points [P, 3], vertices [V, 3], faces [F, 3]) -> distances [P]

The closest point of one triangle (`closest_on_triangles`) follows the Voronoi-region
method: the point is tested against the regions of the three vertices, the three
edges and the face, and projected onto the one it lies in. A (near) zero-area
triangle has no face region: its surface is its longest edge, and the closest point
is taken on that segment (`prepare_triangles` flags those and orders their corners).
It runs in JAX, jitted, in float64 (`jax.enable_x64` around the calls), over
fixed-size chunks of points.

Which triangles are tried (`MeshDistance`, built once per mesh): every triangle is
covered by samples fine enough that each point of the triangle lies within `h` of
one of its own samples (`_grid_samples`: the centroids of an n x n split). A KD-tree
(scipy) over the samples gives each query point its k nearest samples; their
triangles are the candidates, and the exact distance d over them is kept. A triangle
with no sample among the k nearest has all its samples at least d_k (the k-th nearest
sample distance) away, so its distance is at least d_k - h: when d <= d_k - h no other
triangle can be closer and the answer is certified. For the points left (far from the
surface, or where samples crowd), every sample within d + h (a ball query) gives the
candidates, which is exact by the same bound; those points are grouped by their
number of candidates so that little padding is computed. The results are exact, not
approximate: the prefilter only skips work.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree

CHUNK = 8192          # query points per jitted call for 16 candidates each (padded)
STAGES = (32,)        # nearest samples tried before the exact ball search
SPLIT = 2             # a median triangle is split into SPLIT x SPLIT sample pieces


# ------------------------------------------------------------------ one triangle


def _safe_ratio(num, den):
  return num / jnp.where(den != 0, den, 1.0)


def _region_coefficients(d1, d2, bb, bc, cc, degenerate):
  """(v, w) with closest = a + v ab + w ac, from d1 = ab.ap, d2 = ac.ap and the
  triangle's bb = ab.ab, bc = ab.ac, cc = ac.ac (any matching shapes)."""
  d3, d4, d5, d6 = d1 - bb, d2 - bc, d1 - bc, d2 - cc     # ab.bp, ac.bp, ab.cp, ac.cp
  va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
  # From the last region tested to the first, so that earlier regions take priority.
  total = va + vb + vc
  v, w = _safe_ratio(vb, total), _safe_ratio(vc, total)                  # face
  t = _safe_ratio(d4 - d3, (d4 - d3) + (d5 - d6))
  region = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)                   # edge bc
  v, w = jnp.where(region, 1 - t, v), jnp.where(region, t, w)
  region = (vb <= 0) & (d2 >= 0) & (d6 <= 0)                             # edge ac
  v, w = jnp.where(region, 0.0, v), jnp.where(region, _safe_ratio(d2, d2 - d6), w)
  region = (d6 >= 0) & (d5 <= d6)                                        # vertex c
  v, w = jnp.where(region, 0.0, v), jnp.where(region, 1.0, w)
  region = (vc <= 0) & (d1 >= 0) & (d3 <= 0)                             # edge ab
  v, w = jnp.where(region, _safe_ratio(d1, d1 - d3), v), jnp.where(region, 0.0, w)
  region = (d3 >= 0) & (d4 <= d3)                                        # vertex b
  v, w = jnp.where(region, 1.0, v), jnp.where(region, 0.0, w)
  region = (d1 <= 0) & (d2 <= 0)                                         # vertex a
  v, w = jnp.where(region, 0.0, v), jnp.where(region, 0.0, w)
  v = jnp.where(degenerate, jnp.clip(_safe_ratio(d1, bb), 0.0, 1.0), v)
  w = jnp.where(degenerate, 0.0, w)
  return v, w


def closest_on_triangles(p, a, b, c, degenerate=None):
  """Closest points of p [..., 3] on the triangles (a, b, c) [..., 3] as coefficients
  (v [...], w [...]) with closest = a + v (b - a) + w (c - a): the Voronoi-region
  method (vertex, edge, then face regions). `degenerate` [...] bool marks triangles of
  (near) zero area, given with (a, b) their longest edge: their closest point is on
  that segment."""
  ab, ac, ap = b - a, c - a, p - a
  dot = lambda x, y: jnp.sum(x * y, -1)
  flags = jnp.zeros(p.shape[:-1], bool) if degenerate is None else degenerate
  return _region_coefficients(dot(ab, ap), dot(ac, ap), dot(ab, ab), dot(ab, ac),
                              dot(ac, ac), flags)


def triangle_table(triangles):
  """triangles [F, 3, 3] -> [12, F]: a, ab = b - a, ac = c - a (x, y, z rows each),
  ab.ab, ab.ac, ac.ac. Row-wise so that the kernel works on whole [P, K] arrays (about
  twice as fast on a CPU as [P, K, 3] arrays)."""
  a, ab, ac = triangles[:, 0], triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]
  grams = [np.sum(ab * ab, -1), np.sum(ab * ac, -1), np.sum(ac * ac, -1)]
  return np.concatenate([a.T, ab.T, ac.T, grams])


@jax.jit
def _best_of_candidates(points, table, degenerate, candidates):
  """points [P, 3], table [12, F] (`triangle_table`), degenerate [F], candidates
  [P, K] face ids -> (squared distance [P], face id [P], closest point [P, 3]) over the
  candidates."""
  g = table[:, candidates]                                         # [12, P, K]
  ap = [points[:, i:i + 1] - g[i] for i in range(3)]
  ab, ac = g[3:6], g[6:9]
  d1 = ab[0] * ap[0] + ab[1] * ap[1] + ab[2] * ap[2]
  d2 = ac[0] * ap[0] + ac[1] * ap[1] + ac[2] * ap[2]
  v, w = _region_coefficients(d1, d2, g[9], g[10], g[11], degenerate[candidates])
  offset = [v * ab[i] + w * ac[i] - ap[i] for i in range(3)]     # closest - p
  d2s = offset[0] ** 2 + offset[1] ** 2 + offset[2] ** 2           # [P, K]
  best = jnp.argmin(d2s, -1)
  rows = jnp.arange(points.shape[0])
  closest = jnp.stack([offset[i][rows, best] + points[:, i] for i in range(3)], -1)
  return d2s[rows, best], candidates[rows, best], closest


def prepare_triangles(vertices, faces):
  """float64 triangles [F, 3, 3] and their degenerate flags [F]; a degenerate
  triangle's corners are reordered so that its first edge is its longest."""
  tri = np.asarray(vertices, np.float64)[np.asarray(faces, np.int64)]
  edges = np.stack([tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 1], tri[:, 0] - tri[:, 2]], 1)
  longest2 = np.max(np.sum(edges ** 2, -1), -1)
  normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  degenerate = np.sum(normal ** 2, -1) <= 1e-24 * longest2 ** 2
  first = np.argmax(np.sum(edges ** 2, -1), -1)                   # edge k joins k, k+1
  for k in (1, 2):
    rows = degenerate & (first == k)
    tri[rows] = np.roll(tri[rows], -k, axis=1)
  return tri, degenerate


def _run_chunked(points, table, degenerate, candidates, chunk):
  """`_best_of_candidates` over fixed-size chunks (the last one padded), in float64."""
  n = len(points)
  chunk = min(chunk, 2 ** int(np.ceil(np.log2(max(n, 1)))))     # small inputs: less padding
  d2 = np.empty(n)
  face = np.empty(n, np.int64)
  closest = np.empty((n, 3))
  with jax.enable_x64(True):
    table = jnp.asarray(table, jnp.float64)
    flags = jnp.asarray(degenerate)
    for start in range(0, n, chunk):
      stop = min(start + chunk, n)
      pad = chunk - (stop - start)
      pts = np.pad(points[start:stop], ((0, pad), (0, 0)))
      cand = np.pad(candidates[start:stop], ((0, pad), (0, 0)))
      out = _best_of_candidates(jnp.asarray(pts, jnp.float64), table, flags,
                                jnp.asarray(cand, jnp.int32))
      d2[start:stop] = np.asarray(out[0])[:stop - start]
      face[start:stop] = np.asarray(out[1])[:stop - start]
      closest[start:stop] = np.asarray(out[2])[:stop - start]
  return d2, face, closest


# ------------------------------------------------------------------ whole mesh


def _grid_samples(triangles, spacing):
  """Samples of each triangle [F, 3, 3] such that every point of the triangle is
  within `spacing` of one of its own samples -> (samples [S, 3], owning face [S],
  the covering radius actually reached). A triangle is split into n x n similar
  pieces (n per triangle); the samples are the pieces' centroids, and a piece's
  points are within max_k |centroid - corner_k| / n of its centroid."""
  centroid = triangles.mean(1)                                     # [F, 3]
  reach = np.sqrt(np.max(np.sum((triangles - centroid[:, None]) ** 2, -1), -1))  # [F]
  levels = np.maximum(1, np.ceil(reach / spacing)).astype(np.int64)
  samples, owners = [], []
  for n in np.unique(levels):
    ids = np.nonzero(levels == n)[0]
    bary = []
    for i in range(n):
      for j in range(n - i):
        bary.append([i + 1 / 3, j + 1 / 3, n - i - j - 2 / 3])     # upright piece
        if i + j < n - 1:
          bary.append([i + 2 / 3, j + 2 / 3, n - i - j - 4 / 3])   # inverted piece
    bary = np.array(bary) / n                                      # [n * n, 3]
    samples.append(np.einsum("gk,fkc->fgc", bary, triangles[ids]).reshape(-1, 3))
    owners.append(np.repeat(ids, len(bary)))
  radius = float(np.max(reach / levels))
  return np.concatenate(samples), np.concatenate(owners), radius


class MeshDistance:
  """Exact closest points on one mesh, for many queries (build once per mesh).

  vertices [V, 3], faces [F, 3] (0-based). `spacing`: the sample covering radius h
  (default: the median triangle's centroid-to-corner reach / SPLIT)."""

  def __init__(self, vertices, faces, spacing=None):
    self.vertices = np.asarray(vertices, np.float64)
    self.faces = np.asarray(faces, np.int64)
    if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
      raise ValueError(f"vertices must be [V, 3], got {self.vertices.shape}")
    if self.faces.ndim != 2 or self.faces.shape[1] != 3 or len(self.faces) == 0:
      raise ValueError(f"faces must be a non-empty [F, 3], got {self.faces.shape}")
    if self.faces.min() < 0 or self.faces.max() >= len(self.vertices):
      raise ValueError("faces index vertices that do not exist")
    if not np.all(np.isfinite(self.vertices)):
      raise ValueError("vertices contain NaN or infinite values (must be finite)")
    self.triangles, self.degenerate = prepare_triangles(self.vertices, self.faces)
    self.table = triangle_table(self.triangles)
    if spacing is None:
      centroid = self.triangles.mean(1, keepdims=True)
      reach = np.sqrt(np.max(np.sum((self.triangles - centroid) ** 2, -1), -1))
      spacing = max(float(np.median(reach)) / SPLIT, 1e-12)
    samples, self.owners, self.radius = _grid_samples(self.triangles, spacing)
    self.tree = cKDTree(samples)
    # Certification slack for float64 rounding, relative to the mesh's size.
    self.slack = 1e-12 * max(1.0, float(np.abs(self.vertices).max()))

  def query(self, points):
    """points [P, 3] -> (distances [P] float64, face ids [P] int64, closest points
    [P, 3] float64)."""
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
      raise ValueError(f"points must be [P, 3], got {points.shape}")
    if not np.all(np.isfinite(points)):
      raise ValueError("points contain NaN or infinite values (must be finite)")
    d2 = np.full(len(points), np.inf)
    face = np.zeros(len(points), np.int64)
    closest = np.zeros((len(points), 3))
    todo = np.arange(len(points))
    for k in STAGES:
      if len(todo) == 0:
        return np.sqrt(d2), face, closest
      k = min(k, self.tree.n)
      dist_k, idx = self.tree.query(points[todo], k=k, workers=-1)
      dist_k, idx = dist_k.reshape(len(todo), k), idx.reshape(len(todo), k)
      out = _run_chunked(points[todo], self.table, self.degenerate, self.owners[idx],
                         _chunk(k))
      d2[todo], face[todo], closest[todo] = out
      if k == self.tree.n:          # every sample seen: every triangle was a candidate
        return np.sqrt(d2), face, closest
      certified = np.sqrt(out[0]) + self.radius + self.slack <= dist_k[:, -1]
      todo = todo[~certified]
    if len(todo):
      d2[todo], face[todo], closest[todo] = self._ball_stage(points[todo], np.sqrt(d2[todo]))
    return np.sqrt(d2), face, closest

  def _ball_stage(self, points, bound):
    """Exact answers for points [P, 3] whose distance is at most bound [P]: every
    triangle closer than that has a sample within bound + h, so the triangles owning
    the samples in that ball are all the candidates needed."""
    balls = self.tree.query_ball_point(points, bound + self.radius + self.slack,
                                       workers=-1, return_sorted=False)
    lengths = np.array([len(b) for b in balls])
    rows = np.repeat(np.arange(len(points)), lengths)
    flat = np.fromiter(itertools.chain.from_iterable(balls), np.int64, int(lengths.sum()))
    owners = self.owners[flat]
    keys = np.unique(rows * len(self.faces) + owners)              # (row, face) pairs
    rows, owners = keys // len(self.faces), keys % len(self.faces)
    counts = np.bincount(rows, minlength=len(points))
    starts = np.cumsum(counts) - counts
    d2 = np.empty(len(points))
    face = np.empty(len(points), np.int64)
    closest = np.empty((len(points), 3))
    # Points grouped by their candidate count rounded up to a power of two: each group
    # is padded to its own width (with one of each row's real candidates).
    widths = 2 ** np.ceil(np.log2(np.maximum(counts, 16))).astype(np.int64)
    for width in np.unique(widths):
      group = np.nonzero(widths == width)[0]
      columns = np.minimum(np.arange(width)[None], counts[group, None] - 1)
      candidates = owners[starts[group, None] + columns]
      d2[group], face[group], closest[group] = _run_chunked(
          points[group], self.table, self.degenerate, candidates, _chunk(int(width)))
    return d2, face, closest


def _chunk(k):
  """Points per call for k candidates each (about CHUNK * 16 point-triangle pairs),
  a power of two (few distinct compilations)."""
  return max(16, 2 ** int(np.log2(max(1, CHUNK * 16 // k))))


def closest_points(points, vertices, faces):
  """points [P, 3], vertices [V, 3], faces [F, 3] -> (distances [P], face ids [P],
  closest points [P, 3]) on the mesh surface, float64 numpy."""
  return MeshDistance(vertices, faces).query(points)


def point_to_mesh(points, vertices, faces):
  """Unsigned distances [P] (float64 numpy) from points [P, 3] to the closest point
  of the surface of the mesh vertices [V, 3], faces [F, 3]."""
  return closest_points(points, vertices, faces)[0]
