"""Losses against independent oracles: scikit-image SSIM, torch's HuberLoss,
closed forms, finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from kaojax import losses
from kaojax.losses.photometric import ssim_map


def _images(seed, shape):
  rng = np.random.default_rng(seed)
  base = rng.uniform(size=shape).astype(np.float32)
  noisy = np.clip(base + 0.1 * rng.normal(size=shape), 0, 1).astype(np.float32)
  return base, noisy


def test_ssim_map_matches_scikit_image_away_from_borders():
  a, b = _images(0, (40, 36, 3))
  _, full = structural_similarity(
      a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=1.0, channel_axis=-1, full=True)
  ours = np.asarray(ssim_map(jnp.asarray(a), jnp.asarray(b)))
  pad = 5  # (11 - 1) / 2: scikit-image's statistics are exact only inside
  np.testing.assert_allclose(ours[pad:-pad, pad:-pad], full[pad:-pad, pad:-pad],
                             atol=2e-5)


def test_dssim_is_zero_for_equal_images_and_batches_like_a_loop():
  a, b = _images(1, (2, 3, 24, 20, 3))
  assert abs(float(losses.dssim(jnp.asarray(a), jnp.asarray(a)))) < 1e-6
  batched = float(losses.dssim(jnp.asarray(a), jnp.asarray(b)))
  looped = np.mean([float(losses.dssim(jnp.asarray(a[i, j]), jnp.asarray(b[i, j])))
                    for i in range(2) for j in range(3)])
  assert batched == pytest.approx(looped, rel=1e-5)


def test_dssim_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    a, b = _images(2, (12, 13, 3))
    a, b = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
    direction = jnp.asarray(np.random.default_rng(3).normal(size=a.shape))
    grad = jax.grad(losses.dssim)(a, b)
    eps = 1e-6
    fd = (losses.dssim(a + eps * direction, b) - losses.dssim(a - eps * direction, b))
    fd = fd / (2 * eps)
    assert float(jnp.sum(grad * direction)) == pytest.approx(float(fd), rel=1e-6)


def test_masked_pixel_mse_closed_form():
  a, b = _images(4, (2, 8, 9, 3))
  mask = np.random.default_rng(5).uniform(size=(2, 8, 9)) > 0.5
  err = (a - b) ** 2
  expected = 0.3 * err.mean() + 0.7 * err[mask].mean()
  got = losses.masked_pixel_mse(jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # A full mask is plain MSE; an empty one leaves only the whole-image part.
  full = losses.masked_pixel_mse(jnp.asarray(a), jnp.asarray(b), np.ones((2, 8, 9)))
  assert float(full) == pytest.approx(err.mean(), rel=1e-5)
  empty = losses.masked_pixel_mse(jnp.asarray(a), jnp.asarray(b), np.zeros((2, 8, 9)))
  assert float(empty) == pytest.approx(0.3 * err.mean(), rel=1e-5)


def test_landmark_loss_matches_torch_huber_with_invalid_views_skipped():
  rng = np.random.default_rng(6)
  target = rng.uniform(5, 190, size=(2, 4, 68, 2)).astype(np.float32)
  pred = (target + rng.normal(scale=3.0, size=target.shape)).astype(np.float32)
  target[0, 2, 10, 1] = 0.0   # no detection in this view
  target[1, 3, 50, 0] = -1.0  # nor in this one
  huber = torch.nn.HuberLoss(delta=1.0, reduction="mean")
  keep = [(i, j) for i in range(2) for j in range(4) if (target[i, j] > 0).all()]
  p = torch.tensor(np.stack([pred[i, j] for i, j in keep]))
  t = torch.tensor(np.stack([target[i, j] for i, j in keep]))
  expected = (huber(p, t) + huber(p[:, 17:48], t[:, 17:48])
              + huber(p[:, 48:68], t[:, 48:68])).item()
  got = losses.landmark_loss(jnp.asarray(pred), jnp.asarray(target))
  assert float(got) == pytest.approx(expected, rel=1e-5)
  assert float(losses.landmark_loss(jnp.asarray(pred), jnp.zeros_like(target))) == 0.0


def test_landmark_loss_is_measured_in_reference_render_pixels():
  # The same projected landmarks in a 32 px and in the reference 192 px render give
  # the same loss (Huber delta included): the term keeps its weight at any size.
  rng = np.random.default_rng(16)
  target = rng.uniform(1, 31, size=(3, 68, 2)).astype(np.float32)
  pred = (target + rng.normal(scale=0.3, size=target.shape)).astype(np.float32)
  scale = losses.landmarks.REFERENCE_RENDER_SIZE / 32
  small = losses.landmark_loss(jnp.asarray(pred), jnp.asarray(target), render_size=32)
  reference = losses.landmark_loss(jnp.asarray(pred * scale), jnp.asarray(target * scale))
  assert float(small) == pytest.approx(float(reference), rel=1e-5)
  # Errors of 0.3 px at 32 px are 1.8 px at 192 px: past the Huber knee, not below it.
  assert float(small) > 2 * float(losses.landmark_loss(jnp.asarray(pred), jnp.asarray(target)))


def test_binding_and_regularisers_closed_form():
  rng = np.random.default_rng(7)
  d1, d2 = rng.uniform(1, 3, size=(2, 2, 6, 5))
  n1, n2 = rng.normal(size=(2, 2, 6, 5, 3))
  mask = rng.uniform(size=(2, 6, 5)) > 0.4
  assert float(losses.depth_binding(d1, d2, mask)) == pytest.approx(
      np.abs(d1 - d2)[mask].mean(), rel=1e-5)
  assert float(losses.normal_binding(n1, n2, mask)) == pytest.approx(
      np.abs(n1 - n2)[mask].mean(), rel=1e-5)
  beta = rng.normal(size=(3, 100))
  assert float(losses.squared_norm(beta)) == pytest.approx(
      (beta ** 2).sum(-1).mean(), rel=1e-5)
  alpha, gt = rng.uniform(size=(2, 2, 6, 5))
  assert float(losses.mask_l1(alpha, gt)) == pytest.approx(np.abs(alpha - gt).mean())


def test_stage_weights_follow_the_paper_table():
  s1, mono, multi = (losses.stage_weights(1), losses.stage_weights(2, multiview=False),
                     losses.stage_weights(2))
  assert (s1["landmark"], s1["mask"], s1["pixel"], s1["shape_reg"]) == (1.0, 0.1, 0, 1e-2)
  assert (mono["pixel"], mono["lpips"], mono["dssim"]) == (0.1, 0.1, 0.1)
  assert (multi["pixel"], multi["depth_binding"], multi["landmark"]) == (0.5, 0.5, 0.01)
  assert losses.stage_weights(2, overrides={"lpips": 0})["lpips"] == 0.0
  with pytest.raises(ValueError, match="unknown loss term 'lpip'"):
    losses.stage_weights(2, overrides={"lpip": 0})
  with pytest.raises(ValueError, match="stage must be 1 or 2"):
    losses.stage_weights(3)
  terms = {"landmark": 2.0, "shape_reg": 1.0, "expression_reg": 1.0, "mask": 1.0}
  assert losses.weighted_total(terms, s1) == pytest.approx(2.0 + 0.01 + 0.01 + 0.1)
  with pytest.raises(ValueError, match="not computed"):
    losses.weighted_total({"landmark": 1.0}, s1)
