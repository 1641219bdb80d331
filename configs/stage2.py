"""KaoLRM's full multi-view training: stage I (landmarks) for 5 epochs, then stage II
(photometric + depth/normal binding) to 300 epochs.

    python run.py --config=configs/stage2.py --workdir=outputs/stage2
    python run.py --config=configs/stage2.py:tiny --workdir=outputs/tiny   # CPU demo
    python run.py --config=configs/stage2.py --config.data.root=/data/FaceVerse \
        --config.flame_path=/models/FLAME2020 \
        --config.init.converted_model=/models/kaolrm-init
"""

from configs import kaolrm_common


def get_config(arg: str = ""):
  config = kaolrm_common.base_config()
  if arg == "tiny":
    kaolrm_common.tiny_overrides(config, stage1_steps=4400, stage2_steps=150)
  elif arg:
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  return config
