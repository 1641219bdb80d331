"""GS-LRM training (FaceLift's reconstructor; configs/facelift_gslrm.py): the job
`train_gslrm`.

Per subject, `num_views` random views (data_pipeline.facelift_sources): the first
`num_input` go through GS-LRM -> pixel-aligned 3D Gaussians, which are rendered
(`kaojax.render.rasterize_gaussians`, the batch's background) at all `num_views`
cameras, inputs and novel views alike (the reference's "target has input"); the loss
is mse_weight * MSE + lpips_weight * LPIPS-VGG over those renders (the reference:
1.0 and 0.5). Held-out subjects are scored (PSNR / SSIM / LPIPS when its network is
given) on fixed views; render grids go to WORKDIR/images, and at the end a held-out
head's post-filtered Gaussians to WORKDIR/gaussians.ply and the trained network to
WORKDIR/gslrm_model (a model directory the FaceLift inference job loads).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import facelift_layout, facelift_sources
from data_pipeline.view_batch import make_view_batch
from kaojax import losses
from kaojax.export.ply import write_gslrm_ply
from kaojax.models import loading
from kaojax.models.gslrm import GSLRM, gslrm_config, post_filter_mask
from kaojax.nn.params import mark_parameters
from kaojax.render import rasterize_gaussians
from kaojax.train import facelift_loop


def build_model(config) -> GSLRM:
  """GS-LRM from config.init.converted_model (a GS-LRM checkpoint with the released
  key list - `model` dict, `loss_calculator.*` dropped - or a kaojax model directory)
  or the preset config.model.preset with random weights."""
  model_cfg = config.model
  options = dict(dtype=model_cfg.dtype, attention_chunk=model_cfg.attention_chunk or None,
                 remat=model_cfg.remat)
  path = config.init.converted_model
  if path:
    if loading.is_model_directory(path):
      model = loading.load_network(path, "gslrm", **options)
    else:
      from kaojax.convert.gslrm import load_gslrm  # pylint: disable=import-outside-toplevel
      model = load_gslrm(path, head_dim=config.init.head_dim, **options)
    logging.info("GS-LRM initialised from %s", path)
  else:
    model = GSLRM(gslrm_config(model_cfg.preset, **options), nnx.Rngs(config.seed))
  return mark_parameters(model)


def render(out, batch, render_cfg):
  """GSLRMOutput [B] at every camera of `batch` -> rasterizer dict ([B, V, S, S, ...])."""
  size = batch.images.shape[-2]
  return rasterize_gaussians(out.gaussians(), jnp.linalg.inv(batch.c2w), batch.Ks, size,
                             size, batch.background[:, None, :],
                             tile_size=render_cfg.tile_size,
                             intersection_budget=render_cfg.intersection_budget or None)


def make_loss(config):
  """loss_fn(model, batch, key, perceptual) -> (total, terms)."""
  num_input, weights = config.data.num_input_views, config.loss

  def loss_fn(model, batch, key, perceptual):
    del key
    inputs = batch.views(0, num_input)
    out = model(inputs.images, inputs.c2w, inputs.Ks)
    renders = render(out, batch, config.render)
    mse = jnp.mean(jnp.square(renders["color"] - batch.images))
    terms = {"mse": mse, "psnr": -10.0 * jnp.log10(mse)}
    total = weights.mse_weight * mse
    if weights.lpips_weight:
      terms["lpips"] = losses.lpips_loss(perceptual, renders["color"], batch.images)
      total = total + weights.lpips_weight * terms["lpips"]
    return total, terms

  return loss_fn


def build_perceptual(config):
  """The LPIPS network when the perceptual term has a weight (its weights from
  config.loss.lpips_weights, required then)."""
  if not config.loss.lpips_weight:
    return None
  if not config.loss.lpips_weights:
    raise ValueError(f"the perceptual loss has weight {config.loss.lpips_weight} but "
                     "config.loss.lpips_weights is empty: convert VGG/LPIPS weights with "
                     "`python -m kaojax.convert.vgg` or set config.loss.lpips_weight=0")
  return loading.load_lpips(config.loss.lpips_weights)


def load_eval_set(root, config):
  """Held-out subjects, each with fixed views (drawn once from the seed) -> list of
  ViewBatches of at most config.eval.batch_size subjects."""
  uids = facelift_layout.read_split(root, "val")[:config.eval.max_subjects]
  samples = []
  for i, uid in enumerate(uids):
    rng = np.random.default_rng([config.seed, i])
    samples.append(facelift_sources.load_random_views(
        pathlib.Path(root) / uid, rng, config.data.image_size, config.data.num_views,
        "white"))
  size = config.eval.batch_size
  return [make_view_batch(samples[i:i + size]) for i in range(0, len(samples), size)]


def image_scores(renders, targets, perceptual=None):
  """renders, targets [B, V, S, S, 3] -> per-image {"psnr", "ssim"(, "lpips")} [B, V]
  (renders clipped to [0, 1]; PSNR from each image's MSE)."""
  renders = jnp.clip(renders, 0.0, 1.0)
  mse = jnp.mean(jnp.square(renders - targets), axis=(-3, -2, -1))
  scores = {"psnr": -10.0 * jnp.log10(jnp.maximum(mse, 1e-10)),
            "ssim": jnp.mean(losses.photometric.ssim_map(renders, targets), axis=(-3, -2, -1))}
  if perceptual is not None:
    scores["lpips"] = perceptual(renders, targets)
  return scores


def make_evaluate(config, root, workdir, perceptual):
  """evaluate(graphdef, state, step) -> {"eval/psnr", "eval/psnr_input",
  "eval/psnr_novel", "eval/ssim"(, "eval/lpips")}; writes WORKDIR/images/step_N.png."""
  eval_set = load_eval_set(root, config)
  num_input = config.data.num_input_views
  workdir = pathlib.Path(workdir)

  def eval_step(graphdef, params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    inputs = batch.views(0, num_input)
    out = model(inputs.images, inputs.c2w, inputs.Ks)
    colors = render(out, batch, config.render)["color"]
    return colors, image_scores(colors, batch.images, perceptual)

  jitted = jax.jit(eval_step, static_argnums=0)

  def evaluate(graphdef, state, step):
    scores, first = [], None
    for batch in eval_set:
      colors, s = jitted(graphdef, state.params, state.rest, batch)
      scores.append(jax.device_get(s))
      first = np.asarray(colors) if first is None else first
    merged = {k: np.concatenate([s[k] for s in scores]) for k in scores[0]}
    metrics = {f"eval/{k}": float(np.mean(v)) for k, v in merged.items()}
    metrics["eval/psnr_input"] = float(np.mean(merged["psnr"][:, :num_input]))
    metrics["eval/psnr_novel"] = float(np.mean(merged["psnr"][:, num_input:]))
    if jax.process_index() == 0:
      save_grid(workdir / "images" / f"step_{step:06d}.png", eval_set[0], first, num_input)
    return metrics

  return evaluate, eval_set


def render_grid(batch, renders, num_input: int, index: int = 0):
  """uint8 [3 S, V S, 3]: inputs (white beyond num_input) / targets / renders."""
  targets = np.asarray(batch.images[index])
  inputs = np.where(np.arange(len(targets))[:, None, None, None] < num_input, targets, 1.0)
  rows = [np.concatenate(list(x), axis=1) for x in (inputs, targets, renders[index])]
  return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)


def save_grid(path, batch, renders, num_input: int):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(render_grid(batch, renders, num_input)).save(path)


def make_finish(config, workdir, eval_set):
  """After the last step: the first held-out head as a post-filtered .ply and the
  trained network as a model directory."""
  num_input = config.data.num_input_views

  def finish(graphdef, state):
    if jax.process_index() != 0:
      return
    model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.rest))
    inputs = eval_set[0].views(0, num_input)
    out = jax.jit(lambda m, i, c, k: m(i, c, k))(model, inputs.images, inputs.c2w, inputs.Ks)
    keep = np.asarray(post_filter_mask(out.xyz[0], out.scales[0], out.opacities[0]))
    write_gslrm_ply(pathlib.Path(workdir) / "gaussians.ply", out, mask=keep)
    loading.save_network(pathlib.Path(workdir) / "gslrm_model", model, overwrite=True)

  return finish


def train(config, workdir) -> dict:
  """The job `train_gslrm`: returns the last evaluation's metrics."""
  workdir, device_mesh = facelift_loop.setup(config, workdir)
  perceptual = build_perceptual(config)
  root = facelift_loop.heads_root(config, workdir)
  loader = facelift_sources.gslrm_loader(root, "train", config.data.image_size,
                                         config.data.num_views, config.data.background)
  evaluate, eval_set = (make_evaluate(config, root, workdir, perceptual)
                        if config.eval_every > 0 else (None, None))
  task = facelift_loop.Task(
      model=build_model(config), loss_fn=make_loss(config), loader=loader,
      frozen=perceptual, evaluate=evaluate,
      finish=make_finish(config, workdir, eval_set) if eval_set else None)
  logging.info("GS-LRM training: %d subjects, %d steps, device mesh %s",
               loader.num_subjects, config.total_steps, dict(device_mesh.shape))
  return facelift_loop.train(config, workdir, device_mesh, task)

