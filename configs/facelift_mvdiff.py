"""Multi-view diffusion fine-tuning (FaceLift's view generator), the job `train_mvdiff`.

    python run.py --config=configs/facelift_mvdiff.py --workdir=outputs/mvdiff \
        --config.init.mvdiffusion=SD21_UNCLIP_FOLDER --config.init.text_embeddings=EMB
    python run.py --config=configs/facelift_mvdiff.py:tiny --workdir=outputs/mvdiff_tiny

The default follows the reference's fine-tuning: 512 px, six fixed views, lr 1e-4
constant, batch 8 per GPU x grad-accum 2 on 8 GPUs (128 here, in one step), 20k
steps, EMA (decay 0.9999), min-SNR gamma 5, condition drop rate 0.05 per subject,
random white/black/grey backgrounds. init.mvdiffusion: a diffusers folder in the
SD2.1-unCLIP layout (unet/ with FaceLift's 8 input channels, vae/, image_encoder/,
image_normalizer/); init.text_embeddings: the [6, 77, 1024] prompt embeddings.

`:tiny`: random-weight toy UNet, VAE and CLIP at 32 px; minutes on a CPU.
"""

import ml_collections

from configs import facelift_common


def get_config(arg: str = ""):
  config = facelift_common.base_config("train_mvdiff")
  config.model = ml_collections.ConfigDict()
  config.model.preset = "facelift"      # UNet: tiny | small | facelift
  config.model.vae_preset = "facelift"  # random-weight VAE (tiny runs only)
  config.model.clip_preset = "facelift"
  config.model.text_tokens = 77         # random text embeddings (tiny runs only)
  config.model.dtype = "float32"        # compute dtype (bfloat16 on accelerators)
  config.model.attention_chunk = 1024   # query block size (0: one block)
  config.model.remat = False            # recompute the UNet's transformers in backward
  config.init = ml_collections.ConfigDict()
  config.init.mvdiffusion = ""          # diffusers SD2.1-unCLIP-layout folder
  config.init.text_embeddings = ""
  config.data.background = "three_choices"
  config.loss = ml_collections.ConfigDict()
  config.loss.snr_gamma = 5.0
  config.loss.condition_drop_rate = 0.05
  config.ema_decay = 0.9999
  config.optim.schedule = "constant"
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 1e-2      # torch AdamW's default, as the reference
  config.optim.b2 = 0.999
  config.batch_size = 128
  config.eval.timesteps = (100, 300, 500, 700, 900)
  config.eval.sample_steps = 50         # DDIM steps of the sampled evaluation (0: none)
  config.eval.sample_subjects = 2
  config.eval.guidance_scale = 3.0
  if arg == "tiny":
    facelift_common.tiny_data(config, num_subjects=24, num_random_views=0, image_size=32)
    config.model.preset = "tiny"
    config.model.vae_preset = "tiny"
    config.model.clip_preset = "tiny"
    config.model.text_tokens = 5
    config.model.attention_chunk = 0
    config.ema_decay = 0.99
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.batch_size = 4
    config.total_steps = 80
    config.log_every = 20
    config.eval_every = 40
    config.checkpoint_every = 40
    config.eval.max_subjects = 3
    config.eval.sample_steps = 4
    config.eval.sample_subjects = 1
  elif arg:
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  return config
