"""GS-LRM training (FaceLift's reconstructor), the job `train_gslrm`.

    python run.py --config=configs/facelift_gslrm.py --workdir=outputs/gslrm \
        --config.init.converted_model=CKPT --config.loss.lpips_weights=DIR
    python run.py --config=configs/facelift_gslrm.py:tiny --workdir=outputs/gslrm_tiny

The reference trains in three resolution stages, each a run of this job started from
the previous stage's WORKDIR/gslrm_model (`--config.init.converted_model`):
  :stage1  Objaverse renders at 256 px, lr 4e-4, batch 8 per GPU (64 on 8), 80k steps
  :stage2  Objaverse renders at 512 px, lr 1e-4, batch 2 per GPU (16 on 8), 20k steps
  :stage3  (the default) fine-tuning on synthetic heads at 512 px, lr 1e-4, batch 16,
           20k steps
All: 4 random input views reconstructing 8 (inputs + 4 novel), AdamW (0.9, 0.95),
weight decay 0.05, clip 1.0, cosine with warm-up, loss 1.0 MSE + 0.5 perceptual.
Stages I and II need `--config.data.root` (Objaverse in the FaceLift layout; not
available here). The perceptual term here is LPIPS-VGG16 (`kaojax.losses.perceptual`;
the reference's is a VGG19 feature loss, not implemented).

`:tiny`: random-weight 1-layer model, 32-px synthetic heads, no perceptual term (no
VGG weights ship with kaojax), minutes on a CPU.
"""

import ml_collections

from configs import facelift_common


def get_config(arg: str = ""):
  config = facelift_common.base_config("train_gslrm")
  config.model = ml_collections.ConfigDict()
  config.model.preset = "facelift"  # tiny | small | facelift
  config.model.dtype = "float32"    # compute dtype (bfloat16 on accelerators)
  config.model.attention_chunk = 1024   # query block size (0: one block)
  config.model.remat = False        # recompute transformer blocks in the backward pass
  config.init = ml_collections.ConfigDict()
  # A GS-LRM torch checkpoint (released key list: `model` dict, `loss_calculator.*`
  # dropped) or a kaojax model directory (e.g. a previous run's WORKDIR/gslrm_model).
  config.init.converted_model = ""
  config.init.head_dim = 64         # a torch checkpoint's attention head width
  config.data.num_views = 8         # rendered per subject (inputs + novel)
  config.data.num_input_views = 4
  config.data.background = "white"
  config.loss = ml_collections.ConfigDict()
  config.loss.mse_weight = 1.0
  config.loss.lpips_weight = 0.5
  config.loss.lpips_weights = ""    # python -m kaojax.convert.vgg ... --out DIR
  config.optim.schedule = "cosine"
  if arg == "tiny":
    facelift_common.tiny_data(config, num_subjects=24, num_random_views=14, image_size=32)
    config.model.preset = "tiny"
    config.model.attention_chunk = 0
    config.render.tile_size = 8       # 8-px tiles: 2.5x faster renders at 32 px here
    config.loss.lpips_weight = 0.0
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.batch_size = 2
    config.total_steps = 240
    config.log_every = 20
    config.eval_every = 80
    config.checkpoint_every = 80
    config.eval.max_subjects = 3
  elif arg in STAGES:
    image_size, lr, batch_size, steps = STAGES[arg]
    config.data.image_size = image_size
    config.optim.lr = lr
    config.batch_size = batch_size
    config.total_steps = steps
  elif arg:
    raise ValueError(f"unknown preset {arg!r} (known: tiny, {', '.join(STAGES)})")
  return config


# The reference's resolution stages: (image size, lr, global batch, steps).
STAGES = {"stage1": (256, 4e-4, 64, 80_000), "stage2": (512, 1e-4, 16, 20_000),
          "stage3": (512, 1e-4, 16, 20_000)}
