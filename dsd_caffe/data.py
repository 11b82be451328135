"""The old home of the LMDB code, kept for one release so that ``from dsd_caffe import data`` keeps working.

The code now lives by concern: :mod:`dsd_caffe.lmdbio` (LMDB writing, reading and checks),
:mod:`dsd_caffe.imagedb` (building an LMDB from images) and :mod:`dsd_caffe.fashion_mnist`.
"""
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, import_fashion_mnist, read_idx  # noqa: F401
from .imagedb import LmdbOptions, list_folder, make_lmdb, read_list_file, read_mean_file, write_mean_file  # noqa: F401
from .lmdbio import check_lmdb, label_range, lmdb_info, read_lmdb, write_array_lmdb  # noqa: F401
