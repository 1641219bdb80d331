"""The multi-view evaluation job (`eval_multiview`): KaoLRM Tables 1 / 3 and Fig. 4.

    python run.py --config=configs/eval_multiview.py:tiny --workdir=OUT
    python run.py --config=configs/eval_multiview.py --config.data_root=DATA \
        --config.split=test --config.flame_path=FLAME --config.infer.model=MODEL_DIR \
        --workdir=OUT
    python run.py --config=configs/eval_multiview.py --config.data_root=DATA \
        --config.predictions=PRED --config.flame_path=FLAME --workdir=OUT

The test set: `data_root`, a multi-view dataset in the project's layout
(`data_pipeline.layout`) whose subjects carry ground truth in FLAME topology
(gt/params.npz: vertices [V, 3], landmarks3d [68, 3], shape, expression; gt/mesh.obj for
the faces), the subjects of `split`; or, without one, a synthetic set written into
OUT/benchmark (`data_pipeline.synthetic.generate`, every subject in the `val` split).

The predictions, one per view: `predictions` (PRED/UID/NNN/params.npz with shape,
expression, landmarks3d [68, 3] in the frame of PRED/UID/NNN/mesh.obj) or, without one,
the KaoLRM inference job (`kaojax.infer.kaolrm`, config `infer`, crop=full) run on every
view composited on white (OUT/inputs/UID/NNN.png) into OUT/inference. Going through the
inference job (not the model directly) scores exactly what users export, the same way
the NoW job does.

Scores (`kaojax.evaluate.multiview`): per view, the Chamfer distance over the facial
region (the FLAME face mask of `flame_path`, or the synthetic stand-in's) after
Umeyama alignment on the 68 keypoints; per subject, Var(beta) and Var(psi) over the
first 10 and all coefficients, and the per-vertex variance of the aligned meshes
rendered on their mean (OUT/variance/UID.png, one colour scale for all subjects). The
ground truth is first normalised into [-1, 1]^3 (`normalize_gt`, `unit_box`: the
paper's normalisation of its renders), so distances are in that frame's units. A view
whose prediction is missing or whose mesh has another vertex count is listed under
`skipped` and not scored; a subject needs two scored views for its variances.

Writes into OUT:
  multiview_results.json  chamfer {mean, median, std, count} (x 1e-2 as printed too),
                          variance {shape_10, shape_full, expression_10,
                          expression_full}, per-view and per-subject rows, skipped,
                          the settings and the command
  multiview_results.md    the table in the paper's Table 1 layout, the published rows
                          beside ours, and Table 3's rows
  multiview_variance.npz  per subject: per-vertex variance [V] and mean mesh [V, 3]
  variance/UID.png        the heat maps
"""

import json
import pathlib
import sys
import time

import numpy as np
from absl import logging

from data_pipeline import layout
from data_pipeline.synthetic import generate, load_generator_flame
from kaojax.evaluate import multiview
from kaojax.evaluate.heatmap import render_heatmap
from kaojax.evaluate.now import read_mesh
from kaojax.images import composite

# KaoLRM Table 1 (FaceVerse test set): Chamfer (x 1e-2) mean, median, std; Var(beta)
# 10, full; Var(psi) 10, full (None: not reported).
PUBLISHED_TABLE1 = {
    "DECA": (3.17, 3.13, 0.331, 1.91, 2.02, 2.32, 2.48),
    "EMOCA": (3.15, 3.11, 0.359, 1.91, 2.01, 4.61, 4.67),
    "SMIRK": (3.20, 3.18, 0.329, 9.47, 8.48, 45.94, 47.04),
    "MICA": (2.63, 2.58, 0.381, 27.41, 28.52, None, None),
    "KaoLRM (paper)": (2.68, 2.67, 0.157, 1.46, 1.54, 1.01, 1.10),
}
# KaoLRM Table 3 (ablation, FaceVerse test set): Chamfer mean, median, std; Var(beta),
# Var(psi) over all coefficients.
PUBLISHED_TABLE3 = {
    "w/o regularization": (2.75, 2.74, 0.170, 2.08, 0.41),
    "w/o photometric loss": (2.99, 2.96, 0.200, 2.07, 0.41),
    "w/o binding loss": (3.05, 3.05, 0.206, 0.75, 0.27),
    "Full": (2.68, 2.67, 0.157, 1.54, 1.10),
}
VARIANCE_KEYS = ("shape_10", "shape_full", "expression_10", "expression_full")


def _test_set(config, workdir):
  """(dataset root, uids, whether it is synthetic)."""
  if config.data_root:
    root = pathlib.Path(config.data_root)
    return root, layout.read_split(root, config.split), False
  root = workdir / "benchmark"
  if not (root / "val.json").is_file():
    generate(root, config.synthetic.num_subjects, config.synthetic.num_views,
             config.synthetic.image_size, seed=config.seed, val_fraction=1.0,
             progress=False)
  return root, layout.read_split(root, "val"), True


def _face_mask(config, synthetic):
  """The FLAME facial region [F] bool."""
  if config.flame_path:
    from kaojax.flame.io import load_flame  # pylint: disable=import-outside-toplevel
    return np.asarray(load_flame(config.flame_path).face_mask, bool)
  if not synthetic:
    logging.warning("eval_multiview: no flame_path: the synthetic stand-in's face mask is "
                    "used (right only for its topology)")
  return np.asarray(load_generator_flame("", config.seed)[0].face_mask, bool)


def _views(root, uids, max_views):
  """[(uid, view index)] of the test set."""
  out = []
  for uid in uids:
    count = layout.num_views(root / uid)
    out += [(uid, v) for v in range(min(count, max_views) if max_views else count)]
  return out


def _infer(config, workdir, root, views):
  """Runs the inference job on the views composited on white -> {(uid, view): the
  prediction's folder}."""
  from kaojax.infer import kaolrm, runner  # pylint: disable=import-outside-toplevel
  images = {}
  for uid, v in views:
    path = (workdir / "inputs" / uid / f"{layout.view_name(v)}.png").resolve()
    if not path.is_file():
      rgba = layout.read_png(root / uid / "rgba" / f"{layout.view_name(v)}.png", 4)
      layout.write_png(path, composite(rgba, 1.0))
    images[(uid, v)] = path
  infer_dir = workdir / "inference"
  infer_dir.mkdir(parents=True, exist_ok=True)
  listing = infer_dir / "inputs.txt"
  listing.write_text("\n".join(str(p) for p in images.values()) + "\n")
  infer_config = config.infer.copy_and_resolve_references()
  with infer_config.unlocked():
    infer_config.input = str(listing)
  kaolrm.run(infer_config, infer_dir)
  rows = runner.read_results(*runner.results_files(infer_dir))
  folders = {}
  for key, path in images.items():
    row = rows.get(str(path))
    if row and row.get("status") == "ok" and row.get("outputs"):
      folders[key] = infer_dir / row["outputs"][0]
  return folders


def _prediction_folders(config, workdir, root, views):
  if not config.predictions:
    return _infer(config, workdir, root, views)
  base = pathlib.Path(config.predictions)
  return {(uid, v): base / uid / layout.view_name(v) for uid, v in views}


def _read_prediction(folder):
  """-> (vertices [V, 3], keypoints [68, 3], shape [S], expression [E]) or a reason."""
  if folder is None or not (folder / "params.npz").is_file():
    return "missing prediction (params.npz)"
  if not (folder / "mesh.obj").is_file():
    return "missing predicted mesh (mesh.obj)"
  with np.load(folder / "params.npz") as p:
    if "landmarks3d" not in p or p["landmarks3d"].shape != (68, 3):
      return "params.npz has no landmarks3d [68, 3]"
    params = (p["landmarks3d"], p["shape"], p["expression"])
  return (read_mesh(folder / "mesh.obj")[0],) + params


def score(config, root, uids, folders, views, face_mask):
  """Scores every view, then every subject -> (per-view rows, per-subject rows,
  skipped rows, {uid: (variance [V], mean mesh [V, 3])}, faces)."""
  per_view, skipped, subjects, faces = [], [], {}, None
  for uid in uids:
    with np.load(root / uid / "gt" / "params.npz") as gt:
      gt_vertices, gt_keypoints = gt["vertices"], gt["landmarks3d"]
    if config.normalize_gt:
      gt_vertices, gt_keypoints = unit_box(gt_vertices, gt_keypoints)
    faces = read_mesh(root / uid / "gt" / "mesh.obj")[1]
    if len(face_mask) != len(faces):
      raise ValueError(f"the face mask has {len(face_mask)} faces, {uid}'s ground truth "
                       f"{len(faces)}: give the matching flame_path")
    collected = {"aligned": [], "shape": [], "expression": []}
    for _, v in [key for key in views if key[0] == uid]:
      name = f"{uid}/{layout.view_name(v)}"
      prediction = _read_prediction(folders.get((uid, v)))
      if isinstance(prediction, str):
        skipped.append({"view": name, "reason": prediction})
        continue
      vertices, keypoints, shape, expression = prediction
      if len(vertices) != len(gt_vertices):
        skipped.append({"view": name, "reason": f"predicted mesh has {len(vertices)} "
                        f"vertices, the ground truth {len(gt_vertices)}"})
        continue
      s = multiview.score_view(vertices, keypoints, gt_vertices, gt_keypoints, faces,
                               face_mask)
      per_view.append({"view": name, "chamfer": s.chamfer, "pred_to_gt": s.pred_to_gt,
                       "gt_to_pred": s.gt_to_pred, "alignment_scale": s.scale})
      collected["aligned"].append(s.aligned)
      collected["shape"].append(shape)
      collected["expression"].append(expression)
    if len(collected["aligned"]) >= 2:
      subjects[uid] = collected
  rows, maps = [], {}
  for uid, c in subjects.items():
    row = {"subject": uid, "views": len(c["aligned"])}
    for kind in ("shape", "expression"):
      values = np.stack(c[kind])
      row[f"{kind}_10"] = multiview.parameter_variance(values, 10)
      row[f"{kind}_full"] = multiview.parameter_variance(values)
      row[f"{kind}_dims"] = int(values.shape[1])
    maps[uid] = multiview.vertex_variance(np.stack(c["aligned"]))
    row["vertex_variance_mean"] = float(np.mean(maps[uid][0]))
    rows.append(row)
  return per_view, rows, skipped, maps, faces


def unit_box(vertices, *others):
  """Moves and scales vertices [V, 3] (and the same for each of `others` [*, 3]) so that
  their bounding box is centred at 0 with half-extent 1 on its longest side: the
  paper's [-1, 1]^3 normalisation (the synthetic ground truth already is)."""
  vertices = np.asarray(vertices, np.float64)
  centre = 0.5 * (vertices.max(0) + vertices.min(0))
  scale = 1.0 / np.abs(vertices - centre).max()
  return tuple((np.asarray(x, np.float64) - centre) * scale for x in (vertices,) + others)


def _fmt(x, digits=2):
  """Fixed decimals as the paper prints them; tiny values (untrained models) in
  scientific notation rather than as 0.00."""
  if x is None or x != x:
    return "-"
  return f"{x:.2e}" if 0 < abs(x) < 10 ** -digits else f"{x:.{digits}f}"


def markdown_table(results: dict) -> str:
  """Table 1's layout with the published rows, then Table 3's rows."""
  c, var = results["chamfer_x1e2"], results["variance"]
  head = ["| method | CD mean | CD median | CD std | Var(beta) 10 | Var(beta) full | "
          "Var(psi) 10 | Var(psi) full |", "|---|---|---|---|---|---|---|---|"]
  ours = (c["mean"], c["median"], c["std"]) + tuple(var[k] for k in VARIANCE_KEYS)
  row = lambda name, v: f"| {name} | " + " | ".join(
      _fmt(x, 3 if i == 2 else 2) for i, x in enumerate(v)) + " |"
  lines = ["## Multi-view accuracy and consistency (KaoLRM Table 1 layout)", "",
           f"Chamfer distance x 1e-2 (ground-truth units) over {c['count']} views; "
           f"variances over {results['subjects_scored']} subjects.", ""] + head
  lines.append(row("kaojax (this run)", ours))
  lines += ["", "Published (KaoLRM paper, Table 1, FaceVerse test set):", ""] + head
  lines += [row(name, v) for name, v in PUBLISHED_TABLE1.items()]
  lines += ["", "Published ablation (KaoLRM paper, Table 3, variances over all "
            "coefficients):", "",
            "| setting | CD mean | CD median | CD std | Var(beta) | Var(psi) |",
            "|---|---|---|---|---|---|"]
  lines += [row(name, v) for name, v in PUBLISHED_TABLE3.items()]
  lines += ["", f"Command: `{results['command']}`", ""]
  return "\n".join(lines)


def run(config, workdir) -> dict:
  """The job (module doc); returns the results (also in multiview_results.json)."""
  workdir = pathlib.Path(workdir)
  started = time.perf_counter()
  root, uids, synthetic = _test_set(config, workdir)
  if config.max_subjects:
    uids = uids[:config.max_subjects]
  views = _views(root, uids, config.max_views)
  folders = _prediction_folders(config, workdir, root, views)
  face_mask = _face_mask(config, synthetic)
  per_view, subjects, skipped, maps, faces = score(config, root, uids, folders, views,
                                                   face_mask)
  for s in skipped:
    logging.warning("eval_multiview: skipped %s: %s", s["view"], s["reason"])
  chamfer = multiview.summarize([r["chamfer"] for r in per_view])
  variance = {k: float(np.mean([r[k] for r in subjects])) if subjects else float("nan")
              for k in VARIANCE_KEYS}
  command = " ".join(["python"] + sys.argv) if sys.argv and sys.argv[0].endswith(
      "run.py") else f"kaojax.evaluate.multiview_job.run(config, {str(workdir)!r})"
  results = {
      "chamfer": chamfer,
      "chamfer_x1e2": {k: (v * 100 if k != "count" else v) for k, v in chamfer.items()},
      "variance": variance, "subjects_scored": len(subjects),
      "per_view": per_view, "per_subject": subjects, "skipped": skipped,
      "dataset": str(root), "synthetic": synthetic, "views": len(views),
      "predictions": config.predictions or str(workdir / "inference"),
      "chamfer_definition": "symmetric mean point-to-surface distance over the FLAME "
                            "facial region after Umeyama alignment on 68 keypoints",
      "normalize_gt": bool(config.normalize_gt), "command": command, "seconds": 0.0}
  if maps:
    vmax = max(float(np.percentile(m[0], 99)) for m in maps.values()) or 1e-12
    for uid, (values, mean) in maps.items():
      render_heatmap(workdir / "variance" / f"{uid}.png", mean, faces, values, vmax,
                     title=f"{uid} per-vertex variance")
    np.savez_compressed(workdir / "multiview_variance.npz", **{
        f"{uid}/{k}": a for uid, m in maps.items() for k, a in zip(("variance", "mean"), m)})
    results["heatmap_vmax"] = vmax
  results["seconds"] = round(time.perf_counter() - started, 1)
  (workdir / "multiview_results.json").write_text(json.dumps(results, indent=1))
  (workdir / "multiview_results.md").write_text(markdown_table(results))
  logging.info("eval_multiview: Chamfer (x1e-2) mean %.3f median %.3f std %.3f over %d "
               "views; Var(beta) %.4g Var(psi) %.4g over %d subjects (%d skipped)",
               results["chamfer_x1e2"]["mean"], results["chamfer_x1e2"]["median"],
               results["chamfer_x1e2"]["std"], chamfer["count"], variance["shape_full"],
               variance["expression_full"], len(subjects), len(skipped))
  return results
