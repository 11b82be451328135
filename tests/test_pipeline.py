"""The DSD run (tools/dsd.py, dsd_caffe.pipeline) on the small net with tiny LMDBs: cycles, the control arm and
its invariants, seeds and the verdict, one writer per run folder, and interruptions (Ctrl-C, SIGTERM) that end
with exit status 130 and resume."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dsd_caffe import fileio, masks, phases, pipeline, training
from dsd_caffe.solvers import Schedule
from helpers import ROOT, small_setup

caffe = pytest.importorskip("caffe")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pipeline"))
    model, weights = small_setup(folder)
    return folder, model, weights


def dsd_args(setup, out, *extra, sparse=6, redense=4):
    folder, model, weights = setup
    return [sys.executable, os.path.join(ROOT, "tools", "dsd.py"), "--model", model, "--weights", weights,
            "--output", str(out), "--ratio", "3x", "--sparse-max-iter", str(sparse), "--redense-max-iter",
            str(redense), "--snapshot", "2", "--sparse-base-lr", "0.05", "--iterations", "2", *map(str, extra)]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def test_cycles_and_the_finished_run(setup, tmp_path):
    out = tmp_path / "dsd"
    r = run(dsd_args(setup, out, "--cycles", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    state = fileio.read_json(out / pipeline.STATE)
    assert state["finished"] and [p["name"] for p in state["phases"]] == [
        "dense", "cycle1-pruned", "cycle1-sparse", "cycle1-redense", "cycle2-pruned", "cycle2-sparse",
        "cycle2-redense"]
    assert state["final_model"] == os.path.join("cycle2-redense", phases.REDENSE)
    # DSDSD: the second pruning starts from the first redense model
    prov = fileio.read_json(fileio.sidecar_path(out / "cycle2-sparse" / phases.PRUNED))
    assert prov["source"] == str(out / "cycle1-redense" / phases.REDENSE)
    assert all(p["accuracy"] is not None for p in state["phases"])
    assert state["phases"][2]["density"] == pytest.approx(1 / 3, abs=0.002)
    assert (out / pipeline.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.stdout.splitlines()[0].split() == ["model", "top-1", "top-5", "density"]
    r = run(dsd_args(setup, out, "--cycles", 2))
    assert r.returncode == 2 and "finished DSD run" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_control_arm_invariants(setup, tmp_path):
    """Both arms start from the same dense caffemodel (by hash), take the same iterations at the same learning
    rates (the solvers they ran, read back), and the control never holds a mask layer."""
    folder, model, weights = setup
    config = pipeline.RunConfig(model, weights, phases.PruneConfig(ratio="3x"),
                                Schedule(max_iter=6, snapshot=2, base_lr=0.05, flag="sparse"),
                                Schedule(max_iter=4, snapshot=2, flag="redense"), control=True, iterations=2)
    out = tmp_path / "run"
    state = pipeline.run_dsd(config, out)
    dense_hash = training.file_record(weights)["sha256"]
    assert state["dense_model"]["sha256"] == dense_hash
    assert training.record_of(str(out / "control1-sparse"))["weights"]["sha256"] == dense_hash
    assert fileio.read_json(fileio.sidecar_path(out / "cycle1-sparse" / phases.PRUNED))["source_sha256"] == \
        dense_hash
    for phase in ("sparse", "redense"):
        dsd = fileio.read_solver_prototxt(out / f"cycle1-{phase}" / phases.solver_file(phase))
        control = fileio.read_solver_prototxt(out / f"control1-{phase}" / phases.solver_file("dense"))
        for s in (dsd, control):
            s.ClearField("net")
            s.ClearField("snapshot_prefix")
        assert control == dsd, phase  # every other field: iterations, learning rates, policy, seed, momentum...
        dsd_it = fileio.read_json(fileio.sidecar_path(out / f"cycle1-{phase}" / phases.model_file(phase)))
        ctl = fileio.read_json(fileio.sidecar_path(out / f"control1-{phase}" / phases.model_file("dense")))
        assert dsd_it["iteration"] == ctl["iteration"] and ctl["arm"] == "control" and ctl["schedule"] == phase
        net = fileio.read_net_prototxt(out / f"control1-{phase}" / phases.net_file("dense"))
        assert not any(masks.is_mask_layer(l) for l in net.layer)
    # the control's second step starts where its first ended, as DSD's redense starts from its sparse model
    assert training.record_of(str(out / "control1-redense"))["weights"]["path"] == \
        str(out / "control1-sparse" / phases.DENSE)
    table = pipeline.results_table(state)
    assert list(table) == ["dense", "sparse", "DSD", "control"] and table["control"]["density"] == 1.0
    assert "DSD - control:" in pipeline.results_text(state)
    points, marks = pipeline.curves(str(out), state)
    assert set(points) == {"sparse", "redense", "control"} and len(marks) == 1
    assert max(i for i, _ in points["control"]) == max(i for i, _ in points["redense"]) == 10


def test_control_with_two_seeds_and_the_verdict(setup, tmp_path):
    out = tmp_path / "seeds"
    r = run(dsd_args(setup, out, "--control", "--seeds", 2, "--jobs", 2, "--holdout-source",
                     os.path.join(setup[0], "val_lmdb")))
    assert r.returncode == 0, r.stderr[-3000:]
    v = fileio.read_json(out / pipeline.VERDICT)
    assert v["seeds"] == [0, 1] and v["split"] == "holdout" and len(v["gains"]) == 2
    for seed in (0, 1):
        state = fileio.read_json(out / f"seed{seed}" / pipeline.STATE)
        assert state["finished"] and "holdout" in state["phases"][-1]
        gain = pipeline.results_table(state)
        assert v["gains"][seed] == pytest.approx(100 * (gain["DSD"]["top1"] - gain["control"]["top1"]))
        solver = fileio.read_solver_prototxt(out / f"seed{seed}" / "cycle1-sparse" / phases.SPARSE_SOLVER)
        assert solver.random_seed == seed
    assert "seed 0:" in r.stdout and "seed 1:" in r.stdout and v["sentence"] in r.stdout
    r = run(dsd_args(setup, tmp_path / "x", "--seeds", 2))
    assert r.returncode == 2 and "--control" in r.stderr


def _start(args):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _wait_for(cond, proc, timeout=120):
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "condition never held"
        time.sleep(0.02)


def _iteration(log):
    found = re.findall(r"Iteration (\d+)", open(log).read()) if os.path.exists(log) else []
    return int(found[-1]) if found else 0


def test_two_runs_in_one_folder(setup, tmp_path):
    """A second run on a live run's folder is refused, --force or not, naming the live pid; the first finishes."""
    out = tmp_path / "dsd"
    first = _start(dsd_args(setup, out, sparse=4000))
    try:
        _wait_for(lambda: _iteration(out / "cycle1-sparse" / training.LOG) > 10, first)
        for extra in ((), ("--force",)):
            r = run(dsd_args(setup, out, *extra, sparse=4000))
            assert r.returncode == 2, r.stderr
            assert f"in use by another dsd-caffe process (pid {first.pid})" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
        assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    state = fileio.read_json(out / pipeline.STATE)
    assert state["finished"] and fileio.read_json(fileio.sidecar_path(out / "cycle1-sparse" / phases.SPARSE))[
        "iteration"] == 4000


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_ends_with_130_and_resumes(setup, tmp_path, how):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM (to the tool only): one line
    naming the iteration, exit status 130; the same command resumes from the snapshot Caffe wrote on stopping."""
    out = tmp_path / "dsd"
    args = dsd_args(setup, out, sparse=4000)
    proc = _start(args)
    log = out / "cycle1-sparse" / training.LOG
    try:
        _wait_for(lambda: _iteration(log) > 20, proc)
        os.killpg(proc.pid, signal.SIGINT) if how == "ctrl-c" else proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"dsd\.py: sparse: interrupted at iteration (\d+); run the same command again to resume", last)
    assert m, err[-2000:]
    snaps = training.snapshots(str(out / "cycle1-sparse" / "snapshots"), "sparse")
    assert snaps and snaps[0].iteration == int(m.group(1))  # Caffe snapshotted where it stopped
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr and fileio.read_json(out / pipeline.STATE)["finished"]
    masks.check_masked(str(out / "cycle1-sparse" / phases.SPARSE),
                       masks.load_masks(str(out / "cycle1-sparse" / phases.MASKS)))


@pytest.mark.parametrize("engine", ["binary", "pycaffe"])
def test_training_tools_show_progress_and_stop_cleanly(setup, tmp_path, engine):
    """retrain_dense.py: the log lines a person reads (rounded to 4 digits, where Caffe's log is), and Ctrl-C."""
    folder, model, weights = setup
    args = [sys.executable, os.path.join(ROOT, "tools", "retrain_dense.py"), "--model", model, "--weights", weights,
            "--output", str(tmp_path / "r"), "--max-iter", "20000", "--engine", engine]
    proc = _start(args)
    try:
        _wait_for(lambda: _iteration(tmp_path / "r" / training.LOG) > 1100, proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert f"Caffe's log: {tmp_path / 'r' / training.LOG}" in err
    tests = re.findall(r"redense: iteration (\d+)/20000, training loss (\S+); test: accuracy_top1 (\S+), "
                       r"accuracy_top5 (\S+), loss (\S+)", err)
    assert tests and tests[0][0] == "1000", err[-2000:]  # Caffe tests every 1,000 iterations here
    for _, *numbers in tests:
        assert all(re.fullmatch(r"\d+\.\d{4}", n) for n in numbers), numbers
    assert re.search(r"redense: interrupted at iteration \d+; run the same command again to resume$", err.strip())


def test_seeds_in_parallel_stop_on_sigterm_and_resume(setup, tmp_path):
    """SIGTERM to dsd.py alone (its seed workers get no signal from a terminal): it forwards the interrupt, each
    seed stops at a snapshot, exit status 130 at once, and the same command finishes every seed."""
    out = tmp_path / "seeds"
    args = dsd_args(setup, out, "--control", "--seeds", 2, "--jobs", 2, sparse=6000)
    proc = _start(args)
    try:
        _wait_for(lambda: all(_iteration(out / f"seed{s}" / "cycle1-sparse" / training.LOG) > 20 for s in (0, 1)),
                  proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and err.strip().endswith("dsd.py: interrupted; run the same command again to "
                                                             "resume"), err[-2000:]
    for s in (0, 1):
        snaps = training.snapshots(str(out / f"seed{s}" / "cycle1-sparse" / "snapshots"), "sparse")
        assert snaps and snaps[0].iteration < 6000
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert fileio.read_json(out / pipeline.VERDICT)["seeds"] == [0, 1]
