"""The FaceLift converters' command lines: GS-LRM checkpoints and diffusers folders ->
kaojax model directories, read back by the same loaders."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx

from kaojax.convert import diffusers as diffusers_convert
from kaojax.convert import gslrm as gslrm_convert
from kaojax.models import loading
from kaojax.models.gslrm import gslrm_config
from kaojax.models.mvdiffusion.unet import unet_config
from tests.facelift.gslrm_model_test import _tiny_state


def assert_same_params(a, b):
  flat_a = nnx.to_flat_state(nnx.state(a, nnx.Param))
  flat_b = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
  assert len(flat_a) == len(flat_b)
  for path, var in flat_a:
    np.testing.assert_array_equal(np.asarray(var.get_value()),
                                  np.asarray(flat_b[path].get_value()), err_msg=str(path))


@pytest.mark.parametrize("module", ["gslrm", "diffusers"])
def test_help(module):
  out = subprocess.run([sys.executable, "-m", f"kaojax.convert.{module}", "--help"],
                       capture_output=True, text=True, timeout=300, check=True).stdout
  assert f"python -m kaojax.convert.{module}" in out and "--out" in out


def test_gslrm_checkpoint_to_directory(tmp_path, capsys):
  cfg = gslrm_config("tiny")
  state = _tiny_state(cfg)
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()},
              "optimizer": {}}, tmp_path / "gslrm.pt")
  gslrm_convert.main(["--in", str(tmp_path / "gslrm.pt"), "--out", str(tmp_path / "out"),
                      "--head-dim", str(cfg.head_dim)])
  assert "saved GS-LRM" in capsys.readouterr().out
  model = loading.load_network(tmp_path / "out", "gslrm", attention_chunk=None)
  assert model.cfg == gslrm_config("tiny", attention_chunk=None)
  assert_same_params(model, gslrm_convert.load_gslrm(state, cfg))
  with pytest.raises(FileExistsError):
    gslrm_convert.convert(tmp_path / "gslrm.pt", tmp_path / "out", head_dim=cfg.head_dim)


def test_diffusers_unet_folder_to_directory(tmp_path):
  from diffusers import UNet2DConditionModel
  torch.manual_seed(0)
  UNet2DConditionModel(**unet_config("tiny").to_diffusers()).save_pretrained(tmp_path / "unet")
  diffusers_convert.main(["--in", str(tmp_path / "unet"), "--out", str(tmp_path / "out"),
                          "--num-views", "3"])
  model = loading.load_network(tmp_path / "out", "unet", num_views=2, dtype="bfloat16")
  assert model.cfg == unet_config("tiny", num_views=2, dtype="bfloat16")
  assert_same_params(model, diffusers_convert.load_unet(tmp_path / "unet"))
  with pytest.raises(ValueError, match="'unet'"):
    loading.load_network(tmp_path / "out", "vae")
