"""solvers: epochs -> max_iter and test_iter with known answers, DeepScale's dense defaults, the committed solver
files parse, and `caffe train` runs a generated solver from its own folder with the relative paths it holds."""
import glob
import os
import subprocess

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import write_tiny_lmdb
from dsd_caffe import repogen, solvers
from dsd_caffe.caffe_env import caffe_binary, caffe_pb2
from dsd_caffe.fileio import read_solver_prototxt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("epochs,train,batch,iter_size,expect", [
    (1, 1000, 100, 1, 10), (1, 1001, 100, 1, 11), (2, 1000, 64, 1, 32), (20, 1281167, 32, 16, 50046),
    (0.1, 1000, 10, 1, 10), (0.5, 3, 1, 1, 2), (1, 5, 64, 1, 1), (8, 55000, 64, 1, 6875)])
def test_epochs_to_iters(epochs, train, batch, iter_size, expect):
    assert solvers.epochs_to_iters(epochs, train, batch, iter_size) == expect


@pytest.mark.parametrize("size,batch,expect", [(50000, 50, 1000), (10000, 64, 157), (1, 100, 1), (100, 100, 1),
                                               (101, 100, 2)])
def test_test_iters(size, batch, expect):
    assert solvers.test_iters(size, batch) == expect


@pytest.mark.parametrize("args", [(0, 10, 1), (-1, 10, 1), (float("inf"), 10, 1), (1, 0, 1), (1, 10, 0),
                                  (1, 10, 1.5), (True, 10, 1), ("1", 10, 1)])
def test_epochs_to_iters_rejects_bad_values(args):
    with pytest.raises(ValueError):
        solvers.epochs_to_iters(*args)


def test_dense_default_is_deepscale():
    s = solvers.dense_solver("trainval.prototxt")
    for field, value in solvers.DEEPSCALE_DENSE.items():
        if field != "batch_size":
            assert getattr(s, field) == pytest.approx(value), field
    assert s.test_iter == [1000] and s.net == "trainval.prototxt" and s.type == "SGD"
    assert s.solver_mode == caffe_pb2().SolverParameter.CPU
    # 170000 iterations of 32 x 16 images: about 68 ImageNet epochs
    assert s.max_iter == 170000 and 67 < 170000 * 32 * 16 / solvers.IMAGENET_TRAIN < 68


@pytest.mark.parametrize("builder,base_lr", [(solvers.dense_solver, 0.04), (solvers.sparse_solver, 0.004),
                                             (solvers.redense_solver, 1e-4)])
def test_iterations_follow_from_sizes(builder, base_lr):
    s = builder("net.prototxt", train_size=10000, test_size=999, batch_size=50, iter_size=2, test_batch=100,
                epochs=3)
    assert s.max_iter == 300 and s.test_iter == [10] and s.iter_size == 2
    assert s.base_lr == pytest.approx(base_lr)
    s = builder("net.prototxt", train_size=10000, test_size=999, max_iter=7)
    assert s.max_iter == 7 and s.test_interval == 7 and s.snapshot == 1
    with pytest.raises(ValueError, match="not both"):
        builder("net.prototxt", epochs=1, max_iter=5)
    with pytest.raises(TypeError, match="bogus"):
        builder("net.prototxt", bogus=1)


def test_phase_defaults_come_from_the_one_table():
    table = solvers.DEFAULTS["imagenet"]
    for phase, builder in (("sparse", solvers.sparse_solver), ("redense", solvers.redense_solver)):
        row, s = table[phase], builder("n")
        assert s.max_iter == solvers.epochs_to_iters(row.epochs, solvers.IMAGENET_TRAIN, 32, row.iter_size)
        assert (s.base_lr, s.iter_size, s.snapshot) == (pytest.approx(row.base_lr), row.iter_size,
                                                        solvers.snapshot_interval(s.max_iter, row.snapshots))
    assert solvers.redense_solver("n").base_lr == pytest.approx(1e-4)  # the DSD paper's redense rate
    assert table["redense"].epochs == 20
    demo = solvers.DEFAULTS["fashion-mnist"]  # what make demo trains with
    assert [(demo[p].base_lr, demo[p].max_iter) for p in solvers.PHASES] == [(0.04, 4000), (0.004, 1000),
                                                                               (0.004, 1000)]
    s = solvers.dense_solver("n", lr_policy="step", gamma=0.1, stepsize=100, max_iter=300)
    assert (s.lr_policy, s.stepsize, s.gamma) == ("step", 100, pytest.approx(0.1))
    with pytest.raises(ValueError, match="lr_policy"):
        solvers.dense_solver("n", lr_policy="cosine")
    with pytest.raises(ValueError, match="--base-lr must be a positive"):
        solvers.dense_solver("n", base_lr=0)
    with pytest.raises(TypeError):
        solvers.dense_solver(None)


def test_committed_solvers_are_the_table():
    """Every committed solver is what solvers.DEFAULTS gives for its net's recipe (a default changes in one place,
    and tools/generate.py --force writes it here)."""
    recipes = {"squeezenet_v1.0": "imagenet", "small_squeezenet": "fashion-mnist"}
    for path in sorted(glob.glob(os.path.join(ROOT, "solvers", "*", "*_solver.prototxt"))):
        net, phase = os.path.basename(os.path.dirname(path)), os.path.basename(path).split("_")[0]
        s, row = read_solver_prototxt(path), solvers.DEFAULTS[recipes[net]][phase]
        assert (s.base_lr, s.lr_policy, s.momentum, s.weight_decay, s.iter_size) == (
            pytest.approx(row.base_lr), row.lr_policy, pytest.approx(row.momentum), pytest.approx(row.weight_decay),
            row.iter_size), path
        assert s.snapshot == solvers.snapshot_interval(s.max_iter, row.snapshots), path
        if row.max_iter:
            assert s.max_iter == row.max_iter, path
        assert ("sparse_trainval" in s.net) == (phase == "sparse"), path  # a "sparse" solver holds the mask layer


def test_committed_solvers_parse_and_match_their_sizes():
    paths = sorted(glob.glob(os.path.join(ROOT, "solvers", "*", "*_solver.prototxt")))
    assert len(paths) == 6
    for path in paths:
        s = read_solver_prototxt(path)
        folder = os.path.dirname(path)
        assert not os.path.isabs(s.net) and not os.path.isabs(s.snapshot_prefix)
        assert os.path.isfile(os.path.join(folder, s.net)), f"{path}: net {s.net} is not beside it"
        net = repogen.generated_files()[os.path.relpath(os.path.normpath(os.path.join(folder, s.net)), ROOT)]
        train_batch, test_batch = [l.data_param.batch_size for l in net.layer if l.type == "Data"]
        if "small_squeezenet" in path:
            sizes = (repogen.FASHION_TRAIN, repogen.FASHION_VAL)
        else:
            sizes = (solvers.IMAGENET_TRAIN, solvers.IMAGENET_VAL)
        assert s.test_iter == [solvers.test_iters(sizes[1], test_batch)], path
        if "squeezenet_v1.0/" in path and "dense_solver" not in path:  # dense: DeepScale's 170000; small: iterations
            epochs = s.max_iter * train_batch * s.iter_size / sizes[0]
            assert s.max_iter == solvers.epochs_to_iters(round(epochs), sizes[0], train_batch, s.iter_size), path
    resolved = solvers.load_solver(paths[0])
    assert os.path.isabs(resolved.net) and os.path.isfile(resolved.net)
    assert os.path.dirname(resolved.snapshot_prefix) == os.path.dirname(paths[0])


def test_relative_net():
    assert solvers.relative_net("/a/solvers/x/s.prototxt", "/a/models/x/t.prototxt") == "../../models/x/t.prototxt"


def test_caffe_train_runs_a_generated_solver_from_its_folder(tmp_path):
    """The committed layout in a tmp root: data/, models/small_squeezenet/, solvers/small_squeezenet/."""
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "fashion_mnist").mkdir(parents=True)
    for split, n in (("train", 16), ("val", 8)):
        write_tiny_lmdb(tmp_path / "data" / "fashion_mnist" / f"{split}_lmdb",
                        rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n))
    repogen.generate(tmp_path)
    solver_dir = tmp_path / "solvers" / "small_squeezenet"
    s = read_solver_prototxt(solver_dir / "dense_solver.prototxt")
    s.max_iter, s.test_interval, s.test_iter[0], s.snapshot = 2, 2, 1, 0
    from dsd_caffe.fileio import write_prototxt

    write_prototxt(solver_dir / "quick_solver.prototxt", s)
    env = dict(os.environ, GLOG_minloglevel="0", OMP_NUM_THREADS="1")
    r = subprocess.run([caffe_binary(), "train", "-solver", "quick_solver.prototxt"], cwd=solver_dir, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy_top1 =" in r.stderr
    assert (solver_dir / "dense_iter_2.caffemodel").is_file()


@given(st.integers(1, 100), st.integers(1, 2_000_000), st.integers(1, 512), st.integers(1, 32))
def test_epochs_to_iters_is_the_smallest_count_covering_the_epochs(epochs, train, batch, iter_size):
    iters = solvers.epochs_to_iters(epochs, train, batch, iter_size)
    per_iter = batch * iter_size
    assert iters * per_iter >= epochs * train > (iters - 1) * per_iter


@given(st.integers(1, 1_000_000), st.integers(1, 1000))
def test_test_iters_covers_the_set_once(size, batch):
    n = solvers.test_iters(size, batch)
    assert n * batch >= size > (n - 1) * batch
