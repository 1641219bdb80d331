"""Surfel (2DGS) renderer: tiled compositor vs the dense compositor, same run.

    python benchmarks/render.py [--quick] [--capacity 512]

Scene: surfels bound to the synthetic FLAME head (area-weighted surface samples,
as KaoLRM), 16 views around the face. Default size: 8,000 surfels, 192x192, 16
views; --quick: 600 surfels, 48x48, 2 views.

- tiled: `rasterize_surfels` (16x16 tiles, per-tile capacity, top-K by depth).
- dense: the same compositing math with ONE tile covering the whole image and
  capacity N, i.e. every surfel evaluated at every pixel in depth order (scanned
  in blocks of 128 so it fits in memory at all).
The dense compositor is slow on a CPU: by default it renders 1 of the 16 views
and its times are scaled to 16 (flagged in the JSON); --dense-views 16 measures
all. Both are jitted; forward = colour/alpha/depth/normal, backward = gradient of a
weighted sum of all four w.r.t. every Gaussian parameter. Times are the best of
--repeats runs of the AOT-compiled function (compile time reported apart); memory is XLA's compiled buffer estimate (arguments + outputs +
temporaries) and, on a GPU, the device's peak bytes in use.
The last stdout line is one JSON object.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kaojax.render.demo import head_cameras, head_vertices, surfels_on_surface
from kaojax.render.surfel import rasterize_surfels


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


def _device_peak():
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
  parser.add_argument("--capacity", type=int, default=None, help="tiled per-tile capacity")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--dense-views", type=int, default=None,
                      help="views rendered by the dense compositor (default: all in --quick, "
                           "1 otherwise; its times are scaled linearly to all views and "
                           "marked as such - views are independent, so work is linear)")
  args = parser.parse_args()
  num, size, views = (600, 48, 2) if args.quick else (8000, 192, 16)
  capacity = args.capacity or 1024
  repeats = args.repeats or 1
  dense_views = min(views, args.dense_views or (views if args.quick else 1))

  vertices, faces = head_vertices()
  mean_edge = float(jnp.mean(jnp.linalg.norm(vertices[faces[:, 0]] - vertices[faces[:, 1]], axis=-1)))
  gaussians = surfels_on_surface(jax.random.key(0), vertices, faces, num,
                                 radius=0.8 * mean_edge * (8000 / num) ** 0.5)
  viewmats, Ks = head_cameras(vertices, size, views)
  # a tighter framing than the demo: the head fills most of the image, as in KaoLRM
  Ks = Ks.at[:, :2, :2].multiply(1.6)
  background = jnp.zeros(3)
  rng = np.random.default_rng(0)
  weights = {k: jnp.asarray(rng.uniform(size=(views, size, size) + s), jnp.float32)
             for k, s in (("color", (3,)), ("alpha", ()), ("depth", ()), ("normal", (3,)))}

  configs = {
      "tiled": (views, dict(tile_size=16, tile_capacity=capacity, block_size=16)),
      "dense": (dense_views, dict(tile_size=size, tile_capacity=num, block_size=128)),
  }
  results = {}
  for name, (nv, cfg) in configs.items():
    def forward(g, cfg=cfg, nv=nv):
      return rasterize_surfels(g, viewmats[:nv], Ks[:nv], size, size, background, **cfg)

    def loss(g, cfg=cfg, nv=nv):
      out = rasterize_surfels(g, viewmats[:nv], Ks[:nv], size, size, background, **cfg)
      return sum(jnp.sum(weights[k][:nv] * out[k]) for k in weights)

    fwd_s, fwd_compile_s, fwd_bytes, out = _compile_and_time(forward, (gaussians,), repeats)
    bwd_s, bwd_compile_s, bwd_bytes, _ = _compile_and_time(jax.value_and_grad(loss),
                                                           (gaussians,), repeats)
    res = {
        "fwd_s": fwd_s, "fwd_bwd_s": bwd_s, "fwd_bytes": fwd_bytes, "fwd_bwd_bytes": bwd_bytes,
        "compile_s": fwd_compile_s + bwd_compile_s,
        "device_peak_bytes": _device_peak(),
        "overflow_per_view": np.asarray(out["overflow"]).tolist(),
        "max_tile_count": int(np.max(out["max_tile_count"])),
        "views_measured": nv,
    }
    scale = views / nv
    res["fwd_s_all_views"] = res["fwd_s"] * scale
    res["fwd_bwd_s_all_views"] = res["fwd_bwd_s"] * scale
    results[name] = (res, out)
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:9.1f} MiB"
    print(f"{name:6s} ({nv} views) fwd {res['fwd_s']:8.3f} s  fwd+bwd {res['fwd_bwd_s']:8.3f} s  "
          f"mem fwd {mb(res['fwd_bytes'])}  fwd+bwd {mb(res['fwd_bwd_bytes'])}  "
          f"max tile count {res['max_tile_count']}  overflow {sum(res['overflow_per_view'])}",
          flush=True)

  tiled, tiled_out = results["tiled"]
  dense, dense_out = results["dense"]
  diff = float(jnp.max(jnp.abs(tiled_out["color"][:dense_views] - dense_out["color"])))
  print(f"max |colour tiled - dense| = {diff:.2e} (nonzero only where tiles overflowed)")
  summary = {
      "benchmark": "render_surfels",
      "device": str(jax.devices()[0].platform),
      "surfels": num, "size": size, "views": views, "tile_capacity": capacity,
      "dense_views_measured": dense_views,
      "tiled_fwd_s": round(tiled["fwd_s"], 4),
      "dense_fwd_s": round(dense["fwd_s_all_views"], 4),
      "tiled_fwd_bwd_s": round(tiled["fwd_bwd_s"], 4),
      "dense_fwd_bwd_s": round(dense["fwd_bwd_s_all_views"], 4),
      "dense_times_scaled_from_fewer_views": dense_views < views,
      "speedup_fwd": round(dense["fwd_s_all_views"] / tiled["fwd_s"], 3),
      "speedup_fwd_bwd": round(dense["fwd_bwd_s_all_views"] / tiled["fwd_bwd_s"], 3),
      "tiled_fwd_mib": None if tiled["fwd_bytes"] is None else round(tiled["fwd_bytes"] / 2**20, 1),
      "dense_fwd_mib_measured_views": None if dense["fwd_bytes"] is None else round(dense["fwd_bytes"] / 2**20, 1),
      "tiled_fwd_bwd_mib": (None if tiled["fwd_bwd_bytes"] is None
                            else round(tiled["fwd_bwd_bytes"] / 2**20, 1)),
      "dense_fwd_bwd_mib_measured_views": (None if dense["fwd_bwd_bytes"] is None
                            else round(dense["fwd_bwd_bytes"] / 2**20, 1)),
      "tiled_compile_s": round(tiled["compile_s"], 2),
      "dense_compile_s": round(dense["compile_s"], 2),
      "tiled_overflow": int(sum(tiled["overflow_per_view"])),
      "tiled_max_tile_count": tiled["max_tile_count"],
      "max_abs_color_diff": diff,
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
