"""Multi-view accuracy and consistency: KaoLRM Tables 1 / 3 (kaojax/evaluate/multiview_job.py).

    python run.py --config=configs/eval_multiview.py:tiny --workdir=OUT
    python run.py --config=configs/eval_multiview.py --config.data_root=DATA \
        --config.split=test --config.flame_path=FLAME --config.infer.model=MODEL_DIR \
        --workdir=OUT
    python run.py --config=configs/eval_multiview.py --config.data_root=DATA \
        --config.predictions=PRED --config.flame_path=FLAME --workdir=OUT

DATA: a multi-view dataset in the project's layout with FLAME-topology ground truth
(UID/gt/params.npz, UID/gt/mesh.obj). PRED: UID/NNN/params.npz + mesh.obj per view.
Without PRED the KaoLRM inference job (`infer`, configs/infer_kaolrm.py, crop=full)
reconstructs every view composited on white. `:tiny` writes a synthetic test split
(2 subjects x 3 views) and runs the tiny random-weight model on it: a smoke test, not
a reconstruction.
"""

import ml_collections

from configs import infer_kaolrm


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  config = ml_collections.ConfigDict()
  config.job = "eval_multiview"
  config.seed = 0
  config.data_root = ""             # multi-view dataset with gt/; empty: synthetic
  config.split = "test"             # the split's uids (every subject without the file)
  config.max_subjects = 0           # the first N subjects only; 0: all
  config.max_views = 0              # the first N views of each subject; 0: all
  config.predictions = ""           # existing predictions (UID/NNN/); empty: infer
  config.flame_path = ""            # FLAME (its face mask); empty: the synthetic stand-in
  config.normalize_gt = True        # ground truth into [-1, 1]^3 (the paper's frame)
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.num_subjects = 8
  config.synthetic.num_views = 8
  config.synthetic.image_size = 128
  config.infer = infer_kaolrm.get_config(arg)
  config.infer.crop = "full"        # the views are renders, already framed
  config.infer.outputs = "mesh"
  if arg == "tiny":
    config.synthetic.num_subjects = 2
    config.synthetic.num_views = 3
    config.synthetic.image_size = 64
  return config
