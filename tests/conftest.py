"""Shared fixtures: tiny real LMDBs. Helpers and reference-file paths are in tests/helpers.py."""
import numpy as np
import pytest

from helpers import write_tiny_lmdb


@pytest.fixture
def tiny_lmdb(tmp_path):
    """A factory: tiny_lmdb(n=20, channels=1, size=28, classes=10, seed=0) -> path of a real LMDB."""

    def make(n=20, channels=1, size=28, classes=10, seed=0, name="lmdb"):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n)
        return write_tiny_lmdb(tmp_path / name, images, labels)

    return make
