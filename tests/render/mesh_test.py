"""Mesh rasterizer vs Open3D's RaycastingScene (sphere, synthetic FLAME head),
finite-difference gradients, busy tiles (no face dropped), attribute / texture
interpolation."""

import jax
import jax.numpy as jnp
import numpy as np
import open3d as o3d
import pytest
from scipy import ndimage

from kaojax.geometry import cameras
from kaojax.geometry.mesh import vertex_normals
from kaojax.render import (interpolate_vertex_attributes, rasterize_mesh, render_texture,
                           sample_texture)
from tests.render.surfel_test import _directional_check

W, H = 48, 40


def _sphere():
  m = o3d.geometry.TriangleMesh.create_sphere(radius=0.8, resolution=24)
  return np.asarray(m.vertices, np.float32), np.asarray(m.triangles, np.int32)


def _flame_head():
  from kaojax.flame.synthetic import make_synthetic_flame
  model = make_synthetic_flame()
  pose = jnp.array([[0.0, 0.0, 0.0, 0.2, 0.0, 0.0]])                     # open jaw
  out = model(jnp.zeros((1, model.n_shape)), jnp.zeros((1, model.n_expr)), pose)
  verts = np.asarray(out.vertices[0], np.float32)
  verts = (verts - verts.mean(0)) / np.abs(verts - verts.mean(0)).max()   # into [-1, 1]
  return verts, np.asarray(model.faces, np.int32)


def _cameras(seed, n, distance=3.0, focal=45.0, width=W, height=H):
  rng = np.random.default_rng(seed)
  az = 270 + rng.uniform(-60, 60, n)     # 270 = the face side (Y-up orbit)
  el = rng.uniform(-30, 30, n)
  c2w = np.asarray(cameras.orbit_cameras(az, el, distance, up="y"))
  K = np.asarray(cameras.intrinsics(np.full(n, focal), np.full(n, focal * 1.05),
                                    np.full(n, width / 2 + 1.3), np.full(n, height / 2 - 0.7)))
  return np.asarray(cameras.invert_pose(c2w)).astype(np.float32), K.astype(np.float32)


def _open3d_raycast(verts, faces, viewmat, K, width, height):
  """Rays through pixel centres with camera-z-normalised directions, so t_hit is
  the z-depth. Returns depth, hit mask, face ids, barycentrics (b0, b1, b2)."""
  scene = o3d.t.geometry.RaycastingScene()
  scene.add_triangles(o3d.core.Tensor(verts.astype(np.float32)),
                      o3d.core.Tensor(faces.astype(np.uint32)))
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  pix = np.stack([xs + 0.5, ys + 0.5, np.ones_like(xs, dtype=float)], -1).astype(np.float64)
  d_cam = pix @ np.linalg.inv(K.astype(np.float64)).T                 # z component 1
  R, t = viewmat[:3, :3].astype(np.float64), viewmat[:3, 3].astype(np.float64)
  d_world = d_cam @ R                                                  # R^T d
  origin = -R.T @ t
  rays = np.concatenate([np.broadcast_to(origin, d_world.shape), d_world], -1)
  ans = scene.cast_rays(o3d.core.Tensor(rays.astype(np.float32)))
  t_hit = ans["t_hit"].numpy()
  hit = np.isfinite(t_hit)
  uv = ans["primitive_uvs"].numpy()
  bary = np.stack([1 - uv[..., 0] - uv[..., 1], uv[..., 0], uv[..., 1]], -1)
  ids = ans["primitive_ids"].numpy().astype(np.int64)
  return np.where(hit, t_hit, 0.0), hit, np.where(hit, ids, -1), bary


@pytest.mark.parametrize("name", ["sphere", "flame_head"])
def test_depth_normals_match_open3d(name):
  if name == "sphere":
    verts, faces = _sphere()
    w, h, distance, tile_size = W, H, 3.0, 16
  else:  # sub-pixel faces: a larger image and 8 px tiles keep the tile lists short
    verts, faces = _flame_head()
    w, h, distance, tile_size = 96, 80, 2.0, 8
  viewmats, Ks = _cameras(1, 3, distance=distance, focal=45.0 * w / W, width=w, height=h)
  out = rasterize_mesh(verts, faces, viewmats, Ks, w, h, tile_size=tile_size)
  assert out["depth"].shape == (3, h, w) and out["normal"].shape == (3, h, w, 3)
  assert int(jnp.sum(out["overflow"])) == 0, np.asarray(out["max_tile_count"])
  vn = np.asarray(vertex_normals(jnp.asarray(verts), jnp.asarray(faces)), np.float64)
  for i in range(3):
    depth, hit, ids, bary = _open3d_raycast(verts, faces, viewmats[i], Ks[i], w, h)
    mask = np.asarray(out["mask"][i])
    assert 0.15 < hit.mean() < 0.9
    # away from silhouettes: both agree the pixel and its 8 neighbours are covered
    interior = ndimage.binary_erosion(hit & mask, np.ones((3, 3)), border_value=0)
    assert np.mean(mask != hit) < 0.03
    assert interior.sum() > 0.5 * hit.sum()
    ours_depth = np.asarray(out["depth"][i], np.float64)
    np.testing.assert_allclose(ours_depth[interior], depth[interior], rtol=1e-4)
    same = interior & (np.asarray(out["face_id"][i]) == ids)
    assert same.sum() > 0.97 * interior.sum()
    np.testing.assert_allclose(np.asarray(out["bary"][i])[same], bary[same], atol=2e-4)
    # oracle normals: Open3D's hit face + barycentrics interpolating the vertex normals
    n_world = np.einsum("hwk,hwkc->hwc", bary, vn[faces[np.maximum(ids, 0)]])
    n_cam = n_world @ viewmats[i][:3, :3].astype(np.float64).T
    n_cam /= np.linalg.norm(n_cam, axis=-1, keepdims=True) + 1e-30
    np.testing.assert_allclose(np.asarray(out["normal"][i])[same], n_cam[same], atol=2e-4)
    # background is zero
    assert np.all(ours_depth[~mask] == 0) and np.all(np.asarray(out["face_id"][i])[~mask] == -1)


def test_batched_vertices_and_cameras():
  verts, faces = _sphere()
  viewmats, Ks = _cameras(2, 4)
  vb = np.stack([verts, verts * 0.9 + 0.05])                           # [2, V, 3]
  out = rasterize_mesh(vb, faces, viewmats.reshape(2, 2, 4, 4), Ks.reshape(2, 2, 3, 3), W, H)
  assert out["depth"].shape == (2, 2, H, W)
  single = rasterize_mesh(vb[1], faces, viewmats[3], Ks[3], W, H)
  np.testing.assert_allclose(out["depth"][1, 1], single["depth"], atol=1e-6)


def test_busy_tiles_drop_no_face():
  """Small tiles crossed by many faces: nothing overflows and the image equals
  one tile over the whole image."""
  verts, faces = _flame_head()
  viewmats, Ks = _cameras(3, 1, distance=2.0)
  out = rasterize_mesh(verts, faces, viewmats, Ks, W, H, tile_size=8)
  whole = rasterize_mesh(verts, faces, viewmats, Ks, W, H, tile_size=max(W, H))
  assert int(out["overflow"][0]) == 0 and int(out["max_tile_count"][0]) > 16
  for key in ("face_id", "depth", "mask"):
    np.testing.assert_array_equal(whole[key], out[key])


def test_gradients_match_finite_differences_float64():
  with jax.enable_x64(True):
    verts, faces = _sphere()
    verts = jnp.asarray(verts, jnp.float64)
    viewmats, Ks = _cameras(4, 2)
    viewmats, Ks = jnp.asarray(viewmats, jnp.float64), jnp.asarray(Ks, jnp.float64)
    rng = np.random.default_rng(5)
    colors = jnp.asarray(rng.uniform(size=verts.shape))
    wd, wn, wc = (jnp.asarray(rng.uniform(size=s)) for s in [(2, H, W), (2, H, W, 3), (2, H, W, 3)])

    def loss(params):
      v, vm, col = params
      out = rasterize_mesh(v, faces, vm, Ks, W, H)
      shaded = interpolate_vertex_attributes(col, faces, out["face_id"], out["bary"])
      return jnp.sum(wd * out["depth"]) + jnp.sum(wn * out["normal"]) + jnp.sum(wc * shaded)

    _directional_check(loss, (verts, viewmats, colors), seed=6, eps=1e-7)


def test_texture_lookup_reproduces_linear_functions():
  # a linear function of (u, v) sampled at texel centres is reproduced exactly by
  # bilinear lookup away from the border clamp
  ht, wt = 8, 12
  js, is_ = np.meshgrid(np.arange(ht), np.arange(wt), indexing="ij")
  u_c, v_c = (is_ + 0.5) / wt, 1 - (js + 0.5) / ht
  tex = np.stack([u_c, v_c, 2 * u_c - v_c + 0.3], -1).astype(np.float32)
  rng = np.random.default_rng(7)
  uv = rng.uniform(0.1, 0.9, size=(5, 6, 2)).astype(np.float32)
  got = np.asarray(sample_texture(tex, uv))
  want = np.stack([uv[..., 0], uv[..., 1], 2 * uv[..., 0] - uv[..., 1] + 0.3], -1)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # row 0 of the texture is the TOP (v near 1)
  np.testing.assert_allclose(np.asarray(sample_texture(tex, np.array([[[0.5 / wt, 1 - 0.5 / ht]]]))),
                             tex[None, None, 0, 0], atol=1e-6)


def test_textured_plane_matches_analytic_uv():
  # a square at z = 2 in front of the camera, UV = affine map of (x, y); the
  # rendered colour must equal the texture evaluated at the surface point
  verts = np.array([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], np.float32)
  verts[:, 2] = 2.0 + 0.3 * verts[:, 0]                                  # tilted plane
  faces = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
  uvs = (verts[:, :2] * 0.4 + 0.5).astype(np.float32)
  viewmat = np.eye(4, dtype=np.float32)
  K = np.array([[30, 0, W / 2], [0, 30, H / 2], [0, 0, 1]], np.float32)
  out = rasterize_mesh(verts, faces, viewmat, K, W, H)
  ht, wt = 16, 16
  js, is_ = np.meshgrid(np.arange(ht), np.arange(wt), indexing="ij")
  tex = np.stack([(is_ + 0.5) / wt, 1 - (js + 0.5) / ht, np.zeros_like(js, float)], -1)
  colors = np.asarray(render_texture(tex.astype(np.float32), uvs[faces], out["face_id"], out["bary"]))
  # analytic: unproject pixel centres with the rendered depth
  ys, xs = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  z = np.asarray(out["depth"])
  x_w = (xs + 0.5 - W / 2) / 30 * z
  y_w = (ys + 0.5 - H / 2) / 30 * z
  mask = np.asarray(out["mask"])
  ok = mask & (np.abs(x_w) < 0.95) & (np.abs(y_w) < 0.95)
  assert ok.sum() > 200
  np.testing.assert_allclose(colors[..., 0][ok], (x_w * 0.4 + 0.5)[ok], atol=2e-5)
  np.testing.assert_allclose(colors[..., 1][ok], (y_w * 0.4 + 0.5)[ok], atol=2e-5)
  np.testing.assert_allclose(z[ok], (2.0 + 0.3 * x_w)[ok], rtol=1e-5)


def test_gradients_finite_with_vertices_behind_the_camera():
  verts, faces = _sphere()
  viewmats, Ks = _cameras(8, 1, distance=0.5)          # camera inside the sphere's reach
  def loss(v):
    out = rasterize_mesh(v, faces, viewmats, Ks, W, H)
    return jnp.sum(out["depth"]) + jnp.sum(out["normal"])

  assert bool(jnp.any(rasterize_mesh(verts, faces, viewmats, Ks, W, H)["mask"]))
  grads = jax.grad(loss)(jnp.asarray(verts))
  assert np.all(np.isfinite(np.asarray(grads)))
