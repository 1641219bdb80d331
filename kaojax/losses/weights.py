"""KaoLRM's per-stage loss weights (spec: kaolrm.md, "Losses")."""

import types

# term -> weight. Stage I fits geometry to landmarks; stage II adds appearance and
# binding. Monocular and multi-view stage II differ in the photometric weights.
STAGE_WEIGHTS = types.MappingProxyType({
    "stage1": types.MappingProxyType({
        "pixel": 0.0, "lpips": 0.0, "dssim": 0.0, "landmark": 1.0,
        "shape_reg": 1e-2, "expression_reg": 1e-2, "mask": 0.1,
        "depth_binding": 0.0, "normal_binding": 0.0}),
    "stage2_mono": types.MappingProxyType({
        "pixel": 0.1, "lpips": 0.1, "dssim": 0.1, "landmark": 0.01,
        "shape_reg": 1e-5, "expression_reg": 1e-5, "mask": 0.0,
        "depth_binding": 0.5, "normal_binding": 0.5}),
    "stage2_multiview": types.MappingProxyType({
        "pixel": 0.5, "lpips": 0.5, "dssim": 0.5, "landmark": 0.01,
        "shape_reg": 1e-5, "expression_reg": 1e-5, "mask": 0.0,
        "depth_binding": 0.5, "normal_binding": 0.5}),
})


def stage_weights(stage: int, multiview: bool = True, overrides=None) -> dict:
  """The weight table of `stage` (1 or 2), with optional {term: weight} overrides
  (an override of None keeps the table's weight)."""
  if stage == 1:
    weights = dict(STAGE_WEIGHTS["stage1"])
  elif stage == 2:
    weights = dict(STAGE_WEIGHTS["stage2_multiview" if multiview else "stage2_mono"])
  else:
    raise ValueError(f"stage must be 1 or 2, got {stage!r}")
  for term, value in dict(overrides or {}).items():
    if term not in weights:
      raise ValueError(f"unknown loss term {term!r} (known: {', '.join(weights)})")
    if value is None:
      continue
    weights[term] = float(value)
  return weights


def weighted_total(terms: dict, weights: dict):
  """sum(weights[t] * terms[t]) over the terms with a non-zero weight; every such
  term must be present in `terms`."""
  missing = [t for t, w in weights.items() if w and t not in terms]
  if missing:
    raise ValueError(f"loss terms with non-zero weight were not computed: {missing}")
  return sum(w * terms[t] for t, w in weights.items() if w)
