"""Native (XLA FFI) rasterizers vs the pure-JAX reference: forward and gradient
parity for batch shapes (), (2,), (2, 3) under jit, vmap and grad, busy tiles
(sort-based binning, nothing dropped), determinism, per-shard execution under a
sharded jit, and the announced fallback when the library is missing. The CUDA set
runs only where JAX sees a GPU."""

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
from tests.render.scenes import orbit_views, random_gaussians, uv_sphere

REPO = pathlib.Path(__file__).resolve().parents[2]
W, H = 40, 36           # not multiples of the 16 px tile: partial edge tiles
BATCHES = [(), (2,), (2, 3)]
SPLATS = {"surfel": rasterize_surfels, "gaussian3d": rasterize_gaussians}

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
PLATFORMS = ["cpu", "cuda"]

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


# Views are independent, so the reference is computed once on a (2, 3) batch
# (every view with its own Gaussians) and the () and (2,) cases compare against
# its slices: same numbers, a third of the reference's compile time.
_SLICES = {(): (0, 0), (2,): (slice(None), 0), (2, 3): (slice(None), slice(None))}


def _weighted_loss(render, viewmats, Ks, bg, weights, backend):
  def loss(g):
    out = render(g, viewmats, Ks, W, H, bg, backend=backend)
    return sum(jnp.sum(out[k] * w) for k, w in weights.items())
  return loss


@functools.lru_cache(maxsize=None)
def _splat_reference(kind):
  """Scene, reference outputs (float32 and float64), loss weights and reference
  gradients for a (2, 3) batch."""
  render = SPLATS[kind]
  g, viewmats, Ks, bg = _scene((2, 3))
  ref = render(g, viewmats, Ks, W, H, bg, backend="reference")
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64)
    ref64 = render(jax.tree_util.tree_map(to64, g), to64(viewmats), to64(Ks), W, H,
                   to64(bg), backend="reference")
    ref64 = jax.tree_util.tree_map(np.asarray, ref64)
  weights = _loss_weights(ref)
  grads = jax.jit(jax.grad(_weighted_loss(render, viewmats, Ks, bg, weights, "reference")))(g)
  return (g, viewmats, Ks, bg), ref, ref64, weights, grads


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("kind", sorted(SPLATS))
def test_splat_forward_and_gradient_parity(kind, batch, platform):
  if platform == "cuda" and not HAS_GPU:
    pytest.skip("CUDA parity needs a GPU (JAX sees none)")
  render = SPLATS[kind]
  scene, ref, ref64, weights, ref_grads = _splat_reference(kind)
  cut = lambda tree: jax.tree_util.tree_map(lambda a: a[_SLICES[batch]], tree)
  g, viewmats, Ks, bg = cut(scene)
  ref, ref64, weights, ref_grads = cut((ref, ref64, weights, ref_grads))
  device = jax.devices("gpu" if platform == "cuda" else "cpu")[0]
  g, viewmats, Ks = jax.device_put((g, viewmats, Ks), device)
  nat = jax.jit(render, static_argnames=("width", "height", "backend"))(
      g, viewmats, Ks, width=W, height=H, background=bg, backend="native")
  assert nat["color"].shape == tuple(batch) + (H, W, 3)
  assert float(jnp.mean(nat["alpha"])) > 0.2
  _assert_outputs_close(ref, nat, ref64)
  loss = _weighted_loss(render, viewmats, Ks, bg, weights, "native")
  _assert_grads_close(ref_grads, jax.jit(jax.grad(loss))(g))


@pytest.mark.parametrize("kind", sorted(SPLATS))
def test_vmap_of_native_matches_reference_and_is_one_launch(kind):
  render = SPLATS[kind]
  scene, ref, _, weights, ref_grads = _splat_reference(kind)
  cut = lambda tree: jax.tree_util.tree_map(lambda a: a[:, 0], tree)
  (g, viewmats, Ks, bg), ref, weights, ref_grads = cut((scene, ref, weights, ref_grads))

  def per_view(g, viewmat, K, b, w):
    out = render(g, viewmat, K, W, H, b, backend="native")
    return sum(jnp.sum(out[k] * w[k]) for k in w), out["color"]

  fn = jax.jit(jax.vmap(jax.value_and_grad(per_view, has_aux=True)))
  (_, color), grads = fn(g, viewmats, Ks, bg, weights)
  np.testing.assert_allclose(color, ref["color"], rtol=1e-5, atol=1e-5)
  _assert_grads_close(ref_grads, grads)
  hlo = jax.jit(jax.vmap(per_view)).lower(g, viewmats, Ks, bg, weights).as_text()
  target = "surfel" if kind == "surfel" else "gaussian"
  assert hlo.count(f"kaojax_{target}_forward") == 1, "vmap must fold the views into one call"


@pytest.mark.parametrize("kind", sorted(SPLATS))
def test_busy_tiles_match_reference(kind):
  """Tiles crossed by most of 300 splats: both backends composite every one."""
  render = SPLATS[kind]
  g, viewmats, Ks, bg = _scene((2,), n=300, seed=7)
  ref = render(g, viewmats, Ks, W, H, bg, backend="reference")
  nat = render(g, viewmats, Ks, W, H, bg, backend="native")
  assert int(jnp.min(ref["max_tile_count"])) > 100
  assert int(jnp.max(nat["overflow"])) == 0
  _assert_outputs_close(ref, nat)


@pytest.mark.parametrize("kind", sorted(SPLATS))
def test_native_gradients_are_deterministic(kind, tmp_path):
  """The backward pass sums each splat's intersections in a fixed order: the same
  bits with one thread as with the whole pool."""
  render = SPLATS[kind]
  scene, _, _, weights, _ = _splat_reference(kind)
  g, viewmats, Ks, bg = scene
  loss = jax.jit(jax.grad(_weighted_loss(render, viewmats, Ks, bg, weights, "native")))
  first = jax.tree_util.tree_map(np.asarray, loss(g))
  again = jax.tree_util.tree_map(np.asarray, loss(g))
  for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)
  code = f"""
import jax, numpy as np
from tests.render import native_test as t
scene, _, _, weights, _ = t._splat_reference({kind!r})
g, viewmats, Ks, bg = scene
grads = jax.jit(jax.grad(t._weighted_loss(t.SPLATS[{kind!r}], viewmats, Ks, bg, weights,
                                          "native")))(g)
np.savez({str(tmp_path / "one_thread.npz")!r},
         **{{k: np.asarray(getattr(grads, k)) for k in ("means", "colors", "opacities")}})
"""
  _run_python(code, KAOJAX_NATIVE_THREADS="1")
  with np.load(tmp_path / "one_thread.npz") as one_thread:
    for name in one_thread.files:
      np.testing.assert_array_equal(one_thread[name], getattr(first, name), err_msg=name)


def _mesh_scene(batch, seed=0):
  """The Open3D sphere (radius 0.8, resolution 24: 2,208 faces; built in numpy, so
  that these tests need jax alone) seen from `batch` cameras."""
  verts, faces = uv_sphere(0.8, 24)
  viewmats, Ks = orbit_views(seed, batch, distance=2.5, width=W, height=H, focal=45.0)
  return jnp.asarray(verts, jnp.float32), jnp.asarray(faces), jnp.asarray(viewmats), jnp.asarray(Ks)


@functools.lru_cache(maxsize=None)
def _mesh_reference():
  """A (2, 3) batch of meshes (one copy of the sphere per view, so that
  gradients are per view), reference outputs, loss weights and gradients."""
  verts, faces, viewmats, Ks = _mesh_scene((2, 3))
  verts = jnp.broadcast_to(verts, (2, 3) + verts.shape)
  ref = rasterize_mesh(verts, faces, viewmats, Ks, W, H, backend="reference")
  weights = _loss_weights(ref)
  grads = jax.jit(jax.grad(_mesh_loss(faces, viewmats, Ks, weights, "reference")))(verts)
  return (verts, viewmats, Ks), faces, ref, weights, grads


def _mesh_loss(faces, viewmats, Ks, weights, backend):
  def loss(v):
    out = rasterize_mesh(v, faces, viewmats, Ks, W, H, backend=backend)
    return sum(jnp.sum(out[k] * w) for k, w in weights.items())
  return loss


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
def test_mesh_forward_and_gradient_parity(batch, platform):
  if platform == "cuda" and not HAS_GPU:
    pytest.skip("CUDA parity needs a GPU (JAX sees none)")
  scene, faces, ref, weights, ref_grads = _mesh_reference()
  cut = lambda tree: jax.tree_util.tree_map(lambda a: a[_SLICES[batch]], tree)
  verts, viewmats, Ks = cut(scene)
  ref, weights, ref_grads = cut((ref, weights, ref_grads))
  device = jax.devices("gpu" if platform == "cuda" else "cpu")[0]
  verts, viewmats, Ks = jax.device_put((verts, viewmats, Ks), device)
  nat = rasterize_mesh(verts, faces, viewmats, Ks, W, H, backend="native")
  assert float(jnp.mean(ref["mask"])) > 0.2
  _assert_outputs_close(ref, nat)
  grads = jax.jit(jax.grad(_mesh_loss(faces, viewmats, Ks, weights, "native")))(verts)
  np.testing.assert_allclose(grads, ref_grads, rtol=1e-4,
                             atol=1e-4 * float(jnp.max(jnp.abs(ref_grads))))


def test_mesh_busy_tiles_match_reference():
  verts, faces, viewmats, Ks = _mesh_scene((2,), seed=3)
  ref = rasterize_mesh(verts, faces, viewmats, Ks, W, H, backend="reference")
  nat = rasterize_mesh(verts, faces, viewmats, Ks, W, H, backend="native")
  assert int(jnp.min(ref["max_tile_count"])) > 40
  assert int(jnp.max(nat["overflow"])) == 0
  _assert_outputs_close(ref, nat)


def test_cuda_library_is_built_where_nvcc_is_found():
  import shutil
  if not shutil.which("nvcc"):
    pytest.skip("no nvcc on this machine: the CUDA library is not built")
  assert "cuda" in native.loaded, native.load_errors


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
  out = _run_python(code, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                    + " --xla_force_host_platform_device_count=8")
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
