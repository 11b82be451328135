"""Set-up: real Caffe built from Debian's source package, cached outside the repo, and the project's .venv.

Run ``python3 -m dsd_caffe.build`` (``make setup`` does). It needs only the standard library (and the package's
shell, ``cli`` and ``errors``, standard library only too), so it runs before the virtual environment exists. Steps, each named in the one-line error if it fails:

1. ``apt``: install the build dependencies and ``dataset-fashion-mnist`` from Debian (skipped when present).
2. ``venv``: create ``.venv`` and install the pinned requirements and the project (skipped when its stamp matches).
3. ``caffe``: use an existing Caffe (``CAFFE_ROOT``, or ``import caffe`` already working), or the cached build
   keyed by source version, patches and options, or else:
   download Debian bullseye's ``caffe`` source package with a private apt configuration (the system's apt
   sources and lists are untouched), verify the pinned sha256 of each file, unpack it with Debian's patch
   series, apply ``patches/*.patch``, configure (CPU-only by default, Python layer, LMDB, HDF5, OpenCV,
   linked to this interpreter's libpython), compile and install into a temporary folder, and rename it into
   the cache at the end. An interrupted build never leaves a folder that looks complete.
4. ``link``: make ``import caffe`` work in ``.venv`` (a ``.pth`` file).
5. ``blas``: choose the fastest BLAS core type and thread count that passes an SGEMM self-check
   (``dsd_caffe.blas``; once per build and CPU), then write ``.venv/bin/caffe``, a wrapper that runs the binary
   with those settings and ``.venv/bin`` first on PATH, so that Python layers under ``caffe train`` import the
   venv's numpy and ``dsd_caffe``.

``--gpu`` builds the same patched Caffe with CUDA (CPU_ONLY off, NCCL on, plus the ``patches/*-cuda-*.patch``
that only a GPU build applies) on a machine with or without a GPU, under its own cache key: ``nvcc`` from PATH (else
PyPI's, :data:`NVCC_WHEELS`), cuBLAS, cuRAND and NCCL from the PyPI wheels pinned in :data:`CUDA_WHEELS`, installed
into the cache (``cuda-<digest>``) and found at run time through the libraries' RUNPATH; targets
:data:`CUDA_ARCH` unless ``--cuda-arch``/``$DSD_CUDA_ARCH`` say otherwise. Use it in its own venv
(``make setup-gpu``: ``.venv-gpu``), beside the CPU one; docs/gpu.md. ``--unpatched`` only builds (or finds) the Caffe
without the performance patches (``patches/*-perf-*.patch``), under its own cache key, and prints its prefix: the
reference that ``bench/caffe_layers.py`` compares against; the venv is left alone. The cache lives in ``$DSD_CAFFE_CACHE`` or
``~/.cache/dsd-caffe``.

Over 400 lines because it is the whole set-up in one file of standard library only, read top to bottom and run
before any venv exists (a second module would be imported as a second copy under ``python3 -m``).
"""
import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

from . import cli  # the tools' shell: standard library only, like this module
from .errors import UserError

log = logging.getLogger("dsd_caffe.build")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH_DIR = os.path.join(REPO, "patches")
REQUIREMENTS = os.path.join(REPO, "requirements.txt")

SOURCE_PACKAGE = "caffe"
SOURCE_VERSION = "1.0.0+git20180821.99bd997-8"
SOURCE_SUITE = "bullseye"
#: sha256 of every file of the source package; a download that differs is refused.
SOURCE_SHA256 = {
    "caffe_1.0.0+git20180821.99bd997-8.dsc":
        "c492f4893fc1ba1fb514b2d9b4763bc78dc93571ea24adc6e604eccbb93cdd64",
    "caffe_1.0.0+git20180821.99bd997.orig.tar.gz":
        "e0eb3f06794f7402c77b7dec8e8480273ee1a1bb192e9122b621a69d4147ad0c",
    "caffe_1.0.0+git20180821.99bd997-8.debian.tar.xz":
        "07cf073227494a6b07234e40cb5df91db566616593eef9baafdc4d06ad159f21",
}
APT_PACKAGES = [
    "build-essential", "cmake", "dpkg-dev", "patch",
    "libboost-system-dev", "libboost-thread-dev", "libboost-filesystem-dev", "libboost-python-dev",
    "libprotobuf-dev", "protobuf-compiler", "libgoogle-glog-dev", "libgflags-dev",
    "libhdf5-dev", "liblmdb-dev", "libopenblas-dev", "libopencv-dev",
    "dataset-fashion-mnist",
]
STAMP = "dsd-caffe-build.json"
CONFIGURED = ".dsd-configured"  # in a build folder whose configure step finished (its compile can resume)
VENV_STAMP = ".dsd-setup.json"

#: CUDA targets of a GPU build: machine code for Ampere (sm_80) and Hopper (sm_90), PTX (compute_90) that later GPUs
#: compile when they load it. ``--cuda-arch`` or ``$DSD_CUDA_ARCH`` overrides it, in the same words.
CUDA_ARCH = "sm_80 sm_90 compute_90"
#: the CUDA libraries a GPU build links, as PyPI wheels pinned here and installed into the cache (never into the
#: system or a venv): cuBLAS and cuRAND of CUDA 13.0, NCCL for pycaffe's multi-GPU route (``caffe.NCCL``).
CUDA_WHEELS = {"nvidia-cublas": "13.0.2.14", "nvidia-curand": "10.4.0.35", "nvidia-nccl-cu13": "2.28.9"}
#: CUDA's compiler as wheels, used only where no ``nvcc`` is on PATH: nvcc, its back end (nvvm) and headers (crt),
#: the runtime and the C++ library headers (CCCL).
NVCC_WHEELS = {"nvidia-cuda-nvcc": "13.0.88", "nvidia-nvvm": "13.0.88", "nvidia-cuda-crt": "13.0.88",
               "nvidia-cuda-runtime": "13.0.96", "nvidia-cuda-cccl": "13.0.85"}
CUDA_MARK = "-cuda-"  # in the name of a patch that only a GPU build applies (the CPU build's key ignores it)
CUDA_STAMP = "dsd-cuda-wheels.json"


class SetupError(RuntimeError):
    """A failed set-up step: ``str()`` is the one line shown to the user."""

    def __init__(self, step, message):
        super().__init__(f"set-up failed at step '{step}': {message}")
        self.step = step


def cache_root():
    return os.path.abspath(os.environ.get("DSD_CAFFE_CACHE") or os.path.expanduser("~/.cache/dsd-caffe"))


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(step, cmd, logfile=None, env=None, cwd=None):
    """Run ``cmd``; on failure raise SetupError naming the step and, if given, the full log's path."""
    log.debug("%s: %s", step, " ".join(cmd))
    if logfile:
        with open(logfile, "a") as out:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        if rc:
            raise SetupError(step, f"`{' '.join(cmd[:3])} ...` exited with {rc}; full log: {logfile}")
        return ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise SetupError(step, f"`{' '.join(cmd[:3])} ...` exited with {proc.returncode}: {tail[0]}")
    return proc.stdout


# ---------------------------------------------------------------- python linkage


def python_linkage(python=None):
    """The interpreter Caffe links: executable, libpython and include dir (of the base, non-venv Python)."""
    base = getattr(sys, "_base_executable", sys.executable)
    libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    library = os.path.join(libdir or "", ldlib or "")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not os.path.exists(library):
        raise SetupError("python", f"{base} has no shared libpython ({library}); the caffe binary must embed it")
    return {
        "executable": python or base,
        "library": library,
        "include": sysconfig.get_paths()["include"],
        "version": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def cuda_targets(arch=None):
    """``arch`` (default ``$DSD_CUDA_ARCH`` or :data:`CUDA_ARCH`), e.g. "sm_80 sm_90 compute_90", as Caffe's CMake
    options: CUDA_ARCH_BIN (machine code) and CUDA_ARCH_PTX (PTX)."""
    arch = arch or os.environ.get("DSD_CUDA_ARCH") or CUDA_ARCH
    bins, ptx = [], []
    for word in arch.replace(",", " ").split():
        kind, _, number = word.partition("_")
        if kind not in ("sm", "compute") or not number.isdigit():
            raise SetupError("configure", f"CUDA target {word!r} is neither sm_NN nor compute_NN (in {arch!r})")
        (bins if kind == "sm" else ptx).append(number)
    if not bins and not ptx:
        raise SetupError("configure", f"no CUDA target in {arch!r}")
    return {"CUDA_ARCH_NAME": "Manual", "CUDA_ARCH_BIN": " ".join(bins), "CUDA_ARCH_PTX": " ".join(ptx)}


def build_options(gpu=False, arch=None):
    """Caffe's CMake options; a GPU build adds NCCL and its CUDA targets (:func:`cuda_targets`)."""
    options = {
        "CPU_ONLY": "OFF" if gpu else "ON",
        "BUILD_python": "ON",
        "BUILD_python_layer": "ON",
        "BUILD_docs": "OFF",
        "USE_LMDB": "ON",
        "USE_LEVELDB": "OFF",
        "USE_OPENCV": "ON",
        "USE_CUDNN": "OFF",
        "BLAS": "Open",
        "python_version": "3",
        "CMAKE_BUILD_TYPE": "Release",
    }
    if gpu:
        options.update(USE_NCCL="ON", **cuda_targets(arch))
    return options


def cache_key(options, linkage, patches, cuda=None):
    """Key of a cached build: source version, patch contents, build options, the linked libpython and the
    numpy pin (pycaffe compiles against numpy's C API); for a GPU build also ``cuda``, the CUDA version and the
    wheels (:func:`cuda_description`). A CPU build's key is as before the GPU build existed."""
    h = hashlib.sha256()
    h.update(SOURCE_VERSION.encode())
    with open(REQUIREMENTS) as f:
        h.update("".join(l for l in f if l.startswith("numpy")).encode())
    for p in patches:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(linkage["library"].encode())
    if cuda is not None:
        h.update(json.dumps(cuda, sort_keys=True).encode())
    return h.hexdigest()[:16]


PERF_MARK = "-perf-"  # in the name of a patch that changes only speed (left out by --unpatched)


def our_patches(perf=True, gpu=False):
    """``patches/*.patch`` in the order applied; without the performance patches if ``perf`` is false, and with
    the CUDA ones (:data:`CUDA_MARK`) only for a GPU build."""
    names = sorted(n for n in os.listdir(PATCH_DIR) if n.endswith(".patch") and (perf or PERF_MARK not in n)
                   and (gpu or CUDA_MARK not in n))
    return [os.path.join(PATCH_DIR, n) for n in names]


def patch_reason(path):
    """A patch's first line: the one-line reason every patch opens with."""
    with open(path) as f:
        return f.readline().strip()


# ---------------------------------------------------------------- step 1: apt


def missing_packages(packages=APT_PACKAGES):
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *packages],
        capture_output=True, text=True,
    ).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def ensure_apt_packages():
    missing = missing_packages()
    if not missing:
        log.info("apt: build dependencies present")
        return
    if os.geteuid() != 0:
        raise SetupError("apt", f"missing Debian packages, run as root: apt-get install {' '.join(missing)}")
    log.info("apt: installing %s", " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run("apt", ["apt-get", "update", "-qq"], env=env)
    _run("apt", ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


# ---------------------------------------------------------------- step 2: venv


def _file_digest(*paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def ensure_venv(venv):
    """Create ``venv`` with the pinned requirements and the project installed editable."""
    python = os.path.join(venv, "bin", "python")
    stamp_path = os.path.join(venv, VENV_STAMP)
    want = {"requirements": _file_digest(REQUIREMENTS, os.path.join(REPO, "setup.py")), "repo": REPO}
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f).get("venv") == want:
                log.info("venv: %s up to date", venv)
                return python
    if os.path.exists(venv) and not os.path.exists(stamp_path):
        log.info("venv: %s is incomplete, recreating it", venv)
        shutil.rmtree(venv)
    log.info("venv: installing pinned requirements into %s", venv)
    if not os.path.exists(python):
        _run("venv", [python_linkage()["executable"], "-m", "venv", venv])
    _run("venv", [python, "-m", "pip", "install", "-q", "-r", REQUIREMENTS])
    _run("venv", [python, "-m", "pip", "install", "-q", "--no-deps", "-e", REPO])
    _write_stamp(stamp_path, {"venv": want})
    return python


def _write_stamp(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------- step 3 of a GPU build: CUDA


def install_wheels(step, pins):
    """``pip install --target`` the pinned wheels ({name: version}) into ``cache/cuda-<digest>`` once (renamed into
    place when complete) and return that folder."""
    digest = hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(cache_root(), f"cuda-{digest}")
    if os.path.exists(os.path.join(folder, CUDA_STAMP)):
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete one
    tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".cuda-")
    try:
        log.info("%s: pip install --target %s %s", step, folder, " ".join(f"{n}=={v}" for n, v in pins.items()))
        _run(step, [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", tmp, *(f"{n}=={v}" for n, v in sorted(pins.items()))])
        _write_stamp(os.path.join(tmp, CUDA_STAMP), {"wheels": pins})
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _one(step, folder, pattern):
    """The one file under ``folder`` matching the glob ``pattern``."""
    hits = sorted(glob.glob(os.path.join(folder, pattern)))
    if not hits:
        raise SetupError(step, f"{pattern} is missing from {folder}")
    return hits[0]


def nvcc_version(nvcc):
    """CUDA's version as ``nvcc --version`` prints it (e.g. "13.0.88")."""
    out = _run("configure", [nvcc, "--version"])
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    if not m:
        raise SetupError("configure", f"cannot read CUDA's version from `{nvcc} --version`")
    return m.group(1)


def find_nvcc():
    """``(nvcc, toolkit root or None)``: the ``nvcc`` on PATH (CMake finds its toolkit), else the compiler of
    :data:`NVCC_WHEELS`, installed into the cache."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc, None
    log.info("cuda: no nvcc on PATH; using PyPI's CUDA compiler")
    root = os.path.join(install_wheels("cuda", NVCC_WHEELS), "nvidia", "cu13")
    return _one("cuda", root, "bin/nvcc"), root


def cuda_description(arch=None, nvcc=None):
    """What identifies a GPU build beside its options (goes into its cache key): CUDA's version, the targets and
    the pinned wheels. Installs nothing (except PyPI's compiler where no nvcc is on PATH)."""
    nvcc = nvcc or find_nvcc()[0]
    cuda_targets(arch)  # validates
    return {"version": nvcc_version(nvcc),
            "archs": " ".join((arch or os.environ.get("DSD_CUDA_ARCH") or CUDA_ARCH).replace(",", " ").split()),
            "wheels": dict(CUDA_WHEELS)}


def cuda_setup(arch=None):
    """What a GPU build needs: :func:`cuda_description`, the compiler, the pinned libraries (installed into the
    cache) and their folders."""
    nvcc, toolkit = find_nvcc()
    wheels = install_wheels("cuda", CUDA_WHEELS)
    lib = os.path.join(wheels, "nvidia", "cu13", "lib")
    nccl = os.path.join(wheels, "nvidia", "nccl")
    return {
        **cuda_description(arch, nvcc), "nvcc": nvcc, "toolkit": toolkit, "wheel_dir": wheels,
        "include_dirs": [os.path.join(wheels, "nvidia", "cu13", "include"), os.path.join(nccl, "include")],
        "library_dirs": [lib, os.path.join(nccl, "lib")],
        "libraries": {"cublas": _one("cuda", lib, "libcublas.so.*"), "curand": _one("cuda", lib, "libcurand.so.*"),
                      "nccl": _one("cuda", nccl, "lib/libnccl.so.*")},
    }


def cuda_record(cuda):
    """The build record's ``cuda``: version, compiler, targets and each library with its wheel's version and
    file."""
    wheel_of = {"cublas": "nvidia-cublas", "curand": "nvidia-curand", "nccl": "nvidia-nccl-cu13"}
    return {
        "version": cuda["version"], "nvcc": cuda["nvcc"], "archs": cuda["archs"],
        "libraries": {name: {"wheel": wheel_of[name], "version": cuda["wheels"][wheel_of[name]], "file": path}
                      for name, path in sorted(cuda["libraries"].items())},
        "cudnn": False,
    }


def cuda_cmake_args(cuda):
    """CMake arguments that point Caffe at the wheels' cuBLAS, cuRAND and NCCL. The binaries also get
    ``-rpath-link`` to the wheels' folder (libcublas.so needs libcublasLt.so beside it); CMake puts the folders of
    the linked libraries into the installed RUNPATH (Caffe sets CMAKE_INSTALL_RPATH_USE_LINK_PATH)."""
    includes = " ".join(f"-I{d}" for d in cuda["include_dirs"])
    rpath_link = " ".join(f"-Wl,-rpath-link,{d}" for d in cuda["library_dirs"])
    libs = cuda["libraries"]
    args = [f"-DCUDA_cublas_LIBRARY={libs['cublas']}", f"-DCUDA_curand_LIBRARY={libs['curand']}",
            f"-DNCCL_INCLUDE_DIR={cuda['include_dirs'][1]}", f"-DNCCL_LIBRARIES={libs['nccl']}",
            "-DCUDA_NVCC_FLAGS=" + ";".join(f"-I{d}" for d in cuda["include_dirs"]), f"-DCMAKE_CXX_FLAGS={includes}",
            f"-DCMAKE_EXE_LINKER_FLAGS={rpath_link}", f"-DCMAKE_SHARED_LINKER_FLAGS={rpath_link}"]
    if cuda["toolkit"]:  # PyPI's compiler: its runtime has only the versioned libcudart, which CMake cannot find
        args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda['toolkit']}",
                 f"-DCUDA_CUDART_LIBRARY={_one('cuda', cuda['toolkit'], 'lib/libcudart.so.*')}"]
    return args


# ---------------------------------------------------------------- step 3: caffe


def find_existing_caffe():
    """An existing Caffe -> (folder holding the pycaffe package, caffe binary), or None to use our own build.

    ``CAFFE_ROOT`` names a built source tree (``python/caffe`` and ``build/tools/caffe``). Otherwise a pycaffe
    that this (non-venv) interpreter already imports is used, with the ``caffe`` binary on PATH.
    """
    root = os.environ.get("CAFFE_ROOT")
    if root:
        pydir, binary = os.path.join(root, "python"), os.path.join(root, "build", "tools", "caffe")
        if not os.path.isdir(os.path.join(pydir, "caffe")) or not os.access(binary, os.X_OK):
            raise SetupError("caffe", f"CAFFE_ROOT={root} has no python/caffe or build/tools/caffe")
        return pydir, binary
    if sys.prefix != sys.base_prefix:
        return None  # inside a venv (ours, linked to the cache): nothing foreign to adopt
    spec = importlib.util.find_spec("caffe")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = os.path.realpath(list(spec.submodule_search_locations)[0])
    if pkg.startswith(cache_root() + os.sep):
        return None
    binary = shutil.which("caffe")
    if not binary:
        raise SetupError("caffe", f"this Python imports pycaffe from {pkg}, but no caffe binary is on PATH; "
                                  "set CAFFE_ROOT to its source tree")
    return os.path.dirname(pkg), os.path.realpath(binary)


def cached_build(key):
    """The cache folder of a finished build for ``key``, or None. A folder without its stamp is incomplete (left
    to the builder, :func:`drop_incomplete_build`): this only reads."""
    prefix = os.path.join(cache_root(), f"caffe-{key}")
    return prefix if os.path.exists(os.path.join(prefix, STAMP)) else None


def drop_incomplete_build(key):
    """Remove the cache folder of ``key`` when it has no stamp (a build killed halfway), before building it."""
    prefix = os.path.join(cache_root(), f"caffe-{key}")
    if os.path.exists(prefix) and not os.path.exists(os.path.join(prefix, STAMP)):
        log.warning("caffe: %s is incomplete (no %s); rebuilding", prefix, STAMP)
        shutil.rmtree(prefix)


def apt_private_args(aptdir):
    """apt options that read only our own sources list and keep lists and cache in ``aptdir``."""
    for sub in ("sources.list.d", "preferences.d", "lists/partial", "archives/partial"):
        os.makedirs(os.path.join(aptdir, sub), exist_ok=True)
    sources = os.path.join(aptdir, "sources.list")
    with open(sources, "w") as f:
        f.write(f"deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                f"http://deb.debian.org/debian {SOURCE_SUITE} main\n")
    return [
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", f"Dir::Etc::SourceParts={aptdir}/sources.list.d",
        "-o", f"Dir::Etc::PreferencesParts={aptdir}/preferences.d",
        "-o", f"Dir::State={aptdir}",
        "-o", f"Dir::State::Lists={aptdir}/lists",
        "-o", f"Dir::Cache={aptdir}",
        "-o", "APT::Sandbox::User=root",
        "-qq",
    ]


def verify_sources(folder):
    """Check the pinned sha256 of every source file; raise SetupError on a mismatch or a missing file."""
    for name, want in SOURCE_SHA256.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise SetupError("download", f"{name} is missing from {folder}")
        got = _sha256(path)
        if got != want:
            raise SetupError("checksum", f"{name}: sha256 {got} differs from the pinned {want}")


def fetch_sources():
    """Download the source package once into the cache (verified), and return its folder."""
    folder = os.path.join(cache_root(), "src", f"{SOURCE_PACKAGE}_{SOURCE_VERSION}")
    if os.path.isdir(folder):
        verify_sources(folder)
        return folder
    aptdir = os.path.join(cache_root(), "apt")
    args = apt_private_args(aptdir)
    tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".src-")
    try:
        log.info("download: Debian %s source package %s=%s", SOURCE_SUITE, SOURCE_PACKAGE, SOURCE_VERSION)
        try:
            _run("download", ["apt-get", *args, "update"])
        except SetupError as e:
            raise SetupError("download", f"apt cannot reach Debian's {SOURCE_SUITE} sources ({e})") from None
        _run("download", ["apt-get", *args, "source", "--download-only",
                          f"{SOURCE_PACKAGE}={SOURCE_VERSION}"], cwd=tmp)
        verify_sources(tmp)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def unpack_source(sources, src, patches, logfile):
    """Unpack the verified source package into ``src`` with Debian's patch series, then apply ``patches``."""
    dsc = os.path.join(sources, next(n for n in SOURCE_SHA256 if n.endswith(".dsc")))
    log.info("unpack: Debian's source and patch series")
    _run("unpack", ["dpkg-source", "--no-check", "-x", dsc, src], logfile=logfile)
    for p in patches:
        log.info("patch: %s", os.path.basename(p))
        _run("patch", ["patch", "-p1", "--forward", "-d", src, "-i", p], logfile=logfile)


@contextlib.contextmanager
def _build_lock(root, key):
    """Only one set-up builds ``key`` at a time (a second one would share its work folder)."""
    path = os.path.join(root, f".build-{key}.lock")
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SetupError("caffe", f"another set-up is building this Caffe now ({path}); wait for it") from None
        yield


def _work_folder(root, key):
    """``(folder, resumed)``: the work folder of a build of ``key``. A build that failed or was stopped after its
    configure step leaves its folder, and the next one resumes the compile there (a CUDA build compiles for an hour
    on 2 cores); any other leftover is removed."""
    for old in sorted(glob.glob(os.path.join(root, f".build-{key}-*"))):
        if os.path.exists(os.path.join(old, "build", CONFIGURED)):
            return old, True
        shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(dir=root, prefix=f".build-{key}-"), False


def build_caffe(key, options, linkage, patches, jobs, cuda=None):
    """Unpack, patch, configure, compile and install into ``cache/caffe-<key>`` (renamed at the end); with CUDA
    (``cuda``, :func:`cuda_setup`) for a GPU build. A build stopped after configuring resumes (:func:`_work_folder`)."""
    sources = fetch_sources()
    root = cache_root()
    with _build_lock(root, key):
        work, resumed = _work_folder(root, key)
        return _build_in(work, resumed, key, options, linkage, patches, jobs, cuda, sources)


def _build_in(work, resumed, key, options, linkage, patches, jobs, cuda, sources):
    root = cache_root()
    logfile = os.path.join(root, "logs", f"build-{key}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    final = os.path.join(root, f"caffe-{key}")
    # Configured for its final path (RUNPATH points there), installed under DESTDIR, renamed at the end.
    src, build, destdir = (os.path.join(work, d) for d in ("src", "build", "dest"))
    prefix = destdir + final
    done = False
    try:
        if resumed:
            log.info("compile: resuming the build left in %s", work)
            shutil.rmtree(destdir, ignore_errors=True)
        else:
            _configure(src, build, final, options, linkage, patches, cuda, sources, logfile)
        log.info("compile: make -j%d (%s; log: %s)", jobs, "long: CUDA" if cuda else "a few minutes", logfile)
        t0 = time.time()
        _run("compile", ["nice", "-n", "10", "make", f"-j{jobs}"] if cuda else ["make", f"-j{jobs}"],
             logfile=logfile, cwd=build)
        _run("install", ["make", "install", f"DESTDIR={destdir}"], logfile=logfile, cwd=build)
        log.info("compile: done in %.0f s", time.time() - t0)
        record = {
            "source": f"{SOURCE_PACKAGE} {SOURCE_VERSION} (Debian {SOURCE_SUITE})",
            "patches": {os.path.basename(p): patch_reason(p) for p in patches},
            "options": options,
            "cpu_only": options["CPU_ONLY"] == "ON",
            "cuda": cuda_record(cuda) if cuda else None,
            "python": linkage,
            "key": key,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "compile_seconds": round(time.time() - t0, 1),
            "resumed": resumed,
        }
        with open(os.path.join(prefix, STAMP), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(prefix, final)
        done = True
        return final
    finally:
        if done or not os.path.exists(os.path.join(build, CONFIGURED)):
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.warning("caffe: kept %s; the next set-up resumes its compile", work)


def _configure(src, build, final, options, linkage, patches, cuda, sources, logfile):
    """Unpack and patch the source into ``src``, and configure it in ``build`` for the prefix ``final``."""
    unpack_source(sources, src, patches, logfile)
    os.makedirs(build)
    cmake = ["cmake", src, f"-DCMAKE_INSTALL_PREFIX={final}", f"-DPYTHON_EXECUTABLE={linkage['executable']}",
             f"-DPYTHON_LIBRARY={linkage['library']}", f"-DPYTHON_INCLUDE_DIR={linkage['include']}"]
    cmake += [f"-D{k}={v}" for k, v in sorted(options.items())]
    if cuda:
        cmake += cuda_cmake_args(cuda)
    log.info("configure: cmake (log: %s)", logfile)
    _run("configure", cmake, logfile=logfile, cwd=build)
    if cuda:  # FindCUDA drops the given CUDA_cublas_LIBRARY on its first pass; the second keeps it
        _run("configure", cmake, logfile=logfile, cwd=build)
    open(os.path.join(build, CONFIGURED), "w").close()


# ---------------------------------------------------------------- Caffe's own tests of the patched layers

#: Caffe's gtest sources for the layers the performance patches change, and the test cases to run from each.
GTEST_CASES = {
    "test_pooling_layer.cpp": "PoolingLayerTest/*",
    "test_convolution_layer.cpp": "ConvolutionLayerTest/*",
    "test_deconvolution_layer.cpp": "DeconvolutionLayerTest/*",
    "test_im2col_layer.cpp": "Im2colLayerTest/*",
    "test_concat_layer.cpp": "ConcatLayerTest/*",
    "test_neuron_layer.cpp": "NeuronLayerTest/*.TestReLU*",
}


#: Caffe's gtest sources for the layers SqueezeNet uses, and their GPU cases (typed tests /2 and /3 are
#: GPUDevice<float> and GPUDevice<double>): what ``bench/gpu_check.sh`` runs on a GPU.
GTEST_GPU_CASES = {
    "test_convolution_layer.cpp": "ConvolutionLayerTest/2.*:ConvolutionLayerTest/3.*",
    "test_im2col_layer.cpp": "Im2colLayerTest/2.*:Im2colLayerTest/3.*",
    "test_pooling_layer.cpp": "PoolingLayerTest/2.*:PoolingLayerTest/3.*",
    "test_concat_layer.cpp": "ConcatLayerTest/2.*:ConcatLayerTest/3.*",
    "test_neuron_layer.cpp": "NeuronLayerTest/2.*ReLU*:NeuronLayerTest/3.*ReLU*:"
                             "NeuronLayerTest/2.*Dropout*:NeuronLayerTest/3.*Dropout*",
    "test_softmax_layer.cpp": "SoftmaxLayerTest/2.*:SoftmaxLayerTest/3.*",
    "test_softmax_with_loss_layer.cpp": "SoftmaxWithLossLayerTest/2.*:SoftmaxWithLossLayerTest/3.*",
    "test_accuracy_layer.cpp": "AccuracyLayerTest/2.*:AccuracyLayerTest/3.*",
}


def cuda_compile_flags(nvcc=None):
    """(compile flags, link flags) for host code that calls CUDA and the wheels' libraries, as ``nvcc`` itself
    would pass them (read from ``nvcc -dryrun``)."""
    nvcc = nvcc or find_nvcc()[0]
    out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    words = lambda var: [w.strip('"') for line in out.splitlines() if line.startswith(f"#$ {var}=")  # noqa: E731
                         for w in line.split("=", 1)[1].split()]
    cuda = cuda_setup()
    includes = [w for w in words("INCLUDES") if w.startswith("-I")] + [f"-I{d}" for d in cuda["include_dirs"]]
    libdirs = [w for w in words("LIBRARIES") if w.startswith("-L") and not w.endswith("stubs")]
    link = [*libdirs, "-lcudart", *(f"-Wl,-rpath-link,{d}" for d in cuda["library_dirs"])]
    return includes, link


def caffe_gtest(jobs=None, gpu=False, keep=None, cases=None):
    """Compile Caffe's gtest cases against the set-up's cached build, the CPU one (the cases of the patched layers,
    :data:`GTEST_CASES`, run with OpenMP on every core) or with ``gpu`` the GPU one (:data:`GTEST_GPU_CASES`);
    return the test binary's exit code. With ``keep`` (a path) only compile and copy the binary there (for a GPU
    machine: ``bench/gpu_bundle.py``); ``cases`` ({source: filter}) replaces the default set. Works in a temporary
    folder."""
    prefix = cached_prefix(gpu=gpu)
    jobs = jobs or os.cpu_count() or 2
    if prefix is None:
        raise SetupError("gtest", "no cached build for the current patches: run `make setup` first"
                         + (" with DSD_CAFFE_BUILD=gpu" if gpu else ""))
    cases = cases or (GTEST_GPU_CASES if gpu else GTEST_CASES)
    with tempfile.TemporaryDirectory(prefix="dsd-caffe-gtest-") as work:
        logfile = os.path.join(work, "gtest.log")
        src = os.path.join(work, "src")
        unpack_source(fetch_sources(), src, our_patches(gpu=gpu), logfile)
        defines = ["-DUSE_OPENCV", "-DUSE_LMDB", "-DUSE_HDF5"] + ([] if gpu else ["-DCPU_ONLY"])  # build_options()
        cuda_flags, cuda_link = cuda_compile_flags() if gpu else ([], [])
        flags = ["-O2", *defines, f"-I{src}/src", f"-I{prefix}/include", "-I/usr/include/hdf5/serial", *cuda_flags]
        tests = os.path.join(src, "src", "caffe", "test")
        sources = [os.path.join(src, "src", "gtest", "gtest-all.cpp"), os.path.join(tests, "test_caffe_main.cpp")]
        sources += [os.path.join(tests, name) for name in cases]
        objects = [os.path.join(work, os.path.basename(c) + ".o") for c in sources]
        log.info("gtest: compiling %d test sources against %s", len(sources), prefix)
        t0 = time.time()
        _compile_all("gtest", ["g++", *flags], list(zip(sources, objects)), jobs)
        binary = os.path.join(work, "caffe-gtest")
        _run("gtest", ["g++", "-o", binary, *objects, f"-L{prefix}/lib", f"-Wl,-rpath,{prefix}/lib", "-lcaffe",
                       "-lglog", "-lgflags", "-lprotobuf", "-lboost_system", "-lpthread", *cuda_link])
        if keep:
            shutil.copy2(binary, keep)
            log.info("gtest: compiled in %.0f s into %s; its cases: %s", time.time() - t0, keep,
                     ":".join(cases.values()))
            return 0
        log.info("gtest: compiled in %.0f s; running %s", time.time() - t0, ":".join(cases.values()))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
        t0 = time.time()
        rc = subprocess.call([binary, "--gtest_filter=" + ":".join(cases.values())], env=env, cwd=src)
        log.info("gtest: ran in %.1f s, exit code %d", time.time() - t0, rc)
        return rc


def _compile_all(step, compiler, pairs, jobs):
    """Compile each (source, object) of ``pairs`` with ``compiler``, ``jobs`` at a time."""
    while pairs:
        batch, pairs = pairs[:jobs], pairs[jobs:]
        procs = [subprocess.Popen([*compiler, "-c", c, "-o", o], stderr=subprocess.PIPE, text=True)
                 for c, o in batch]
        for (c, _), proc in zip(batch, procs):
            err = proc.communicate()[1]
            if proc.returncode:
                raise SetupError(step, f"compiling {os.path.basename(c)} failed: {err.strip()[-500:]}")


# ---------------------------------------------------------------- step 4: link into the venv


def site_packages(venv):
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.join(venv, "lib", py, "site-packages")


def link_pycaffe(venv, pydir):
    """``import caffe`` in the venv via a .pth file."""
    with open(os.path.join(site_packages(venv), "dsd_caffe_pycaffe.pth"), "w") as f:
        f.write(pydir + "\n")


def choose_blas(python):
    """The BLAS configuration (``dsd_caffe.blas``): chosen and self-checked once per Caffe build, then returned as
    the environment variables to set when Caffe runs. A failed choice warns and keeps the library's defaults."""
    env = dict(os.environ, GLOG_minloglevel="2")
    decision = _run("blas", [python, "-c", "from dsd_caffe import blas; print(blas.decision_path())"], env=env)
    if not os.path.exists(decision.strip()):
        log.info("blas: checking and timing the BLAS kernels (once per build)")
        try:
            _run("blas", [python, "-m", "dsd_caffe.blas"], env=env)
        except SetupError as e:
            log.warning("%s; keeping OpenBLAS's own defaults", e)
    code = "import json; from dsd_caffe import blas; print(json.dumps(blas.runtime_env(environ={})))"
    return json.loads(_run("blas", [python, "-c", code], env=env) or "{}")


def write_wrapper(venv, binary, blas_env):
    """``venv/bin/caffe``: runs ``binary`` with the venv's Python first on PATH and the chosen BLAS and OpenMP
    settings."""
    wrapper = os.path.join(venv, "bin", "caffe")
    venv_bin = os.path.join(os.path.abspath(venv), "bin")
    lines = [
        "#!/bin/sh",
        "# Written by python3 -m dsd_caffe.build: the real caffe binary, with this venv's python first on PATH",
        "# so that an embedded Python layer imports the venv's packages (numpy, dsd_caffe), and the BLAS settings",
        "# chosen at set-up (python -m dsd_caffe.blas) unless the environment sets them already.",
    ]
    if "OPENBLAS_CORETYPE" in blas_env:
        lines.append(f'[ -n "${{OPENBLAS_CORETYPE+x}}" ] || export OPENBLAS_CORETYPE={blas_env["OPENBLAS_CORETYPE"]}')
    if "OPENBLAS_NUM_THREADS" in blas_env:
        lines.append(f'[ -n "${{OPENBLAS_NUM_THREADS}}${{OMP_NUM_THREADS}}" ] || '
                     f'export OPENBLAS_NUM_THREADS={blas_env["OPENBLAS_NUM_THREADS"]}')
    if "OMP_WAIT_POLICY" in blas_env:
        lines.append(f'[ -n "${{OMP_WAIT_POLICY}}${{GOMP_SPINCOUNT}}" ] || '
                     f'export OMP_WAIT_POLICY={blas_env["OMP_WAIT_POLICY"]}')
    lines.append(f'PATH="{venv_bin}:$PATH" exec "{binary}" "$@"')
    text = "\n".join(lines) + "\n"
    with open(wrapper + ".tmp", "w") as f:
        f.write(text)
    os.chmod(wrapper + ".tmp", 0o755)
    os.replace(wrapper + ".tmp", wrapper)


def check_caffe(python):
    """Import pycaffe in the venv and check the layers the toolkit needs."""
    code = ("import caffe; t=set(caffe.layer_type_list()); "
            "m=[n for n in ('Python','Data','ImageData','HDF5Data') if n not in t]; "
            "print(','.join(m))")
    out = _run("check", [python, "-c", code], env=dict(os.environ, GLOG_minloglevel="2")).strip()
    if out:
        raise SetupError("check", f"pycaffe lacks the layer types {out}")


# ---------------------------------------------------------------- main


def caffe_build(python, gpu=False, perf=True, jobs=None, arch=None):
    """The cached Caffe build for these options and patches (building it if missing): its prefix."""
    options, patches, linkage = build_options(gpu, arch), our_patches(perf, gpu), python_linkage(python)
    key = cache_key(options, linkage, patches, cuda_description(arch) if gpu else None)
    prefix = cached_build(key)
    if prefix:
        log.info("caffe: cached build %s", prefix)
        return prefix
    drop_incomplete_build(key)
    cuda = cuda_setup(arch) if gpu else None
    return build_caffe(key, options, linkage, patches, jobs or os.cpu_count() or 2, cuda)


def cached_prefix(perf=True, gpu=False):
    """The prefix of the finished CPU (or GPU, default targets) build with (``perf``) or without the performance
    patches, or None if it was not built."""
    return cached_build(cache_key(build_options(gpu), python_linkage(), our_patches(perf, gpu),
                                  cuda_description() if gpu else None))


def cached_gpu_prefixes():
    """The prefixes of every finished GPU build in the cache (any targets, any CUDA), newest first."""
    found = []
    for stamp in glob.glob(os.path.join(cache_root(), "caffe-*", STAMP)):
        with open(stamp) as f:
            if json.load(f).get("cpu_only") is False:
                found.append(os.path.dirname(stamp))
    return sorted(found, key=lambda p: os.stat(os.path.join(p, STAMP)).st_mtime, reverse=True)


def setup(venv=None, gpu=False, jobs=None, skip_apt=False, arch=None):
    """Run every step; return the dict of what was used. Raises SetupError naming the failed step."""
    t0 = time.time()
    venv = os.path.abspath(venv or os.path.join(REPO, ".venv"))
    if gpu:
        cuda_targets(arch)  # a bad --cuda-arch fails before anything is installed
    if not skip_apt:
        ensure_apt_packages()
    os.makedirs(cache_root(), exist_ok=True)
    python = ensure_venv(venv)
    existing = find_existing_caffe()
    if existing:
        pydir, binary = existing
        log.info("caffe: using the existing Caffe: pycaffe in %s, binary %s", pydir, binary)
    else:
        prefix = caffe_build(python, gpu=gpu, jobs=jobs, arch=arch)
        pydir = os.path.join(prefix, "lib", "python3", "dist-packages")
        binary = os.path.join(prefix, "bin", "caffe")
    link_pycaffe(venv, pydir)
    check_caffe(python)
    write_wrapper(venv, binary, choose_blas(python))
    log.info("set-up done in %.1f s: %s/bin/python imports caffe; %s/bin/caffe", time.time() - t0, venv, venv)
    return {"venv": venv, "pycaffe": pydir, "caffe": binary}


def _run_setup(args):
    """The command's one call: the gtest run, the unpatched build, or the set-up; a failed step is one line."""
    try:
        if args.gtest:
            return 1 if caffe_gtest(jobs=args.jobs, gpu=args.gpu, keep=args.gtest_binary) else 0
        if args.unpatched:
            if not args.skip_apt:
                ensure_apt_packages()
            os.makedirs(cache_root(), exist_ok=True)
            print(caffe_build(None, gpu=args.gpu, perf=False, jobs=args.jobs, arch=args.cuda_arch))
            return 0
        setup(args.venv, gpu=args.gpu, jobs=args.jobs, skip_apt=args.skip_apt, arch=args.cuda_arch)
    except SetupError as e:
        raise UserError(str(e)) from e
    except OSError as e:
        raise UserError(f"set-up failed: {e}") from e
    return 0


def main(argv=None):
    p = cli.parser(__doc__, prog="python3 -m dsd_caffe.build")
    p.add_argument("--venv", help="virtual environment to create (default: .venv in the repo)")
    p.add_argument("--gpu", action="store_true",
                   help="build with CUDA (CPU_ONLY off, NCCL on; its own cache key); nvcc from PATH, else PyPI's")
    p.add_argument("--cuda-arch", help=f"CUDA targets of --gpu (default $DSD_CUDA_ARCH or {CUDA_ARCH!r})")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    p.add_argument("--skip-apt", action="store_true", help="do not check or install Debian packages")
    p.add_argument("--gtest", action="store_true",
                   help="compile and run Caffe's own tests of the patched layers against the cached build "
                        "(with --gpu: the GPU cases of SqueezeNet's layers against the GPU build)")
    p.add_argument("--gtest-binary", metavar="PATH",
                   help="with --gtest: only compile, and write the test binary to PATH (for a GPU machine)")
    p.add_argument("--unpatched", action="store_true",
                   help="only build (or find) Caffe without the performance patches and print its prefix")
    cli.main(p, _run_setup, argv, log_format="[setup %(asctime)s] %(message)s")


if __name__ == "__main__":
    main()
