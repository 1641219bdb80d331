"""KaoLRM stage I only: landmark, regulariser and alpha-mask losses for 5 epochs.
Its checkpoint can start stage II (`--config.init.stage1_checkpoint=WORKDIR/checkpoints`).

    python run.py --config=configs/stage1.py --workdir=outputs/stage1
"""

from configs import kaolrm_common


def get_config(arg: str = ""):
  config = kaolrm_common.base_config()
  config.num_epochs = 5
  config.stage1_epochs = 5
  if arg == "tiny":
    kaolrm_common.tiny_overrides(config, stage1_steps=4400, stage2_steps=0)
  elif arg:
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  return config
