"""FaceLift on real photos: detect, crop, generate 6 views, reconstruct Gaussians.

    python run.py --config=configs/infer_facelift.py --config.input=PHOTOS \
        --config.mvdiffusion=PIPELINE_DIR --config.gslrm=GSLRM_CKPT \
        --config.text_embeddings=clr_embeds.pt --workdir=OUT
    python run.py --config=configs/infer_facelift.py:tiny --config.input=PHOTOS --workdir=OUT

PHOTOS: an image or a video, a folder (recursive), a glob or a text file of paths.
Per face: face.npz (detection and crop transform), input.png, multiview.png,
gaussians.ply, output.png and turntable.mp4 (kaojax/infer/facelift.py); one
results.jsonl row per input (kaojax/infer/runner.py). `:tiny` runs random toy weights
at 32 px: a smoke test of the pipeline, not a reconstruction.
"""

import ml_collections


def get_config(arg: str = ""):
  config = ml_collections.ConfigDict()
  config.job = "infer_facelift"
  config.seed = 0
  config.input = ""
  config.tiny = False               # random toy models instead of the weights below
  config.mvdiffusion = ""           # diffusers pipeline folder (unet/, vae/, ...)
  config.gslrm = ""                 # GS-LRM checkpoint or converted directory
  config.text_embeddings = ""       # [6, 77, 1024] prompt embeddings (clr_embeds.pt)
  config.dtype = "float32"          # UNet / VAE / CLIP compute dtype
  config.steps = 50                 # DDIM steps
  config.guidance = 3.0
  config.turntable_frames = 150
  config.turntable_fps = 30
  config.faces = "largest"          # largest | all
  config.face_threshold = 0.8       # FaceLift's protocol
  config.min_face_size = 20
  config.crop = "facelift"          # facelift | full (pre-cropped 512 inputs)
  config.batch_size = 1
  config.workers = 2
  config.prefetch = 2
  config.outputs = "all"
  config.video_every = 1
  config.video_max_frames = 0
  config.rerun = False
  if arg == "tiny":
    config.tiny = True
    config.steps = 2
    config.turntable_frames = 4
  elif arg:
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  return config
