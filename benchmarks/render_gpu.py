"""Native CUDA rasterizers vs gsplat's CUDA rasterizers on a GPU, same run.

    python benchmarks/render_gpu.py [--quick] [--repeats 10]

Needs an NVIDIA GPU, JAX with CUDA (`pip install "jax[cuda13]==0.10.2"`),
kaojax built with nvcc (its CUDA library), and PyTorch with CUDA plus gsplat
(which JIT-compiles its kernels on first use). Scene as benchmarks/render.py:
8,000 surfels on the FLAME head, 192x192, 16 views (--quick: 600, 48, 2).

- kaojax: `rasterize_surfels` / `rasterize_gaussians` with backend="native".
- gsplat: `rasterization_2dgs` / `rasterization` (packed=False, SH degree 0
  colours, 16-px tiles), the same Gaussians and cameras.
Forward, and forward + backward of a weighted sum of the colour/alpha outputs,
best of --repeats after warm-up; peak device memory of each run (JAX: the
device's peak_bytes_in_use; torch: max_memory_allocated). The last stdout line
is one JSON object with the ratios gsplat_time / kaojax_time (> 1: kaojax is
faster) and kaojax_memory / gsplat_memory.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kaojax.render import rasterize_gaussians, rasterize_surfels
from render import head_scene
from timing import device_peak_bytes


def _best(fn, repeats, sync):
  fn()
  sync()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    sync()
    best = min(best, time.perf_counter() - start)
  return best


def _kaojax(render, gaussians, viewmats, Ks, size, weights, repeats):
  def forward(g):
    return render(g, viewmats, Ks, size, size, backend="native")

  def loss(g):
    out = forward(g)
    return jnp.sum(out["color"] * weights["color"]) + jnp.sum(out["alpha"] * weights["alpha"])

  fwd = jax.jit(forward)
  grad = jax.jit(jax.value_and_grad(loss))
  sync = lambda: jax.block_until_ready(jnp.zeros(()))
  fwd_s = _best(lambda: jax.block_until_ready(fwd(gaussians)), repeats, sync)
  bwd_s = _best(lambda: jax.block_until_ready(grad(gaussians)), repeats, sync)
  return fwd_s, bwd_s, device_peak_bytes()


def _gsplat(kind, gaussians, viewmats, Ks, size, weights, repeats):
  import torch
  import gsplat
  dev = torch.device("cuda")
  t = lambda x: torch.tensor(np.asarray(x), device=dev)
  params = {k: t(getattr(gaussians, k)).requires_grad_(True)
            for k in ("means", "quats", "scales", "opacities", "colors")}
  vm, K = t(viewmats), t(Ks)
  w_color, w_alpha = t(weights["color"]), t(weights["alpha"])[..., None]

  def forward():
    if kind == "surfel":
      colors, alphas = gsplat.rasterization_2dgs(
          params["means"], params["quats"], params["scales"], params["opacities"],
          params["colors"], vm, K, size, size, packed=False, tile_size=16)[:2]
    else:
      colors, alphas, _ = gsplat.rasterization(
          params["means"], params["quats"], params["scales"], params["opacities"],
          params["colors"], vm, K, size, size, packed=False, tile_size=16)
    return colors, alphas

  def fwd_bwd():
    colors, alphas = forward()
    loss = (colors * w_color).sum() + (alphas * w_alpha).sum()
    loss.backward()

  torch.cuda.reset_peak_memory_stats()
  with torch.no_grad():
    fwd_s = _best(forward, repeats, torch.cuda.synchronize)
  bwd_s = _best(fwd_bwd, repeats, torch.cuda.synchronize)
  return fwd_s, bwd_s, torch.cuda.max_memory_allocated()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    sys.exit("benchmarks/render_gpu.py needs JAX on an NVIDIA GPU "
             f"(jax.default_backend() is {jax.default_backend()!r})")
  num, size, views = (600, 48, 2) if args.quick else (8000, 192, 16)
  _, _, gaussians, viewmats, Ks, weights = head_scene(num, size, views)
  summary = {"benchmark": "render_gpu", "device": str(jax.devices()[0].device_kind),
             "gaussians": num, "size": size, "views": views}
  for kind, render in (("surfel", rasterize_surfels), ("gaussian3d", rasterize_gaussians)):
    ours = _kaojax(render, gaussians, viewmats, Ks, size, weights, args.repeats)
    theirs = _gsplat(kind, gaussians, viewmats, Ks, size, weights, args.repeats)
    print(f"{kind:10s} kaojax fwd {ours[0] * 1e3:8.2f} ms  fwd+bwd {ours[1] * 1e3:8.2f} ms | "
          f"gsplat fwd {theirs[0] * 1e3:8.2f} ms  fwd+bwd {theirs[1] * 1e3:8.2f} ms", flush=True)
    summary[kind] = {
        "kaojax_fwd_ms": ours[0] * 1e3, "kaojax_fwd_bwd_ms": ours[1] * 1e3,
        "gsplat_fwd_ms": theirs[0] * 1e3, "gsplat_fwd_bwd_ms": theirs[1] * 1e3,
        "gsplat_over_kaojax_fwd": theirs[0] / ours[0],
        "gsplat_over_kaojax_fwd_bwd": theirs[1] / ours[1],
        "kaojax_peak_mib": None if ours[2] is None else ours[2] / 2**20,
        "gsplat_peak_mib": theirs[2] / 2**20,
    }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
