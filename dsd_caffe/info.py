"""Print the Caffe in use and how it was built: version, BLAS and the kernel it runs, threads, Python layer, OpenCV,
LMDB, HDF5, CPU or GPU, numpy, the paths and the patches applied to Caffe's source, each with its reason. For users
and bug reports: ``dsd-info [--json]`` (or ``python -m dsd_caffe.info``).

Everything is read from what pycaffe really has (its layer registry, the libraries ``_caffe.so`` resolves, the
OpenBLAS loaded in this process) as well as from the set-up's build record.
"""
import os
import re
import subprocess
import sys

from dsd_caffe import blas, caffe_env
from dsd_caffe.errors import UserError

LAYERS = ("Python", "Data", "ImageData", "HDF5Data", "HDF5Output", "WindowData", "MemoryData", "Input")
LIBS = {"OpenCV": "libopencv_core", "LMDB": "liblmdb", "LevelDB": "libleveldb", "HDF5": "libhdf5",
        "protobuf": "libprotobuf", "glog": "libglog", "boost_python": "libboost_python", "python": "libpython",
        "CUDA": "libcudart", "cuBLAS": "libcublas.", "cuRAND": "libcurand", "NCCL": "libnccl", "cuDNN": "libcudnn",
        "BLAS": None}


#: a glog line: severity, source file and message ("F20261203 09:50:24.063478 19865 common.cpp:66] Cannot use ...")
GLOG_LINE = re.compile(r"^([IWEF])\d{8} [\d:.]+\s+\d+ ([\w.]+):\d+\] (.*)$")


def device_query(gpu="all", binary=None):
    """Caffe's own report of its GPUs (``caffe device_query -gpu <gpu>``, ``gpu`` a number, "0,1" or "all"): a
    list of {field: value}, one per device ("Device id", "Name", "Total global memory", ...).

    Where a device cannot be used (no GPU or driver, a CPU-only build, a bad number), Caffe aborts with a glog
    stack; this raises UserError instead, one line naming the device and Caffe's reason."""
    binary = binary or caffe_env.caffe_binary()
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    proc = subprocess.run([binary, "device_query", f"-gpu={gpu}"], capture_output=True, text=True, env=env)
    lines = [m.groups() for m in map(GLOG_LINE.match, proc.stderr.splitlines()) if m]
    fatal = [msg for sev, _, msg in lines if sev == "F"]
    if proc.returncode or fatal:
        reason = fatal[-1] if fatal else (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise UserError(f"GPU {gpu} cannot be used: {' '.join(reason.split())}")
    devices = []
    for _, source, msg in lines:
        key, sep, value = msg.partition(":")
        if source != "common.cpp" or not sep:
            continue
        if key.strip() == "Device id":
            devices.append({})
        if devices:
            devices[-1][key.strip()] = value.strip()
    return devices


def cuda_summary(record):
    """One line for a GPU build's record: CUDA version, targets and each library with its version."""
    cuda = record.get("cuda") or {}
    if not cuda:
        return None
    libs = ", ".join(f"{name} {v['version']}" for name, v in sorted(cuda.get("libraries", {}).items()))
    return f"{cuda.get('version')}  targets {cuda.get('archs')}  ({libs}; cuDNN {_yes(cuda.get('cudnn'))})"


def _soname_version(name):
    m = re.search(r"\.so\.([\d.]+)$", name)
    return m.group(1) if m else ""


def _linked(ext):
    """{label: {"linked", "libraries", "version"}} of the libraries ``_caffe.so`` resolves."""
    libs = blas._ldd(ext) if ext else {}
    linked = {}
    for label, prefix in LIBS.items():
        if prefix is None:
            continue
        hits = sorted(n for n in libs if n.startswith(prefix))
        linked[label] = {"linked": bool(hits), "libraries": {n: libs[n] for n in hits},
                         "version": _soname_version(hits[0]) if hits else None}
    return linked


def _blas(applied):
    """The BLAS library in use, its kernel and threads, the environment and the set-up's decision."""
    try:
        library = blas.caffe_blas_library()
        cfg = blas.library_config(library)
    except (FileNotFoundError, OSError) as e:
        library, cfg = None, {"error": str(e)}
    decision = blas.load_decision()
    return {
        "library": library,
        "kernel": cfg.get("corename"),
        "config": cfg.get("config"),
        "threads": cfg.get("threads"),
        "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                          "OPENBLAS_L2_SIZE") if k in os.environ},
        "env_applied_by_dsd_caffe": applied,
        "decision_file": blas.decision_path(),
        "decision": {k: decision.get(k) for k in ("coretype", "threads", "corename", "ok")} if decision else None,
        "error": cfg.get("error"),
    }


def collect():
    """A dict describing the Caffe in use (see :func:`format_text` for the fields)."""
    applied = blas.runtime_env()  # the env the wrapper and import_caffe() set, here only while collecting
    with caffe_env.environ_set(applied):
        return _collect(applied)


def _collect(applied):
    caffe = caffe_env.import_caffe()
    ext = blas._caffe_extension()
    layers = sorted(caffe.layer_type_list())
    import numpy  # deferred: this module imports with the standard library alone (its missing-Caffe line)

    try:
        np_blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        np_blas = {k: np_blas.get(k) for k in ("name", "version", "openblas configuration")}
    except (TypeError, KeyError):
        np_blas = {}
    try:
        import google.protobuf as gpb  # deferred: optional here (its version is reported as None when missing)

        protobuf_version = gpb.__version__
    except ImportError:
        protobuf_version = None
    try:
        binary = caffe_env.caffe_binary()
    except FileNotFoundError:
        binary = None
    gpu = caffe_env.has_gpu_support()
    devices = None
    if gpu and binary:
        try:
            devices = device_query("all", binary)
        except UserError as e:
            devices = str(e)
    record = caffe_env.build_info()
    return {
        "caffe_version": getattr(caffe, "__version__", None),
        "mode": "GPU (CUDA)" if gpu else "CPU only",
        "gpu_support": gpu,
        "cuda": (record.get("cuda") or None) if gpu else None,
        "gpu_devices": devices,
        "python_layer": "Python" in layers,
        "data_layers": {t: t in layers for t in LAYERS},
        "layer_types": layers,
        "libraries": _linked(ext),
        "blas": _blas(applied),
        "build_record": record,
        "numpy": {"version": numpy.__version__, "blas": np_blas},
        "protobuf": protobuf_version,
        "python": {"version": sys.version.split()[0], "executable": sys.executable},
        "paths": {"pycaffe": os.path.dirname(os.path.realpath(caffe.__file__)), "caffe_extension": ext,
                  "prefix": caffe_env.caffe_prefix(), "caffe_binary": binary},
    }


def _yes(flag):
    return "yes" if flag else "no"


def format_text(d):
    """Human-readable lines for :func:`collect`'s dict."""
    b = d["blas"]
    lib = d["libraries"]
    dec = b["decision"]
    lines = [
        f"Caffe          {d['caffe_version']}  ({d['mode']})",
        f"Python layer   {_yes(d['python_layer'])}",
        "Data layers    " + ", ".join(f"{t}={_yes(v)}" for t, v in d["data_layers"].items()),
        f"BLAS           {b['library']}",
        f"  kernel       {b['kernel']}   threads {b['threads']}   ({b['config']})",
        f"  environment  {b['env'] or '(no OPENBLAS_* set)'}" +
        (f"; added by dsd_caffe: {b['env_applied_by_dsd_caffe']}" if b["env_applied_by_dsd_caffe"] else ""),
        f"  set-up choice {dec if dec else 'none recorded'}  ({b['decision_file']})",
    ]
    for label in ("OpenCV", "LMDB", "LevelDB", "HDF5", "protobuf", "glog", "CUDA", "cuDNN"):
        v = lib[label]
        lines.append(f"{label:15}{'yes ' + (v['version'] or '') if v['linked'] else 'no'}")
    if d["gpu_support"]:
        lines.append(f"CUDA build     {cuda_summary(d['build_record']) or 'no build record'}")
        devs = d["gpu_devices"]
        lines.append("GPU devices    " + (devs if isinstance(devs, str) else
                                         ", ".join(f"{x.get('Device id')}: {x.get('Name')}" for x in devs or [])
                                         or "none"))
    lines += [
        f"numpy          {d['numpy']['version']}  (its own BLAS: {d['numpy']['blas'].get('name')} "
        f"{d['numpy']['blas'].get('version')})",
        f"protobuf (py)  {d['protobuf']}",
        f"Python         {d['python']['version']}  {d['python']['executable']}",
        f"pycaffe        {d['paths']['pycaffe']}",
        f"caffe binary   {d['paths']['caffe_binary']}",
        f"prefix         {d['paths']['prefix']}",
    ]
    rec = d["build_record"]
    if rec:
        plain = ", ".join(f"{k}={v}" for k, v in rec.items() if not isinstance(v, (dict, list)))
        lines.append("build record   " + plain)
        patches = rec.get("patches") or {}
        lines.append(f"patches        {len(patches) or 'none'} applied to Debian's source")
        for name in patches:
            reason = patches[name] if isinstance(patches, dict) else ""
            lines.append(f"  {name}" + (f": {reason}" if reason else ""))
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m dsd_caffe.info`, as documented: the command is dsd_caffe.commands.info
    from dsd_caffe.commands.info import main  # deferred: breaks a cycle (commands.info imports this module)

    main()
