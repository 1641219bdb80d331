import pytest

from kaojax.flame.synthetic import write_synthetic_flame


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory):
  """The synthetic FLAME model written in the official / smplx file layouts."""
  return write_synthetic_flame(tmp_path_factory.mktemp("synthetic_flame"))
