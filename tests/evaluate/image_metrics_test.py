"""FaceLift's image metrics against independent oracles: scikit-image's PSNR and SSIM
(the calls FaceLift's helpers make) and the `lpips` package (VGG trunk stand-in, real
lin weights: see tests/losses/perceptual_test.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kaojax.convert import vgg as vgg_convert
from kaojax.evaluate import image_metrics
from kaojax.models import loading
# The lpips package over a stand-in torchvision VGG (a module-scoped fixture).
from tests.losses.perceptual_test import torch_lpips  # noqa: F401  pylint: disable=unused-import


def _pair(seed, shape=(3, 40, 36, 3)):
  """Smooth-ish images with flat regions (where SSIM's constants matter), a noisy
  prediction with values outside [0, 1] (clipped by PSNR only), and a mask."""
  rng = np.random.default_rng(seed)
  target = rng.uniform(size=shape)
  target[:, :10] = 1.0                                      # white background band
  target[:, :, :8] = 0.3
  pred = target + 0.15 * rng.normal(size=shape)
  pred[0, 5:15, 5:15] = 1.3                                 # out of range
  mask = np.zeros(shape[:-1])
  mask[:, 12:34, 6:30] = 1.0
  return target, pred, mask


def test_psnr_matches_skimage_with_clipping():
  target, pred, mask = _pair(0)
  got = np.asarray(image_metrics.psnr(jnp.asarray(target), jnp.asarray(pred)))
  want = [peak_signal_noise_ratio(t, np.clip(p, 0, 1), data_range=1.0)
          for t, p in zip(target, pred)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  masked = np.asarray(image_metrics.psnr(target, pred, mask))
  for i in range(len(target)):
    keep = mask[i] > 0.5
    err = (np.clip(pred[i], 0, 1)[keep] - target[i][keep]) ** 2
    assert masked[i] == pytest.approx(-10 * np.log10(err.mean()), rel=1e-5)
  assert np.isinf(image_metrics.psnr(target, target)).all()


def test_ssim_matches_skimage_gaussian_11_data_range_1():
  target, pred, mask = _pair(1)
  got = np.asarray(image_metrics.ssim(target, pred))
  # FaceLift: structural_similarity(gt, hat, win_size=11, gaussian_weights=True,
  # channel_axis=0, data_range=1.0) on CHW images (same as channel_axis=-1 on HWC).
  want = [structural_similarity(t, p, win_size=11, gaussian_weights=True,
                                channel_axis=-1, data_range=1.0)
          for t, p in zip(target, pred)]
  np.testing.assert_allclose(got, want, atol=2e-6)
  grey = lambda x, m: np.where(m[..., None] > 0.5, x, 0.5)
  masked = np.asarray(image_metrics.ssim(target, pred, mask))
  want = [structural_similarity(grey(t, m), grey(p, m), win_size=11, gaussian_weights=True,
                                channel_axis=-1, data_range=1.0)
          for t, p, m in zip(target, pred, mask)]
  np.testing.assert_allclose(masked, want, atol=2e-6)
  assert np.asarray(image_metrics.ssim(target, target)) == pytest.approx(1.0, abs=1e-6)
  with pytest.raises(ValueError, match="11 pixels"):
    image_metrics.ssim(target[:, :8], pred[:, :8])


def test_lpips_matches_the_lpips_package(torch_lpips, tmp_path):  # noqa: F811
  net, vgg_state, lin_path = torch_lpips
  torch.save(vgg_state, tmp_path / "vgg16.pth")
  vgg_convert.main(["--vgg", str(tmp_path / "vgg16.pth"), "--lin", str(lin_path),
                    "--out", str(tmp_path / "lpips_vgg")])
  ours = loading.load_lpips(tmp_path / "lpips_vgg")
  target, pred, mask = _pair(2, (3, 32, 32, 3))
  pred = np.clip(pred, 0, 1)
  chw = lambda x: torch.tensor(np.transpose(x, (0, 3, 1, 2)), dtype=torch.float32)
  with torch.no_grad():
    want = net(chw(target), chw(pred), normalize=True).reshape(-1).numpy()
    grey = lambda x: np.where(mask[..., None] > 0.5, x, 0.5)
    want_masked = net(chw(grey(target)), chw(grey(pred)), normalize=True).reshape(-1).numpy()
  got = image_metrics.image_metrics(target, pred, net=ours)
  np.testing.assert_allclose(got["lpips"], want, rtol=1e-4)
  got = np.asarray(image_metrics.lpips(ours, target, pred, mask, batch_size=2))
  np.testing.assert_allclose(got, want_masked, rtol=1e-4)
