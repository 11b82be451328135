"""Importing pycaffe: quiet glog, a clear message when Caffe is missing, Caffe's tools and build record. Which
devices exist, the ``--gpu`` forms and Caffe's CPU/GPU mode are :mod:`dsd_caffe.devices`.

Nothing here runs at ``import dsd_caffe`` time, so the pure-numpy parts of the toolkit work without Caffe.

Two libraries inside Caffe read settings that are easy to get wrong from Python:

- **OpenBLAS** reads ``OPENBLAS_CORETYPE`` / ``OPENBLAS_NUM_THREADS`` once, when it loads. :func:`import_caffe`
  sets the values chosen at set-up (``blas.runtime_env``) only around ``import caffe`` and then restores
  ``os.environ``: the caller's environment is never changed (a value the caller set is kept, and wins).
- **glog** reads ``GLOG_*`` variables once, when it loads, so setting them after ``import caffe`` does nothing.
  Its level is therefore set in the running library itself: the flags ``FLAGS_minloglevel`` and
  ``FLAGS_logtostderr`` are globals of the libglog that ``_caffe.so`` loaded, reached through ctypes.
  :func:`import_caffe` lowers Caffe's chatter to ERROR (:data:`QUIET`) whatever the import order, unless
  ``GLOG_minloglevel`` is set in the environment; :func:`glog_level`, :func:`set_glog_level` and the context
  manager :func:`glog_level_set` read and change it later (e.g. to capture Caffe's INFO log while training).
"""
import contextlib
import ctypes
import functools
import json
import logging
import os
import sys
import tempfile

from . import blas, build  # build: stdlib only, the build's names (its record's file name)
from .caffeproto import SETUP_HINT
from .errors import InputMissing, UserError, own_module

log = logging.getLogger(__name__)


#: glog's severities: a level shows its messages and the more severe ones
GLOG_LEVELS = {"INFO": 0, "WARNING": 1, "ERROR": 2, "FATAL": 3}
#: the level import_caffe() sets when the environment does not say (GLOG_minloglevel): ERROR, as before. At
#: WARNING, Caffe's notes (a deploy prototxt's old ``input_dim`` fields, "Logging before InitGoogleLogging()")
#: would precede the one line of a tool's error message.
QUIET = GLOG_LEVELS["ERROR"]


@contextlib.contextmanager
def environ_set(env):
    """Set ``env`` in os.environ for the duration of the block, then restore what was there."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_environ_set = environ_set  # the name other modules used before


@functools.lru_cache(maxsize=None)
def import_caffe():
    """Return the ``caffe`` module, with glog's INFO chatter off unless GLOG_minloglevel is set (see the module
    doc). ``os.environ`` is the same afterwards as before."""
    # the BLAS core type and threads chosen at set-up, read when Caffe's OpenBLAS loads (never overrides the caller's)
    with environ_set(blas.runtime_env()):
        try:
            import caffe  # deferred: heavy (loads _caffe.so, BLAS, glog), and only once the environment is set
        except ImportError as e:
            raise UserError(f"pycaffe is not importable ({e}); {SETUP_HINT}") from e
    if "GLOG_minloglevel" not in os.environ:
        _glog_flags(caffe._caffe.__file__)["minloglevel"].value = QUIET
    return caffe


@functools.lru_cache(maxsize=None)
def _glog_flags(extension):
    """{"minloglevel": c_int, "logtostderr": c_bool}: glog's flags in the libglog that ``extension``
    (pycaffe's ``_caffe.so``, already loaded) uses.

    dlsym on the handle of ``_caffe.so`` searches it and then its dependencies, so this finds the very libglog
    that Caffe logs through, whichever file that is."""
    lib = ctypes.CDLL(extension)
    try:
        return {"minloglevel": ctypes.c_int.in_dll(lib, "_ZN3fLI17FLAGS_minloglevelE"),
                "logtostderr": ctypes.c_bool.in_dll(lib, "_ZN3fLB17FLAGS_logtostderrE")}
    except ValueError as e:  # symbol not found: a glog built without these flags, or a static one
        raise RuntimeError(f"cannot reach glog's flags through {extension}: {e}") from e


def _flags():
    return _glog_flags(import_caffe()._caffe.__file__)


def _level_value(level):
    value = GLOG_LEVELS.get(level, level) if isinstance(level, str) else level
    if isinstance(value, bool) or value not in GLOG_LEVELS.values():
        raise UserError(f"glog level must be one of {', '.join(GLOG_LEVELS)} or 0-3, got {level!r}")
    return value


def glog_level():
    """glog's current minimum level in this process: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL."""
    return _flags()["minloglevel"].value


def set_glog_level(level):
    """Show Caffe's glog messages from ``level`` up (0-3 or "INFO", "WARNING", "ERROR", "FATAL"), from now on and
    whatever the import order. Returns the previous level."""
    value = _level_value(level)
    flag = _flags()["minloglevel"]
    previous, flag.value = flag.value, value
    return previous


@contextlib.contextmanager
def glog_level_set(level, to_stderr=False):
    """Within the block, glog shows messages from ``level`` up; with ``to_stderr`` they all go to stderr (and none
    to glog's log files, which it writes only after ``caffe.init_log()``). Both are restored on exit, also on an
    exception. Example: ``with glog_level_set("INFO", to_stderr=True): solver.step(100)``."""
    flags = _flags()
    previous = (flags["minloglevel"].value, flags["logtostderr"].value)
    set_glog_level(level)
    if to_stderr:
        flags["logtostderr"].value = True
    try:
        yield
    finally:
        flags["minloglevel"].value, flags["logtostderr"].value = previous


def caffe_prefix():
    """The install prefix of the Caffe in use (``<prefix>/lib/python3/dist-packages/caffe``)."""
    pkg = os.path.dirname(os.path.realpath(import_caffe().__file__))
    return os.path.abspath(os.path.join(pkg, "..", "..", "..", ".."))


def caffe_tool(name):
    """Path of a Caffe command-line tool (``caffe``, ``convert_imageset``, ...) of the Caffe in use."""
    root = os.environ.get("CAFFE_ROOT", "")
    for folder in (os.path.join(caffe_prefix(), "bin"), os.path.join(root, "build", "tools")):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    raise InputMissing(f"Caffe tool {name!r} not found beside pycaffe in {caffe_prefix()}; {SETUP_HINT}")


def build_info():
    """The build record written by ``dsd_caffe.build`` beside the Caffe install, or {} for a foreign Caffe."""
    path = os.path.join(caffe_prefix(), build.STAMP)
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


def make_net(net_param, phase="TEST", weights=None):
    """A ``caffe.Net`` built from a NetParameter in memory (pycaffe builds nets only from files: this writes a
    temporary prototxt and removes it), in ``phase`` ("TRAIN"/"TEST"), with ``weights`` (a caffemodel path)
    copied in when given. Relative data sources resolve against the current folder, as in Caffe: pass a
    NetParameter with absolute sources (``sources.absolute_sources``) to be independent of it."""
    from google.protobuf import text_format  # deferred: protobuf; this module imports with the standard library alone

    caffe = import_caffe()
    phase_value = {"TRAIN": caffe.TRAIN, "TEST": caffe.TEST}.get(phase, phase)
    fd, path = tempfile.mkstemp(prefix="dsd-net-", suffix=".prototxt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text_format.MessageToString(net_param))
        net = caffe.Net(path, phase_value)
    except (Exception, SystemExit) as e:  # only a Python layer's own code raises here (Caffe's checks abort)
        layer = _python_layer_in(net_param, e)
        if layer is None or (own_module(layer.python_param.module) and not isinstance(e, UserError)):
            raise  # not a Python layer's, or a bug in our own layer: its traceback
        p = layer.python_param
        raise UserError(f"Python layer {layer.name!r} (module {p.module!r}, class {p.layer!r}) failed while Caffe set "
                        f"it up: {type(e).__name__}: {e}") from e
    finally:
        os.unlink(path)
    if weights is not None:
        net.copy_from(os.fspath(weights))
    return net


def _python_layer_in(net_param, error):
    """The Python layer of ``net_param`` whose module raised ``error`` (the innermost such frame of its
    traceback), or None."""
    layers = [l for l in net_param.layer if l.type == "Python"]
    tb, found = error.__traceback__, None
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__")
        found = next((l for l in layers if l.python_param.module == name), found)
        tb = tb.tb_next
    return found


def caffe_binary():
    """The ``caffe`` command to run in a subprocess: the .venv wrapper beside this Python when present (it runs
    Python layers with this interpreter and its packages), else the binary beside pycaffe."""
    wrapper = os.path.join(os.path.dirname(sys.executable), "caffe")
    if os.access(wrapper, os.X_OK):
        return wrapper
    return caffe_tool("caffe")
