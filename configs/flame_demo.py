"""FLAME demo: random heads from a FLAME-format model -> meshes, landmarks, pictures.

    python run.py --config=configs/flame_demo.py --workdir=outputs/flame_demo
    python run.py --config=configs/flame_demo.py:tiny ...
    python run.py --config=configs/flame_demo.py --config.flame_path=/path/to/FLAME2020
"""

import ml_collections


def get_config(arg: str = ""):
  config = ml_collections.ConfigDict()
  config.job = "flame_demo"
  config.seed = 0
  # A FLAME file or folder (see kaojax.flame.load_flame); empty: the built-in
  # synthetic stand-in model.
  config.flame_path = ""
  config.n_shape = 100
  config.n_expr = 50
  config.num_subjects = 8
  config.image_size = 256
  config.shape_std = 1.0
  config.expression_std = 1.0
  config.max_yaw_deg = 40.0
  config.max_jaw_rad = 0.3
  if arg == "tiny":
    config.num_subjects = 2
    config.image_size = 96
  elif arg:
    raise ValueError(f"unknown preset {arg!r} (known: tiny)")
  return config
