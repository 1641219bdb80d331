"""Pretrained MTCNN weights (P-Net, R-Net, O-Net) as numpy arrays in flax layout.

Runtime source: the MIT-licensed `mtcnn` wheel (requirements.txt), which ships the
original Caffe MTCNN weights as joblib + lz4 pickled lists of Keras arrays in
`mtcnn/assets/weights/{pnet,rnet,onet}.lz4`. Reading them needs joblib and lz4 only:
the `mtcnn` package itself (which imports TensorFlow) is never imported, only located.

facenet-pytorch's `facenet_pytorch/data/{pnet,rnet,onet}.pt` state dicts hold the same
arrays (checked in tests/infer/detect_test.py); `from_facenet_state_dict` converts
those, for parity tests.

Canonical layout (what `kaojax.infer.detect` loads), one dict per network mapping
layer name -> {param name -> array}:
  conv kernels [kh, kw, c_in, c_out] (HWIO), biases [c_out];
  dense kernels [d_in, d_out] (inputs flattened in (w, h, c) order, as the Caffe
  weights expect); PReLU slopes "alpha" [c].
"""

import importlib.util
import pathlib

import numpy as np

# Layer names per network, in the order their arrays appear in the Keras weight lists
# (conv/dense: kernel, bias; prelu: alpha).
_LAYERS = {
    "pnet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "reg", "cls"],
    "rnet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "fc4", "prelu4",
             "reg", "cls"],
    "onet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4", "prelu4",
             "fc5", "prelu5", "reg", "landmarks", "cls"],
}

# facenet-pytorch state-dict prefix for each canonical layer.
_FACENET_NAMES = {
    "pnet": {"reg": "conv4_2", "cls": "conv4_1"},
    "rnet": {"fc4": "dense4", "reg": "dense5_2", "cls": "dense5_1"},
    "onet": {"fc5": "dense5", "reg": "dense6_2", "landmarks": "dense6_3",
             "cls": "dense6_1"},
}


class WeightsNotFound(FileNotFoundError):
  pass


def mtcnn_package_dir() -> pathlib.Path:
  """Directory of the installed `mtcnn` wheel, located without importing it."""
  spec = importlib.util.find_spec("mtcnn")
  if spec is None or not spec.submodule_search_locations:
    raise WeightsNotFound(
        "the MTCNN weights come from the `mtcnn` wheel: pip install -r requirements.txt "
        "(or pip install mtcnn)")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def _from_keras_list(name: str, arrays) -> dict:
  arrays = [np.asarray(a, np.float32) for a in arrays]
  out, i = {}, 0
  for layer in _LAYERS[name]:
    if layer.startswith("prelu"):
      out[layer] = {"alpha": arrays[i].reshape(-1)}
      i += 1
    else:
      out[layer] = {"kernel": arrays[i], "bias": arrays[i + 1]}
      i += 2
  if i != len(arrays):
    raise ValueError(f"{name}: expected {i} arrays, the weight file holds {len(arrays)}")
  return out


def load_mtcnn_wheel_weights(directory=None) -> dict:
  """{"pnet": ..., "rnet": ..., "onet": ...} from the `mtcnn` wheel's .lz4 files."""
  import joblib  # pylint: disable=import-outside-toplevel  (reads the .lz4 via lz4)
  directory = (pathlib.Path(directory) if directory is not None
               else mtcnn_package_dir() / "assets" / "weights")
  out = {}
  for name in _LAYERS:
    path = directory / f"{name}.lz4"
    if not path.exists():
      raise WeightsNotFound(f"MTCNN weights not found: {path}")
    out[name] = _from_keras_list(name, joblib.load(path))
  return out


def from_facenet_state_dict(name: str, state_dict) -> dict:
  """One network's facenet-pytorch state dict (tensors or arrays) -> canonical dict."""
  sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v,
                      np.float32) for k, v in state_dict.items()}
  out = {}
  for layer in _LAYERS[name]:
    src = _FACENET_NAMES[name].get(layer, layer)
    if layer.startswith("prelu"):
      out[layer] = {"alpha": sd[f"{src}.weight"].reshape(-1)}
      continue
    w = sd[f"{src}.weight"]
    kernel = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    out[layer] = {"kernel": np.ascontiguousarray(kernel), "bias": sd[f"{src}.bias"]}
  return out
