"""torchvision VGG16 + lpips linear heads -> `kaojax.losses.perceptual.LPIPS`.

Inputs (the user supplies both; nothing is downloaded):
  --vgg  torchvision's ImageNet `vgg16` state dict (`vgg16-397923af.pth`: keys
         `features.N.weight/bias`, `classifier.*` unused), or the state dict of a whole
         `lpips.LPIPS(net="vgg")` module (keys `net.sliceK.N.*` and `linK.model.1.weight`);
  --lin  lpips' `weights/v0.1/vgg.pth` (keys `linK.model.1.weight` [1, C, 1, 1]); not
         needed when --vgg already holds the lin keys.

    python -m kaojax.convert.vgg --vgg vgg16-397923af.pth \
        --lin .../site-packages/lpips/weights/v0.1/vgg.pth --out weights/lpips_vgg
    python run.py --config=configs/stage2.py --config.loss.lpips_weights=weights/lpips_vgg

The output directory holds `kaojax_model.json` ({"format": 1, "kind": "lpips-vgg",
"config": {"widths": ...}}) and `params/` (an Orbax tree of the LPIPS parameters);
`kaojax.models.loading.load_lpips(DIR)` reads it back. The network's block widths are read from the
weights, so reduced test networks convert the same way.
"""

import os
import re
from typing import Mapping, Optional, Union

import numpy as np
from flax import nnx

from kaojax.models.loading import save_lpips
from kaojax.convert.torch_state import (CheckpointError, StateMapping, assign_state,
                                        conv_kernel_hwio, converter_parser, param_shapes,
                                        read_state_dict)
from kaojax.losses.perceptual import LPIPS
from kaojax.models.vgg import torch_feature_indices

PathLike = Union[str, os.PathLike]
# Present in the accepted files, deliberately unused: VGG's classifier head and
# lpips' constant ScalingLayer buffers (kaojax has them as constants).
ALLOWED = ("classifier.*", "scaling_layer.*")
_LPIPS_TRUNK = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")
_FEATURE = re.compile(r"^features\.(\d+)\.weight$")
_LIN = re.compile(r"^lin(?:s\.)?(\d+)\.model\.(\d+)\.weight$")


def canonical_keys(state: Mapping[str, np.ndarray]) -> dict:
  """lpips' `net.sliceK.N.*` trunk keys -> torchvision's `features.N.*`; lin keys
  `linK.model.M.weight` (M = 1 with dropout, 0 without; an LPIPS module's state dict
  also lists each as `lins.K.model.M.weight`) -> `linK.weight`."""
  out = {}
  for key, value in state.items():
    match = _LPIPS_TRUNK.match(key)
    if match:
      key = f"features.{match.group(1)}.{match.group(2)}"
    match = _LIN.match(key)
    if match:
      key = f"lin{match.group(1)}.weight"
    if key in out and not np.array_equal(np.asarray(out[key]), np.asarray(value)):
      raise CheckpointError(f"two different arrays for {key!r} in the inputs")
    out[key] = value
  return out


def infer_widths(state: Mapping[str, np.ndarray]) -> tuple:
  """Block widths from the conv keys: torchvision's convs are 2 indices apart inside a
  block and 3 apart across a max-pool."""
  indices = sorted(int(m.group(1)) for m in map(_FEATURE.match, state) if m)
  if not indices:
    raise CheckpointError("no VGG conv weights (features.N.weight) in the inputs")
  blocks, previous = [], None
  for index in indices:
    if previous is None or index - previous == 3:
      blocks.append([])
    elif index - previous != 2:
      raise CheckpointError(f"features.{index}: not torchvision's VGG layout (convs at "
                            f"{indices})")
    blocks[-1].append(int(state[f"features.{index}.weight"].shape[0]))
    previous = index
  widths = tuple(tuple(b) for b in blocks)
  if indices != torch_feature_indices(widths) or len(widths) != 5:
    raise CheckpointError(f"convs at {indices}: not a 5-block VGG16 feature layout")
  return widths


def lpips_from_state(vgg_state: Mapping[str, np.ndarray],
                     lin_state: Optional[Mapping[str, np.ndarray]] = None,
                     source: str = "VGG/LPIPS weights") -> LPIPS:
  """An LPIPS module holding the given torch weights (see the module docstring)."""
  state = dict(vgg_state)
  for key, value in dict(lin_state or {}).items():
    if key in state:
      raise CheckpointError(f"{key!r} is in both the VGG and the lin weights")
    state[key] = value
  state = canonical_keys(state)
  widths = infer_widths(state)
  model = nnx.eval_shape(lambda: LPIPS(nnx.Rngs(0), widths))
  mapping = StateMapping(state, source, allow=ALLOWED)
  for i, index in enumerate(torch_feature_indices(widths)):
    weight = mapping.take(f"features.{index}.weight")
    mapping.put(("vgg", "convs", i, "kernel"),
                None if weight is None else conv_kernel_hwio(weight), f"features.{index}.weight")
    mapping.put(("vgg", "convs", i, "bias"), mapping.take(f"features.{index}.bias"),
                f"features.{index}.bias")
  for i in range(len(widths)):
    weight = mapping.take(f"lin{i}.weight")
    # [1, C, 1, 1] -> Linear kernel [C, 1]
    mapping.put(("lins", i, "kernel"), None if weight is None else weight.reshape(
        weight.shape[0], -1).T.copy(), f"lin{i}.model.1.weight")
  assign_state(model, mapping.finish(param_shapes(model)))
  return model


def convert(vgg: PathLike, out: PathLike, lin: Optional[PathLike] = None,
            overwrite: bool = False) -> LPIPS:
  """Files -> converted directory; returns the model."""
  vgg_state = read_state_dict(vgg)
  lin_state = read_state_dict(lin) if lin else None
  sources = str(vgg) + (f" + {lin}" if lin else "")
  model = lpips_from_state(vgg_state, lin_state, sources)
  save_lpips(out, model, overwrite=overwrite)
  return model


def main(argv=None):
  parser = converter_parser(
      "vgg", "Convert torchvision's VGG16 and lpips' linear heads into the kaojax LPIPS "
      "network (config.loss.lpips_weights).")
  parser.add_argument("--vgg", required=True,
                      help="torchvision vgg16 state dict (.pth), or an lpips.LPIPS state dict")
  parser.add_argument("--lin", default=None, help="lpips weights/v0.1/vgg.pth")
  args = parser.parse_args(argv)
  model = convert(args.vgg, args.out, args.lin, args.overwrite)
  count = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  print(f"saved LPIPS-VGG ({count:,} parameters) to {args.out}")


if __name__ == "__main__":
  main()
