"""Released-weights parity of the inference job: a checkpoint in KaoLRM's released key
layout (an OpenLRM oracle case's keys + flame_decoder / gaussian_decoder keys + FLAME
buffers; random values, small widths) is converted with the converter CLI
(`python -m kaojax.convert.openlrm`), the job (`kaojax.infer.kaolrm.run`) reconstructs
a real photo with `--config.model=<converted dir>`, and the FLAME parameters it wrote
are recomputed independently: the photo re-cropped with the job's saved crop
transform, prepared, and passed through the loaded model at the canonical source
camera."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

from configs import infer_kaolrm as infer_config
from data_pipeline.sources import source_camera_vector
from kaojax.convert.openlrm import main as convert_main
from kaojax.convert.torch_state import read_state_dict
from kaojax.images import prepare_source_image
from kaojax.infer import crops
from kaojax.infer import kaolrm as infer
from kaojax.models import loading
from tests.convert.key_lists import fake_flame_buffers, read_key_list
from tests.oracle_cases import oracle_cases

BATCH = 2          # the job's batch: the photo's face plus one padding row
PARAM_KEYS = ("shape", "expression", "pose", "scale", "translation")


def released_checkpoint(case_folder, folder, seed=0):
  """A KaoLRM checkpoint in the released layout (model.safetensors + config.json)
  in `folder`: the case's OpenLRM keys (its NeRF decoder dropped, as KaoLRM's
  release has none), random decoders of small widths, fake FLAME buffers."""
  state = {k: v for k, v in read_state_dict(case_folder / "model.safetensors").items()
           if not k.startswith("synthesizer.")}
  high = 2 * math.isqrt(state["pos_embed"].shape[1] // 3)      # triplane side
  channels = state["upsampler.weight"].shape[1]                 # triplane channels
  flame_in = 3 * high * high
  # out_features x in_features, as torch stores nn.Linear weights; the FLAME head
  # gives 100 shape + 50 expression + 6 pose + 1 scale + 3 translation.
  shapes = {"flame_decoder.decoder.0": (24, flame_in), "flame_decoder.decoder.2": (16, 24),
            "flame_decoder.decoder.4.fc.0": (4, 16), "flame_decoder.decoder.4.fc.2": (16, 4),
            "flame_decoder.decoder.5": (8, 16), "flame_decoder.decoder.7": (160, 8),
            "gaussian_decoder.decoder.net.0": (8, 3 * channels),
            "gaussian_decoder.decoder.net.2": (8, 8), "gaussian_decoder.decoder.net.4": (8, 8),
            "gaussian_decoder.decoder.net.6": (11, 8)}
  rng = np.random.default_rng(seed)
  for key, (out, fan_in) in shapes.items():
    bound = 1 / math.sqrt(fan_in)
    state[key + ".weight"] = rng.uniform(-bound, bound, (out, fan_in)).astype(np.float32)
    state[key + ".bias"] = rng.uniform(-bound, bound, (out,)).astype(np.float32)
  state.update(fake_flame_buffers(read_key_list("kaolrm.txt"), seed))
  folder.mkdir(parents=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            str(folder / "model.safetensors"))
  meta = json.loads((case_folder / "case.json").read_text())
  (folder / "config.json").write_text(json.dumps(meta["model_kwargs"]))
  # the reduced-width oracle encoders do not have the released head dim 64
  return ["--encoder-heads", str(meta["encoder"]["num_heads"]),
          "--heads", str(meta["transformer"]["heads"])]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  case_folder = oracle_cases("openlrm")[0].values[0]
  if case_folder is None:
    pytest.skip("no openlrm oracle case")
  root = tmp_path_factory.mktemp("released")
  heads = released_checkpoint(case_folder, root / "release")
  convert_main(["--in", str(root / "release"), "--out", str(root / "model")] + heads)
  assert loading.is_model_directory(root / "model")
  return root / "model"


def test_job_parameters_equal_the_loaded_model(converted, tmp_path):
  photo = tmp_path / "astronaut.jpg"
  Image.fromarray(skimage.data.astronaut()).save(photo, quality=92)
  config = infer_config.get_config()
  config.model = str(converted)
  config.input = str(photo)
  config.batch_size = BATCH
  config.render_size = 32        # renders are not compared: keep them cheap
  config.num_samples = 256
  config.outputs = "params"     # params.npz only
  summary = infer.run(config, tmp_path / "out")
  assert summary["ok"] == 1, (tmp_path / "out" / "results.jsonl").read_text()
  job = np.load(tmp_path / "out" / "astronaut" / "params.npz")

  # The crop again, from the photo on disk and the job's saved transform.
  model = loading.load_model(converted)
  size = model.cfg.lrm.encoder.image_size
  image = np.asarray(Image.open(photo).convert("RGB"))
  crop = crops.warp(image, job["crop_transform"], int(job["crop_size"]))
  source = prepare_source_image(crop / 255.0, size)                     # [S, S, 3]
  # The job's batch: this face, then white padding rows (the FLAME head is per row,
  # but the same batch shape keeps the compiled arithmetic the same).
  images = np.ones((BATCH, size, size, 3), np.float32)
  images[0] = source
  cameras = np.broadcast_to(source_camera_vector(), (BATCH, 16)).astype(np.float32)
  forward = nnx.jit(lambda m, x, c, k: m(x, c, k).flame)
  flame = forward(model, jnp.asarray(images), jnp.asarray(cameras), jax.random.PRNGKey(0))
  ours = {k: np.asarray(getattr(flame, k), np.float32)[0] for k in PARAM_KEYS}
  for key in PARAM_KEYS:
    want = job[key].reshape(-1)
    got = ours[key].reshape(-1)
    assert got.shape == want.shape, key
    # float32 roundoff only: relative to the entry, or to the vector's size near 0
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale, err_msg=key)
  # not a trivial match: the head is not constant over the photo's content
  other = forward(model, jnp.asarray(np.ones_like(images)), jnp.asarray(cameras),
                  jax.random.PRNGKey(0))
  assert not np.allclose(np.asarray(other.shape)[0], ours["shape"], rtol=1e-3)
