"""KaoLRM inference on real photos: detect faces, crop, reconstruct, export.

    python run.py --config=configs/infer_kaolrm.py --config.input=PHOTOS \
        --config.model=MODEL_DIR --workdir=OUT
    python run.py --config=configs/infer_kaolrm.py:tiny --config.input=PHOTOS --workdir=OUT

PHOTOS: an image or a video, a folder (recursive), a glob or a text file of paths.
MODEL_DIR: a converted KaoLRM model directory (`kaojax.models.loading.save_model`, e.g.
`python -m kaojax.convert.openlrm --kind kaolrm ...`) or a training run's work
directory (its latest complete checkpoint).
`:tiny` runs random tiny-preset weights with the synthetic FLAME (no MODEL_DIR): a
smoke test of the pipeline, not a reconstruction.
See kaojax/infer/kaolrm.py for the outputs.
"""

import ml_collections


def get_config(arg: str = ""):
  config = ml_collections.ConfigDict()
  config.job = "infer_kaolrm"
  config.seed = 0
  config.input = ""
  config.model = ""                 # converted KaoLRM model or training work directory
  # Without a model directory: random weights of this preset (tests and smoke runs).
  config.preset = ""
  config.monocular = False          # random-weight preset only (a model dir knows)
  config.flame_path = ""            # replaces the model's FLAME; random preset: synthetic if empty
  config.faces = "largest"          # largest | all
  config.face_threshold = 0.8       # MTCNN probability kept (FaceLift's protocol)
  config.min_face_size = 20         # MTCNN's smallest face, pixels
  # ffhq (monocular model) | multiview (multi-view model) | facelift | auto (by the
  # model) | full (no detection: the whole image is the face, for pre-cropped inputs)
  config.crop = "auto"
  # The multiview crop's framing "face_size,cx,cy" (fractions of the crop side), as
  # `python -m kaojax.infer.framing --data=TRAINING_RENDERS` measures it; empty: the
  # documented default kaojax.infer.crops.MULTIVIEW_FRAMING.
  config.multiview_framing = ""
  config.batch_size = 4             # faces per forward (padded: one compilation)
  config.devices = 0                # local devices the batch is split over; 0: all
  config.workers = 2                # background threads decoding and detecting
  config.prefetch = 8               # frames decoded ahead, per input
  # Files per face (params.npz always): mesh, lmk7, reference, vis, gaussians,
  # turntable, or "all" (kaojax/infer/kaolrm.py).
  config.outputs = "mesh,lmk7,reference,vis"
  config.turntable_frames = 60
  config.turntable_fps = 30
  config.video_every = 1            # videos: every k-th frame
  config.video_max_frames = 0       # videos: at most this many sampled frames; 0: all
  config.video_smoothing = 0.1      # videos: Gaussian smoothing over time, seconds
  config.synth_focal = 0.75         # normalised focal of the render camera
  config.render_size = 0            # renders in vis.png; 0: the model's source size
  config.num_samples = 0            # surface samples / Gaussians; 0: the model's
  config.dtype = ""                 # compute dtype override ("float32", "bfloat16")
  config.rerun = False              # reprocess inputs already finished in results.jsonl
  if arg == "tiny":
    config.preset = "tiny"
    config.batch_size = 2
    config.render_size = 64
  elif arg:
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  return config
