"""GS-LRM parity with FaceLift's PyTorch reference (golden oracle files), through the
checkpoint converter."""

import numpy as np
import pytest

from kaojax.convert.gslrm import infer_config, load_gslrm, read_gslrm_state
from kaojax.geometry.cameras import intrinsics
from tests.oracle_cases import load_case, oracle_cases


def _config_kwargs(meta):
  c = meta["config"]
  if not c.get("use_custom_plucker", False) or not c.get("hard_pixelalign", False):
    pytest.skip("only the released FaceLift setting (custom plucker, hard pixel-align)")
  if c.get("clip_xyz_applied", False):
    pytest.skip("the [-1, 1] xyz clamp is never applied in the release")
  if c.get("sh_degree", 0) != 0:
    pytest.skip("only SH degree 0")
  return dict(heads=c["heads"], head_dim=c["d_head"],
              depth_preact_bias=c.get("depth_preact_bias", 0.0))


def _check(name, got, want, tol):
  got = np.asarray(got)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  np.testing.assert_allclose(got, want, atol=tol["atol"], rtol=tol["rtol"], err_msg=name)


@pytest.mark.parametrize("folder", oracle_cases("gslrm"))
def test_gslrm_oracle(folder):
  meta, inputs, outputs = load_case(folder)
  tol = meta["tolerance"]["recommended"]
  state = read_gslrm_state(folder / "model.safetensors")
  cfg = infer_config(state, **_config_kwargs(meta))
  c = meta["config"]
  assert (cfg.dim, cfg.layers, cfg.patch, cfg.in_channels, cfg.num_global) == (
      c["d"], c["n_layer"], c["patch_size"], c["in_channels"], c["n_gaussians"])
  model = load_gslrm(state, cfg)

  images = np.moveaxis(inputs["image"], 2, -1)            # [B, V, H, W, 3]
  f = inputs["fxfycxcy"]
  K = np.asarray(intrinsics(f[..., 0], f[..., 1], f[..., 2], f[..., 3]))
  out = model(images, inputs["c2w"], K)

  _check("posed_images", np.moveaxis(np.asarray(out.posed_images), -1, 2),
         outputs["posed_images"], tol)
  _check("transformer_out", out.tokens, outputs["transformer_out"], tol)
  _check("gaussians_raw", out.raw, outputs["gaussians_raw"], tol)
  _check("xyz", out.xyz, outputs["xyz"], tol)
  _check("scaling", out.scales, outputs["scaling"], tol)
  _check("rotation", out.rotations, outputs["rotation"], tol)
  _check("opacity", out.opacities[..., None], outputs["opacity"], tol)
  _check("color", out.colors, outputs["color"], tol)
