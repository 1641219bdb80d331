"""A small generated dataset and a tiny `configs/stage2.py` run over it, shared by the
tests that run `train_and_evaluate` end to end (and by the multi-host worker)."""

from configs import stage2
from data_pipeline import synthetic


# 6 subjects (one held out) x 4 views at 32 px
SYNTHETIC = dict(num_subjects=6, num_views=4, image_size=32, seed=1, val_fraction=0.1)


def make_dataset(root):
  """The SYNTHETIC dataset, written into `root`."""
  synthetic.generate(root, **SYNTHETIC, progress=False)
  return root


def tiny_config(root, total_steps: int, stage1_steps: int, eval_every: int):
  """`stage2.py:tiny` on `root` (None: the SYNTHETIC dataset, generated into the work
  directory), batch 2, 24-px renders, a step logged per row."""
  config = stage2.get_config("tiny")
  config.data.root = str(root or "")
  config.data.synthetic.update(SYNTHETIC)
  config.data.render_size = 24
  config.model.num_samples = 128
  config.batch_size = 2
  config.total_steps = total_steps
  config.stage1_steps = stage1_steps
  config.log_every = 1
  config.eval_every = eval_every
  config.eval.max_subjects = 1
  config.eval.num_source_views = 2
  config.async_checkpoints = False
  return config
