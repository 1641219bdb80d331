"""End-to-end KaoLRM (tiny preset, synthetic FLAME): wiring, sampling, gradients."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaojax.geometry.cameras import default_openlrm_source_camera
from kaojax.models.kaolrm import KaoLRM, RenderTiling, kaolrm_config, nearest_gaussians
from kaojax.nn.params import TRAINABLE, is_frozen


def build(cfg, flame, seed=0):
  """KaoLRM(cfg) with numpy-drawn weights: kernels N(0, 1/fan_in), biases 0.1 N(0, 1),
  norm scales / LayerScale 1 + 0.1 N(0, 1), tokens 0.5 N(0, 1) (non-trivial values
  everywhere, so a broken path cannot hide behind a zero). Built abstractly: the
  random initialisers' per-shape compilation is the slowest part of a tiny model."""
  rng = np.random.default_rng(seed)
  model = KaoLRM.abstract(cfg, flame)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    shape, name = var.get_value().shape, path[-1]
    if name in ("scale", "gamma"):
      value = 1 + 0.1 * rng.standard_normal(shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(shape)
    elif name == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    else:
      value = 0.5 * rng.standard_normal(shape)
    var.set_value(jnp.asarray(value, np.float32))
  nnx.update(model, state)
  return model


@pytest.fixture(scope="module")
def setup(flame):
  cfg = kaolrm_config("tiny")
  model = build(cfg, flame)
  size = cfg.lrm.encoder.image_size
  images = jax.random.uniform(jax.random.key(1), (2, size, size, 3))
  cameras = jnp.stack([default_openlrm_source_camera()] * 2)
  return cfg, model, images, cameras


def test_forward_wiring(setup, flame):
  cfg, model, images, cameras = setup
  forward = nnx.jit(lambda m, x, c, k: m(x, c, k, synth_focal=0.75))
  out = forward(model, images, cameras, jax.random.key(0))
  n, r = cfg.num_samples, cfg.lrm.triplane_high
  assert out.planes.shape == (2, 3, r, r, cfg.lrm.triplane_dim)
  assert out.gaussians.means.shape == (2, n, 3) and out.gaussians.opacities.shape == (2, n)
  assert out.landmarks.shape == (2, 68, 3)
  # The mesh is FLAME(beta, psi, theta) * scale + translation.
  p = out.flame
  ref = flame(p.shape, p.expression, p.pose, scale=p.scale, translation=p.translation)
  np.testing.assert_allclose(out.vertices, ref.vertices, atol=1e-5)
  np.testing.assert_allclose(out.landmarks, ref.landmarks3d, atol=1e-5)
  assert np.all(np.asarray(p.scale) >= 0.1)
  # Gaussian centres are the surface samples: barycentric points of the mesh.
  corner_ids = np.asarray(flame.faces)[np.asarray(out.face_idx)]          # [B, N, 3]
  corners = np.asarray(out.vertices)[np.arange(2)[:, None, None], corner_ids]   # [B, N, 3, 3]
  np.testing.assert_allclose(out.gaussians.means, np.einsum("bnk,bnkc->bnc", out.bary, corners),
                             atol=1e-5)
  q = np.asarray(out.gaussians.quats)
  np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-5)
  # Resampled on every call from the key.
  again = forward(model, images, cameras, jax.random.key(0))
  other = forward(model, images, cameras, jax.random.key(7))
  np.testing.assert_array_equal(again.gaussians.means, out.gaussians.means)
  assert not np.allclose(other.gaussians.means, out.gaussians.means)
  np.testing.assert_array_equal(other.vertices, out.vertices)
  # Monocular selection keeps the Gaussians nearest the camera in depth: for the
  # canonical camera at (0, 0, 2) looking down -z, those of largest z (the reference's).
  viewmats, _ = _front_camera(8)
  kept = nearest_gaussians(out.gaussians, viewmats[:, 0], int(n / 1.8))
  z_all, z_kept = np.asarray(out.gaussians.means)[..., 2], np.asarray(kept.means)[..., 2]
  assert kept.means.shape[1] == int(n / 1.8)
  np.testing.assert_allclose(np.sort(z_kept, 1), np.sort(z_all, 1)[:, -int(n / 1.8):], atol=1e-6)


def _front_camera(size, batch=2):
  """(viewmats [batch, 1, 4, 4], Ks [batch, 1, 3, 3]): the canonical FLAME camera at
  (0, 0, 2) with KaoLRM's multiview render focal (normalised 0.75)."""
  from kaojax.geometry.cameras import intrinsics, invert_pose, look_at
  c2w = look_at(jnp.array([0.0, 0.0, 2.0]), jnp.zeros(3), jnp.array([0.0, 1.0, 0.0]))
  focal = 0.75 * size
  return (jnp.broadcast_to(invert_pose(c2w), (batch, 1, 4, 4)),
          jnp.broadcast_to(intrinsics(focal, focal, size / 2, size / 2), (batch, 1, 3, 3)))


def test_gradients_reach_trainable_and_not_frozen(setup):
  """image -> KaoLRM -> surfel and mesh renders at the canonical FLAME camera (and
  the landmarks and FLAME coefficients): every trainable parameter gets a gradient,
  the frozen encoder and upsampler none."""
  cfg, model, images, cameras = setup
  size = 24
  viewmats, Ks = _front_camera(size)

  def loss_fn(m):
    out = m(images, cameras, jax.random.key(0), synth_focal=0.75)
    renders = m.render(out, viewmats, Ks, size, size, jnp.ones(3))
    surfels, mesh = renders["surfels"], renders["mesh"]
    loss = (jnp.mean((surfels["color"] - 0.5) ** 2) + jnp.mean(surfels["alpha"])
            + jnp.mean(jnp.abs(surfels["depth"] - mesh["depth"]))
            + jnp.mean(out.landmarks ** 2) + jnp.mean(out.flame.shape ** 2)
            + jnp.mean(out.flame.expression ** 2))
    return loss, renders

  grads, renders = nnx.jit(nnx.grad(loss_fn, has_aux=True))(model)
  surfels, mesh = renders["surfels"], renders["mesh"]
  assert surfels["color"].shape == (2, 1, size, size, 3)
  assert mesh["depth"].shape == (2, 1, size, size)
  assert np.any(np.asarray(surfels["alpha"]) > 0.1) and np.any(np.asarray(mesh["mask"]))

  flat = {"/".join(map(str, path)): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(grads)}
  trainable = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
  frozen = {"/".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if is_frozen(v)}
  assert trainable | frozen == set(flat) and not trainable & frozen
  # KaoLRM's split (spec): encoder and upsampler frozen, everything else trains.
  module = lambda p: "/".join(p.split("/")[:2]) if p.startswith("backbone/") else p.split("/")[0]
  assert {module(p) for p in frozen} == {"backbone/encoder", "backbone/upsampler"}
  assert {module(p) for p in trainable} == {"backbone/camera_embedder", "backbone/transformer",
                                           "flame_decoder", "gaussian_decoder"}
  assert "backbone/transformer/pos_embed" in trainable
  dead = sorted(p for p in trainable if not np.any(flat[p] != 0))
  assert not dead, f"no gradient reaches {dead}"
  leaking = sorted(p for p in frozen if np.any(flat[p] != 0))
  assert not leaking, f"frozen parameters get gradients: {leaking}"
  assert all(np.all(np.isfinite(v)) for v in flat.values())


def test_remat_and_plain_attention_give_the_same_planes(setup, flame):
  cfg, model, images, cameras = setup
  lrm = dataclasses.replace(cfg.lrm, remat=True, efficient_attention=False,
                            encoder=dataclasses.replace(cfg.lrm.encoder, remat=True,
                                                        efficient_attention=False))
  other = KaoLRM.abstract(dataclasses.replace(cfg, lrm=lrm), flame)
  nnx.update(other, nnx.state(model, nnx.Param))
  planes = nnx.jit(lambda m, x, c: m.backbone(x, c))
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(planes(other, images, cameras), planes(model, images, cameras),
                               atol=1e-5)



def test_render_tiling_reaches_the_renderers(setup):
  """The mesh tile size reaches the renderer; at any tile size the binning drops
  nothing: the mesh render is exact."""
  from kaojax.render import rasterize_mesh
  _, model, images, cameras = setup
  size = 24
  viewmats, Ks = _front_camera(size)
  out = nnx.jit(lambda m, x, c: m(x, c, jax.random.key(0), synth_focal=0.75))(
      model, images, cameras)
  faces = model.flame_model.faces
  exact = rasterize_mesh(out.vertices, faces, viewmats, Ks, size, size, tile_size=4)
  fine = model.render(out, viewmats, Ks, size, size, tiling=RenderTiling(mesh_tile_size=4))
  np.testing.assert_array_equal(fine["mesh"]["face_id"], exact["face_id"])
  assert int(fine["mesh"]["overflow"].sum()) == 0
  assert int(fine["surfels"]["max_tile_count"].max()) > 8
  assert int(fine["surfels"]["overflow"].sum()) == 0      # no per-tile cap any more
  coarse = model.render(out, viewmats, Ks, size, size)      # 16-px tiles
  np.testing.assert_array_equal(coarse["mesh"]["face_id"], exact["face_id"])
