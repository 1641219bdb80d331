"""2D Gaussian surfels vs gsplat's 2DGS projection and a dense compositor from
its formulas; finite-difference gradients; busy tiles (nothing dropped)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaojax.render import rasterize_surfels
from kaojax.render.surfel import project_surfels
from tests.render import gsplat_oracle as oracle
from tests.render.scenes import add_splats_behind_camera, orbit_views, random_gaussians

W, H = 48, 32


def _flat_views(g, viewmats, Ks, gauss_batch, cam_batch):
  """gsplat layout: Gaussians [*gb, N] with cameras [*gb, C]; returns projection
  of gsplat flattened to [I, N, ...] plus flattened per-view opacities/colours."""
  proj = oracle.project_2dgs(g.means, g.quats, g.scales, viewmats, Ks, W, H)
  n = g.means.shape[-2]
  flat = {k: v.reshape((-1, n) + v.shape[len(cam_batch) + 1:]) for k, v in proj.items()}
  reps = int(np.prod(cam_batch[len(gauss_batch):])) if len(cam_batch) > len(gauss_batch) else 1
  op = np.repeat(g.opacities.reshape((-1, 1, n)), reps, 1).reshape(-1, n)
  col = np.repeat(g.colors.reshape((-1, 1, n, 3)), reps, 1).reshape(-1, n, 3)
  return flat, op, col


def test_projection_matches_gsplat():
  gb, cb = (2,), (2, 3)
  g = random_gaussians(0, gb, n=150)
  viewmats, Ks = orbit_views(1, cb)
  ref = oracle.project_2dgs(g.means, g.quats, g.scales, viewmats, Ks, W, H)
  ours = project_surfels(g.means[:, None], g.quats[:, None], g.scales[:, None], viewmats, Ks, W, H)
  ours = {k: np.asarray(v) for k, v in ours.items()}
  np.testing.assert_array_equal(ours["radii"], ref["radii"])
  live = ref["radii"][..., 0] > 0
  assert live.sum() > 200
  np.testing.assert_allclose(ours["depths"], ref["depths"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours["means2d"][live], ref["means2d"][live], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(ours["ray_transforms"][live], ref["ray_transforms"][live],
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(ours["normals"], ref["normals"], atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ours["normals"], axis=-1), 1.0, atol=1e-5)
  # facing the camera: n . mu_c < 0
  R, t = viewmats[..., None, :3, :3], viewmats[..., None, :3, 3]
  means_c = np.einsum("...ij,...j->...i", R, g.means[:, None]) + t
  assert np.all(np.sum(ours["normals"] * means_c, -1) < 0)


@pytest.mark.parametrize("gauss_batch,cam_batch", [((), ()), ((), (3,)), ((2,), (2, 2))],
                         ids=["one_view", "three_views", "two_scenes_x2"])
def test_render_matches_dense_gsplat_compositor(gauss_batch, cam_batch):
  g = random_gaussians(2, gauss_batch, n=160)
  viewmats, Ks = orbit_views(3, cam_batch)
  views = int(np.prod(cam_batch)) if cam_batch else 1
  bg = np.random.default_rng(4).uniform(size=tuple(cam_batch) + (3,)).astype(np.float32)
  out = rasterize_surfels(jax.tree_util.tree_map(jnp.asarray, g), viewmats, Ks, W, H, bg)
  assert out["color"].shape == tuple(cam_batch) + (H, W, 3)
  assert out["normal"].shape == tuple(cam_batch) + (H, W, 3)
  assert out["alpha"].shape == out["depth"].shape == tuple(cam_batch) + (H, W)
  assert int(jnp.sum(out["overflow"])) == 0
  vm_g = viewmats if cam_batch else viewmats[None]
  K_g = Ks if cam_batch else Ks[None]
  flat, op, col = _flat_views(g, vm_g, K_g, gauss_batch, cam_batch or (1,))
  ref = oracle.dense_composite("2dgs", flat, op, col, W, H, bg.reshape(views, 3))
  clear = ~ref["ambiguous"]
  assert clear.mean() > 0.99
  for key in ("color", "alpha", "depth", "normal"):
    ours = np.asarray(out[key]).reshape(ref[key].shape)
    np.testing.assert_allclose(ours[clear], ref[key][clear], atol=1e-4, rtol=0, err_msg=key)
  alpha = ref["alpha"]
  assert 0.2 < float(np.mean(alpha > 0.5)) < 0.99   # a non-trivial scene
  assert float(np.max(alpha)) > 0.99                  # early stop exercised


def test_busy_tiles_drop_nothing():
  """Every splat listed by gsplat's tile intersection is composited: the tile
  counts equal gsplat's, nothing overflows, and the image equals the dense
  compositor over the full lists."""
  g = random_gaussians(5, (), n=120, scale=(0.2, 0.5))
  viewmats, Ks = orbit_views(6, ())
  gj = jax.tree_util.tree_map(jnp.asarray, g)
  out = rasterize_surfels(gj, viewmats, Ks, W, H)
  proj = oracle.project_2dgs(g.means, g.quats, g.scales, viewmats[None], Ks[None], W, H)
  member = oracle.tile_membership(proj["means2d"], proj["radii"], proj["depths"], W, H)
  counts = member.sum(-1)[0]
  assert int(out["overflow"]) == 0 and int(out["max_tile_count"]) == counts.max() > 8
  ref = oracle.dense_composite("2dgs", proj, g.opacities[None], g.colors[None], W, H,
                               np.zeros((1, 3), np.float32), member=member)
  clear = ~ref["ambiguous"][0]
  for key in ("color", "alpha", "normal"):
    np.testing.assert_allclose(np.asarray(out[key])[clear], ref[key][0][clear], atol=1e-4)


def test_jit_vmap_consistency():
  g = jax.tree_util.tree_map(jnp.asarray, random_gaussians(7, (2,), n=60))
  viewmats, Ks = orbit_views(8, (2,))
  batched = rasterize_surfels(g, viewmats, Ks, W, H)
  single = jax.vmap(lambda gg, v, k: rasterize_surfels(gg, v, k, W, H))(g, viewmats, Ks)
  for key in ("color", "alpha", "depth", "normal"):
    np.testing.assert_allclose(batched[key], single[key], atol=1e-6)


def _directional_check(fn, params, seed, eps=1e-6, rtol=2e-5):
  """d/dt fn(params + t v) at 0 by autodiff vs central differences, per leaf."""
  rng = np.random.default_rng(seed)
  grads = jax.grad(fn)(params)
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(g))), "non-finite gradient"
  leaves, treedef = jax.tree_util.tree_flatten(params)
  for i, leaf in enumerate(leaves):
    v = rng.normal(size=leaf.shape)
    direction = [jnp.zeros_like(l) for l in leaves]
    direction[i] = jnp.asarray(v)
    shift = lambda s: jax.tree_util.tree_unflatten(
        treedef, [l + s * d for l, d in zip(leaves, direction)])
    fd = (fn(shift(eps)) - fn(shift(-eps))) / (2 * eps)
    ad = jnp.sum(jax.tree_util.tree_leaves(grads)[i] * direction[i])
    assert abs(float(fd)) > 1e-6, f"leaf {i}: no sensitivity"
    np.testing.assert_allclose(float(ad), float(fd), rtol=rtol, atol=1e-8, err_msg=f"leaf {i}")


def test_gradients_match_finite_differences_float64():
  with jax.enable_x64(True):
    g = random_gaussians(9, (), n=14, scale=(0.3, 0.6), spread=0.5, dtype=np.float64)
    viewmats, Ks = orbit_views(10, (2,), dtype=np.float64)
    # two splats behind camera 0: culled there, and their gradients must stay finite
    g = add_splats_behind_camera(g, viewmats[0])
    g = jax.tree_util.tree_map(jnp.asarray, g)
    w, h = 24, 16
    Ks = Ks * np.array([0.5, 0.5, 1.0])[:, None]
    rng = np.random.default_rng(11)
    wc, wa, wd, wn = (jnp.asarray(rng.uniform(size=s)) for s in
                      [(2, h, w, 3), (2, h, w), (2, h, w), (2, h, w, 3)])

    def loss(params):
      gg, vm = params
      out = rasterize_surfels(gg, vm, Ks, w, h, jnp.array([0.2, 0.3, 0.4]))
      return (jnp.sum(wc * out["color"]) + jnp.sum(wa * out["alpha"])
              + jnp.sum(wd * out["depth"] * out["alpha"]) + jnp.sum(wn * out["normal"]))

    assert loss((g, jnp.asarray(viewmats))).dtype == jnp.float64
    _directional_check(loss, (g, jnp.asarray(viewmats)), seed=12)
