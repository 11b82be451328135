"""The DSD run (tools/dsd.py, dsd_caffe.pipeline) on the small net with tiny LMDBs: cycles, the control arm and
its invariants, seeds and the verdict, one writer per run folder, and interruptions (Ctrl-C, SIGTERM) that end
with exit status 130 and resume. The same for the phase tools: train_sparse.py interrupted, prune.py killed at
any moment, two prune.py or retrain_dense.py runs on one output."""
import os
import re
import signal
import subprocess
import time

import pytest

from dsd_caffe import fileio, masks, phases, pipeline, runreport, training
from dsd_caffe.solvers import Schedule
import paused_tool
from helpers import small_setup, tool_cmd

caffe = pytest.importorskip("caffe")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pipeline"))
    model, weights = small_setup(folder)
    return folder, model, weights


def dsd_args(setup, out, *extra, sparse=6, redense=4):
    folder, model, weights = setup
    return tool_cmd("dsd", "--model", model, "--weights", weights, "--output", out, "--ratio", "3x",
                    "--sparse-max-iter", sparse, "--redense-max-iter", redense, "--snapshot", 2,
                    "--sparse-base-lr", 0.05, "--iterations", 2, *extra)


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
    assert training.record_of(str(out / pipeline.control_step(1, "sparse")))["weights"]["sha256"] == dense_hash
    assert fileio.read_json(fileio.sidecar_path(out / "cycle1-sparse" / phases.PRUNED))["source_sha256"] == \
        dense_hash
    for phase in ("sparse", "redense"):
        dsd = fileio.read_solver_prototxt(out / f"cycle1-{phase}" / phases.solver_file(phase))
        control = fileio.read_solver_prototxt(out / pipeline.control_step(1, phase) / phases.solver_file("dense"))
        for s in (dsd, control):
            s.ClearField("net")
            s.ClearField("snapshot_prefix")
        assert control == dsd, phase  # every other field: iterations, learning rates, policy, seed, momentum...
        dsd_it = fileio.read_json(fileio.sidecar_path(out / f"cycle1-{phase}" / phases.model_file(phase)))
        ctl = fileio.read_json(fileio.sidecar_path(out / pipeline.control_step(1, phase) / phases.model_file("dense")))
        assert dsd_it["iteration"] == ctl["iteration"] and ctl["arm"] == "control" and ctl["schedule"] == phase
        net = fileio.read_net_prototxt(out / pipeline.control_step(1, phase) / phases.net_file("dense"))
        assert not any(masks.is_mask_layer(l) for l in net.layer)
    # the control's second step starts where its first ended, as DSD's redense starts from its sparse model
    assert training.record_of(str(out / pipeline.control_step(1, "redense")))["weights"]["path"] == \
        str(out / pipeline.control_step(1, "sparse") / phases.DENSE)
    table = runreport.results_table(state)
    assert list(table) == ["dense", "sparse", "DSD", "control"] and table["control"]["density"] == 1.0
    assert "DSD - control:" in runreport.results_text(state)
    points, marks = runreport.curves(str(out), state)
    assert set(points) == {"sparse", "redense", "control"} and len(marks) == 1
    assert max(i for i, _ in points["control"]) == max(i for i, _ in points["redense"]) == 10


def test_control_with_two_seeds_and_the_verdict(setup, tmp_path):
    out = tmp_path / "seeds"
    r = run(dsd_args(setup, out, "--control", "--seeds", 2, "--jobs", 2, "--holdout-source",
                     os.path.join(setup[0], "val_lmdb")))
    assert r.returncode == 0, r.stderr[-3000:]
    v = fileio.read_json(out / runreport.VERDICT)
    assert v["seeds"] == [0, 1] and v["split"] == "holdout" and len(v["gains"]) == 2
    for seed in (0, 1):
        state = fileio.read_json(out / f"seed{seed}" / pipeline.STATE)
        assert state["finished"] and "holdout" in state["phases"][-1]
        gain = runreport.results_table(state)
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


def _interrupt(args, log, after, how="ctrl-c"):
    """Start ``args``, wait until Caffe's ``log`` passes iteration ``after``, then Ctrl-C (SIGINT to the process
    group, as a terminal sends it) or SIGTERM (to the tool only). Returns (exit status, stderr)."""
    proc = _start(args)
    try:
        _wait_for(lambda: _iteration(log) > after, proc)
        os.killpg(proc.pid, signal.SIGINT) if how == "ctrl-c" else proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def test_two_runs_in_one_folder(setup, tmp_path):
    """A second run on a live run's folder is refused, --force or not, naming the live pid; the first finishes."""
    out = tmp_path / "dsd"
    first = _start(dsd_args(setup, out, sparse=4000))
    try:
        _wait_for(lambda: _iteration(out / "cycle1-sparse" / training.LOG) > 10, first)
        _refused_for(first.pid, dsd_args(setup, out, sparse=4000))
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
    code, err = _interrupt(args, out / "cycle1-sparse" / training.LOG, 20, how)
    assert code == 130, err[-2000:]
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
    args = tool_cmd("retrain_dense", "--model", model, "--weights", weights, "--output", tmp_path / "r",
                    "--max-iter", 20000, "--engine", engine)
    code, err = _interrupt(args, tmp_path / "r" / training.LOG, 1100)
    assert code == 130, err[-2000:]
    assert f"Caffe's log: {tmp_path / 'r' / training.LOG}" in err
    tests = re.findall(r"redense: iteration (\d+)/20000, training loss (\S+); test: accuracy_top1 (\S+), "
                       r"accuracy_top5 (\S+), loss (\S+)", err)
    assert tests and tests[0][0] == "1000", err[-2000:]  # Caffe tests every 1,000 iterations here
    for _, *numbers in tests:
        assert all(re.fullmatch(r"\d+\.\d{4}", n) for n in numbers), numbers
    assert re.search(r"redense: interrupted at iteration \d+; run the same command again to resume$", err.strip())


def _group(pgid):
    """Pids of the live (not zombie) processes of process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def _gone(pgid, timeout=30):
    t0 = time.monotonic()
    while _group(pgid) and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    return _group(pgid) == []


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_seeds_in_parallel_stop_and_resume(setup, tmp_path, how):
    """Ctrl-C (SIGINT to the process group) or SIGTERM to dsd.py alone under --seeds 2 --jobs 2: every worker stops
    at a snapshot, exit status 130 with one line naming where each seed stopped, and no process of the group is
    left. SIGKILL of dsd.py: its workers stop too (they follow their parent). The same command resumes every seed;
    run again once finished, it reuses them and writes the same verdict."""
    out = tmp_path / "seeds"
    args = dsd_args(setup, out, "--control", "--seeds", 2, "--jobs", 2, sparse=6000)
    proc = _start(args)
    try:
        _wait_for(lambda: all(_iteration(out / f"seed{s}" / "cycle1-sparse" / training.LOG) > 20 for s in (0, 1)),
                  proc)
        signals = {"ctrl-c": lambda: os.killpg(proc.pid, signal.SIGINT), "sigterm": lambda: proc.send_signal(
            signal.SIGTERM), "sigkill": lambda: proc.send_signal(signal.SIGKILL)}
        signals[how]()
        _, err = proc.communicate(timeout=120)
        assert _gone(proc.pid), [open(f"/proc/{p}/cmdline").read() for p in _group(proc.pid)]
    finally:
        if proc.poll() is None or _group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    if how == "sigkill":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err[-2000:]
        m = re.fullmatch(r"dsd\.py: interrupted at seed 0 sparse iteration (\d+), seed 1 sparse iteration (\d+); run "
                         r"the same command again to resume", err.strip().splitlines()[-1])
        assert m, err[-2000:]
    for s in (0, 1):
        snaps = training.snapshots(str(out / f"seed{s}" / "cycle1-sparse" / "snapshots"), "sparse")
        assert snaps and snaps[0].iteration < 6000
        if how != "sigkill":
            assert snaps[0].iteration == int(m.group(s + 1))  # each stopped at a snapshot
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "seed 0 dsd_caffe.training: sparse: resuming" in r.stderr and \
        "seed 1 dsd_caffe.training: sparse: resuming" in r.stderr
    verdict = fileio.read_json(out / runreport.VERDICT)
    assert verdict["seeds"] == [0, 1]
    if how == "ctrl-c":
        again = run(args)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "seed 0 dsd_caffe.pipeline: DSD: reusing the finished run" in again.stderr
        assert fileio.read_json(out / runreport.VERDICT) == verdict and again.stdout == r.stdout


# ------------------------------------------------------------------------------------------- the phase tools
def _pruned(setup, out, **schedule):
    folder, model, weights = setup
    phases.prune(phases.Inputs(model, weights), out, phases.PruneConfig(ratio="3x"), Schedule(**schedule))
    return out


@pytest.mark.parametrize("engine", ["binary", "pycaffe"])
def test_train_sparse_interrupted_ends_with_130_and_resumes(setup, tmp_path, engine):
    """Ctrl-C: exit 130 with one line naming the iteration of the snapshot taken on stopping; the same command
    resumes from it and the pruned weights stay exactly 0.0."""
    out = _pruned(setup, tmp_path / "sparse", max_iter=1500, snapshot=500)
    args = tool_cmd("train_sparse", out, "--engine", engine)
    code, err = _interrupt(args, out / training.LOG, 20)
    assert code == 130, err[-2000:]
    m = re.fullmatch(r"train_sparse\.py: sparse: interrupted at iteration (\d+); run the same command again to "
                     r"resume", err.strip().splitlines()[-1])
    assert m, err[-2000:]
    assert training.snapshots(str(out / training.SNAPSHOT_DIR), "sparse")[0].iteration == int(m.group(1))
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"from iteration {m.group(1)}" in r.stderr
    masks.check_masked(str(out / phases.SPARSE), masks.load_masks(str(out / phases.MASKS)))


PRUNE_FOLDER = {phases.PRUNED, fileio.sidecar_path(phases.PRUNED), phases.MASKS, phases.SPARSE_NET,
                phases.SPARSE_SOLVER, phases.HISTOGRAM, training.SNAPSHOT_DIR}


def _whole_prune_folder(out):
    assert set(os.listdir(out)) == PRUNE_FOLDER, os.listdir(out)
    kept = masks.load_masks(str(out / phases.MASKS))
    assert masks.same_masks(kept, masks.read_masks(str(out / phases.PRUNED))) is None
    fileio.read_json(out / fileio.sidecar_path(phases.PRUNED))


def test_prune_killed_at_every_rename_leaves_its_folder_absent_or_whole(setup, tmp_path):
    """SIGKILL before each rename of a run in turn (paused there, so every kill lands where it is meant to): the
    folder is absent or whole (it is staged and renamed), and the next run removes what the killed ones left."""
    folder, model, weights = setup
    out = tmp_path / "sparse"
    args = ("--model", model, "--weights", weights, "--ratio", "3x", "--output", out, "--force")
    assert paused_tool.kill_at(1, "prune", *args)
    assert not out.exists() and any(n.startswith(".sparse.tmp-") for n in os.listdir(tmp_path))  # inside the write
    k = 2
    while paused_tool.kill_at(k, "prune", *args):
        if out.exists():
            _whole_prune_folder(out)
        k += 1
    _whole_prune_folder(out)  # the run that had no k-th rename finished
    r = run(tool_cmd("prune", *args))
    assert r.returncode == 0, r.stderr[-2000:]
    _whole_prune_folder(out)
    assert sorted(os.listdir(tmp_path)) == ["sparse"]  # the lock file goes with its last holder


def _feed(fifo, data, proc, timeout=60):
    """Write ``data`` into ``fifo`` once ``proc`` opens it for reading (the open of a writer alone would block)."""
    t0 = time.monotonic()
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # ENXIO: no reader yet
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < timeout, "the FIFO was never opened"
            time.sleep(0.02)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _refused_for(pid, args):
    for extra in ((), ("--force",)):
        r = run(args + list(extra))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"in use by another dsd-caffe process (pid {pid})" in r.stderr, r.stderr


def test_two_prunes_on_one_output(setup, tmp_path):
    """The first holds the folder's lock while it reads its profile (from a FIFO, so it waits for it): the
    second is refused naming its pid, --force or not; then the first finishes."""
    folder, model, weights = setup
    fifo, out = tmp_path / "profile.fifo", tmp_path / "sparse"
    os.mkfifo(fifo)
    first = _start(tool_cmd("prune", "--model", model, "--weights", weights, "--ratio", "3x", "--profile", fifo,
                              "--output", out))
    try:
        profile = b'{"*": 0.33}'
        _feed(fifo, profile, first)  # read once when the flags are checked, before the lock
        lock = fileio.lock_path(out)
        _wait_for(lambda: os.path.exists(lock) and open(lock).read().strip() == str(first.pid), first)
        _refused_for(first.pid, tool_cmd("prune", "--model", model, "--weights", weights, "--ratio", "3x",
                                           "--output", out))
        _feed(fifo, profile, first)  # and once more to prune, holding the lock
        assert first.wait(timeout=120) == 0, first.communicate()[1][-2000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    _whole_prune_folder(out)


def test_two_retrain_dense_on_one_output(setup, tmp_path):
    folder, model, weights = setup
    out = tmp_path / "redense"
    args = tool_cmd("retrain_dense", "--model", model, "--weights", weights, "--max-iter", 2000, "--output", out)
    first = _start(args)
    try:
        _wait_for(lambda: _iteration(out / training.LOG) > 10, first)
        _refused_for(first.pid, args)
        assert first.wait(timeout=600) == 0, first.communicate()[1][-2000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert fileio.read_json(fileio.sidecar_path(out / phases.REDENSE))["iteration"] == 2000
