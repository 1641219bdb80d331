"""3D Gaussians (EWA) vs gsplat's projection and a dense compositor from its
formulas; finite-difference gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaojax.render import rasterize_gaussians
from kaojax.render.gaussian3d import project_gaussians
from tests.render import gsplat_oracle as oracle
from tests.render.scenes import add_splats_behind_camera, orbit_views, random_gaussians
from tests.render.surfel_test import _directional_check

W, H = 48, 32


def test_projection_matches_gsplat():
  g = random_gaussians(20, (2,), n=150)
  viewmats, Ks = orbit_views(21, (2, 3))
  ref = oracle.project_3dgs(g.means, g.quats, g.scales, viewmats, Ks, W, H)
  ours = project_gaussians(g.means[:, None], g.quats[:, None], g.scales[:, None], viewmats, Ks,
                           W, H)
  ours = {k: np.asarray(v) for k, v in ours.items()}
  np.testing.assert_array_equal(ours["radii"], ref["radii"])
  live = ref["radii"][..., 0] > 0
  assert live.sum() > 200
  np.testing.assert_allclose(ours["depths"], ref["depths"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours["means2d"], ref["means2d"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(ours["conics"][live], ref["conics"][live], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gauss_batch,cam_batch", [((), ()), ((), (3,)), ((2,), (2, 2))],
                         ids=["one_view", "three_views", "two_scenes_x2"])
def test_render_matches_dense_gsplat_compositor(gauss_batch, cam_batch):
  g = random_gaussians(22, gauss_batch, n=160)
  viewmats, Ks = orbit_views(23, cam_batch)
  views = int(np.prod(cam_batch)) if cam_batch else 1
  bg = np.random.default_rng(24).uniform(size=tuple(cam_batch) + (3,)).astype(np.float32)
  out = rasterize_gaussians(jax.tree_util.tree_map(jnp.asarray, g), viewmats, Ks, W, H, bg)
  assert out["color"].shape == tuple(cam_batch) + (H, W, 3)
  assert out["alpha"].shape == out["depth"].shape == tuple(cam_batch) + (H, W)
  assert int(jnp.sum(out["overflow"])) == 0
  vm = viewmats if cam_batch else viewmats[None]
  K = Ks if cam_batch else Ks[None]
  proj = oracle.project_3dgs(g.means, g.quats, g.scales, vm, K, W, H)
  n = g.means.shape[-2]
  flat = {k: v.reshape((-1, n) + v.shape[len(vm.shape) - 1:]) for k, v in proj.items()}
  reps = views // (int(np.prod(gauss_batch)) if gauss_batch else 1)
  op = np.repeat(g.opacities.reshape(-1, 1, n), reps, 1).reshape(-1, n)
  col = np.repeat(g.colors.reshape(-1, 1, n, 3), reps, 1).reshape(-1, n, 3)
  ref = oracle.dense_composite("3dgs", flat, op, col, W, H, bg.reshape(views, 3))
  clear = ~ref["ambiguous"]
  assert clear.mean() > 0.99
  for key in ("color", "alpha", "depth"):
    ours = np.asarray(out[key]).reshape(ref[key].shape)
    np.testing.assert_allclose(ours[clear], ref[key][clear], atol=1e-4, rtol=0, err_msg=key)
  assert 0.2 < float(np.mean(ref["alpha"] > 0.5)) < 0.99
  assert float(np.max(ref["alpha"])) > 0.99


def test_gradients_match_finite_differences_float64():
  with jax.enable_x64(True):
    g = random_gaussians(25, (), n=14, scale=(0.15, 0.4), spread=0.5, dtype=np.float64)
    viewmats, Ks = orbit_views(26, (2,), dtype=np.float64)
    # two splats behind camera 0: culled there, and their gradients must stay finite
    g = add_splats_behind_camera(g, viewmats[0])
    g = jax.tree_util.tree_map(jnp.asarray, g)
    w, h = 24, 16
    Ks = Ks * np.array([0.5, 0.5, 1.0])[:, None]
    rng = np.random.default_rng(27)
    wc, wa, wd = (jnp.asarray(rng.uniform(size=s)) for s in [(2, h, w, 3), (2, h, w), (2, h, w)])

    def loss(params):
      gg, vm = params
      out = rasterize_gaussians(gg, vm, Ks, w, h, jnp.array([1.0, 1.0, 1.0]))
      return (jnp.sum(wc * out["color"]) + jnp.sum(wa * out["alpha"])
              + jnp.sum(wd * out["depth"] * out["alpha"]))

    _directional_check(loss, (g, jnp.asarray(viewmats)), seed=28)

