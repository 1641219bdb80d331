"""KaoLRM monocular stage II (FFHQ/CelebA layout: rgba/, mask/, lmks.npz): 200 epochs,
32 images per GPU, render focal 4.0, z-translation fixed, from a stage-I checkpoint.

    python run.py --config=configs/finetune_mono.py --workdir=outputs/mono \
        --config.data.root=/data/FFHQ --config.init.stage1_checkpoint=outputs/stage1/checkpoints
"""

from configs import kaolrm_common


def get_config(arg: str = ""):
  config = kaolrm_common.base_config()
  config.data.kind = "monocular"
  config.data.num_views = 1
  config.synth_focal = 4.0
  config.batch_size = 128           # 32 x 4 GPUs
  config.num_epochs = 200
  config.stage1_epochs = 0
  config.eval_every = 0             # held-out evaluation needs multi-view data
  if arg == "tiny":
    kaolrm_common.tiny_overrides(config, stage1_steps=0, stage2_steps=40)
    config.eval_every = 0
  elif arg:
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  return config
