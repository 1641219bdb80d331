"""VAE parity with diffusers.AutoencoderKL (random small config, through the converter)."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx

from kaojax.convert.diffusers import load_vae, read_diffusers_folder
from kaojax.convert.torch_state import CheckpointError
from tests.facelift.diffusers_util import nchw, nhwc, perturb_

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=2, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
  torch.manual_seed(0)
  ref = AutoencoderKL(**TINY).eval()
  perturb_(ref, seed=2)
  folder = tmp_path_factory.mktemp("vae")
  ref.save_pretrained(folder)
  return ref, folder


_encode = nnx.jit(lambda vae, x: vae.encode(x))
_decode = nnx.jit(lambda vae, z: vae.decode(z))


def test_vae_matches_diffusers(tiny_vae):
  ref, folder = tiny_vae
  vae = load_vae(folder)
  assert vae.cfg.scaling_factor == pytest.approx(0.18215)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(nchw(images)).latent_dist
    z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    decoded = ref.decode(nchw(z)).sample
  mean, logvar = _encode(vae, images)
  np.testing.assert_allclose(np.asarray(mean), nhwc(dist.mean), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(logvar), nhwc(dist.logvar), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(_decode(vae, z)), nhwc(decoded), atol=1e-4, rtol=1e-4)


def test_old_attention_names_and_errors(tiny_vae):
  ref, folder = tiny_vae
  config, state = read_diffusers_folder(folder)
  renamed = {}
  for key, value in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      if "mid_block.attentions.0." + new + "." in key:
        key = key.replace(new, old)
        value = value[:, :, None, None] if value.ndim == 2 else value   # conv-style 1x1
    renamed[key] = value
  assert any(".query." in k for k in renamed)
  a = load_vae(config=config, state=renamed)
  b = load_vae(folder)
  np.testing.assert_array_equal(np.asarray(a.encoder.mid_block.attentions[0].to_q.kernel[...]),
                                np.asarray(b.encoder.mid_block.attentions[0].to_q.kernel[...]))
  bad = dict(state)
  bad.pop("decoder.conv_out.bias")
  bad["encoder.quant.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(CheckpointError, match="decoder.conv_out.bias(.|\n)*encoder.quant.weight"):
    load_vae(config=config, state=bad)
