import pytest

from kaojax.flame.synthetic import make_synthetic_flame


@pytest.fixture(scope="session")
def flame():
  """The synthetic FLAME model (kaojax.flame.synthetic), shared by the model tests."""
  return make_synthetic_flame(seed=0)
