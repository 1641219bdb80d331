"""FaceLift novel-view image metrics: Tables 1 / 2 (kaojax/evaluate/facelift_job.py).

    python run.py --config=configs/eval_facelift.py:tiny --workdir=OUT
    python run.py --config=configs/eval_facelift.py --config.data_root=DATA \
        --config.infer.mvdiffusion=PIPELINE_DIR --config.infer.gslrm=GSLRM_CKPT \
        --config.infer.text_embeddings=clr_embeds.pt --config.lpips_weights=LPIPS_DIR \
        --workdir=OUT

DATA: subjects in FaceLift's layout (data_pipeline/facelift_layout.py). LPIPS_DIR: the
LPIPS-VGG network converted by `python -m kaojax.convert.vgg`. `:tiny` writes synthetic
heads (2 subjects, 4 held-out views each) and runs FaceLift's random toy models with a
random-VGG LPIPS: a smoke test, not a reconstruction.
"""

import ml_collections

from configs import infer_facelift


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  config = ml_collections.ConfigDict()
  config.job = "eval_facelift"
  config.seed = 0
  config.data_root = ""             # FaceLift-layout test subjects; empty: synthetic
  config.split = "test"             # the split's uids (every subject without the file)
  config.max_subjects = 0           # the first N subjects only; 0: all
  config.input_view = 0             # the single input frame (0: FaceLift's front camera)
  config.first_eval_view = 6        # held-out frames: this one on (6: after the fixed six)
  config.max_views = 0              # at most N held-out frames per subject; 0: all
  config.lpips_weights = ""         # converted LPIPS-VGG dir; "random": smoke test; "": off
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.num_subjects = 8
  config.synthetic.num_random = 10
  config.synthetic.image_size = 512
  config.infer = infer_facelift.get_config(arg)
  if arg == "tiny":
    config.lpips_weights = "random"
    config.synthetic.num_subjects = 2
    config.synthetic.num_random = 4
    config.synthetic.image_size = 32
  return config
