import pytest

from training.data import load_dataset


@pytest.fixture(scope="session")
def digits():
    """The 8x8 digits bundled with scikit-learn: real data, no network, trains in seconds."""
    return load_dataset("digits", seed=0)
