"""Fixtures of the training tests."""

import pytest

from tests.train import tiny_run


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """The generated dataset of `tiny_run`, made once per session."""
  return tiny_run.make_dataset(tmp_path_factory.mktemp("tiny_dataset"))
