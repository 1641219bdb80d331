"""CLIP vision tower parity with transformers.CLIPVisionModelWithProjection (random
small config), through the converter, in the transformers and OpenCLIP key layouts."""

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig as HFConfig
from transformers import CLIPVisionModelWithProjection

from kaojax.convert.clip import load_clip_vision
from kaojax.convert.torch_state import CheckpointError
from kaojax.models.mvdiffusion.clip import CLIPVisionConfig
from tests.facelift.diffusers_util import nchw, perturb_


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  torch.manual_seed(0)
  hf = HFConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=28, patch_size=7, projection_dim=24, hidden_act="gelu")
  ref = CLIPVisionModelWithProjection(hf).eval()
  perturb_(ref, seed=3)
  folder = tmp_path_factory.mktemp("clip")
  ref.save_pretrained(folder)
  return ref, folder


def _pixels():
  return np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)


def test_clip_matches_transformers(tiny_clip):
  ref, folder = tiny_clip
  model = load_clip_vision(folder)
  assert model.cfg.hidden_act == "gelu" and model.cfg.projection_dim == 24
  with torch.no_grad():
    want = ref(pixel_values=nchw(_pixels())).image_embeds.numpy()
  np.testing.assert_allclose(np.asarray(model(_pixels())), want, atol=1e-4, rtol=1e-4)


def test_openclip_layout(tiny_clip):
  ref, _ = tiny_clip
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  v, oc = "vision_model.", {}
  oc["visual.conv1.weight"] = sd[v + "embeddings.patch_embedding.weight"]
  oc["visual.class_embedding"] = sd[v + "embeddings.class_embedding"]
  oc["visual.positional_embedding"] = sd[v + "embeddings.position_embedding.weight"]
  for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    oc[f"visual.{a}.weight"], oc[f"visual.{a}.bias"] = sd[v + b + ".weight"], sd[v + b + ".bias"]
  oc["visual.proj"] = sd["visual_projection.weight"].T
  for i in range(2):
    h, o = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
    for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
      oc[o + a + ".weight"], oc[o + a + ".bias"] = sd[h + b + ".weight"], sd[h + b + ".bias"]
    oc[o + "attn.in_proj_weight"] = np.concatenate(
        [sd[h + f"self_attn.{n}_proj.weight"] for n in "qkv"])
    oc[o + "attn.in_proj_bias"] = np.concatenate([sd[h + f"self_attn.{n}_proj.bias"] for n in "qkv"])
  cfg = CLIPVisionConfig.from_transformers(ref.config.to_dict())
  assert (cfg.layers, cfg.image_size, cfg.projection_dim) == (2, 28, 24)
  with torch.no_grad():
    want = ref(pixel_values=nchw(_pixels())).image_embeds.numpy()
  np.testing.assert_allclose(np.asarray(load_clip_vision(oc, cfg)(_pixels())), want,
                             atol=1e-4, rtol=1e-4)
  oc.pop("visual.ln_post.bias")
  oc["visual.extra"] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError, match="visual.ln_post.bias(.|\n)*visual.extra"):
    load_clip_vision(oc, cfg)
