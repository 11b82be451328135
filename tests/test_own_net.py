"""A net no one here wrote, as a new user brings it: BVLC's LeNet with its own solver (``--solver``: every phase
inherits it but for DSD's base_lr and length), and seeds that vary something (the TRAIN data order) or nothing (a
net without dropout read in a fixed order: no verdict)."""
import os

import pytest

from dsd_caffe import fileio, phases, pipeline, runreport, seedpool, solvers
from dsd_caffe.caffeproto import caffe_pb2
from dsd_caffe.solvers import Schedule
from helpers import LENET, LENET_SOLVER, shared_file, small_setup, tool_cmd, write_tiny_lmdb

caffe = pytest.importorskip("caffe")


def _lmdbs(folder, n_train=16, n_val=8):
    import numpy as np

    rng = np.random.default_rng(0)
    train = write_tiny_lmdb(os.path.join(folder, "train_lmdb"), rng.integers(0, 256, (n_train, 1, 28, 28)),
                            rng.integers(0, 10, n_train))
    val = write_tiny_lmdb(os.path.join(folder, "val_lmdb"), rng.integers(0, 256, (n_val, 1, 28, 28)),
                          rng.integers(0, 10, n_val))
    return train, val


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """BVLC's LeNet trainval as written (its sources given as flags), its solver, tiny LMDBs and a dense model."""
    from dsd_caffe import sources
    from dsd_caffe.caffe_env import make_net

    model, solver = shared_file(LENET), shared_file(LENET_SOLVER)
    folder = str(tmp_path_factory.mktemp("lenet"))
    train, val = _lmdbs(folder)
    net = sources.read_net(model, train, val)
    caffe.set_random_seed(0)
    weights = os.path.join(folder, "lenet.caffemodel")
    make_net(net, "TRAIN").save(weights)
    return model, solver, weights, train, val


#: what the phases take from BVLC's lenet_solver.prototxt
LENET_INHERITED = dict(momentum=0.9, weight_decay=0.0005, lr_policy="inv", gamma=0.0001, power=0.75, display=100,
                       test_interval=500)


def test_lenet_phases_inherit_its_own_solver(lenet, tmp_path):
    model, solver, weights, train, val = lenet
    config = pipeline.RunConfig(model, weights, phases.PruneConfig(ratio="3x"), Schedule(max_iter=4, flag="sparse"),
                                Schedule(max_iter=4, flag="redense"), iterations=1, train_source=train,
                                test_source=val, control=True, seed=3, solver=solver)
    out = tmp_path / "run"
    state = pipeline.run_dsd(config, out)
    assert state["finished"] and state["config"]["solver"] == os.path.abspath(solver)  # run paths are absolute
    pb2 = caffe_pb2()
    mode = pb2.SolverParameter.CPU  # lenet's says GPU: the device is --gpu's, never the template's
    for folder, phase, file_phase in (("cycle1-sparse", "sparse", "sparse"), ("cycle1-redense", "redense", "redense"),
                                      (pipeline.control_step(1, "sparse"), "sparse", "dense"),
                                      (pipeline.control_step(1, "redense"), "redense", "dense")):
        s = fileio.read_solver_prototxt(out / folder / phases.solver_file(file_phase))
        for field, value in LENET_INHERITED.items():
            assert getattr(s, field) == pytest.approx(value), (folder, field)
        assert list(s.test_iter) == [100] and s.solver_mode == mode and s.iter_size == 1, folder
        # DSD's own: the phase's base_lr (the recipe's) and length, snapshots, seed and files
        assert s.base_lr == pytest.approx(solvers.DEFAULTS["imagenet"][phase].base_lr) and s.max_iter == 4
        assert s.random_seed == 3 and s.snapshot_prefix == f"snapshots/{file_phase}"
        assert s.net == phases.net_file(file_phase)


def test_flags_win_over_the_template_and_train_sparse_takes_it_again(lenet, tmp_path):
    model, solver, weights, train, val = lenet
    template = solvers.read_template(solver)
    s = solvers.build("sparse", "net.prototxt", solvers.DataSizes(640, 8, 64, 100),
                      Schedule(base_lr=0.02, epochs=2, momentum=0.5, lr_policy="fixed"), template=template)
    assert (s.base_lr, s.max_iter, s.momentum, s.lr_policy, s.weight_decay) == (
        pytest.approx(0.02), 20, pytest.approx(0.5), "fixed", pytest.approx(0.0005))
    # prune.py records the template; train_sparse.py rebuilds the solver from it where the data is
    out = tmp_path / "pruned"
    phases.prune(phases.Inputs(model, weights, train, val), out, phases.PruneConfig(ratio="3x"),
                 Schedule(max_iter=2), solver=solver)
    written = fileio.read_solver_prototxt(out / phases.SPARSE_SOLVER)
    assert written.lr_policy == "inv" and written.weight_decay == pytest.approx(0.0005)
    (out / phases.SPARSE_SOLVER).unlink()
    phases.train_sparse(out)
    rebuilt = fileio.read_solver_prototxt(out / phases.SPARSE_SOLVER)
    assert rebuilt == written


def test_the_plan_is_printed_and_the_fallback_recipe_named(lenet, tmp_path):
    model, solver, weights, train, val = lenet
    import subprocess

    args = tool_cmd("prune", "--model", model, "--weights", weights, "--output", tmp_path / "p", "--ratio", "3x",
                    "--train-source", train, "--test-source", val)
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "records no recipe and no --solver was given: the phases take the imagenet recipe" in r.stderr
    r = subprocess.run(args[:-8] + ["--output", str(tmp_path / "q"), "--ratio", "3x", "--train-source", train,
                                    "--test-source", val, "--solver", solver], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "no --solver" not in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ seeds
@pytest.fixture(scope="module")
def nodropout(tmp_path_factory):
    """The small net without its Dropout layer: nothing random in it, so only the data order can vary."""
    folder = str(tmp_path_factory.mktemp("nodropout"))
    model, weights = small_setup(folder)
    net = fileio.read_net_prototxt(model)
    keep = [l for l in net.layer if l.type != "Dropout"]
    del net.layer[:]
    net.layer.extend(keep)
    fileio.write_prototxt(model, net)
    return folder, model, weights


def _seeds(setup, out, order):
    folder, model, weights = setup
    config = pipeline.RunConfig(model, weights, phases.PruneConfig(ratio="3x"),
                                Schedule(max_iter=6, snapshot=2, base_lr=0.05, flag="sparse"),
                                Schedule(max_iter=4, snapshot=2, flag="redense"), iterations=2, control=True,
                                data_order=order)
    return seedpool.run_seeds(config, out, seeds=2, jobs=2)


def test_seeds_that_vary_nothing_give_no_verdict(nodropout, tmp_path):
    result = _seeds(nodropout, tmp_path / "fixed", "fixed")
    v = result["verdict"]
    digests = {runreport.weights_digest(tmp_path / "fixed" / f"seed{s}" / "cycle1-redense" / phases.REDENSE)
               for s in (0, 1)}
    assert len(digests) == 1  # the seeds changed only the solvers' random_seed, which this net never draws from
    assert (v.low, v.high, v.varied) == (None, None, ())
    assert v.sentence.startswith("No verdict: the 2 seeds varied nothing (their models are bit-identical)")
    assert fileio.read_json(tmp_path / "fixed" / runreport.VERDICT)["varied"] == []


def test_a_seeded_run_reads_the_data_in_its_own_order(nodropout, tmp_path):
    from dsd_caffe import lmdbio

    out = tmp_path / "shuffled"
    v = _seeds(nodropout, out, None)["verdict"]  # over several seeds the order is shuffled by default
    digests = {runreport.weights_digest(out / f"seed{s}" / "cycle1-redense" / phases.REDENSE) for s in (0, 1)}
    assert len(digests) == 2
    assert v.varied == ("the TRAIN data order (a copy of the TRAIN LMDB in each seed's order)",) and v.low is not None
    original = [(img.tobytes(), label) for _, img, label in lmdbio.read_lmdb(os.path.join(nodropout[0], "train_lmdb"))]
    orders = []
    for s in (0, 1):
        copy = out / f"seed{s}" / pipeline.SHUFFLED
        records = [(img.tobytes(), label) for _, img, label in lmdbio.read_lmdb(str(copy))]
        assert sorted(records) == sorted(original) and len(records) == len(original)  # every record, once
        orders.append(records)
        state = fileio.read_json(out / f"seed{s}" / pipeline.STATE)
        assert state["config"]["data_order"] == "shuffled"
        trainval = fileio.read_net_prototxt(out / f"seed{s}" / "cycle1-sparse" / phases.SPARSE_NET)
        assert trainval.layer[0].data_param.source == os.path.join("..", pipeline.SHUFFLED)
    assert orders[0] != orders[1] != original


def test_dense_per_seed_trains_each_seeds_own_dense_model_with_your_solver(nodropout, tmp_path, capfd):
    folder, model, weights = nodropout
    solver = tmp_path / "my_solver.prototxt"
    solver.write_text('net: "elsewhere.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\nmomentum: 0.8\nmax_iter: 6\n'
                      'test_iter: 1\ntest_interval: 3\nsnapshot: 100\nsnapshot_prefix: "x"\n')
    config = pipeline.RunConfig(model, weights, phases.PruneConfig(ratio="3x"),
                                Schedule(max_iter=4, flag="sparse"), Schedule(max_iter=4, flag="redense"),
                                iterations=2, control=True, data_order="fixed", dense_per_seed=True,
                                solver=str(solver))
    out = tmp_path / "run"
    v = seedpool.run_seeds(config, out, seeds=2, jobs=1)["verdict"]
    assert v.varied == ("the dense model (trained per seed from the net's fillers)",)
    digests = set()
    for s in (0, 1):
        dense = out / f"seed{s}" / "dense" / phases.DENSE
        prov = fileio.read_json(fileio.sidecar_path(dense))
        assert (prov["seed"], prov["iteration"], prov["phase"]) == (s, 6, "dense")
        written = fileio.read_solver_prototxt(out / f"seed{s}" / "dense" / phases.solver_file("dense"))
        assert (written.max_iter, written.base_lr, written.lr_policy, written.momentum, written.random_seed) == (
            6, pytest.approx(0.01), "fixed", pytest.approx(0.8), s)
        pruned = fileio.read_json(fileio.sidecar_path(out / f"seed{s}" / "cycle1-sparse" / phases.PRUNED))
        assert pruned["source"] == str(dense)  # DSD and its control start from the seed's own dense model
        state = fileio.read_json(out / f"seed{s}" / pipeline.STATE)
        assert state["phases"][0]["model"] == os.path.join("dense", phases.DENSE)
        digests.add(runreport.weights_digest(dense))
    assert len(digests) == 2
    # --jobs 1: one worker process per seed, and each log line carries the seed it is about
    err = capfd.readouterr().err
    for s in (0, 1):
        lines = [l for l in err.splitlines() if f" seed {s} dsd_caffe.training: dense: training" in l]
        assert len(lines) == 1 and f"seed{s}" in lines[0], err[-3000:]


def test_recorded_settings_are_the_values_given_not_float32_noise():
    from dsd_caffe import training

    s = solvers.build("sparse", "n.prototxt", solvers.DataSizes(100, 10, 10, 10),
                      Schedule(base_lr=0.004, momentum=0.95, weight_decay=0.0005))
    assert s.base_lr != 0.004  # Caffe's float32 holds 0.004000000189989805
    assert training.solver_summary(s) == {"base_lr": 0.004, "lr_policy": "poly", "power": 1.0, "max_iter": 200,
                                          "iter_size": 1, "momentum": 0.95, "weight_decay": 0.0005, "snapshot": 20,
                                          "random_seed": solvers.SEED, "type": "SGD"}


@pytest.mark.parametrize("code, logs", [
    ("import caffe, dsd_caffe; dsd_caffe.load(DEPLOY)", False),
    ("import dsd_caffe, caffe; dsd_caffe.load(DEPLOY)", False),
    ("import caffe, dsd_caffe; caffe.Net(DEPLOY, caffe.TEST)", True),  # Caffe's own call logs, as the README says
    ("import caffe, dsd_caffe; dsd_caffe.set_glog_level('WARNING'); caffe.Net(DEPLOY, caffe.TEST)", False),
])
def test_the_readme_glog_claim(code, logs):
    import subprocess
    import sys

    from helpers import ROOT

    deploy = repr(os.path.join(ROOT, "models", "small_squeezenet", "deploy.prototxt"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOG_")}
    r = subprocess.run([sys.executable, "-c", code.replace("DEPLOY", deploy)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("] Initializing net from parameters" in r.stderr) == logs, r.stderr[-500:]


def test_dsd_zoo_names_itself_in_its_usage():
    import subprocess
    import sys

    installed = os.path.join(os.path.dirname(sys.executable), "dsd-zoo")
    if not os.path.exists(installed):
        pytest.skip("dsd-zoo is not installed in this environment")
    for cmd, prog in (([installed], "dsd-zoo"), ([sys.executable, "-m", "dsd_caffe.zoo"], "python -m dsd_caffe.zoo")):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith(f"usage: {prog} "), r.stderr
