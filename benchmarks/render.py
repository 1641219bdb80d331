"""Native rasterizers vs the pure-JAX reference (and the dense compositor), same run,
and the FaceLift-size 3D Gaussian scene.

    python benchmarks/render.py [--quick] [--dense] [--facelift-sizes 300000,1000000]

KaoLRM scene: surfels bound to the synthetic FLAME head (area-weighted surface
samples, as KaoLRM), 16 views around the face; the head mesh itself for the mesh
rasterizer. Default size: 8,000 surfels, 192x192, 16 views; --quick: 600
surfels, 48x48, 2 views.

- native: `rasterize_surfels(..., backend="native")` / `rasterize_mesh(...,
  backend="native")`, the C++ (CPU) or CUDA kernels through XLA FFI.
- reference: the same calls with backend="reference" (pure JAX, 16x16 tiles,
  sort-based binning with the intersection budget counted before compiling).
- dense (--dense): the reference compositing math with ONE tile covering the
  whole image, every surfel at every pixel in depth order; slow on a CPU, so it
  renders 1 of the 16 views and its times are scaled to 16 (flagged in the JSON);
  --dense-views 16 measures all.

FaceLift scene (native only; --facelift-sizes, default 300,000 and 1,000,000;
--quick: 20,000): that many flattened 3D Gaussians covering the head in
FaceLift's world, its six 512x512 cameras (`kaojax.render.demo.facelift_head_scene`);
forward and forward+backward times, tile intersections (all views) and the busiest
tile, XLA's buffer estimate and the process's peak resident memory (which also
counts the native kernels' own tile lists).
All are jitted; forward = colour/alpha/depth/normal (mesh: depth/normal/mask),
backward = gradient of a weighted sum of all outputs w.r.t. every Gaussian
parameter (mesh: the vertices). Times are the best of --repeats runs of the
AOT-compiled function (compile time reported apart); memory is XLA's compiled
buffer estimate (arguments + outputs + temporaries) and, on a GPU, the device's
peak bytes in use. The last stdout line is one JSON object; its key
`native_over_reference` is the surfel forward+backward speedup.
"""

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from timing import device_peak_bytes, xla_buffer_bytes
from kaojax.render import rasterize_gaussians, rasterize_mesh, rasterize_surfels, tiles
from kaojax.render import gaussian3d, mesh, surfel
from kaojax.render.demo import (facelift_head_scene, head_cameras, head_vertices,
                                surfels_on_surface)


def _compile_and_time(fn, args, repeats):
  """AOT-compile fn, then time `repeats` runs (best). Returns (seconds, compile
  seconds, XLA buffer bytes: arguments + outputs + temporaries - aliased)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  nbytes = xla_buffer_bytes(compiled)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return best, compile_s, nbytes, out


def head_scene(num: int, size: int, views: int):
  """The benchmark scene: FLAME-head vertices/faces, `num` surfels on its surface,
  `views` cameras at size x size, and fixed random output weights for the losses."""
  vertices, faces = head_vertices()
  mean_edge = float(jnp.mean(jnp.linalg.norm(vertices[faces[:, 0]] - vertices[faces[:, 1]], axis=-1)))
  gaussians = surfels_on_surface(jax.random.key(0), vertices, faces, num,
                                 radius=0.8 * mean_edge * (8000 / num) ** 0.5)
  viewmats, Ks = head_cameras(vertices, size, views)
  # a tighter framing than the demo: the head fills most of the image, as in KaoLRM
  Ks = Ks.at[:, :2, :2].multiply(1.6)
  rng = np.random.default_rng(0)
  weights = {k: jnp.asarray(rng.uniform(size=(views, size, size) + s), jnp.float32)
             for k, s in (("color", (3,)), ("alpha", ()), ("depth", ()), ("normal", (3,)))}
  return vertices, faces, gaussians, viewmats, Ks, weights


def _mib(b):
  return None if b is None else round(b / 2**20, 1)


def _measure(name, forward, loss, args, repeats):
  fwd_s, fwd_compile_s, fwd_bytes, out = _compile_and_time(forward, args, repeats)
  bwd_s, bwd_compile_s, bwd_bytes, _ = _compile_and_time(jax.value_and_grad(loss), args, repeats)
  res = {"fwd_s": fwd_s, "fwd_bwd_s": bwd_s, "fwd_mib": _mib(fwd_bytes),
         "fwd_bwd_mib": _mib(bwd_bytes), "compile_s": fwd_compile_s + bwd_compile_s,
         "device_peak_mib": _mib(device_peak_bytes()),
         "overflow": int(np.sum(out["overflow"])),
         "max_tile_count": int(np.max(out["max_tile_count"]))}
  print(f"{name:16s} fwd {fwd_s:8.4f} s  fwd+bwd {bwd_s:8.4f} s  mem fwd {res['fwd_mib']} MiB  "
        f"fwd+bwd {res['fwd_bwd_mib']} MiB  compile {res['compile_s']:.1f} s  "
        f"max tile count {res['max_tile_count']}  overflow {res['overflow']}", flush=True)
  return res, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
  parser.add_argument("--facelift-sizes", default=None,
                      help="comma-separated Gaussian counts of the FaceLift scene "
                           "(default 300000,1000000; --quick 20000; 0 skips it)")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--dense", action="store_true", help="also time the dense compositor")
  parser.add_argument("--dense-views", type=int, default=None,
                      help="views rendered by the dense compositor (default: all in --quick, "
                           "1 otherwise; its times are scaled linearly to all views)")
  args = parser.parse_args()
  num, size, views = (600, 48, 2) if args.quick else (8000, 192, 16)
  repeats = args.repeats or 3
  dense_views = min(views, args.dense_views or (views if args.quick else 1))

  vertices, faces, gaussians, viewmats, Ks, weights = head_scene(num, size, views)
  background = jnp.zeros(3)

  grid = tiles.TileGrid(size, size, 16)
  # The reference's static intersection budget, counted before compiling (inside a
  # jit it would have to assume the worst case).
  budget = tiles.plan_budget(
      None, lambda *a: surfel.count_intersections(*a, grid=grid), num, grid, gaussians,
      viewmats, Ks)
  whole = tiles.TileGrid(size, size, size)
  dense_budget = tiles.plan_budget(
      None, lambda *a: surfel.count_intersections(*a, grid=whole), num, whole, gaussians,
      viewmats[:dense_views], Ks[:dense_views])
  surfel_configs = {
      "native": (views, dict(tile_size=16, backend="native")),
      "reference": (views, dict(tile_size=16, block_size=16, intersection_budget=budget,
                                backend="reference")),
  }
  if args.dense:
    surfel_configs["dense"] = (dense_views, dict(tile_size=size, block_size=128,
                                                 intersection_budget=dense_budget,
                                                 backend="reference"))
  surfels, outs = {}, {}
  for name, (nv, cfg) in surfel_configs.items():
    def forward(g, cfg=cfg, nv=nv):
      return rasterize_surfels(g, viewmats[:nv], Ks[:nv], size, size, background, **cfg)

    def loss(g, cfg=cfg, nv=nv):
      out = rasterize_surfels(g, viewmats[:nv], Ks[:nv], size, size, background, **cfg)
      return sum(jnp.sum(weights[k][:nv] * out[k]) for k in weights)

    res, outs[name] = _measure(f"surfels {name}", forward, loss, (gaussians,), repeats)
    res["views_measured"] = nv
    surfels[name] = res

  mesh_weights = {k: weights[k] for k in ("depth", "normal")}
  mesh_budget = tiles.plan_budget(
      None, lambda *a: mesh.count_intersections(*a, grid=grid), len(faces), grid, vertices,
      faces, viewmats, Ks)
  meshes = {}
  for name in ("native", "reference"):
    def mesh_forward(v, name=name):
      return rasterize_mesh(v, faces, viewmats, Ks, size, size, backend=name,
                            intersection_budget=mesh_budget if name == "reference" else None)

    def mesh_loss(v, name=name):
      out = mesh_forward(v)
      return sum(jnp.sum(w * out[k]) for k, w in mesh_weights.items())

    meshes[name], _ = _measure(f"mesh {name}", mesh_forward, mesh_loss, (vertices,), repeats)

  err = jnp.max(jnp.abs(outs["native"]["color"] - outs["reference"]["color"]), -1)
  diff, off = float(jnp.max(err)), float(jnp.mean(err > 1e-4))
  # a few pixels may differ where a splat's alpha sits at the 1/255 cut or the
  # transmittance at the 1e-4 stop: there float32 rounding decides
  print(f"max |colour native - reference| = {diff:.2e}; pixels off by > 1e-4: {off:.2e}")
  ratio = lambda a, b, key: round(a[key] / b[key], 2)
  summary = {
      "benchmark": "render",
      "device": str(jax.devices()[0].platform),
      "surfels": num, "size": size, "views": views,
      "reference_budget": {"intersections": budget.intersections, "per_tile": budget.per_tile},
      "surfel": surfels, "mesh": meshes,
      "native_over_reference": ratio(surfels["reference"], surfels["native"], "fwd_bwd_s"),
      "native_over_reference_fwd": ratio(surfels["reference"], surfels["native"], "fwd_s"),
      "mesh_native_over_reference": ratio(meshes["reference"], meshes["native"], "fwd_bwd_s"),
      "mesh_native_over_reference_fwd": ratio(meshes["reference"], meshes["native"], "fwd_s"),
      "max_abs_color_diff": diff,
      "fraction_pixels_color_diff_over_1e-4": off,
  }
  if args.dense:
    dense = surfels["dense"]
    scale = views / dense["views_measured"]
    summary["dense_times_scaled_from_fewer_views"] = dense["views_measured"] < views
    summary["native_over_dense"] = round(dense["fwd_bwd_s"] * scale / surfels["native"]["fwd_bwd_s"], 2)
    summary["reference_over_dense"] = round(dense["fwd_bwd_s"] * scale / surfels["reference"]["fwd_bwd_s"], 2)
  sizes = args.facelift_sizes or ("20000" if args.quick else "300000,1000000")
  summary["facelift"] = [facelift(int(n), 128 if args.quick else 512, repeats)
                         for n in sizes.split(",") if int(n) > 0]
  print(json.dumps(summary))


def facelift(num: int, size: int, repeats: int):
  """The FaceLift-size scene (native): times, intersections, memory."""
  gaussians, viewmats, Ks = facelift_head_scene(num, size, 6)
  grid = tiles.TileGrid(size, size, 16)
  totals, busiest = gaussian3d.count_intersections(gaussians, viewmats, Ks, grid=grid)
  weights = jnp.asarray(np.random.default_rng(0).uniform(size=(6, size, size, 3)), jnp.float32)

  def forward(g):
    return rasterize_gaussians(g, viewmats, Ks, size, size, backend="native")

  def loss(g):
    out = forward(g)
    return jnp.sum(weights * out["color"]) + jnp.sum(out["alpha"])

  res, _ = _measure(f"facelift {num}", forward, loss, (gaussians,), repeats)
  res.update(gaussians=num, size=size, views=6, intersections=int(jnp.sum(totals)),
             intersections_per_view=[int(t) for t in totals],
             busiest_tile=int(jnp.max(busiest)),
             old_cap_1024_would_drop=int(_dropped_by_cap(gaussians, viewmats, Ks, grid, 1024)),
             process_peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
  print(f"facelift {num}: {res['intersections']} intersections over 6 views, busiest tile "
        f"{res['busiest_tile']}, a 1024 cap would drop {res['old_cap_1024_would_drop']}, "
        f"peak RSS {res['process_peak_rss_mib']} MiB", flush=True)
  return res


def _dropped_by_cap(gaussians, viewmats, Ks, grid, cap):
  """Intersections a per-tile cap of `cap` would drop (what the old binning did)."""
  def per_view(vm, K):
    proj = gaussian3d.project_gaussians(gaussians.means, gaussians.quats, gaussians.scales, vm,
                                        K, grid.width, grid.height)
    counts = tiles.tile_counts(grid, *tiles.gaussian_tile_rect(grid, proj["means2d"],
                                                               proj["radii"]))
    return jnp.sum(jnp.maximum(counts - cap, 0))
  return jnp.sum(jax.jit(jax.vmap(per_view))(viewmats, Ks))


if __name__ == "__main__":
  main()
