"""Importing pycaffe: quiet glog, a clear message when Caffe is missing, and CPU/GPU selection.

Nothing here runs at ``import dsd_caffe`` time, so the pure-numpy parts of the toolkit work without Caffe.
"""
import functools
import json
import os
from .errors import UserError

SETUP_HINT = "run `make setup` (or `python3 -m dsd_caffe.build`) and use .venv/bin/python"


@functools.lru_cache(maxsize=None)
def import_caffe():
    """Return the ``caffe`` module, with glog's INFO chatter off unless GLOG_minloglevel is set."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    from . import blas

    blas.apply()  # the BLAS core type and threads chosen at set-up; read when Caffe's OpenBLAS loads
    try:
        import caffe
    except ImportError as e:
        raise UserError(f"pycaffe is not importable ({e}); {SETUP_HINT}") from None
    return caffe


def glog_flags():
    """{"minloglevel": c_int, "logtostderr": c_bool} views of glog's flags in the libglog this process loaded
    (with pycaffe), or None when it cannot be found. Setting ``.value`` takes effect at once."""
    import ctypes

    import_caffe()
    path = None
    with open("/proc/self/maps") as f:
        for line in f:
            if "libglog.so" in line:
                path = line.split()[-1]
                break
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    try:
        return {"minloglevel": ctypes.c_int.in_dll(lib, "_ZN3fLI17FLAGS_minloglevelE"),
                "logtostderr": ctypes.c_bool.in_dll(lib, "_ZN3fLB17FLAGS_logtostderrE")}
    except ValueError:
        return None


def caffe_pb2():
    """Return ``caffe.proto.caffe_pb2``."""
    import_caffe()
    from caffe.proto import caffe_pb2 as pb2

    return pb2


def caffe_prefix():
    """The install prefix of the Caffe in use (``<prefix>/lib/python3/dist-packages/caffe``)."""
    pkg = os.path.dirname(os.path.realpath(import_caffe().__file__))
    return os.path.abspath(os.path.join(pkg, "..", "..", "..", ".."))


def caffe_tool(name):
    """Path of a Caffe command-line tool (``caffe``, ``convert_imageset``, ...) of the Caffe in use."""
    for folder in (os.path.join(caffe_prefix(), "bin"), os.path.join(os.environ.get("CAFFE_ROOT", ""), "build", "tools")):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"Caffe tool {name!r} not found beside pycaffe in {caffe_prefix()}; {SETUP_HINT}")


def build_info():
    """The build record written by ``dsd_caffe.build`` beside the Caffe install, or {} for a foreign Caffe."""
    path = os.path.join(caffe_prefix(), "dsd-caffe-build.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def has_gpu_support():
    """True when the Caffe in use was built with CUDA (CPU_ONLY off)."""
    info = build_info()
    if "cpu_only" in info:
        return not info["cpu_only"]
    caffe = import_caffe()
    lib = os.path.join(os.path.dirname(os.path.realpath(caffe.__file__)), "_caffe.so")
    with open(lib, "rb") as f:
        return b"cudaGetDevice" in f.read()


def set_device(gpu=None):
    """Select CPU (``gpu is None``) or GPU ``gpu``; a GPU on a CPU-only build is refused with ValueError."""
    caffe = import_caffe()
    if gpu is None:
        caffe.set_mode_cpu()
        return caffe
    if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
        raise UserError(f"--gpu must be a device number >= 0, got {gpu!r}")
    if not has_gpu_support():
        raise UserError(
            f"--gpu {gpu} was asked for, but this Caffe is a CPU-only build; rebuild with "
            "`python3 -m dsd_caffe.build --gpu` on a machine with CUDA, or drop --gpu"
        )
    caffe.set_mode_gpu()
    caffe.set_device(gpu)
    return caffe


def make_net(net_param, phase="TEST", weights=None):
    """A ``caffe.Net`` built from a NetParameter in memory (pycaffe builds nets only from files: this writes a
    temporary prototxt and removes it), in ``phase`` ("TRAIN"/"TEST"), with ``weights`` (a caffemodel path)
    copied in when given. Relative data sources resolve against the current folder, as in Caffe: pass a
    NetParameter with absolute sources (``sources.absolute_sources``) to be independent of it."""
    import tempfile

    from google.protobuf import text_format

    caffe = import_caffe()
    phase_value = {"TRAIN": caffe.TRAIN, "TEST": caffe.TEST}.get(phase, phase)
    fd, path = tempfile.mkstemp(prefix="dsd-net-", suffix=".prototxt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text_format.MessageToString(net_param))
        net = caffe.Net(path, phase_value)
    finally:
        os.unlink(path)
    if weights is not None:
        net.copy_from(os.fspath(weights))
    return net


def caffe_binary():
    """The ``caffe`` command to run in a subprocess: the .venv wrapper beside this Python when present (it runs
    Python layers with this interpreter and its packages), else the binary beside pycaffe."""
    import sys

    wrapper = os.path.join(os.path.dirname(sys.executable), "caffe")
    if os.access(wrapper, os.X_OK):
        return wrapper
    return caffe_tool("caffe")
