"""FaceLift model presets: one table per family, the released sizes of the spec, clear
errors for unknown names."""

import pytest

from kaojax.models.gslrm import gslrm_config
from kaojax.models.mvdiffusion.clip import clip_vision_config
from kaojax.models.mvdiffusion.unet import UNetConfig, unet_config
from kaojax.models.mvdiffusion.vae import vae_config

FAMILIES = {"GS-LRM": gslrm_config, "UNet": unet_config, "VAE": vae_config,
            "CLIP vision": clip_vision_config}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unknown_preset_is_a_clear_error(family):
  with pytest.raises(ValueError, match=f"unknown {family} preset 'huge': tiny, .*facelift"):
    FAMILIES[family]("huge")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_overrides_replace_fields(family):
  assert FAMILIES[family]("tiny", dtype="bfloat16").dtype == "bfloat16"
  assert FAMILIES[family]("tiny") == FAMILIES[family]("tiny")


def test_released_sizes():
  g = gslrm_config()
  assert (g.dim, g.layers, g.heads, g.head_dim, g.patch, g.num_global) == (1024, 24, 16, 64, 8, 2)
  u = unet_config()
  assert u.block_out_channels == (320, 640, 1280, 1280) and u.heads == (5, 10, 20, 20)
  assert (u.in_channels, u.cross_attention_dim, u.projection_class_embeddings_input_dim) == (
      8, 1024, 2048)
  v = vae_config()
  assert v.block_out_channels == (128, 256, 512, 512) and v.scaling_factor == 0.18215
  c = clip_vision_config()
  assert (c.hidden_size, c.layers, c.patch_size, c.image_size, c.projection_dim) == (
      1280, 32, 14, 224, 1024)


@pytest.mark.parametrize("name", ["tiny", "small", "facelift"])
def test_unet_presets_round_trip_through_diffusers_configs(name):
  cfg = unet_config(name, num_views=3)
  assert UNetConfig.from_diffusers(cfg.to_diffusers(), num_views=3) == cfg


@pytest.mark.parametrize("name", ["tiny", "facelift"])
def test_presets_fit_together(name):
  """The UNet's class embedding takes the CLIP embedding ++ its noise-level embedding."""
  clip, unet = clip_vision_config(name), unet_config(name)
  assert unet.projection_class_embeddings_input_dim == 2 * clip.projection_dim
