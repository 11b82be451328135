"""Caffe's messages (``caffe.proto.caffe_pb2``) without Caffe's runtime: reading and writing prototxts and
caffemodels (masks, pruning, nets) needs no ``_caffe.so``, BLAS or glog. Importing pycaffe itself is
:mod:`dsd_caffe.caffe_env`'s."""
import importlib.util
import os
import sys

from .errors import UserError

SETUP_HINT = "run `make setup` (or `python3 -m dsd_caffe.build`) and use .venv/bin/python"


def caffe_pb2():
    """Return ``caffe.proto.caffe_pb2``: Caffe's messages, loaded from pycaffe's package without importing Caffe
    itself (no ``_caffe.so``, BLAS or glog), so reading and writing prototxts and caffemodels (masks, pruning)
    needs no Caffe runtime. ``import caffe`` later finds and uses this same module."""
    name = "caffe.proto.caffe_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("caffe")  # finds the package without running its __init__
    path = os.path.join(spec.submodule_search_locations[0], "proto", "caffe_pb2.py") if spec else None
    if path is None or not os.path.isfile(path):
        raise UserError(f"pycaffe is not importable (no caffe/proto/caffe_pb2.py on this Python's path); "
                        f"{SETUP_HINT}")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    sys.modules[name] = module
    try:
        module.__spec__.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
