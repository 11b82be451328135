"""Test helpers shared by the test modules (which never import each other): one way to run a tool, small real
set-ups (tiny LMDBs, the small net, a dense caffemodel), a small private tmpfs for full-disk tests, and the
reference files of ../shared.

Reference files are optional: a user clones the repository alone. :func:`shared_file` skips the test with a reason
naming the file and where to get it when it is absent.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dsd_caffe.fashion_mnist import FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("DSD_SHARED", os.path.join(ROOT, "..", "shared"))
REFERENCE = os.path.join(SHARED, "reference")
DSD_TRAINVAL = os.path.join(REFERENCE, "squeezenet-dsd", "trainval.prototxt")
DC_NET = os.path.join(REFERENCE, "squeezenet-deep-compression", "compressed_SqueezeNet.net")
DC_DEPLOY = os.path.join(REFERENCE, "squeezenet-deep-compression", "SqueezeNet_deploy.prototxt")
IMAGENET_CLASSES = os.path.join(REFERENCE, "imagenet", "classes.txt")
LENET = os.path.join(REFERENCE, "caffe-models", "mnist", "lenet_train_test.prototxt")
LENET_SOLVER = os.path.join(REFERENCE, "caffe-models", "mnist", "lenet_solver.prototxt")
FASHION = FASHION_MNIST_DIR
#: where each reference file comes from (for skip reasons)
ORIGIN = {
    DSD_TRAINVAL: "github.com/songhan/SqueezeNet-DSD-Training (trainval.prototxt)",
    DC_NET: "github.com/songhan/SqueezeNet-Deep-Compression (compressed_SqueezeNet.net)",
    DC_DEPLOY: "github.com/songhan/SqueezeNet-Deep-Compression (SqueezeNet_deploy.prototxt)",
    IMAGENET_CLASSES: "Caffe's data/ilsvrc12/synset_words.txt (class names in Caffe's order)",
    LENET: "github.com/BVLC/caffe examples/mnist/lenet_train_test.prototxt",
    LENET_SOLVER: "github.com/BVLC/caffe examples/mnist/lenet_solver.prototxt",
}


def shared_file(path):
    """``path`` when the reference file exists, else skip the test naming it and where it comes from."""
    if not os.path.exists(path):
        pytest.skip(f"reference file {os.path.relpath(path, SHARED)} is not in {os.path.abspath(SHARED)} (a "
                    f"clone of the repository alone has no ../shared); it comes from {ORIGIN.get(path, 'shared/')}"
                    "; set DSD_SHARED to a folder holding reference/ to run this test")
    return path


def tool_cmd(name, *args):
    """The command line of ``tools/<name>.py`` with this interpreter (a dotted ``name`` such as ``dsd_caffe.zoo``:
    ``python -m name``), for :func:`tool` and for tests that start a tool with Popen."""
    script = ["-m", name] if "." in name else [os.path.join(ROOT, "tools", f"{name}.py")]
    return [sys.executable, *script, *map(str, args)]


def tool(name, *args, timeout=600, env=None, cwd=None):
    """Run :func:`tool_cmd` ``(name, *args)``; returns the CompletedProcess (text)."""
    return subprocess.run(tool_cmd(name, *args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def tool_parser(module):
    """The argparse parser a tool module (``dsd_caffe.commands.prune``) hands to ``cli.main``, captured without
    running the tool."""
    import importlib
    from unittest import mock

    captured = {}
    mod = importlib.import_module(module)
    with mock.patch("dsd_caffe.cli.main", lambda p, fn, argv=None: captured.setdefault("p", p)):
        mod.main([])
    return captured["p"]


def write_tiny_lmdb(path, images, labels):
    """Write uint8 images (N, C, H, W) and int labels as raw caffe Datums, keys 00000000, 00000001, ..."""
    import lmdb

    from dsd_caffe.caffeproto import caffe_pb2

    pb2 = caffe_pb2()
    images = np.asarray(images, dtype=np.uint8)
    env = lmdb.open(str(path), map_size=max(1 << 20, images.nbytes * 4))
    with env.begin(write=True) as txn:
        for i, (img, lab) in enumerate(zip(images, labels)):
            d = pb2.Datum(channels=img.shape[0], height=img.shape[1], width=img.shape[2],
                          data=img.tobytes(), label=int(lab))
            txn.put(f"{i:08d}".encode(), d.SerializeToString())
    env.close()
    return str(path)


def copy_beside(src, name):
    """A copy of the run folder ``src`` beside it, named ``name`` (its data sources are paths relative to the
    LMDBs next to it); returns its path."""
    dst = os.path.join(os.path.dirname(src), name)
    shutil.copytree(src, dst)
    return dst


def copy_repo(tmp_path):
    """A copy of this checkout's tracked files in ``tmp_path``/repo, with this checkout's venv linked as its
    ``.venv`` (as after `make setup`), for running documented commands literally; returns its path."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "repo"
    for rel in files:
        os.makedirs(copy / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), copy / rel)
    os.symlink(sys.prefix, copy / ".venv")
    return copy


def small_setup(folder, n_train=16, n_val=8, batch=4, seed=0):
    """Random-pixel LMDBs, the small SqueezeNet trainval (sources relative to ``folder``) and a dense caffemodel
    (its filler weights, seeded) in ``folder``. Returns (trainval path, caffemodel path)."""
    from dsd_caffe import fileio, netgen, sources
    from dsd_caffe.caffe_env import import_caffe, make_net

    caffe = import_caffe()
    rng = np.random.default_rng(seed)
    write_tiny_lmdb(os.path.join(folder, "train_lmdb"), rng.integers(0, 256, (n_train, 1, 28, 28)),
                    rng.integers(0, 10, n_train))
    write_tiny_lmdb(os.path.join(folder, "val_lmdb"), rng.integers(0, 256, (n_val, 1, 28, 28)),
                    rng.integers(0, 10, n_val))
    net = netgen.small_squeezenet("train_lmdb", "val_lmdb", train_batch=batch, test_batch=batch)
    model = os.path.join(folder, "trainval.prototxt")
    fileio.write_prototxt(model, net)
    caffe.set_random_seed(seed)
    weights = os.path.join(folder, "dense.caffemodel")
    make_net(sources.absolute_sources(net, folder), "TRAIN").save(weights)
    return model, weights


def in_small_tmpfs(tmp_path, size, script):
    """Run the shell ``script`` with a tmpfs of ``size`` mounted on $DISK in a private mount namespace, which
    nothing outside it sees (the mount goes with the process); $PY and $TOOLS are set. Skips where this machine
    does not allow it (it needs unshare(1) and the right to mount, i.e. root or a user namespace)."""
    disk = tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    cmd = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$DISK" || exit 97\n{script}']
    env = dict(os.environ, DISK=str(disk), PY=sys.executable, TOOLS=os.path.join(ROOT, "tools"))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except FileNotFoundError:
        pytest.skip("no unshare(1) on this machine: no private tmpfs for a full-disk test")
    if r.returncode == 97 or r.stderr.startswith("unshare:"):
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {r.stderr.strip()[:300]}")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout
