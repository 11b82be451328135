"""dsd-caffe: Dense-Sparse-Dense training for Caffe models, around real pycaffe.

This file only re-exports the public names. They load lazily, so ``import dsd_caffe`` needs neither Caffe
nor numpy, and ``python3 -m dsd_caffe.build`` runs before the virtual environment exists.
"""
import importlib

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "import_caffe": "caffe_env",
    "set_device": "caffe_env",
    "build_info": "caffe_env",
    "read_caffemodel": "fileio",
    "write_caffemodel": "fileio",
    "read_net_prototxt": "fileio",
    "write_provenance": "fileio",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dsd_caffe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
