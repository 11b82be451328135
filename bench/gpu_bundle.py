"""Pack what ``bench/gpu_check.sh`` needs on a GPU machine without a package registry into one archive:
``.gpu-bundle/dsd-gpu.tar.xz`` (git ignores it; a device run names that file in its ``carry``, 64 MiB at most
with the working tree). Why a bundle and not a build there: docs/gpu.md.

It holds, stripped: the GPU build's ``caffe`` binary, libcaffe and pycaffe; Caffe's GPU gtest cases of the layers
SqueezeNet uses, compiled here against that build; every shared library they load that such a machine lacks
(Debian's Boost, glog, gflags, protobuf, HDF5, LMDB, OpenBLAS, OpenCV core, libpython3.11 ...); the Python 3.11 that
pycaffe is built for (the machine's own is 3.12), with numpy, protobuf and six; and Fashion-MNIST LMDBs cut to what
the check reads (6,400 training images, 5,000 others for ``caffe test``, both from Debian's training file). Left
out, because the machine's image has them: glibc, libstdc++, libgcc, and CUDA's driver, runtime, cuBLAS, cuRAND and
NCCL.

A few libraries are never called by what the check runs, and carry much: OpenCV's image codecs (GDAL and a dozen
codecs; only encoded Datums and ImageData use them), OpenGL and LAPACK under OpenCV core, and HDF5's libcurl and
libcrypto (its S3 driver). Each is replaced by a stub of the same name, compiled here, that defines the symbols (and
symbol versions) the carried libraries import from it, each one aborting if ever called. ``--cpu`` packs the CPU build the same way: a dry run of the route on this machine, whose check
(``bench/gpu_check.sh --cpu``) also verifies, with ``LD_DEBUG``, that every library loaded comes from the bundle or
from the list of what the machine has.

Usage: .venv-gpu/bin/python bench/gpu_bundle.py [--cpu] [--output .gpu-bundle] [--preset 9]
"""
import argparse
import glob
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from dsd_caffe import build, fashion_mnist, lmdbio

LIMIT = 64 << 20  # what a device run carries, the working tree included
#: libraries the GPU machine's image has: glibc, the compiler's runtime, CUDA's driver, runtime and libraries
ON_DEVICE = re.compile(r"^(ld-linux.*|lib(c|m|dl|rt|pthread|util|resolv|stdc\+\+|gcc_s|cuda|cudart|cublas|cublasLt|"
                       r"curand|nccl|nvidia-ml)\.so.*|linux-vdso.*)$")
#: libraries replaced by stubs: called by nothing the check runs (see the module doc)
CUT = {"libopencv_imgcodecs.so.406", "libGLX.so.0", "liblapack.so.3", "libcurl.so.4", "libcrypto.so.3"}
#: Python's standard library, less what the check never imports
STDLIB_SKIP = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "unittest",
               "pydoc_data", "distutils", "__pycache__"}
DYNLOAD_SKIP = re.compile(r"^(_(tkinter|ssl|hashlib|curses.*|dbm|gdbm|sqlite3|test.*|xxtestfuzz|ctypes_test|crypt|uuid)|"
                          r"readline|nis|xxlimited.*)\.")
TRAIN_IMAGES, OTHER_IMAGES = 6400, 5000
#: the few gtest cases of the --cpu dry run (quick to compile and run; bench/gpu_check.sh --cpu runs them)
CPU_GTEST = {"test_concat_layer.cpp": "ConcatLayerTest/*"}


def _ldd(path):
    """{soname: path} of every library ``path`` loads here (its RUNPATH included)."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*(\S+) => (/\S+)", out, re.M)}


def _needed(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+)\]", out)


def closure(roots):
    """The libraries the ``roots`` need that the machine lacks, following NEEDED edges but not into :data:`CUT`:
    ({soname: path here}, {cut soname: path here})."""
    where = {}
    for r in roots:
        where.update(_ldd(r))
    keep, cut, todo = {}, {}, list(roots)
    while todo:
        for name in _needed(todo.pop()):
            if name in keep or name in cut or ON_DEVICE.match(name):
                continue
            if name not in where:
                sys.exit(f"gpu_bundle: {name} is needed but not found here")
            if name in CUT:
                cut[name] = where[name]
                continue
            keep[name] = where[name]
            todo.append(where[name])
    return keep, cut


def _copy_elf(src, dst):
    """Copy (unless in place) and strip."""
    if os.path.realpath(src) != os.path.realpath(dst):
        shutil.copy2(os.path.realpath(src), dst)
    os.chmod(dst, 0o755)
    subprocess.run(["strip", "--strip-unneeded", dst], check=True, capture_output=True)


def _symbols(path, defined):
    """{(name, version or "")} of the dynamic symbols ``path`` defines (or imports)."""
    out = subprocess.run(["nm", "-D", "--defined-only" if defined else "--undefined-only", path],
                         capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        name, _, version = line.split()[-1].partition("@")
        found.add((name, version.lstrip("@")))
    return found


def make_stub(soname, real, users, libdir, work):
    """``libdir/soname``: defines every symbol of ``real`` that the ``users`` import, with its version, as a
    function that aborts."""
    offered = {name for name, _ in _symbols(real, defined=True)}
    wanted = {(n, v) for u in users for n, v in _symbols(u, defined=False) if n in offered}
    stem = os.path.join(work, soname)
    with open(stem + ".c", "w") as f:
        f.write("#include <stdlib.h>\n")
        f.writelines(f"void {n}(void) {{ abort(); }}\n" for n in sorted({n for n, _ in wanted}))
    cmd = ["gcc", "-shared", "-fPIC", "-o", os.path.join(libdir, soname), f"-Wl,-soname,{soname}", stem + ".c"]
    versions = sorted({v for _, v in wanted if v})
    if versions:
        with open(stem + ".map", "w") as f:
            f.writelines(f"{v} {{ global: {'; '.join(sorted(n for n, w in wanted if w == v))}; }};\n"
                         for v in versions)
        cmd.append(f"-Wl,--version-script={stem}.map")
    subprocess.run(cmd, check=True)
    return len(wanted)


def _copytree(src, dst, skip=frozenset()):
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip or n.endswith((".pyc", ".pyi"))])


def pack_python(prefix, root):
    """The Python that pycaffe is built for, its standard library, numpy, protobuf, six and pycaffe, under
    ``root/python``. Returns the ELF files in it whose libraries must travel."""
    home = os.path.join(root, "python")
    base = sys.base_prefix
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    os.makedirs(os.path.join(home, "bin"))
    _copy_elf(os.path.join(base, "bin", ver), os.path.join(home, "bin", ver))
    lib = os.path.join(home, "lib", ver)
    _copytree(os.path.join(base, "lib", ver), lib,
              skip=STDLIB_SKIP | {n for n in os.listdir(os.path.join(base, "lib", ver)) if n.startswith("config-")})
    for so in glob.glob(os.path.join(lib, "lib-dynload", "*.so")):
        if DYNLOAD_SKIP.match(os.path.basename(so)):
            os.unlink(so)
        else:
            _copy_elf(so, so)
    site = os.path.join(lib, "site-packages")
    here = os.path.dirname(np.__file__)
    for name in ("numpy", "numpy.libs", "google", "six.py"):
        src = os.path.join(os.path.dirname(here), name)
        if os.path.isdir(src):
            _copytree(src, os.path.join(site, name), skip={"tests", "__pycache__"})
        else:
            shutil.copy2(src, site)
    _copytree(os.path.join(prefix, "lib", "python3", "dist-packages", "caffe"), os.path.join(site, "caffe"),
              skip={"__pycache__", "test", "imagenet"})
    caffe_so = os.path.join(site, "caffe", "_caffe.so")
    _copy_elf(caffe_so, caffe_so)
    return [os.path.join(home, "bin", ver), caffe_so, *glob.glob(os.path.join(lib, "lib-dynload", "*.so"))]


def pack_data(root):
    """Fashion-MNIST LMDBs where the small net's trainval looks (``data/fashion_mnist``)."""
    files = fashion_mnist.idx_files()
    images, labels = fashion_mnist.read_idx(files["train-images"]), fashion_mnist.read_idx(files["train-labels"])
    out = os.path.join(root, "data", "fashion_mnist")
    os.makedirs(out)
    for split, part in (("train", slice(None, TRAIN_IMAGES)), ("val", slice(-OTHER_IMAGES, None))):
        lmdbio.write_array_lmdb(os.path.join(out, fashion_mnist.lmdb_name(split)), images[part], labels[part])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="pack the CPU build (a dry run of the route here)")
    p.add_argument("--output", default=os.path.join(build.REPO, ".gpu-bundle"))
    p.add_argument("--preset", type=int, default=9, help="xz preset, 0-9 (9: smallest, slowest)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[gpu_bundle %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    prefix = build.cached_prefix() if a.cpu else (build.cached_gpu_prefixes() or [None])[0]
    if not prefix:
        sys.exit("gpu_bundle: no GPU build in the cache: run `make setup-gpu` first")
    with tempfile.TemporaryDirectory(prefix="dsd-gpu-bundle-") as tmp:
        root = os.path.join(tmp, "dsd-gpu")
        bindir, libdir = os.path.join(root, "bin"), os.path.join(root, "lib")
        os.makedirs(bindir)
        os.makedirs(libdir)
        os.makedirs(a.output, exist_ok=True)
        gtest = os.path.join(a.output, f"caffe-gtest-{'cpu' if a.cpu else 'gpu'}")  # compiled once (minutes)
        if not os.path.exists(gtest) or os.path.getmtime(gtest) < os.path.getmtime(os.path.join(prefix, build.STAMP)):
            build.caffe_gtest(gpu=not a.cpu, keep=gtest, cases=CPU_GTEST if a.cpu else None)
        _copy_elf(os.path.join(prefix, "bin", "caffe"), os.path.join(bindir, "caffe"))
        _copy_elf(gtest, os.path.join(bindir, "caffe-gtest"))
        elves = [os.path.join(bindir, "caffe"), os.path.join(bindir, "caffe-gtest")]
        elves += pack_python(prefix, root)
        keep, cut = closure([os.path.join(prefix, "bin", "caffe"), gtest, *elves])
        for name, path in sorted(keep.items()):
            _copy_elf(path, os.path.join(libdir, name))
        elves += [os.path.join(libdir, n) for n in keep]
        for name, path in sorted(cut.items()):
            users = [e for e in elves if name in _needed(e)]
            logging.info("stub %s: %d symbols for %s", name, make_stub(name, path, users, libdir, tmp),
                         ", ".join(os.path.basename(u) for u in users))
        pack_data(root)
        with open(os.path.join(root, "BUILD"), "w") as f:
            f.write(f"{'cpu' if a.cpu else 'gpu'} {prefix}\n")
        sizes = {d: sum(os.path.getsize(os.path.join(w, n)) for w, _, ns in os.walk(os.path.join(root, d))
                        for n in ns) for d in ("bin", "lib", "python", "data")}
        archive = os.path.join(a.output, "dsd-gpu.tar.xz")
        with tarfile.open(archive + ".tmp", "w:xz", preset=a.preset) as tar:
            tar.add(root, arcname="dsd-gpu")
        os.replace(archive + ".tmp", archive)
    size = os.path.getsize(archive)
    print(f"{'CPU' if a.cpu else 'GPU'} build {prefix}")
    print("unpacked MiB: " + ", ".join(f"{d} {s / 2**20:.1f}" for d, s in sizes.items()))
    print(f"{archive} (xz -{a.preset}): {size / 2**20:.1f} MiB of the {LIMIT >> 20} MiB a device run carries "
          f"({'fits' if size < LIMIT else 'TOO BIG'}, the working tree travels beside it)")
    return 0 if size < LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
