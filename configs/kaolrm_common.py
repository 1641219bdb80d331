"""Shared KaoLRM training configuration (spec: kaolrm.md, "Optimiser", "Datasets").

Real-scale values by default; `tiny_overrides` shrinks a config so that the whole
run (synthetic data generation included) finishes in minutes on a 2-core CPU.
"""

import ml_collections


def base_config():
  config = ml_collections.ConfigDict()
  config.job = "train"
  config.seed = 0
  config.flame_path = ""            # FLAME file/folder; empty: synthetic stand-in

  config.model = ml_collections.ConfigDict()
  config.model.preset = "base"      # tiny | small | base | large
  config.model.n_shape = 100
  config.model.n_expr = 50
  config.model.num_samples = 8000   # surface samples = Gaussians per forward
  config.model.dtype = "float32"    # or "bfloat16" (compute; parameters stay fp32)
  config.model.remat = False
  # The encoder's initial position table (replaced by converted DINOv2/OpenLRM
  # weights): "normal" (DINOv2's N(0, 0.02)) or "sincos" (kaojax.models.dinov2).
  config.model.encoder_position_init = "normal"
  # Transformer attention in query blocks of this many tokens, each recomputed in the
  # backward pass (0: one block). The base preset's 3 x 32 x 32-token self-attention
  # needs > 20 GiB per example in one block, ~3.6 GiB for a whole step in blocks of 512.
  config.model.attention_chunk = 512

  config.init = ml_collections.ConfigDict()
  # A converted model dir: python -m kaojax.convert.openlrm --kind kaolrm-init
  #   --in openlrm-mix-base/ --flame FLAME2020/ --out DIR  (OpenLRM backbone, fresh decoders)
  config.init.converted_model = ""
  config.init.stage1_checkpoint = ""   # a previous run's checkpoints/ dir

  config.data = ml_collections.ConfigDict()
  config.data.kind = "multiview"    # multiview | monocular
  config.data.root = ""             # empty: synthetic data generated into the workdir
  config.data.num_views = 4
  config.data.source_size = 224
  config.data.render_size = 192
  config.data.num_workers = 0
  # Multi-view views kept decoded and resized in memory (0: read every time); for
  # datasets that fit in RAM (~66 KB per view at 192/224 px).
  config.data.cache_views = 0
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_subjects = 512
  config.data.synthetic.num_views = 32
  config.data.synthetic.image_size = 512
  config.data.synthetic.seed = 0
  config.data.synthetic.val_fraction = 0.0625
  config.synth_focal = 0.75         # normalised focal of the render cameras

  config.render = ml_collections.ConfigDict()
  # Rasterizers: "auto" (native C++/CUDA kernels where built, else pure JAX),
  # "native" (fail if not built) or "reference" (pure JAX).
  config.render.backend = "auto"
  # The mesh rasterizer's tile side in pixels (None: its default, 16).
  config.render.mesh_tile_size = ml_collections.FieldReference(None, field_type=int)

  config.batch_size = 64            # global: 16 subjects x 4 GPUs
  config.num_epochs = 300
  config.total_steps = -1           # > 0 overrides num_epochs
  config.stage1_epochs = 5
  config.stage1_steps = -1          # >= 0 overrides stage1_epochs
  config.stop_at_step = -1          # >= 0: leave the run there (resumable), e.g. for time limits

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 4e-4
  config.optim.warmup_steps = 3000
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.05
  config.optim.clip = 1.0
  # The peak of a second warm-up + cosine from the stage switch; None: one schedule
  # over the whole run (the paper's, whose stage I is 5 of its 300 epochs).
  config.optim.stage2_lr = ml_collections.FieldReference(None, field_type=float)

  config.loss = ml_collections.ConfigDict()
  # {term: weight} replacing the paper's table (kaojax.losses.STAGE_WEIGHTS); None
  # keeps the table's weight.
  config.loss.weights_override = ml_collections.ConfigDict(
      {"lpips": ml_collections.FieldReference(None, field_type=float)})
  # The perceptual (LPIPS-VGG) term's network, converted from torchvision's vgg16 and
  # lpips' vgg.pth: python -m kaojax.convert.vgg --vgg ... --lin ... --out DIR. A run
  # whose lpips weight is not 0 refuses to start without it; weights_override.lpips=0
  # turns the term off.
  config.loss.lpips_weights = ""

  config.device_mesh = ml_collections.ConfigDict()
  config.device_mesh.data = -1      # -1: all devices not used by fsdp
  config.device_mesh.fsdp = 1
  # Multi-host: jax.distributed.initialize() at start. Empty / -1 fields are detected
  # from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU; JAX_COORDINATOR_ADDRESS);
  # elsewhere set all three, e.g. on host i of 2:
  #   --config.distributed.coordinator_address=host0:1234
  #   --config.distributed.num_processes=2 --config.distributed.process_id=i
  config.multihost = False
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = -1
  config.distributed.process_id = -1

  # Steps with a non-finite loss or gradients are skipped (counted in metrics.jsonl:
  # nonfinite_steps); this many in a row stop the run (checked at every log step).
  config.max_nonfinite_streak = 20
  config.log_every = 50
  config.eval_every = 2000
  config.checkpoint_every = 2000
  config.keep_checkpoints = 3
  config.async_checkpoints = True
  config.eval = ml_collections.ConfigDict()
  config.eval.max_subjects = 16
  config.eval.num_source_views = 4
  return config


def tiny_overrides(config, stage1_steps: int, stage2_steps: int):
  """CPU-sized model and data; the stage switch by step."""
  config.model.preset = "tiny"
  config.model.num_samples = 256
  config.data.source_size = 56      # the tiny encoder's input size
  # The tiny encoder is random and frozen (no pre-trained DINOv2 at this size): with
  # DINOv2's N(0, 0.02) position table its tokens barely say where their patch is
  # (~2% of a patch embedding), and the head pose read from them was off by 30
  # degrees on held-out subjects. A sine-cosine table gives them their place.
  config.model.encoder_position_init = "sincos"
  config.data.render_size = 32
  # The 8,316-face head in a 32-px render: a 16-px tile sees up to ~3,000 faces,
  # 4-px tiles at most ~1,700, and render 2.5x faster.
  config.render.mesh_tile_size = 4
  # 32 views per subject as in the paper's protocol: the network has to learn the head
  # pose from the source image, and 8 views per subject left too few distinct source
  # images (the landmark error stalled at the mean head's).
  config.data.synthetic.num_subjects = 100
  config.data.synthetic.num_views = 32
  config.data.synthetic.image_size = 64
  config.data.synthetic.val_fraction = 0.1
  # Every view at both sizes (90 x 32 x 2, ~0.2 GB): decoding the PNGs for each
  # sample took a third of the 2 cores the training step needs.
  config.data.cache_views = 8192
  # Batch 4: the landmark error falls with the number of samples seen, about equally
  # at batch 4 and 8, and a batch-4 step costs ~45% of a batch-8 one on 2 cores.
  config.batch_size = 4
  config.total_steps = stage1_steps + stage2_steps
  config.stage1_steps = stage1_steps
  # Over 4,000 stage-I steps (seeds 0, 1) 3e-3 gave 1.86x / 1.92x lower landmark
  # errors, 1.5e-3 2.03x / 1.98x: a smoother descent.
  config.optim.lr = 1.5e-3
  config.optim.warmup_steps = 20
  # Stage I is most of the tiny run (stage II steps cost 3x more): under one schedule
  # stage II would start at ~0.3% of the peak rate and leave the renders as they are
  # (a 3e-4 peak moved the PSNR by 0.0-0.1 dB in 100-150 steps, 1e-3 by 0.4 dB).
  config.optim.stage2_lr = 1e-3
  config.log_every = 50
  config.eval_every = 400
  config.checkpoint_every = 400
  # Every held-out subject (10) from 4 source views each: 8 subjects x 2 views scored
  # one trained model 0.3 px (9%) worse than this set, a noisy estimate.
  config.eval.max_subjects = 10
  config.eval.num_source_views = 4
  # No VGG weights ship with kaojax: the CPU presets run without the perceptual term
  # (give --config.loss.lpips_weights=DIR --config.loss.weights_override.lpips=0.5).
  config.loss.weights_override.lpips = 0.0
  return config
