"""Which devices Caffe runs on: the forms a device setting takes, how many GPUs there are, and the checks made
before Caffe is asked for one.

Caffe cannot be asked safely: on a CPU-only build ``caffe.set_mode_gpu()`` is a fatal ``NO_GPU`` and on a CUDA
build ``caffe.set_device(n)`` for a device that does not exist is a fatal CUDA error, both glog aborts that end the
process. So :func:`check` decides first, from the build record (``cpu_only``) and, for a CUDA build, the device
count of the CUDA runtime Caffe itself loaded (``cudaGetDeviceCount`` found through ``_caffe.so``'s handle, which
honours ``CUDA_VISIBLE_DEVICES``; the driver's ``cuDeviceGetCount`` when that symbol is not reachable). Neither
aborts: without a GPU or a driver they return an error code, read as no GPU.

The rules (one place for them):

- A device setting is ``None`` (no GPU asked: Caffe's mode is left as it is; the tools then run on the CPU), a
  device number, a sequence of device numbers, or the command line's text ``"0"`` / ``"0,1"`` (:func:`parse`).
  Numbers are whole and >= 0, each at most once.
- Several devices train one phase data-parallel (:mod:`dsd_caffe.multigpu`); evaluation runs on one device
  (:func:`first`). Under ``--seeds``, seed *k* runs on the *k*-th device of the list, round robin
  (:func:`of_seed`).
- :func:`record` is what a training record and a model's JSON say: the list of GPU numbers, or null when no GPU
  was asked.
"""
import collections
import ctypes
import logging

from . import caffe_env
from .errors import UserError

log = logging.getLogger(__name__)

#: what the machine offers: cpu_only (a CPU-only Caffe build), count (GPUs CUDA sees), how (how it was learnt)
Offer = collections.namedtuple("Offer", "cpu_only count how")

_INT_MAX = 2 ** 31 - 1  # Caffe's device numbers are ints


def _number(value, text):
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(value, 10) if isinstance(value, str) and value.strip().isdigit() else None
        except ValueError:
            value = None
    if value is None or not 0 <= value <= _INT_MAX:
        raise UserError(f"gpu {text}: a device is a whole number >= 0 (e.g. 0, or 0,1 for two)", fields=["gpu"])
    return value


def parse(gpu):
    """The device numbers of a setting, as a tuple, or None for no GPU (see the module doc). A bad form (empty,
    negative, not a whole number, a device given twice) is a UserError naming it."""
    if gpu is None:
        return None
    if isinstance(gpu, str):
        text, items = gpu, gpu.split(",")
    elif isinstance(gpu, (list, tuple)):
        text, items = ",".join(map(str, gpu)), list(gpu)
    else:
        text, items = str(gpu), [gpu]
    if not items or (isinstance(gpu, str) and not gpu.strip()):
        raise UserError(f"gpu {text!r}: name at least one device (e.g. 0)", fields=["gpu"])
    numbers = tuple(_number(v.strip() if isinstance(v, str) else v, text) for v in items)
    twice = sorted({n for n in numbers if numbers.count(n) > 1})
    if twice:
        raise UserError(f"gpu {text}: device {twice[0]} is given twice; each device runs one solver", fields=["gpu"])
    return numbers


def check(gpu, offer=None):
    """The device numbers of ``gpu`` (:func:`parse`) once each is known to exist, or None; else a UserError in one
    line naming the missing device. ``offer`` (an :class:`Offer`, or a function returning one; default
    :func:`probe`) is asked only when a GPU is."""
    gpus = parse(gpu)
    if gpus is None:
        return None
    got = offer if isinstance(offer, Offer) else (offer or probe)()
    flag = "gpu " + ",".join(map(str, gpus))
    if got.cpu_only:
        raise UserError(f"{flag}: there is no GPU device {gpus[0]} for this Caffe: it is a CPU-only build; rebuild "
                        "with `python3 -m dsd_caffe.build --gpu` on a machine with CUDA, or run on the CPU",
                        fields=["gpu"])
    missing = [g for g in gpus if g >= got.count]
    if missing:
        have = ("no GPU" if got.count == 0 else f"{got.count} GPU{'s' if got.count > 1 else ''} "
                f"(device{'s' if got.count > 1 else ''} {', '.join(map(str, range(got.count)))})")
        raise UserError(f"{flag}: there is no GPU device {missing[0]} here: CUDA sees {have} ({got.how})",
                        fields=["gpu"])
    return gpus


def first(gpu):
    """The one device an evaluation runs on: the first of ``gpu``'s devices, or None."""
    gpus = parse(gpu)
    return gpus[0] if gpus else None


def of_seed(gpu, k):
    """The device of the ``k``-th seed (0, 1, ...) of a run over seeds: the list's devices round robin, or None."""
    gpus = parse(gpu)
    return gpus[k % len(gpus)] if gpus else None


def record(gpu):
    """What records say about ``gpu``: the list of GPU numbers, or None (no GPU asked)."""
    gpus = parse(gpu)
    return list(gpus) if gpus else None


# ------------------------------------------------------------------------------------------------ choosing
def set_device(gpu=None):
    """Run Caffe in this process on GPU ``gpu`` (one device number, checked first by :func:`check`:
    a missing device is one UserError, never a glog abort), or, for ``gpu=None``, leave Caffe's mode and device as
    they are: no library function changes them behind its caller; the tools choose (:func:`use_cpu` unless
    ``--gpu``). Returns the ``caffe`` module."""
    caffe = caffe_env.import_caffe()
    gpus = check(gpu)
    if gpus is None:
        return caffe
    if len(gpus) != 1:
        raise UserError(f"--gpu {','.join(map(str, gpus))}: this runs on one device; give one (e.g. --gpu "
                        f"{gpus[0]})")
    caffe.set_mode_gpu()
    caffe.set_device(gpus[0])
    return caffe


def use_cpu():
    """Run Caffe in this process on the CPU: what a tool chooses when no ``--gpu`` is given."""
    caffe_env.import_caffe().set_mode_cpu()



# ------------------------------------------------------------------------------------------------ the probe
def probe():
    """The :class:`Offer` of the Caffe in use on this machine (see the module doc)."""
    if not caffe_env.has_gpu_support():
        return Offer(True, 0, "a CPU-only build")
    return cuda_count(ctypes.CDLL(caffe_env.import_caffe()._caffe.__file__))


def cuda_count(caffe_lib, driver="libcuda.so.1"):
    """Offer(False, n, how) from the CUDA runtime reachable through ``caffe_lib`` (a ctypes library), else from
    the driver library ``driver``. An error code or a missing library counts as no GPU, with the reason."""
    n = ctypes.c_int(0)
    fn = getattr(caffe_lib, "cudaGetDeviceCount", None)
    if fn is not None:
        rc = fn(ctypes.byref(n))
        return Offer(False, n.value if rc == 0 else 0, f"cudaGetDeviceCount {'ok' if rc == 0 else f'error {rc}'}")
    try:
        cuda = ctypes.CDLL(driver)
    except OSError as e:
        return Offer(False, 0, f"no NVIDIA driver: {e}")
    rc = cuda.cuInit(0)
    if rc == 0:
        rc = cuda.cuDeviceGetCount(ctypes.byref(n))
    return Offer(False, n.value if rc == 0 else 0, f"cuDeviceGetCount {'ok' if rc == 0 else f'error {rc}'}")
