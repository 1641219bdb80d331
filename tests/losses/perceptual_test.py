"""LPIPS-VGG against the `lpips` package itself.

torchvision cannot be installed here, but `lpips` (installed with --no-deps) only
needs `torchvision.models.vgg16(pretrained=...).features`. A stand-in module with
torchvision's exact VGG16 `features` layout (random weights) is put in sys.modules
before lpips is imported; lpips then loads its REAL trained lin weights
(lpips/weights/v0.1/vgg.pth) from its package, and the converter gets the stand-in's
`features.N.*` state dict plus that same file.
"""

import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kaojax.convert import vgg as vgg_convert
from kaojax.convert.torch_state import CheckpointError
from kaojax.losses.perceptual import LPIPS, lpips_loss
from kaojax.models import loading
from kaojax.models.vgg import VGG16_WIDTHS, torch_feature_indices


def _torchvision_vgg16_features(seed=0):
  """torchvision's vgg16().features layout (31 modules), torchvision's conv init
  (kaiming normal, fan_out) plus small random biases so the biases are checked."""
  torch.manual_seed(seed)
  layers, channels = [], 3
  for b, block in enumerate(VGG16_WIDTHS):
    for width in block:
      conv = torch.nn.Conv2d(channels, width, kernel_size=3, padding=1)
      torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
      torch.nn.init.uniform_(conv.bias, -0.05, 0.05)
      layers += [conv, torch.nn.ReLU(inplace=True)]
      channels = width
    layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
  return torch.nn.Sequential(*layers)


class _FakeVGG(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.features = _torchvision_vgg16_features()


@pytest.fixture(scope="module")
def torch_lpips():
  """lpips.LPIPS(net='vgg') over the stand-in torchvision; -> (module, vgg state dict,
  path of lpips' packaged lin weights)."""
  made = []

  def vgg16(pretrained=False, weights=None, **kwargs):
    del pretrained, weights, kwargs
    made.append(_FakeVGG())
    return made[-1]

  fake = types.ModuleType("torchvision")
  fake.models = types.ModuleType("torchvision.models")
  fake.models.vgg16 = vgg16
  saved = {name: mod for name, mod in sys.modules.items()
           if name == "lpips" or name.startswith(("lpips.", "torchvision"))}
  for name in saved:
    del sys.modules[name]
  sys.modules["torchvision"], sys.modules["torchvision.models"] = fake, fake.models
  try:
    # installed by the README's test command: pip install --no-deps lpips==0.1.4
    import lpips  # pylint: disable=import-outside-toplevel
    net = lpips.LPIPS(net="vgg", verbose=False).eval()
    lin_path = pathlib.Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
  finally:
    for name in [n for n in sys.modules
                 if n == "lpips" or n.startswith(("lpips.", "torchvision"))]:
      del sys.modules[name]
    sys.modules.update(saved)
  assert len(made) == 1 and lin_path.is_file()
  # the real lin weights were loaded (they are non-negative and not all equal)
  lin0 = net.lin0.model[1].weight.detach().numpy()
  assert lin0.min() >= 0 and lin0.std() > 0
  return net, made[0].state_dict(), lin_path


def _images(seed, shape=(3, 64, 48, 3)):
  rng = np.random.default_rng(seed)
  a = rng.uniform(size=shape).astype(np.float32)
  b = np.clip(a + 0.2 * rng.normal(size=shape), 0, 1).astype(np.float32)
  return a, b


def test_torch_feature_indices_are_torchvision_vgg16():
  assert torch_feature_indices() == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def _torch_value_and_grad(net, a, b, dtype):
  pa = torch.tensor(np.transpose(a, (0, 3, 1, 2)), dtype=dtype, requires_grad=True)
  pb = torch.tensor(np.transpose(b, (0, 3, 1, 2)), dtype=dtype)
  value = net.to(dtype)(pa, pb, normalize=True).reshape(-1)
  value.sum().backward()
  net.to(torch.float32)
  return value.detach().numpy(), np.transpose(pa.grad.numpy(), (0, 2, 3, 1))


def _jit_lpips(net):
  """-> jitted (weights, x, y) -> (lpips_loss, per-image LPIPS, d lpips_loss / d x) and
  the net's weights. The weights are an argument: closing over them would bake 14.7M
  constants into the program, and running op by op takes ten times as long."""
  graphdef, weights = nnx.split(net)

  def loss(x, weights, y):
    values = nnx.merge(graphdef, weights)(x, y)
    return lpips_loss(nnx.merge(graphdef, weights), x, y), values

  @jax.jit
  def run(weights, x, y):
    (mean, values), grad = jax.value_and_grad(loss, has_aux=True)(x, weights, y)
    return mean, values, grad

  return run, weights


def test_lpips_matches_the_lpips_package_value_and_input_gradient(torch_lpips, tmp_path):
  net, vgg_state, lin_path = torch_lpips
  vgg_file = tmp_path / "vgg16.pth"
  torch.save(vgg_state, vgg_file)
  vgg_convert.main(["--vgg", str(vgg_file), "--lin", str(lin_path),
                    "--out", str(tmp_path / "lpips_vgg")])
  run, weights = _jit_lpips(loading.load_lpips(tmp_path / "lpips_vgg"))
  a, b = _images(0)
  count = a.shape[0]

  want, want_grad = _torch_value_and_grad(net, a, b, torch.float32)
  mean, values, grad = run(weights, jnp.asarray(a), jnp.asarray(b))
  np.testing.assert_allclose(np.asarray(values), want, rtol=1e-5)
  assert float(mean) == pytest.approx(float(want.mean()), rel=1e-5)
  # float32 gradients of a deep random ReLU net differ between any two float32
  # implementations where a pre-activation sits within rounding of 0 ...
  grad = count * np.asarray(grad)   # torch's is the gradient of the sum
  assert np.linalg.norm(grad - want_grad) < 1e-2 * np.linalg.norm(want_grad)
  # ... so the gradient is checked tightly in float64, on both sides.
  want64, want_grad64 = _torch_value_and_grad(net, a, b, torch.float64)
  with jax.enable_x64(True):
    weights64 = jax.tree.map(lambda v: v.astype(jnp.float64), weights)
    mean64, _, grad64 = run(weights64, jnp.asarray(a, jnp.float64),
                            jnp.asarray(b, jnp.float64))
    assert grad64.dtype == jnp.float64
    assert float(mean64) * count == pytest.approx(float(want64.sum()), rel=1e-7)  # lpips keeps its constants in float32
    np.testing.assert_allclose(count * np.asarray(grad64), want_grad64, rtol=1e-5,
                               atol=1e-6 * np.abs(want_grad64).max())


def test_whole_lpips_state_dict_converts_the_same(torch_lpips):
  net, vgg_state, lin_path = torch_lpips
  from_files = vgg_convert.lpips_from_state(
      {k: v.numpy() for k, v in vgg_state.items()},
      {k: v.numpy() for k, v in torch.load(lin_path, map_location="cpu").items()})
  from_module = vgg_convert.lpips_from_state(
      {k: v.detach().numpy() for k, v in net.state_dict().items()})
  a, b = _images(1, (2, 32, 32, 3))
  np.testing.assert_array_equal(np.asarray(from_files(a, b)), np.asarray(from_module(a, b)))


def test_converter_lists_missing_and_unexpected_keys(torch_lpips):
  _, vgg_state, _ = torch_lpips
  state = {k: v.numpy() for k, v in vgg_state.items()}
  state["features.0.extra"] = np.zeros(3, np.float32)
  state["classifier.0.weight"] = np.zeros((2, 2), np.float32)   # allowed, unused
  with pytest.raises(CheckpointError) as err:
    vgg_convert.lpips_from_state(state)
  message = str(err.value)
  assert "lin0.weight" in message and "lin4.weight" in message
  assert "features.0.extra" in message and "classifier" not in message


def test_lpips_is_zero_for_equal_images_batches_and_has_finite_gradients():
  net = LPIPS(nnx.Rngs(0), widths=((4, 4), (8, 8), (8, 8, 8), (8, 8, 8), (8, 8, 8)))
  run, weights = _jit_lpips(net)
  a, b = _images(2, (2, 3, 32, 32, 3))
  assert np.allclose(np.asarray(run(weights, a, a)[1]), 0.0, atol=1e-7)
  _, batched, _ = run(weights, a, b)
  assert batched.shape == (2, 3)
  np.testing.assert_allclose(batched[1, 2], run(weights, a[1, 2], b[1, 2])[1], rtol=1e-5)
  # a black image kills every ReLU of a small net: the gradient stays finite
  _, _, grad = run(weights, jnp.zeros_like(a), jnp.asarray(b))
  assert np.all(np.isfinite(np.asarray(grad)))
