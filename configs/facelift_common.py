"""Fields shared by FaceLift's two training configs (configs/facelift_gslrm.py,
configs/facelift_mvdiff.py): data, schedule, logging, checkpoints, device mesh and
multi-host, with the meaning they have in KaoLRM's configs (configs/kaolrm_common.py).
"""

import ml_collections


def base_config(job: str):
  config = ml_collections.ConfigDict()
  config.job = job
  config.seed = 0
  config.flame_path = ""            # the synthetic heads' FLAME (empty: stand-in model)

  config.data = ml_collections.ConfigDict()
  config.data.root = ""             # facelift_layout dataset; empty: synthetic heads
  config.data.image_size = 512
  config.data.num_workers = 0
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_subjects = 512
  config.data.synthetic.num_random_views = 26   # + the 6 fixed views = the paper's 32
  config.data.synthetic.image_size = 512
  config.data.synthetic.seed = 0
  config.data.synthetic.val_fraction = 0.0625

  config.render = ml_collections.ConfigDict()
  config.render.backend = "auto"    # auto | native | reference
  config.render.tile_size = 16
  # (tile, Gaussian) pairs per view the pure-JAX rasterizer may bin inside the jitted
  # step (0: its worst case, every Gaussian on every tile); the native kernels size
  # their lists per call and ignore it.
  config.render.intersection_budget = 0

  config.optim = ml_collections.ConfigDict()
  config.optim.schedule = "cosine"  # cosine | constant (after the warm-up)
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 1000
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.05
  config.optim.clip = 1.0

  config.batch_size = 16
  config.total_steps = 20_000
  config.stop_at_step = -1          # >= 0: leave the run there (resumable)
  config.max_nonfinite_streak = 20
  config.log_every = 50
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.async_checkpoints = True
  config.eval = ml_collections.ConfigDict()
  config.eval.max_subjects = 16
  config.eval.batch_size = 4

  config.device_mesh = ml_collections.ConfigDict()
  config.device_mesh.data = -1
  config.device_mesh.fsdp = 1
  config.multihost = False
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = -1
  config.distributed.process_id = -1
  return config


def tiny_data(config, num_subjects: int, num_random_views: int, image_size: int):
  """CPU-sized synthetic heads, trained at their own size."""
  config.data.synthetic.num_subjects = num_subjects
  config.data.synthetic.num_random_views = num_random_views
  config.data.synthetic.image_size = image_size
  config.data.synthetic.val_fraction = 0.125
  config.data.image_size = image_size
  config.async_checkpoints = False
  return config
