"""FLAME forward (vertices + landmarks) speed: kaojax (jitted JAX) vs smplx.FLAME
(PyTorch) on the CPU, measured in the same run on the synthetic model.

smplx is timed with one PyTorch thread and with one per core, and its faster figure
is the one compared (on a shared machine PyTorch's thread pool can be many times
slower than one thread). The largest vertex difference between the two is printed.

    python benchmarks/flame.py [--quick]

The last line is a JSON object with the headline figures.
"""

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from timing import best_time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="fewer repeats")
  args = parser.parse_args()
  repeats = 3 if args.quick else 20

  import torch
  import smplx
  from kaojax.flame import load_flame
  from kaojax.flame.synthetic import write_synthetic_flame

  folder = write_synthetic_flame(tempfile.mkdtemp())
  model = load_flame(folder)
  @jax.jit
  def forward(m, s, e, p):
    out = m(s, e, p)
    return out.vertices, out.landmarks2d

  results, diffs = {}, {}
  for batch in (1, 64):
    rng = np.random.default_rng(0)
    shape = rng.normal(size=(batch, 100)).astype(np.float32)
    expr = rng.normal(size=(batch, 50)).astype(np.float32)
    pose = (0.2 * rng.normal(size=(batch, 6))).astype(np.float32)
    js, je, jp = jnp.asarray(shape), jnp.asarray(expr), jnp.asarray(pose)
    t_jax = best_time(lambda: jax.block_until_ready(forward(model, js, je, jp)), repeats)

    ref = smplx.FLAME(model_path=str(folder), num_betas=100, num_expression_coeffs=50,
                      use_face_contour=True, batch_size=batch)
    ts, te, tp = (torch.from_numpy(a) for a in (shape, expr, pose))

    def run_smplx():
      with torch.no_grad():
        return ref(betas=ts, expression=te, global_orient=tp[:, :3], jaw_pose=tp[:, 3:])
    t_torch = float("inf")
    for threads in sorted({1, os.cpu_count()}):
      torch.set_num_threads(threads)
      t_torch = min(t_torch, best_time(run_smplx, repeats))
    vertex_diff = float(np.abs(np.asarray(forward(model, js, je, jp)[0])
                               - run_smplx().vertices.numpy()).max())
    diffs[batch] = vertex_diff
    results[batch] = (t_jax, t_torch)
    print(f"batch {batch:3d}: kaojax {t_jax * 1e3:8.2f} ms   smplx {t_torch * 1e3:8.2f} ms   "
          f"speedup x{t_torch / t_jax:.2f}   max |vertex diff| {vertex_diff:.2e}")
  print(json.dumps({
      "benchmark": "flame_forward_cpu",
      "kaojax_ms_b1": round(results[1][0] * 1e3, 3), "smplx_ms_b1": round(results[1][1] * 1e3, 3),
      "kaojax_ms_b64": round(results[64][0] * 1e3, 3),
      "smplx_ms_b64": round(results[64][1] * 1e3, 3),
      "speedup_b1": round(results[1][1] / results[1][0], 3),
      "speedup_b64": round(results[64][1] / results[64][0], 3),
      "max_vertex_diff": max(diffs.values()),
  }))


if __name__ == "__main__":
  main()
