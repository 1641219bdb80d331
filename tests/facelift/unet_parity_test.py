"""UNet parity with diffusers.UNet2DConditionModel (random small SD2.1-style configs,
through the diffusers-folder converter), and the multi-view attention."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from flax import nnx

from kaojax.convert.diffusers import load_unet
from kaojax.convert.torch_state import CheckpointError
from tests.facelift.diffusers_util import nchw, nhwc, perturb_

# SD2.1-unCLIP layout at toy width: linear projections, projection class embedding,
# 8 input channels (noisy latent ++ image latent), heads listed per block.
TINY = dict(sample_size=8, in_channels=8, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 48),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 3), cross_attention_dim=24, norm_num_groups=8,
            use_linear_projection=True, class_embed_type="projection",
            projection_class_embeddings_input_dim=20, flip_sin_to_cos=True, freq_shift=0,
            upcast_attention=True)


class SparseMultiViewProcessor:
  """Torch emulation of FaceLift's attn1: keys/values = [view 0 ; own view]."""

  def __init__(self, num_views):
    self.num_views = num_views

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None, **kwargs):
    assert encoder_hidden_states is None
    n, length, _ = hidden_states.shape
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

    def front_and_self(t):
      g = t.reshape(n // self.num_views, self.num_views, length, -1)
      return torch.cat([g[:, :1].expand_as(g), g], 2).reshape(n, 2 * length, -1)

    k, v = front_and_self(k), front_and_self(v)
    heads = attn.heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out.transpose(1, 2).reshape(n, length, -1)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
  torch.manual_seed(0)
  ref = UNet2DConditionModel(**TINY).eval()
  perturb_(ref, seed=1)
  folder = tmp_path_factory.mktemp("unet")
  ref.save_pretrained(folder)
  return ref, folder


def _inputs(n, seed=0):
  rng = np.random.default_rng(seed)
  return dict(sample=rng.normal(size=(n, 8, 8, 8)).astype(np.float32),
              t=rng.integers(0, 1000, n), context=rng.normal(size=(n, 7, 24)).astype(np.float32),
              labels=rng.normal(size=(n, 20)).astype(np.float32))


_apply = nnx.jit(lambda model, x: model(x["sample"], x["t"], x["context"], x["labels"]))


def _reference(ref, x):
  with torch.no_grad():
    out = ref(nchw(x["sample"]), torch.from_numpy(x["t"]),
              encoder_hidden_states=torch.from_numpy(x["context"]),
              class_labels=torch.from_numpy(x["labels"])).sample
  return nhwc(out)


def test_unet_matches_diffusers_single_view(tiny_unet):
  ref, folder = tiny_unet
  ref.set_attn_processor(AttnProcessor2_0())
  model = load_unet(folder, num_views=1)
  assert model.conv_in.kernel.shape == (3, 3, 8, 32)
  x = _inputs(2)
  want = _reference(ref, x)
  got = _apply(model, x)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_unet_matches_emulated_sparse_multiview(tiny_unet):
  ref, folder = tiny_unet
  views = 3
  processors = {name: SparseMultiViewProcessor(views) if name.endswith("attn1.processor")
                else AttnProcessor2_0() for name in ref.attn_processors}
  ref.set_attn_processor(processors)
  # the emulation really mixes views: view 1 differs from the stock processor's answer
  x = _inputs(2 * views, seed=3)
  with torch.no_grad():
    stock = ref.__class__(**TINY).eval()
    stock.load_state_dict(ref.state_dict())
    stock.set_attn_processor(AttnProcessor2_0())
  assert np.abs(_reference(stock, x)[1] - _reference(ref, x)[1]).max() > 1e-3
  model = load_unet(folder, num_views=views)
  want = _reference(ref, x)
  got = np.asarray(_apply(model, x))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  ref.set_attn_processor(AttnProcessor2_0())


def test_converter_reports_bad_keys(tiny_unet):
  ref, folder = tiny_unet
  from kaojax.convert.diffusers import read_diffusers_folder
  config, state = read_diffusers_folder(folder)
  state = dict(state)
  state["mid_block.extra.weight"] = np.zeros((3, 3), np.float32)
  del state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
  state["conv_in.weight"] = np.zeros((32, 4, 3, 3), np.float32)     # 4- instead of 8-channel
  with pytest.raises(CheckpointError) as err:
    load_unet(config=config, state=state, num_views=1)
  msg = str(err.value)
  for key in ("mid_block.extra.weight", "attn1.to_q.weight", "conv_in.weight"):
    assert key in msg
  assert "unexpected" in msg and "missing" in msg and "mis-shaped" in msg


def test_unsupported_config_is_named():
  with pytest.raises(ValueError, match="dual_cross_attention"):
    load_unet(config={**TINY, "dual_cross_attention": True}, state={})
