"""Set-up: real Caffe built from Debian's source package, cached outside the repo, and the project's .venv.

Run ``python3 -m dsd_caffe.build`` (``make setup`` does). It needs only the standard library, so it runs before
the virtual environment exists. Steps, each named in the one-line error if it fails:

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

``--gpu`` builds with CUDA (CPU_ONLY off) where ``nvcc`` exists. ``--unpatched`` only builds (or finds) the Caffe
without the performance patches (``patches/*-perf-*.patch``), under its own cache key, and prints its prefix: the
reference that ``bench/caffe_layers.py`` compares against; the venv is left alone. The cache lives in ``$DSD_CAFFE_CACHE`` or
``~/.cache/dsd-caffe``.
"""
import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

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
VENV_STAMP = ".dsd-setup.json"


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


def build_options(gpu=False):
    return {
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


def cache_key(options, linkage, patches):
    """Key of a cached build: source version, patch contents, build options, the linked libpython and the
    numpy pin (pycaffe compiles against numpy's C API)."""
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
    return h.hexdigest()[:16]


PERF_MARK = "-perf-"  # in the name of a patch that changes only speed (left out by --unpatched)


def our_patches(perf=True):
    """``patches/*.patch`` in the order applied; without the performance patches if ``perf`` is false."""
    names = sorted(n for n in os.listdir(PATCH_DIR) if n.endswith(".patch") and (perf or PERF_MARK not in n))
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


def build_caffe(key, options, linkage, patches, jobs):
    """Unpack, patch, configure, compile and install into ``cache/caffe-<key>`` (renamed at the end)."""
    sources = fetch_sources()
    root = cache_root()
    work = tempfile.mkdtemp(dir=root, prefix=f".build-{key}-")
    logfile = os.path.join(root, "logs", f"build-{key}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    final = os.path.join(root, f"caffe-{key}")
    # Configured for its final path (RUNPATH points there), installed under DESTDIR, renamed at the end.
    src, build, destdir = (os.path.join(work, d) for d in ("src", "build", "dest"))
    prefix = destdir + final
    try:
        unpack_source(sources, src, patches, logfile)
        os.makedirs(build)
        cmake = ["cmake", src, f"-DCMAKE_INSTALL_PREFIX={final}",
                 f"-DPYTHON_EXECUTABLE={linkage['executable']}",
                 f"-DPYTHON_LIBRARY={linkage['library']}",
                 f"-DPYTHON_INCLUDE_DIR={linkage['include']}"]
        cmake += [f"-D{k}={v}" for k, v in sorted(options.items())]
        log.info("configure: cmake (log: %s)", logfile)
        _run("configure", cmake, logfile=logfile, cwd=build)
        log.info("compile: make -j%d (a few minutes; log: %s)", jobs, logfile)
        t0 = time.time()
        _run("compile", ["make", f"-j{jobs}"], logfile=logfile, cwd=build)
        _run("install", ["make", "install", f"DESTDIR={destdir}"], logfile=logfile, cwd=build)
        log.info("compile: done in %.0f s", time.time() - t0)
        record = {
            "source": f"{SOURCE_PACKAGE} {SOURCE_VERSION} (Debian {SOURCE_SUITE})",
            "patches": {os.path.basename(p): patch_reason(p) for p in patches},
            "options": options,
            "cpu_only": options["CPU_ONLY"] == "ON",
            "python": linkage,
            "key": key,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "compile_seconds": round(time.time() - t0, 1),
        }
        with open(os.path.join(prefix, STAMP), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(prefix, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


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


def caffe_gtest(jobs=None):
    """Compile Caffe's gtest cases of the patched layers (:data:`GTEST_CASES`) against the set-up's cached build
    and run them with OpenMP on every core; return the test binary's exit code. Works in a temporary folder."""
    prefix = cached_prefix()
    jobs = jobs or os.cpu_count() or 2
    if prefix is None:
        raise SetupError("gtest", "no cached build for the current patches: run `make setup` first")
    with tempfile.TemporaryDirectory(prefix="dsd-caffe-gtest-") as work:
        logfile = os.path.join(work, "gtest.log")
        src = os.path.join(work, "src")
        unpack_source(fetch_sources(), src, our_patches(), logfile)
        defines = ["-DUSE_OPENCV", "-DUSE_LMDB", "-DUSE_HDF5", "-DCPU_ONLY"]  # the CPU build (build_options())
        flags = ["-O2", *defines, f"-I{src}/src", f"-I{prefix}/include", "-I/usr/include/hdf5/serial"]
        tests = os.path.join(src, "src", "caffe", "test")
        sources = [os.path.join(src, "src", "gtest", "gtest-all.cpp"), os.path.join(tests, "test_caffe_main.cpp")]
        sources += [os.path.join(tests, name) for name in GTEST_CASES]
        objects = [os.path.join(work, os.path.basename(c) + ".o") for c in sources]
        log.info("gtest: compiling %d test sources against %s", len(sources), prefix)
        t0 = time.time()
        pending = list(zip(sources, objects))
        while pending:  # ``jobs`` compilers at a time
            batch, pending = pending[:jobs], pending[jobs:]
            procs = [subprocess.Popen(["g++", *flags, "-c", c, "-o", o], stderr=subprocess.PIPE, text=True)
                     for c, o in batch]
            for (c, _), proc in zip(batch, procs):
                err = proc.communicate()[1]
                if proc.returncode:
                    raise SetupError("gtest", f"compiling {os.path.basename(c)} failed: {err.strip()[-500:]}")
        binary = os.path.join(work, "caffe-gtest")
        _run("gtest", ["g++", "-o", binary, *objects, f"-L{prefix}/lib", f"-Wl,-rpath,{prefix}/lib", "-lcaffe",
                       "-lglog", "-lgflags", "-lprotobuf", "-lboost_system", "-lpthread"])
        log.info("gtest: compiled in %.0f s; running %s", time.time() - t0, ":".join(GTEST_CASES.values()))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 2))
        t0 = time.time()
        rc = subprocess.call([binary, "--gtest_filter=" + ":".join(GTEST_CASES.values())], env=env, cwd=src)
        log.info("gtest: ran in %.1f s, exit code %d", time.time() - t0, rc)
        return rc


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


def caffe_build(python, gpu=False, perf=True, jobs=None):
    """The cached Caffe build for these options and patches (building it if missing): its prefix."""
    options, patches, linkage = build_options(gpu), our_patches(perf), python_linkage(python)
    key = cache_key(options, linkage, patches)
    prefix = cached_build(key)
    if prefix:
        log.info("caffe: cached build %s", prefix)
        return prefix
    drop_incomplete_build(key)
    return build_caffe(key, options, linkage, patches, jobs or os.cpu_count() or 2)


def cached_prefix(perf=True):
    """The prefix of the finished CPU build with (``perf``) or without the performance patches, or None if it was
    not built."""
    return cached_build(cache_key(build_options(), python_linkage(), our_patches(perf)))


def setup(venv=None, gpu=False, jobs=None, skip_apt=False):
    """Run every step; return the dict of what was used. Raises SetupError naming the failed step."""
    t0 = time.time()
    venv = os.path.abspath(venv or os.path.join(REPO, ".venv"))
    if gpu and not shutil.which("nvcc"):
        raise SetupError("configure", "--gpu needs CUDA's nvcc on PATH; none found")
    if not skip_apt:
        ensure_apt_packages()
    os.makedirs(cache_root(), exist_ok=True)
    python = ensure_venv(venv)
    existing = find_existing_caffe()
    if existing:
        pydir, binary = existing
        log.info("caffe: using the existing Caffe: pycaffe in %s, binary %s", pydir, binary)
    else:
        prefix = caffe_build(python, gpu=gpu, jobs=jobs)
        pydir = os.path.join(prefix, "lib", "python3", "dist-packages")
        binary = os.path.join(prefix, "bin", "caffe")
    link_pycaffe(venv, pydir)
    check_caffe(python)
    write_wrapper(venv, binary, choose_blas(python))
    log.info("set-up done in %.1f s: %s/bin/python imports caffe; %s/bin/caffe", time.time() - t0, venv, venv)
    return {"venv": venv, "pycaffe": pydir, "caffe": binary}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m dsd_caffe.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", help="virtual environment to create (default: .venv in the repo)")
    p.add_argument("--gpu", action="store_true", help="build with CUDA (CPU_ONLY off); needs nvcc")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    p.add_argument("--skip-apt", action="store_true", help="do not check or install Debian packages")
    p.add_argument("--gtest", action="store_true",
                   help="compile and run Caffe's own tests of the patched layers against the cached build")
    p.add_argument("--unpatched", action="store_true",
                   help="only build (or find) Caffe without the performance patches and print its prefix")
    p.add_argument("--debug", action="store_true", help="show the traceback on errors")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[setup %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        if args.gtest:
            return 1 if caffe_gtest(jobs=args.jobs) else 0
        if args.unpatched:
            if not args.skip_apt:
                ensure_apt_packages()
            os.makedirs(cache_root(), exist_ok=True)
            print(caffe_build(None, gpu=args.gpu, perf=False, jobs=args.jobs))
            return 0
        setup(args.venv, gpu=args.gpu, jobs=args.jobs, skip_apt=args.skip_apt)
    except (SetupError, OSError) as e:
        if args.debug:
            raise
        print(str(e) if isinstance(e, SetupError) else f"set-up failed: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
