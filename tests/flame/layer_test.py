"""The FLAME layer under jit / vmap / grad / bf16, scale + translation, and the
synthetic model's anatomy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaojax.flame import load_flame
from kaojax.flame.synthetic import make_synthetic_flame


@pytest.fixture(scope="module")
def model(synthetic_folder):
  return load_flame(synthetic_folder)


_call = jax.jit(lambda m, *args, **kw: m(*args, **kw))


def _params(batch, seed=0):
  rng = np.random.default_rng(seed)
  pose = np.concatenate([rng.uniform(-0.3, 0.3, (batch, 3)), rng.uniform(0, 0.3, (batch, 3))], 1)
  return (rng.normal(size=(batch, 100)).astype(np.float32),
          rng.normal(size=(batch, 50)).astype(np.float32), pose.astype(np.float32))


def test_in_memory_synthetic_equals_files(model):
  direct = make_synthetic_flame()
  args = _params(2)
  np.testing.assert_allclose(direct(*args).vertices, model(*args).vertices, atol=1e-7)
  np.testing.assert_array_equal(direct.face_mask, model.face_mask)


def test_jit_vmap_and_leading_axes(model):
  args = _params(6)
  eager = model(*args)
  jitted = _call(model, *args)
  np.testing.assert_allclose(jitted.vertices, eager.vertices, atol=1e-6)
  np.testing.assert_array_equal(jitted.contour_bin, eager.contour_bin)
  mapped = jax.vmap(lambda s, e, p: model(s[None], e[None], p[None]))(*args)
  np.testing.assert_allclose(mapped.landmarks2d[:, 0], eager.landmarks2d, atol=1e-6)
  nested = model(*(a.reshape(2, 3, -1) for a in args))
  assert nested.vertices.shape == (2, 3) + eager.vertices.shape[1:]
  np.testing.assert_allclose(nested.landmarks3d.reshape(eager.landmarks3d.shape),
                             eager.landmarks3d, atol=1e-6)


def test_scale_and_translation(model):
  args = _params(3)
  base = _call(model, *args)
  s = jnp.array([0.5, 1.0, 2.0])
  t = jnp.array([[0.1, 0, 0], [0, 0.2, 0], [0, 0, -0.3]])
  out = _call(model, *args, scale=s[:, None], translation=t)
  np.testing.assert_allclose(out.vertices, base.vertices * s[:, None, None] + t[:, None], atol=1e-6)
  np.testing.assert_allclose(out.landmarks3d, base.landmarks3d * s[:, None, None] + t[:, None],
                             atol=1e-6)


def test_gradients_match_finite_differences(model):
  with jax.enable_x64(True):
    _check_gradients(model)


def _check_gradients(model):
  shape, expr, pose = (jnp.asarray(a[:1], jnp.float64) for a in _params(1, seed=3))
  weights = jax.random.normal(jax.random.key(0), model(shape, expr, pose).landmarks3d.shape)

  def loss(s, e, p):
    out = model(s, e, p)
    return jnp.sum(out.landmarks3d * weights) + jnp.sum(out.vertices[:, ::50] ** 2)

  loss = jax.jit(loss)
  grads = jax.grad(loss, argnums=(0, 1, 2))(shape, expr, pose)
  eps = 1e-4
  for arg, grad in zip(range(3), grads):
    for idx in ((0, 0), (0, 1), (0, 4)):
      args = [shape, expr, pose]
      plus, minus = list(args), list(args)
      plus[arg] = args[arg].at[idx].add(eps)
      minus[arg] = args[arg].at[idx].add(-eps)
      fd = (loss(*plus) - loss(*minus)) / (2 * eps)
      assert float(grad[idx]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9), (arg, idx)


def test_bfloat16(model):
  args = _params(2)
  ref = model(*args)
  out = model(*(jnp.asarray(a, jnp.bfloat16) for a in args))
  assert out.vertices.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out.vertices, np.float32) - np.asarray(ref.vertices)).max()
  assert err < 2e-3  # metres; bf16 has 8 bits of mantissa on ~0.1 m coordinates


def test_synthetic_anatomy(model):
  zero = jnp.zeros((1, 100)), jnp.zeros((1, 50))
  rest = _call(model, *zero, jnp.zeros((1, 6)))
  open_ = _call(model, *zero, jnp.array([[0, 0, 0, 0.35, 0, 0]]))
  v = np.asarray(rest.vertices[0])
  extent = v.max(0) - v.min(0)
  assert 0.15 < extent[0] < 0.22 and 0.25 < extent[1] < 0.32 and 0.17 < extent[2] < 0.24
  # Opening the jaw separates the inner lips (iBUG 62 upper, 66 lower) and lowers the chin (8).
  gap = lambda o: float(o.landmarks2d[0, 62, 1] - o.landmarks2d[0, 66, 1])
  assert gap(rest) < 0.006 and gap(open_) > gap(rest) + 0.01
  assert float(open_.landmarks2d[0, 8, 1]) < float(rest.landmarks2d[0, 8, 1]) - 0.01
  # The nose tip (iBUG 30) is the front-most landmark; eyes are above the mouth.
  lm = np.asarray(rest.landmarks2d[0])
  assert lm[30, 2] == lm[:, 2].max()
  assert lm[36:48, 1].min() > lm[48:68, 1].max()
  # Smooth bases: neighbouring vertices move together.
  f = np.asarray(model.faces)
  for dirs in (np.asarray(model.shapedirs), np.asarray(model.exprdirs)):
    edge = np.abs(dirs[f[:, 0]] - dirs[f[:, 1]]).mean()
    assert edge < 0.25 * np.abs(dirs).mean()
  # The facial-region mask covers the front of the face and the ears only.
  centres = v[f].mean(1)
  mask = np.asarray(model.face_mask)
  assert 0.05 < mask.mean() < 0.4
  assert np.all((centres[mask, 2] > 0) | (np.abs(centres[mask, 0]) > 0.06))
  assert not mask[centres[:, 1] > 0.06].any()  # no forehead / scalp
