"""Gradual pruning (Zhu & Gupta's cubic schedule) inside Caffe's loop: the schedule's known answers, the mask layer's
steps under the `caffe train` binary and pycaffe (momentum 0.9, weight decay, iter_size 2), a SIGKILL between two
steps and the resume, and bad inputs (one line, exit 2)."""
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from dsd_caffe import caffelog, fileio, gradual, masks, phases, pipeline, pruning, solvers, training
from dsd_caffe.errors import UserError
from dsd_caffe.gradual import Gradual, Plan
from dsd_caffe.solvers import Schedule
from helpers import copy_beside, small_setup, tool, tool_cmd


# ------------------------------------------------------------------------------------------ the schedule
def test_density_follows_the_cubic_formula():
    plan = Plan(begin=5, interval=7, steps=4, initial=0.9)
    for j in range(5):
        t = 5 + 7 * j
        assert plan.iteration(j) == t
        for final in (0.1, 1 / 3, 0.9):
            assert plan.density(j, final) == final + (0.9 - final) * (1 - (t - 5) / (4 * 7)) ** 3
    assert plan.density(0, 0.2) == pytest.approx(0.9) and plan.density(4, 0.2) == 0.2 and plan.density(2, 1.0) == 1.0
    assert plan.end == 33
    assert [plan.due(t) for t in (0, 4, 5, 11, 12, 32, 33, 34, 1000)] == [None, None, 0, 0, 1, 3, 4, 4, 4]


def test_targets_are_the_exact_k_of_every_layer():
    """k = floor(s_t * size + 0.5), clamped to [1, size] as pruning.kept_count: a layer kept dense, one whose k
    rounds to 0 (kept: 1), one whose k rounds to its size."""
    plan = Plan(begin=0, interval=10, steps=3)
    sizes = {"dense": 100, "tiny": 3, "full": 40, "plain": 1000}
    finals = {"dense": 1.0, "tiny": 0.1, "full": 0.99, "plain": 1 / 3}
    got = gradual.targets(plan, sizes, finals)
    assert [t for t, _ in got] == [0, 10, 20, 30]
    for j, (_, ks) in enumerate(got):
        for name, size in sizes.items():
            s = finals[name] + (1 - finals[name]) * (1 - j / 3) ** 3 if finals[name] < 1 else 1.0
            assert ks[name] == min(size, max(1, math.floor(s * size + 0.5))), (j, name)
    assert [ks["dense"] for _, ks in got] == [100] * 4
    assert [ks["tiny"] for _, ks in got] == [3, 1, 1, 1]  # 0.3 rounds to 0: one weight kept
    assert [ks["full"] for _, ks in got] == [40] * 4  # 39.6 rounds to 40
    assert [ks["plain"] for _, ks in got] == [1000, 531, 358, 333]


def test_defaults_come_from_the_table():
    row = solvers.DEFAULTS["fashion-mnist"]["sparse"]
    assert (row.gradual_begin, row.gradual_end, row.gradual_steps) == (0.0, 2 / 3, 15)
    assert Gradual().resolve(1000, row) == Plan(0, 44, 15, 1.0)  # final step at 660 <= 2/3 of the phase
    assert Gradual().resolve(10, row) == Plan(0, 1, 6, 1.0)  # a short phase: one step per iteration
    assert Gradual(steps=10).resolve(1000, row) == Plan(0, 66, 10, 1.0)
    assert Gradual(begin=100, interval=50).resolve(1000, row) == Plan(100, 50, 11, 1.0)


def test_shrink_mask_is_prunings_rule_among_the_kept():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(7, 9)).astype(np.float32)
    w.ravel()[[3, 10, 20]] = 0.5  # ties at the threshold: the lower index wins
    for d in (0.9, 0.5, 1 / 3, 0.05):
        np.testing.assert_array_equal(pruning.shrink_mask(w, np.ones_like(w, bool), d), pruning.magnitude_mask(w, d))
    mask = np.ones(w.shape, bool)
    for d in (0.8, 0.6, 0.4, 0.2, 0.3):  # a density above the mask's returns it unchanged: masks only shrink
        w = w + rng.normal(scale=0.5, size=w.shape).astype(np.float32)
        new = pruning.shrink_mask(w, mask, d)
        assert not np.any(new & ~mask)
        assert new.sum() == min(mask.sum(), pruning.kept_count(w.size, d))
        masked = np.where(mask, np.abs(w), -1)
        assert np.abs(w[new]).min() >= masked[mask & ~new].max(initial=-1)
        mask = new


@pytest.mark.parametrize("plan, finals, max_iter, match", [
    (Plan(0, 10, 10), {"a": 0.3}, 100, r"ends at iteration 100 .* after the sparse phase's last iteration 99"),
    (Plan(0, 5, 3, initial=0.2), {"a": 0.3, "b": 1.0}, 100, r"initial density 0.2 is below the final density 0.3 of layer 'a'"),
    (Plan(0, 5, 3), {"a": 0.0}, 100, r"layer 'a': final density 0.0 must be in \(0, 1\]"),
])
def test_plan_refuses(plan, finals, max_iter, match):
    with pytest.raises(UserError, match=match):
        plan.check(finals, max_iter)


def test_settings_refuse_zero_interval_and_steps():
    with pytest.raises(UserError, match=r"^gradual.interval must be an integer >= 1, got 0"):
        Gradual(interval=0)
    with pytest.raises(UserError, match=r"gradual interval \(dt\) must be an integer >= 1, got 0"):
        Plan(0, 0, 3)
    with pytest.raises(UserError, match=r"^gradual.steps must be an integer >= 1"):
        Gradual(steps=0)


def test_param_str_holds_the_schedule_and_refuses_bad_ones():
    text = json.dumps({"layers": [{"name": "c", "shape": [2, 3], "final": 0.5}],
                       "gradual": {"begin": 0, "interval": 2, "steps": 3, "initial": 1.0}})
    assert masks.parse_gradual(text) == (Plan(0, 2, 3, 1.0), {"c": 0.5})
    assert masks.parse_param_str(text) == [("c", (2, 3))]
    assert masks.parse_gradual('{"layers": [{"name": "c", "shape": [2, 3]}]}') is None
    for bad, match in ((dict(final=0.0), "final density 0.0"), (dict(interval=0), r"interval \(dt\)"),
                       (dict(final=None), "no final density")):
        spec = json.loads(text)
        spec["layers"][0].update({k: v for k, v in bad.items() if k == "final"})
        spec["gradual"].update({k: v for k, v in bad.items() if k != "final"})
        with pytest.raises(UserError, match=match):
            masks.parse_gradual(json.dumps(spec))


def test_state_blob_roundtrip():
    for it, done in ((0, 0), (1, 1), (65535, 3), (65536, 4), (2**31 - 1, 16)):
        assert masks.unpack_state(masks.pack_state(it, done)) == (it, done)
    with pytest.raises(UserError, match="not set"):
        masks.unpack_state(np.zeros(4, np.float32))


# ------------------------------------------------------------------------------------------ in Caffe
#: steps at iterations 1, 3, 5, 7 of 10; snapshots every iteration
PLAN = Plan(begin=1, interval=2, steps=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("caffe")
    base = str(tmp_path_factory.mktemp("gradual"))
    model, weights = small_setup(base)
    profile = os.path.join(base, "profile.json")
    with open(profile, "w") as f:  # k rounds to 0 (128 * 0.003 = 0.38: one kept) and to the size (127.9)
        json.dump({"*": 1 / 3, "fire2/conv1x1_2": 0.003, "fire3/conv1x1_2": 0.999}, f)
    out = os.path.join(base, "pruned")
    phases.prune(phases.Inputs(model, weights), out,
                 phases.PruneConfig(profile=profile, skip=("conv1",), schedule="gradual",
                                    gradual=Gradual(begin=1, interval=2, steps=3)),
                 Schedule(max_iter=10, snapshot=1, base_lr=0.05, iter_size=2, weight_decay=0.01, momentum=0.9))
    return out


def expected_counts(folder):
    plan, finals = masks.gradual_spec(fileio.read_net_prototxt(os.path.join(folder, phases.SPARSE_NET)))
    sizes = {n: int(m.size) for n, m in masks.load_masks(os.path.join(folder, phases.MASKS)).items()}
    return plan, finals, sizes, gradual.targets(plan, sizes, finals)


def test_prune_folder_starts_dense_and_says_it_all(folder):
    plan, finals, sizes, _ = expected_counts(folder)
    assert plan == PLAN
    assert finals["conv1"] == 1.0 and finals["fire2/conv1x1_2"] == 0.003 and finals["fire4/conv3x3_2"] == 1 / 3
    dense = masks.weight_arrays(os.path.join(os.path.dirname(folder), "dense.caffemodel"))
    pruned = masks.weight_arrays(os.path.join(folder, phases.PRUNED))
    for name in sizes:
        np.testing.assert_array_equal(pruned[name], dense[name])
        assert masks.read_masks(os.path.join(folder, phases.PRUNED))[name].all()
    prov = fileio.read_json(fileio.sidecar_path(os.path.join(folder, phases.PRUNED)))
    assert prov["gradual"] == dict(PLAN.to_json(), final_densities=finals)


def snapshot_state(path):
    param = fileio.read_caffemodel(path)
    layer = next(l for l in param.layer if masks.is_mask_layer(l))
    return masks.unpack_state(layer.blobs[-1].data)


def check_run(run, max_iter=10, whole_log=True):
    """Every snapshot: the state's count is the snapshot's iteration; each layer keeps exactly the k of the last
    step due; masks only shrink; under the mask a weight is exactly the solver's momentum residual, which decays
    by exactly float32(0.9) per iteration (the net computed with 0.0 there: no gradient, no weight decay reached
    it); the final model holds exact zeros under its masks."""
    plan, finals, sizes, targets = expected_counts(run)
    snaps = sorted(training.snapshots(os.path.join(run, "snapshots"), "sparse"))
    assert [s.iteration for s in snaps] == list(range(1, max_iter + 1))
    previous = masks.load_masks(os.path.join(run, phases.MASKS))
    for snap in snaps:
        iteration, done = snapshot_state(snap.caffemodel)
        due = plan.due(snap.iteration - 1)  # the last iteration this snapshot ran is iteration - 1
        assert (iteration, done) == (snap.iteration, due + 1 if due is not None else 0), snap
        kept = masks.read_masks(snap.caffemodel)
        for name, m in kept.items():
            assert m.sum() == (targets[due][1][name] if due is not None else sizes[name]), (snap, name)
            assert not np.any(m & ~previous[name]), (snap, name)  # no pruned weight comes back
        weights = masks.weight_arrays(snap.caffemodel)
        if snap.iteration > 1:
            for name, m in last.items():
                np.testing.assert_array_equal(weights[name][~m], np.float32(0.9) * last_w[name][~m], err_msg=name)
        previous, last, last_w = kept, kept, weights
    final = os.path.join(run, phases.SPARSE)
    w, kept = masks.weight_arrays(final), masks.read_masks(final)
    for name, m in kept.items():
        assert np.all(w[name][~m] == 0.0) and not np.signbit(w[name][~m]).any(), name
    prov = fileio.read_json(fileio.sidecar_path(final))
    total = sum(sizes.values())
    assert prov["density_curve"] == [[plan.iteration(j), sum(ks.values()) / total]
                                     for j, (_, ks) in enumerate(targets)]
    if whole_log:  # a SIGKILL loses the tail of the log: its lines may be missing
        assert [[it, round(d, 6)] for it, d in prov["density_curve"]] == \
            caffelog.read_density_curve(os.path.join(run, training.LOG))
    assert prov["density"] == {n: kept[n].sum() / kept[n].size for n in kept}
    return [sum(masks.read_masks(snap.caffemodel)[n].sum() for n in sizes) for snap in snaps]


@pytest.mark.parametrize("engine", ["binary", "pycaffe"])
def test_masks_follow_the_schedule_under_both_engines(folder, tmp_path, engine):
    run = copy_beside(folder, f"run-{engine}-{tmp_path.name}")
    phases.train_sparse(run, engine=engine)
    check_run(run)
    steps = [l for l in open(os.path.join(run, training.LOG)) if "dsd_masks: pruning step" in l]
    assert [l.split(" at iteration ")[1].split(":")[0] for l in steps] == ["1", "3", "5", "7"]


def test_every_forward_computes_with_exact_zeros_and_a_forward_alone_counts_nothing(folder, tmp_path):
    """Step pycaffe's solver one iteration at a time: after each, an extra forward pass (Caffe's display pass, or
    a user's) leaves the count alone and the convolutions see exact zeros under the masks."""
    from dsd_caffe import caffe_env, solvers as solv, sources

    caffe = caffe_env.import_caffe()
    run = copy_beside(folder, "step-" + tmp_path.name)
    s = solv.resolve_paths(fileio.read_solver_prototxt(os.path.join(run, phases.SPARSE_SOLVER)), run)
    s.ClearField("net")
    s.net_param.CopyFrom(sources.absolute_sources(fileio.read_net_prototxt(os.path.join(run, phases.SPARSE_NET)),
                                                  run))
    path = os.path.join(run, "solver.prototxt")
    fileio.write_prototxt(path, s)
    solver = caffe.get_solver(path)
    solver.net.copy_from(os.path.join(run, phases.PRUNED))
    layer = next(l for l in solver.net.layers if type(l).__name__ == "MaskLayer")
    n = len(layer.layers)
    for i in range(10):
        solver.step(1)
        assert masks.unpack_state(layer.blobs[2 * n].data)[0] == i + 1
        solver.net.forward()
        assert masks.unpack_state(layer.blobs[2 * n].data)[0] == i + 1
        kept = masks.read_masks(solver.net)
        for name, m in kept.items():
            assert np.all(solver.net.params[name][0].data[~m] == 0.0), (i, name)


def test_sigkill_between_two_steps_then_resume(folder, tmp_path):
    """Kill `train_sparse.py` (its process group) once the snapshot after the step at iteration 9 is written,
    before the step at 15; the resume continues the schedule at the right step: the same density sequence as the
    uninterrupted run, and no weight pruned earlier comes back."""
    runs = {}
    for name in ("whole", "killed"):
        runs[name] = run = copy_beside(folder, f"{name}-{tmp_path.name}")
        masks_net = fileio.read_net_prototxt(os.path.join(run, phases.SPARSE_NET))
        layer = next(l for l in masks_net.layer if masks.is_mask_layer(l))
        spec = json.loads(layer.python_param.param_str)
        spec["gradual"].update(begin=3, interval=6, steps=3)  # steps at 3, 9, 15, 21 of 30
        layer.python_param.param_str = json.dumps(spec)
        fileio.write_prototxt(os.path.join(run, phases.SPARSE_NET), masks_net)
    cmd = lambda run: tool_cmd("train_sparse", run, "--max-iter", 30, "--snapshot", 1)
    r = tool("train_sparse", runs["whole"], "--max-iter", 30, "--snapshot", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = runs["killed"]
    marker = os.path.join(killed, "snapshots", "sparse_iter_10.solverstate")
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        while proc.poll() is None and not os.path.exists(marker):
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = max(s.iteration for s in training.snapshots(os.path.join(killed, "snapshots"), "sparse"))
    assert 10 <= before < 15, f"the kill landed at iteration {before}, not between the steps at 9 and 15"
    assert snapshot_state(os.path.join(killed, "snapshots", f"sparse_iter_{before}.caffemodel")) == (before, 2)
    assert len(training.snapshots(os.path.join(killed, "snapshots"), "sparse")) == before
    r = tool("train_sparse", killed, "--max-iter", 30, "--snapshot", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    # the density sequence, snapshot by snapshot, is the uninterrupted run's (check_run: each the exact k of the
    # step due, masks only shrinking, the state's count the snapshot's iteration)
    assert check_run(killed, max_iter=30, whole_log=False) == check_run(runs["whole"], max_iter=30)
    with open(os.path.join(killed, training.LOG)) as f:
        log = f.read().split(" -snapshot ")[-1]  # what the resumed run printed
    steps = [l.split("step ")[1].split(" at iteration ") for l in log.splitlines() if "dsd_masks: pruning step" in l]
    assert [(j, it.split(":")[0]) for j, it in steps] == [("2/3", "15"), ("3/3", "21")]  # the right step, once


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    pytest.importorskip("caffe")
    base = str(tmp_path_factory.mktemp("gradual-bad"))
    model, weights = small_setup(base)
    zero = os.path.join(base, "zero.json")
    with open(zero, "w") as f:
        json.dump({"*": 0.33, "conv1": 0}, f)
    return base, model, weights, zero


@pytest.mark.parametrize("args, match", [
    (["--ratio", "3x", "--max-iter", "10", "--gradual-steps", "5", "--gradual-interval", "2"],
     "the gradual schedule ends at iteration 10 .* after the sparse phase's last iteration 9"),
    (["--ratio", "3x", "--max-iter", "10", "--gradual-interval", "0"], "--gradual-interval must be an integer >= 1"),
    (["--ratio", "3x", "--max-iter", "10", "--gradual-initial-density", "0.2"],
     "gradual initial density 0.2 is below the final density 0.3333 of layer 'conv1'"),
    (["--profile", "ZERO", "--max-iter", "10"], r"'conv1': invalid density 0 \(must be in \(0, 1\]\)"),
])
def test_bad_gradual_inputs_are_one_line_exit_2(dense, args, match):
    import re

    base, model, weights, zero = dense
    out = os.path.join(base, "out")
    r = tool("prune", "--model", model, "--weights", weights, "--output", out, "--schedule", "gradual",
             *[zero if a == "ZERO" else a for a in args])
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(match, r.stderr), r.stderr
    assert not os.path.exists(out)


def test_gradual_settings_without_the_gradual_schedule_are_refused(dense):
    base, model, weights, _ = dense
    r = tool("prune", "--model", model, "--weights", weights, "--output", os.path.join(base, "o2"), "--ratio", "3x",
             "--gradual-steps", "4")
    assert r.returncode == 2 and "need --schedule gradual" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_max_iter_that_ends_the_phase_before_the_schedule_is_refused(folder, tmp_path):
    run = copy_beside(folder, "short-" + tmp_path.name)
    r = tool("train_sparse", run, "--max-iter", "7")
    assert r.returncode == 2 and "ends at iteration 7" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_dsd_with_the_gradual_sparse_schedule_and_its_control(dense):
    """dsd.py --sparse-schedule gradual --control: the default schedule for 9 sparse iterations (final at
    floor(2/3 * 9) = 6, one step per iteration), the density curve in the model's JSON and the phase record, the
    control beside it."""
    base, model, weights, _ = dense
    out = os.path.join(base, "dsd")
    r = tool("dsd", "--model", model, "--weights", weights, "--output", out, "--ratio", "3x", "--skip", "conv1",
             "--sparse-schedule", "gradual", "--sparse-max-iter", 9, "--redense-max-iter", 2, "--snapshot", 3,
             "--iterations", 1, "--control")
    assert r.returncode == 0, r.stderr[-2000:]
    state = fileio.read_json(os.path.join(out, "dsd_state.json"))
    assert state["config"]["prune"]["schedule"] == "gradual"
    sparse = next(p for p in state["phases"] if p["name"] == "cycle1-sparse")
    folder = os.path.join(out, "cycle1-sparse")
    plan, finals, sizes, _ = expected_counts(folder)
    assert plan == Plan(0, 1, 6)
    assert sparse["density_curve"] == gradual.density_curve(plan, sizes, finals)
    assert sparse["density"] == pytest.approx(sparse["density_curve"][-1][1], abs=1e-12)
    assert [p["name"] for p in state["phases"]] == ["dense", "cycle1-pruned", "cycle1-sparse", "cycle1-redense",
                                                    pipeline.control_step(1, "sparse"), pipeline.control_step(1, "redense")]
    assert next(p for p in state["phases"] if p["name"] == "cycle1-pruned")["density"] == 1.0
    with open(os.path.join(out, "accuracy.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
