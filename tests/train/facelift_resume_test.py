"""FaceLift's trainings resume exactly: 6 steps straight == 3 steps, restart, 3 steps
(metrics rows, evaluations, parameters and EMA weights identical)."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import facelift_gslrm, facelift_mvdiff, infer_facelift
from data_pipeline import heads
from kaojax import jobs
from kaojax.export.ply import read_gaussian_ply
from kaojax.infer import facelift as facelift_infer
from kaojax.models import loading
from kaojax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def heads_dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("heads")
  heads.generate(root, num_subjects=4, num_random=4, image_size=16, seed=0,
                 val_fraction=0.25, progress=False)
  return root


def _config(module, root):
  config = module.get_config("tiny")
  config.data.root = str(root)
  config.data.image_size = 16
  config.batch_size = 2
  config.total_steps = 6
  config.log_every = 1
  config.eval_every = 3
  config.checkpoint_every = 3
  config.eval.max_subjects = 1
  if module is facelift_mvdiff:
    config.eval.sample_steps = 0     # sampling: run by the tiny job itself
  return config


def _final_state(workdir):
  return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "6" / "default")


def _check_outputs(workdir):
  """The held-out head's .ply, and the trained network through FaceLift's inference
  pipeline (reconstruction at the six fixed cameras)."""
  assert read_gaussian_ply(workdir / "gaussians.ply").means.shape[1] == 3
  models = facelift_infer.tiny_models()
  models.gslrm = loading.load_network(workdir / "gslrm_model", "gslrm")
  views = np.random.default_rng(0).uniform(size=(6, 16, 16, 3)).astype(np.float32)
  out = facelift_infer.reconstruct(models, views)
  assert out.xyz.shape == (1, 2 + 6 * 16 * 16, 3) and np.isfinite(np.asarray(out.xyz)).all()
  # ... and through the FaceLift inference job (toy diffusion, the trained GS-LRM).
  photo = workdir / "photo.png"
  Image.fromarray((views[0] * 255).astype(np.uint8)).save(photo)
  config = infer_facelift.get_config("tiny")
  config.input, config.gslrm, config.crop = str(photo), str(workdir / "gslrm_model"), "full"
  summary = jobs.run(config, workdir / "inference")
  assert summary["ok"] == 1
  assert read_gaussian_ply(workdir / "inference" / "photo" / "gaussians.ply").means.shape[1] == 3


@pytest.mark.parametrize("module", [facelift_gslrm, facelift_mvdiff],
                         ids=["gslrm", "mvdiff"])
def test_restart_gives_identical_metrics_and_state(module, heads_dataset, tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  jobs.run(_config(module, heads_dataset), straight)
  first = _config(module, heads_dataset)
  first.stop_at_step = 3
  jobs.run(first, resumed)
  assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [1, 2, 3]
  jobs.run(_config(module, heads_dataset), resumed)
  a, b = read_metrics(straight), read_metrics(resumed)
  assert [r["step"] for r in a if "loss" in r] == [1, 2, 3, 4, 5, 6]
  key = "eval/psnr" if module is facelift_gslrm else "eval/loss"
  assert [r["step"] for r in a if key in r] == [0, 3, 6]
  assert a == b
  x, y = _final_state(straight), _final_state(resumed)
  assert (straight / "images" / "step_000006.png").is_file() == (module is facelift_gslrm)
  if module is facelift_gslrm:
    _check_outputs(straight)
  assert set(x) == set(y) and ("ema" in x) == (module is facelift_mvdiff)
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    np.testing.assert_array_equal(u, v)
