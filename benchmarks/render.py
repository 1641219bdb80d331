"""Native rasterizers vs the pure-JAX reference (and the dense compositor), same run.

    python benchmarks/render.py [--quick] [--capacity 1024] [--dense]

Scene: surfels bound to the synthetic FLAME head (area-weighted surface samples,
as KaoLRM), 16 views around the face; the head mesh itself for the mesh
rasterizer. Default size: 8,000 surfels, 192x192, 16 views; --quick: 600
surfels, 48x48, 2 views.

- native: `rasterize_surfels(..., backend="native")` / `rasterize_mesh(...,
  backend="native")`, the C++ (CPU) or CUDA kernels through XLA FFI.
- reference: the same calls with backend="reference" (pure JAX, 16x16 tiles,
  per-tile capacity, top-K by depth).
- dense (--dense): the reference compositing math with ONE tile covering the
  whole image and capacity N, every surfel at every pixel in depth order; slow
  on a CPU, so it renders 1 of the 16 views and its times are scaled to 16
  (flagged in the JSON); --dense-views 16 measures all.
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
import time

import jax
import jax.numpy as jnp
import numpy as np

from timing import device_peak_bytes
from kaojax.render.demo import head_cameras, head_vertices, surfels_on_surface
from kaojax.render import rasterize_mesh, rasterize_surfels


def _compile_and_time(fn, args, repeats):
  """AOT-compile fn, then time `repeats` runs (best). Returns (seconds, compile
  seconds, XLA buffer bytes: arguments + outputs + temporaries - aliased)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  nbytes = None if analysis is None else int(
      analysis.argument_size_in_bytes + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
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
  parser.add_argument("--capacity", type=int, default=None, help="per-tile capacity")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--dense", action="store_true", help="also time the dense compositor")
  parser.add_argument("--dense-views", type=int, default=None,
                      help="views rendered by the dense compositor (default: all in --quick, "
                           "1 otherwise; its times are scaled linearly to all views)")
  args = parser.parse_args()
  num, size, views = (600, 48, 2) if args.quick else (8000, 192, 16)
  capacity = args.capacity or 1024
  repeats = args.repeats or 3
  dense_views = min(views, args.dense_views or (views if args.quick else 1))

  vertices, faces, gaussians, viewmats, Ks, weights = head_scene(num, size, views)
  background = jnp.zeros(3)

  surfel_configs = {
      "native": (views, dict(tile_size=16, tile_capacity=capacity, backend="native")),
      "reference": (views, dict(tile_size=16, tile_capacity=capacity, block_size=16,
                                backend="reference")),
  }
  if args.dense:
    surfel_configs["dense"] = (dense_views, dict(tile_size=size, tile_capacity=num,
                                                 block_size=128, backend="reference"))
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
  meshes = {}
  for name in ("native", "reference"):
    def mesh_forward(v, name=name):
      return rasterize_mesh(v, faces, viewmats, Ks, size, size, tile_capacity=capacity,
                            backend=name)

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
      "surfels": num, "size": size, "views": views, "tile_capacity": capacity,
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
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
