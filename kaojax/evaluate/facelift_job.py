"""The FaceLift evaluation job (`eval_facelift`): FaceLift Tables 1 / 2 image metrics.

    python run.py --config=configs/eval_facelift.py:tiny --workdir=OUT
    python run.py --config=configs/eval_facelift.py --config.data_root=DATA \
        --config.infer.mvdiffusion=PIPELINE_DIR --config.infer.gslrm=GSLRM_CKPT \
        --config.infer.text_embeddings=clr_embeds.pt --config.lpips_weights=LPIPS_DIR \
        --workdir=OUT

The test set: `data_root`, subjects in FaceLift's layout (`data_pipeline.facelift_layout`,
cameras in FaceLift's world) of `split`; or, without one, synthetic heads
(`data_pipeline.heads.generate`) written into OUT/benchmark. Per subject, frame
`input_view` (default 0, FaceLift's front camera) composited on white is the single
input; the held-out frames from `first_eval_view` on (at most `max_views`) are the
targets, composited on white at the model's image size, their alpha > 0.5 the masks.

Per subject, FaceLift (`kaojax.infer.facelift.predict`: multi-view diffusion, GS-LRM,
post-filter; the models of the `infer` config, as the infer_facelift job builds them)
reconstructs Gaussians from the input (`reconstruct`), rendered (white background,
clipped to [0, 1] as a saved image) at every held-out camera. The model is run
directly, not through the inference job: that job renders only its fixed cameras, and
scoring needs the test cameras. No landmark alignment of the
renders to the targets (the paper aligns with MediaPipe landmarks to bridge camera
conventions; the synthetic set shares FaceLift's cameras): a documented deviation.

Metrics (`kaojax.evaluate.image_metrics`, FaceLift's helper definitions): PSNR, SSIM and
LPIPS-VGG per image, over whole images and, as extra columns, with the masks; means
over every (subject, view). LPIPS needs converted weights (`lpips_weights`, from
`python -m kaojax.convert.vgg`); "random" uses a random VGG (smoke tests only, flagged
in the results); empty: no LPIPS.

Writes into OUT:
  facelift_results.json  psnr, ssim, lpips (means; masked_* with masks), per-view rows,
                         the settings and the command
  facelift_results.md    the table in the paper's Table 1 / 2 layout with the published
                         rows beside ours
  renders/UID.png        per subject: targets (top) over renders (bottom)
"""

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from data_pipeline import facelift_layout, facelift_sources
from kaojax.evaluate import image_metrics
from kaojax.images import resize_bicubic

# FaceLift's Tables 1 (Cafca) and 2 (Ava-256): PSNR, SSIM, LPIPS, DreamSim, ArcFace.
PUBLISHED = {
    "Cafca (Table 1)": {
        "GGHead": (10.35, 0.7406, 0.3636, 0.3252, 0.2681),
        "PanoHead": (10.72, 0.7594, 0.3351, 0.2048, 0.2183),
        "Dual Encoder": (10.78, 0.7385, 0.3922, 0.2785, 0.2421),
        "Era3D": (13.69, 0.7230, 0.3662, 0.2892, 0.2978),
        "LGM": (16.52, 0.7933, 0.3060, 0.1552, 0.2557),
        "Our MV + LGM": (14.13, 0.7812, 0.2956, 0.1282, 0.1767),
        "FaceLift (paper)": (16.61, 0.7968, 0.2694, 0.1096, 0.1573)},
    "Ava-256 (Table 2)": {
        "Era3D": (14.77, 0.7963, 0.2538, 0.2515, 0.3721),
        "LGM": (14.05, 0.8136, 0.2476, 0.1496, 0.3142),
        "Our MV + LGM": (15.24, 0.8213, 0.2292, 0.1093, 0.2264),
        "FaceLift (paper)": (16.52, 0.8271, 0.2277, 0.1065, 0.1871)},
}
WHITE = (1.0, 1.0, 1.0)


def _test_set(config, workdir):
  """(dataset root, uids, whether it is synthetic)."""
  if config.data_root:
    root = pathlib.Path(config.data_root)
    return root, facelift_layout.read_split(root, config.split), False
  from data_pipeline.heads import generate  # pylint: disable=import-outside-toplevel
  root = workdir / "benchmark"
  if not (root / "val.json").is_file():
    generate(root, config.synthetic.num_subjects, config.synthetic.num_random,
             config.synthetic.image_size, seed=config.seed, val_fraction=1.0,
             progress=False)
  return root, facelift_layout.read_split(root, "val"), True


def _lpips_net(config):
  """(LPIPS network or None, a description)."""
  if not config.lpips_weights:
    return None, "off (no lpips_weights)"
  if config.lpips_weights == "random":
    from kaojax.losses.perceptual import LPIPS  # pylint: disable=import-outside-toplevel
    return LPIPS(nnx.Rngs(config.seed)), "RANDOM VGG weights (smoke test, not LPIPS)"
  from kaojax.models.loading import load_lpips  # pylint: disable=import-outside-toplevel
  return load_lpips(config.lpips_weights), str(config.lpips_weights)


def _jit_lpips(net):
  """A jitted (pred, target) -> LPIPS [B] (the weights an argument, not constants)."""
  if net is None:
    return None
  graphdef, weights = nnx.split(net)
  run = jax.jit(lambda w, x, y: nnx.merge(graphdef, w)(x, y))
  return lambda x, y: run(weights, x, y)


def reconstruct(task, image):
  """image [S, S, 3] in [0, 1] -> FaceLift's post-filtered Gaussians (`predict` with the
  models of `task`, a `kaojax.infer.facelift.FaceLiftTask`)."""
  from kaojax.infer import facelift  # pylint: disable=import-outside-toplevel
  from kaojax.models.gslrm import select  # pylint: disable=import-outside-toplevel
  result = facelift.predict(task.models, image, task.cfg, render_outputs=False)
  return jax.tree_util.tree_map(jnp.asarray, select(jax.tree_util.tree_map(
      lambda a: a[0], result["gaussians"].gaussians()), result["keep"]))


def load_targets(subject_dir, indices, size: int):
  """Held-out frames -> (images [V, S, S, 3] on white, masks [V, S, S], c2w [V, 4, 4],
  Ks [V, 3, 3]) at `size`."""
  cameras = facelift_layout.read_cameras(subject_dir)
  views = facelift_sources.load_views(subject_dir, indices, size, WHITE, cameras)
  masks = []
  for i in indices:
    width, height = (int(x) for x in cameras[2][i])
    alpha = facelift_layout.read_image(subject_dir, cameras[3][i], width, height)[..., 3:]
    masks.append((resize_bicubic(alpha, size) if width != size else alpha)[..., 0] > 0.5)
  return views["images"], np.stack(masks), views["c2w"], views["Ks"]


def _grid(targets, renders):
  top, bottom = np.concatenate(list(targets), 1), np.concatenate(list(renders), 1)
  return (np.clip(np.concatenate([top, bottom], 0), 0, 1) * 255).round().astype(np.uint8)


def _fmt(x, digits):
  return "-" if x is None or x != x else f"{x:.{digits}f}"


def markdown_table(results: dict) -> str:
  """Our row and the published rows, in the paper's column order."""
  head = ["| method | PSNR | SSIM | LPIPS | DreamSim | ArcFace |", "|---|---|---|---|---|---|"]
  row = lambda name, v: (f"| {name} | {_fmt(v[0], 2)} | {_fmt(v[1], 4)} | {_fmt(v[2], 4)} | "
                         f"{_fmt(v[3], 4)} | {_fmt(v[4], 4)} |")
  ours = (results["psnr"], results["ssim"], results.get("lpips"), None, None)
  masked = (results["masked_psnr"], results["masked_ssim"], results.get("masked_lpips"),
            None, None)
  lines = ["## FaceLift novel-view metrics (Tables 1 / 2 layout)", "",
           f"{results['images']} held-out views of {results['subjects']} subjects; LPIPS: "
           f"{results['lpips_weights']}. DreamSim and ArcFace are not computed (not in "
           "FaceLift's released code).", ""] + head
  lines += [row("kaojax (this run)", ours), row("kaojax (this run, masked)", masked)]
  for table, rows in PUBLISHED.items():
    lines += ["", f"Published (FaceLift paper, {table}):", ""] + head
    lines += [row(name, v) for name, v in rows.items()]
  lines += ["", f"Command: `{results['command']}`", ""]
  return "\n".join(lines)


def run(config, workdir) -> dict:
  """The job (module doc); returns the results (also in facelift_results.json)."""
  from kaojax.infer import facelift  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir)
  started = time.perf_counter()
  root, uids, synthetic = _test_set(config, workdir)
  if config.max_subjects:
    uids = uids[:config.max_subjects]
  task = facelift.FaceLiftTask(config.infer)             # builds the models as the job does
  size = task.image_size
  net, lpips_source = _lpips_net(config)
  lpips = _jit_lpips(net)
  rows, scores = [], {}
  for uid in uids:
    subject = root / uid
    count = len(facelift_layout.read_cameras(subject)[0])
    held_out = list(range(config.first_eval_view, count))
    held_out = held_out[:config.max_views] if config.max_views else held_out
    source = facelift_sources.load_views(subject, [config.input_view], size, WHITE)
    targets, masks, c2w, Ks = load_targets(subject, held_out, size)
    gaussians = reconstruct(task, source["images"][0])
    renders = np.clip(np.asarray(facelift.render(gaussians, jnp.asarray(c2w),
                                                 jnp.asarray(Ks), size)), 0.0, 1.0)
    s = image_metrics.image_metrics(targets, renders, net=lpips)
    m = image_metrics.image_metrics(targets, renders, masks, net=lpips)
    for name, values in list(s.items()) + [(f"masked_{k}", v) for k, v in m.items()]:
      scores.setdefault(name, []).extend(values.tolist())
    for k, view in enumerate(held_out):
      rows.append({"subject": uid, "view": view, **{n: float(v[k]) for n, v in s.items()},
                   **{f"masked_{n}": float(v[k]) for n, v in m.items()}})
    (workdir / "renders").mkdir(parents=True, exist_ok=True)
    Image.fromarray(_grid(targets, renders)).save(workdir / "renders" / f"{uid}.png")
    logging.info("eval_facelift %s: PSNR %.2f SSIM %.4f over %d views", uid,
                 np.mean(s["psnr"]), np.mean(s["ssim"]), len(held_out))
  command = " ".join(["python"] + sys.argv) if sys.argv and sys.argv[0].endswith(
      "run.py") else f"kaojax.evaluate.facelift_job.run(config, {str(workdir)!r})"
  results = {name: float(np.mean(v)) for name, v in scores.items()}
  results.update({
      "images": len(rows), "subjects": len(uids), "image_size": size,
      "lpips_weights": lpips_source, "dataset": str(root), "synthetic": synthetic,
      "input_view": config.input_view, "per_view": rows, "command": command,
      "seconds": round(time.perf_counter() - started, 1)})
  (workdir / "facelift_results.json").write_text(json.dumps(results, indent=1))
  (workdir / "facelift_results.md").write_text(markdown_table(results))
  logging.info("eval_facelift: PSNR %.2f SSIM %.4f LPIPS %s over %d views",
               results["psnr"], results["ssim"], results.get("lpips", "-"), len(rows))
  return results
