"""Native (XLA FFI) rasterizers vs the pure-JAX reference: forward and gradient
parity for batch shapes (), (2,), (2, 3) under jit, vmap and grad, tile
overflow, per-shard execution under a sharded jit, and the announced fallback
when the library is missing. The CUDA set runs only where JAX sees a GPU."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaojax.render import native, rasterize_gaussians, rasterize_mesh, rasterize_surfels
from tests.render.scenes import orbit_views, random_gaussians

REPO = pathlib.Path(__file__).resolve().parents[2]
W, H = 40, 36           # not multiples of the 16 px tile: partial edge tiles
BATCHES = [(), (2,), (2, 3)]
SPLATS = {"surfel": rasterize_surfels, "gaussian3d": rasterize_gaussians}

PLATFORMS = ["cpu"] + (["cuda"] if any(d.platform == "gpu" for d in jax.devices()) else [])

pytestmark = pytest.mark.skipif("cpu" not in native.loaded,
                                reason=f"native CPU library not built: {native.load_errors}")


def _scene(batch, n=180, seed=0):
  g = random_gaussians(seed, batch, n=n, scale=(0.05, 0.25), spread=0.7)
  viewmats, Ks = orbit_views(seed + 1, batch, distance=3.0, width=W, height=H, focal=38.0)
  bg = np.random.default_rng(seed + 2).uniform(size=tuple(batch) + (3,)).astype(np.float32)
  return jax.tree_util.tree_map(jnp.asarray, g), jnp.asarray(viewmats), jnp.asarray(Ks), bg


def _loss_weights(out, seed=3):
  """Fixed random cotangents for every float output."""
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32))
          for k, v in out.items() if jnp.issubdtype(v.dtype, jnp.floating)}


def _assert_outputs_close(ref, nat, ref64=None):
  """Within 1e-5 (depth: relative to its scale, it is divided by alpha).
  With `ref64` (the reference in float64), pixels where float32 rounding alone
  moves the reference by more than the tolerance (grazing surfels, splats at
  the 1/255 cut) are left out of the strict check; they must be under 0.5% of
  the pixels and within 1e-3."""
  assert set(ref) == set(nat)
  for k in ref:
    a, b = np.asarray(ref[k]), np.asarray(nat[k])
    if not np.issubdtype(a.dtype, np.floating):
      np.testing.assert_array_equal(b, a, err_msg=k)
      continue
    tol = 1e-5 * (float(np.max(np.abs(a))) if k == "depth" else 1.0)
    strict = np.ones(a.shape, bool)
    if ref64 is not None:
      strict = np.abs(a - np.asarray(ref64[k])) <= tol
      assert strict.mean() > 0.995, (k, strict.mean())
      np.testing.assert_allclose(b, a, rtol=0, atol=100 * tol, err_msg=k)
    np.testing.assert_allclose(b[strict], a[strict], rtol=1e-5, atol=tol, err_msg=k)


def _assert_grads_close(ref, nat):
  for name in ("means", "quats", "scales", "opacities", "colors"):
    a, b = getattr(ref, name), getattr(nat, name)
    scale = float(jnp.max(jnp.abs(a)))
    assert scale > 0, name
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("kind", sorted(SPLATS))
def test_splat_forward_and_gradient_parity(kind, batch, platform):
  render = SPLATS[kind]
  g, viewmats, Ks, bg = _scene(batch)
  device = jax.devices("gpu" if platform == "cuda" else "cpu")[0]
  g, viewmats, Ks = jax.device_put((g, viewmats, Ks), device)
  ref = render(g, viewmats, Ks, W, H, bg, backend="reference")
  nat = render(g, viewmats, Ks, W, H, bg, backend="native")
  assert float(jnp.mean(nat["alpha"])) > 0.2
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64)
    ref64 = render(jax.tree_util.tree_map(to64, g), to64(viewmats), to64(Ks), W, H,
                   to64(bg), backend="reference")
  _assert_outputs_close(ref, nat, ref64)
  weights = _loss_weights(ref)

  def loss(g, backend):
    out = render(g, viewmats, Ks, W, H, bg, backend=backend)
    return sum(jnp.sum(out[k] * w) for k, w in weights.items())

  _assert_grads_close(jax.grad(loss)(g, "reference"), jax.jit(jax.grad(loss), static_argnums=1)(
      g, "native"))


@pytest.mark.parametrize("kind", sorted(SPLATS))
def test_vmap_of_native_matches_reference_and_is_one_launch(kind):
  render = SPLATS[kind]
  g, viewmats, Ks, bg = _scene((3,), seed=5)
  weights = _loss_weights(render(g, viewmats[0], Ks[0], W, H, bg[0], backend="reference"))

  def per_view(backend, g, viewmat, K, b):
    out = render(g, viewmat, K, W, H, b, backend=backend)
    return sum(jnp.sum(out[k] * w) for k, w in weights.items()), out["color"]

  def run(backend):
    fn = jax.vmap(jax.value_and_grad(functools.partial(per_view, backend), has_aux=True))
    return jax.jit(fn)(g, viewmats, Ks, bg)

  (l_ref, c_ref), g_ref = run("reference")
  (l_nat, c_nat), g_nat = run("native")
  np.testing.assert_allclose(c_nat, c_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l_nat, l_ref, rtol=1e-5)
  _assert_grads_close(g_ref, g_nat)
  hlo = jax.jit(jax.vmap(functools.partial(per_view, "native"))).lower(
      g, viewmats, Ks, bg).as_text()
  target = "surfel" if kind == "surfel" else "gaussian"
  assert hlo.count(f"kaojax_{target}_forward") == 1, "vmap must fold the views into one call"


@pytest.mark.parametrize("kind", sorted(SPLATS))
def test_tile_overflow_matches_reference(kind):
  render = SPLATS[kind]
  g, viewmats, Ks, bg = _scene((2,), n=300, seed=7)
  ref = render(g, viewmats, Ks, W, H, bg, tile_capacity=24, backend="reference")
  nat = render(g, viewmats, Ks, W, H, bg, tile_capacity=24, backend="native")
  assert int(jnp.min(ref["overflow"])) > 0
  _assert_outputs_close(ref, nat)


def _mesh_scene(batch, seed=0, head=False):
  """The Open3D sphere (1,100 faces) or the synthetic FLAME head (~10k faces)."""
  from tests.render.mesh_test import _flame_head, _sphere
  verts, faces = _flame_head() if head else _sphere()
  distance = 0.9 if head else 2.5
  viewmats, Ks = orbit_views(seed, batch, distance=distance, width=W, height=H, focal=45.0)
  return jnp.asarray(verts, jnp.float32), jnp.asarray(faces), jnp.asarray(viewmats), jnp.asarray(Ks)


@pytest.mark.parametrize("batch", BATCHES, ids=str)
def test_mesh_forward_and_gradient_parity(batch):
  verts, faces, viewmats, Ks = _mesh_scene(batch)
  ref = rasterize_mesh(verts, faces, viewmats, Ks, W, H, backend="reference")
  nat = rasterize_mesh(verts, faces, viewmats, Ks, W, H, backend="native")
  assert float(jnp.mean(ref["mask"])) > 0.2
  _assert_outputs_close(ref, nat)
  weights = _loss_weights(ref)

  def loss(v, backend):
    out = rasterize_mesh(v, faces, viewmats, Ks, W, H, backend=backend)
    return sum(jnp.sum(out[k] * w) for k, w in weights.items())

  a = jax.grad(loss)(verts, "reference")
  b = jax.jit(jax.grad(loss), static_argnums=1)(verts, "native")
  np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(a))))


def test_mesh_overflow_matches_reference():
  verts, faces, viewmats, Ks = _mesh_scene((2,), seed=3, head=True)
  ref = rasterize_mesh(verts, faces, viewmats, Ks, W, H, tile_capacity=64, backend="reference")
  nat = rasterize_mesh(verts, faces, viewmats, Ks, W, H, tile_capacity=64, backend="native")
  assert int(jnp.min(ref["overflow"])) > 0
  _assert_outputs_close(ref, nat)


def test_backend_argument_is_checked():
  g, viewmats, Ks, bg = _scene(())
  with pytest.raises(ValueError, match="backend must be one of"):
    rasterize_surfels(g, viewmats, Ks, W, H, backend="fast")


def _run_python(code, **env):
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, **env))
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def test_sharded_jit_runs_per_shard_without_collectives():
  code = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from kaojax.render import rasterize_surfels
from tests.render.native_test import _scene, W, H
g, viewmats, Ks, bg = _scene((8,), n=120)
mesh = Mesh(np.array(jax.devices()), ("data",))
shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
gs, vs, ks = jax.tree_util.tree_map(shard, (g, viewmats, Ks))
def loss(g, v, k, backend):
  return jnp.sum(rasterize_surfels(g, v, k, W, H, backend=backend)["color"] ** 2)
fn = jax.jit(jax.value_and_grad(loss), static_argnums=3)
hlo = fn.lower(gs, vs, ks, "native").compile().as_text()
(l_n, g_n), l_r = fn(gs, vs, ks, "native"), loss(g, viewmats, Ks, "reference")
collectives = [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")
               if op in hlo]
print(json.dumps(dict(collectives=collectives, calls=hlo.count("kaojax_surfel_forward"),
                      loss_diff=float(abs(l_n - l_r) / abs(l_r)),
                      sharding=str(g_n.means.sharding.spec))))
"""
  import json
  out = _run_python(code, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["calls"] >= 1
  assert report["loss_diff"] < 1e-5, report
  # the loss is a sum over views: one all-reduce of the scalar is expected, but
  # nothing may gather the sharded splats or images
  assert "all-gather" not in report["collectives"], report
  assert "all-to-all" not in report["collectives"], report


def test_fallback_to_reference_is_announced_when_the_library_is_missing(tmp_path):
  code = f"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
import kaojax.render.native as native
native.loaded.clear()
native.load({str(tmp_path)!r})
native._announce()
assert native.resolve("auto") == "reference"
try:
  native.resolve("native")
except RuntimeError as e:
  print("ERROR:", e)
else:
  raise SystemExit("backend='native' did not fail without the library")
"""
  out = _run_python(code).stdout
  assert "native rasterizers not available" in out and "pure-JAX reference" in out
  assert "not found in " + str(tmp_path) in out
  assert "ERROR: kaojax.render: backend='native' asked for" in out


def test_environment_variable_selects_the_backend():
  code = """
import kaojax.render.native as native
assert native.default_backend() == "reference", native.default_backend()
assert native.resolve() == "reference"
"""
  _run_python(code, KAOJAX_RENDER_BACKEND="reference")
