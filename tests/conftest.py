"""Shared fixtures: tiny real LMDBs and paths to the shared reference artifacts."""
import os

import numpy as np
import pytest

SHARED = os.environ.get(
    "DSD_SHARED", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
)
REFERENCE = os.path.join(SHARED, "reference")
DSD_TRAINVAL = os.path.join(REFERENCE, "squeezenet-dsd", "trainval.prototxt")
DC_NET = os.path.join(REFERENCE, "squeezenet-deep-compression", "compressed_SqueezeNet.net")
DC_DEPLOY = os.path.join(REFERENCE, "squeezenet-deep-compression", "SqueezeNet_deploy.prototxt")


def write_tiny_lmdb(path, images, labels):
    """Write uint8 images (N, C, H, W) and int labels as raw caffe Datums, keys 00000000, 00000001, ..."""
    import lmdb

    from dsd_caffe.caffe_env import caffe_pb2

    pb2 = caffe_pb2()
    images = np.asarray(images, dtype=np.uint8)
    env = lmdb.open(str(path), map_size=max(1 << 20, images.nbytes * 4))
    with env.begin(write=True) as txn:
        for i, (img, lab) in enumerate(zip(images, labels)):
            d = pb2.Datum(channels=img.shape[0], height=img.shape[1], width=img.shape[2],
                          data=img.tobytes(), label=int(lab))
            txn.put(f"{i:08d}".encode(), d.SerializeToString())
    env.close()
    return str(path)


@pytest.fixture
def tiny_lmdb(tmp_path):
    """A factory: tiny_lmdb(n=20, channels=1, size=28, classes=10, seed=0) -> path of a real LMDB."""

    def make(n=20, channels=1, size=28, classes=10, seed=0, name="lmdb"):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n)
        return write_tiny_lmdb(tmp_path / name, images, labels)

    return make
