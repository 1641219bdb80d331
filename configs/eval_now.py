"""NoW benchmark evaluation: scan-to-mesh errors per challenge (kaojax/evaluate/now_job.py).

    python run.py --config=configs/eval_now.py:tiny --workdir=OUT
    python run.py --config=configs/eval_now.py --config.now_root=NOW \
        --config.infer.model=MODEL_DIR --workdir=OUT
    python run.py --config=configs/eval_now.py --config.now_root=NOW \
        --config.predictions=PRED --workdir=OUT

NOW: NoW's final_release_version/ folder (imagepathsvalidation.txt, scans/,
scans_lmks_onlypp/, iphone_pictures/). PRED: predictions in NoW's submission layout
(SUBJECT/CHALLENGE/NAME.obj + NAME.npy). Without PRED the KaoLRM inference job
(`infer`, configs/infer_kaolrm.py) reconstructs the list's images first.
`:tiny` writes a synthetic NoW-style benchmark (2 subjects x 4 challenges) and runs the
tiny random-weight model on it end to end: a smoke test, not a reconstruction.
"""

import ml_collections

from configs import infer_kaolrm


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  config = ml_collections.ConfigDict()
  config.job = "eval_now"
  config.seed = 0
  config.now_root = ""              # NoW's final_release_version/; empty: synthetic
  config.image_set = "val"          # val (imagepathsvalidation.txt) | test
  config.image_list = ""            # another image list (lines SUBJECT/CHALLENGE/NAME)
  config.images_folder = "iphone_pictures"
  config.challenge = ""             # one of the four challenges; empty: all
  config.max_images = 0             # the first N lines only; 0: all
  config.predictions = ""           # existing predictions (NoW layout); empty: infer
  config.metrical = False           # unit scale (rotation and translation refined only)
  config.unit = "m"                 # the predictions' unit for the metrical variant
  config.refine = True              # the scan-to-mesh refinement after Procrustes
  config.iterations = 30            # its Levenberg-Marquardt iterations at most
  config.workers = 2                # subjects scored in parallel (threads)
  config.num_vertices = 5023        # expected mesh vertices (FLAME); 0: any; -1: the
                                    # check model's (flame_path or synthetic)
  config.check_neutral = True       # flag meshes with expression or pose left on
  config.flame_path = ""            # the FLAME model for that check; "synthetic": the
                                    # built-in stand-in (default for a synthetic benchmark)
  config.neutral_threshold_mm = 0.1
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.num_subjects = 2
  config.synthetic.images_per_challenge = 1
  config.synthetic.image_size = 128
  config.infer = infer_kaolrm.get_config(arg)
  config.infer.crop = "full" if arg == "tiny" else config.infer.crop
  config.infer.outputs = "mesh,lmk7"
  if arg == "tiny":
    config.num_vertices = -1        # the synthetic model's
    config.flame_path = "synthetic"
  return config
