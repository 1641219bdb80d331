"""One KaoLRM training step: the model's forward-and-render from the source view at
every target view, weighted stage losses, AdamW update of the trainable parameters.

Batches are `data_pipeline.batch.Batch`es.
"""

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kaojax import losses
from kaojax.models.kaolrm import DEFAULT_TILING, RenderTiling, project_landmarks
from kaojax.nn.params import TRAINABLE


@flax.struct.dataclass
class TrainState:
  """step []; params: trainable nnx.State; rest: every other model variable
  (frozen encoder/upsampler, FLAME buffers); opt_state: optax state of params;
  nonfinite_steps [] / nonfinite_streak []: steps whose loss or gradients were not
  finite (their update skipped), in all and in a row up to now."""
  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState
  nonfinite_steps: jax.Array
  nonfinite_streak: jax.Array


def create_state(model, tx) -> tuple:
  """-> (graphdef, TrainState at step 0): the trainable parameters apart from the
  rest of the model."""
  graphdef, params, rest = nnx.split(model, TRAINABLE, ...)
  # Three arrays, not one shared: the jitted step donates each field's buffer.
  zero = lambda: jnp.zeros((), jnp.int32)
  return graphdef, TrainState(step=zero(), params=params, rest=rest,
                              opt_state=tx.init(params), nonfinite_steps=zero(),
                              nonfinite_streak=zero())


def apply_gradients(state: TrainState, tx, total, grads):
  """One optimiser update of `state.params` with `grads` of the loss `total` ->
  (state, grad_norm). A step whose loss or gradients are not finite changes neither
  the parameters nor the optimiser state; it is counted in the state's non-finite
  counters (every training step of kaojax updates through here)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  bad = 1 - finite.astype(jnp.int32)
  state = state.replace(step=state.step + 1, params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        nonfinite_steps=state.nonfinite_steps + bad,
                        nonfinite_streak=(state.nonfinite_streak + 1) * bad)
  return state, grad_norm


# Terms that need the mesh renders (the surfels are always rendered).
MESH_TERMS = ("pixel", "depth_binding", "normal_binding")


def loss_terms(model, out, renders, batch, terms, perceptual=None) -> dict:
  """The loss terms named in `terms` (see kaojax.losses); renders must hold the mesh
  renders when a MESH_TERMS term is asked for, and `perceptual` (an LPIPS network,
  kaojax.losses.perceptual) must be given for "lpips"."""
  surfels, mesh = renders.get("surfels"), renders.get("mesh")
  if "lpips" in terms and perceptual is None:
    raise ValueError("the lpips term needs an LPIPS network (perceptual=...)")
  # Where the pixel and binding losses are taken, as in the reference: the dataset's
  # facial mask when it has one (monocular data), else the rendered FLAME facial region.
  facial = None
  if any(t in MESH_TERMS for t in terms):
    facial = batch.face_mask if batch.face_mask is not None else model.facial_mask(mesh)
  pick = {
      "pixel": lambda: losses.masked_pixel_mse(surfels["color"], batch.target_rgb, facial),
      "dssim": lambda: losses.dssim(surfels["color"], batch.target_rgb),
      "lpips": lambda: losses.lpips_loss(perceptual, surfels["color"], batch.target_rgb),
      "landmark": lambda: losses.landmark_loss(
          project_landmarks(out.landmarks, batch.viewmats, batch.Ks),
          batch.landmarks, render_size=batch.render_size),
      "shape_reg": lambda: losses.squared_norm(out.flame.shape),
      "expression_reg": lambda: losses.squared_norm(out.flame.expression),
      "mask": lambda: losses.mask_l1(surfels["alpha"], batch.target_alpha),
      "depth_binding": lambda: losses.depth_binding(surfels["depth"], mesh["depth"], facial),
      "normal_binding": lambda: losses.normal_binding(surfels["normal"], mesh["normal"],
                                                      facial),
  }
  unknown = set(terms) - set(pick)
  if unknown:
    raise ValueError(f"unknown loss terms {sorted(unknown)}")
  return {t: pick[t]() for t in terms}


LPIPS_WEIGHTS_FIELD = "config.loss.lpips_weights"


def missing_perceptual_error(weight) -> ValueError:
  return ValueError(
      f"the perceptual (LPIPS) loss has weight {weight} but no LPIPS-VGG weights were "
      f"given: convert torchvision's vgg16 and lpips' vgg.pth with `python -m "
      f"kaojax.convert.vgg --vgg ... --lin ... --out DIR` and set {LPIPS_WEIGHTS_FIELD}=DIR, "
      f"or turn the term off with config.loss.weights_override.lpips=0")


def make_train_step(graphdef, tx, weights: dict, synth_focal: float,
                    tiling: RenderTiling = DEFAULT_TILING, perceptual=None):
  """A jit-able (state, batch, key[, perceptual_state]) -> (state, metrics) for one
  loss-weight table. metrics: every active loss term, `loss`, `grad_norm`,
  `nonfinite_steps` and `nonfinite_streak` (see TrainState).

  A step whose loss or gradients are not finite changes neither the parameters nor
  the optimiser state; it is counted in the state's non-finite counters.

  perceptual: the LPIPS network (kaojax.convert.vgg.load_lpips), required when the
  "lpips" weight is not 0; its parameters are never trained. Pass its
  `nnx.state(perceptual)` as the 4th argument to keep them out of the compiled
  program's constants (without it they are baked in)."""
  weights = dict(weights)
  if weights.get("lpips") and perceptual is None:
    raise missing_perceptual_error(weights["lpips"])

  active = {t: w for t, w in weights.items() if w}
  need_mesh = any(t in MESH_TERMS for t in active)
  use_perceptual = "lpips" in active
  if use_perceptual:
    perceptual_graph, perceptual_default = nnx.split(perceptual)

  def loss_fn(params, rest, batch, key, perceptual_state):
    model = nnx.merge(graphdef, params, rest)
    out, renders = model.forward_and_render(
        batch.source, batch.source_camera, batch.viewmats, batch.Ks, batch.render_size, key,
        synth_focal=synth_focal, background=batch.background, mesh=need_mesh, tiling=tiling)
    net = (nnx.merge(perceptual_graph, jax.lax.stop_gradient(perceptual_state))
           if use_perceptual else None)
    terms = loss_terms(model, out, renders, batch, active, net)
    return losses.weighted_total(terms, active), terms

  def train_step(state: TrainState, batch, key, perceptual_state=None):
    if use_perceptual and perceptual_state is None:
      perceptual_state = perceptual_default
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (total, terms), grads = grad_fn(state.params, state.rest, batch, key,
                                    perceptual_state if use_perceptual else None)
    state, grad_norm = apply_gradients(state, tx, total, grads)
    metrics = dict(terms, loss=total, grad_norm=grad_norm,
                   nonfinite_steps=state.nonfinite_steps,
                   nonfinite_streak=state.nonfinite_streak)
    return state, metrics

  return train_step
