"""Kill-and-resume harness for tools/dsd.py: SIGKILL the run (its whole process group) at points chosen by watching
the run folder (phase transitions, snapshot files appearing), re-run the same command, and check that the run
finishes with the masks of an uninterrupted run, every sparse-phase snapshot at exactly the pruned density, and no
output file truncated.

Used by tests/test_crash_resume.py (5 kill points) and run as a script for more:

    OMP_NUM_THREADS=1 .venv/bin/python tests/crash_harness.py [--chains 3] [--seed 0] [--keep DIR]

The script prints one line per kill (where it landed, what the folder held) and a summary.
"""
import argparse
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE_ITERS, DENSE_ITERS, SNAPSHOT = 12, 6, 2


# ------------------------------------------------------------------------------------------------ set-up
def fashion_arrays(n, offset=0):
    """n real Fashion-MNIST training images (N, 1, 28, 28) uint8 and labels, from ``offset``; synthetic images when
    the dataset package is not installed."""
    from dsd_caffe import fashion_mnist

    images = os.path.join(fashion_mnist.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")
    labels = os.path.join(fashion_mnist.FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz")
    if os.path.exists(images) and os.path.exists(labels):
        x = fashion_mnist.read_idx(images)[offset:offset + n]
        y = fashion_mnist.read_idx(labels)[offset:offset + n]
        return x[:, None].astype(np.uint8), y.astype(np.int64)
    rng = np.random.default_rng(offset)
    y = rng.integers(0, 10, n)
    x = (rng.integers(0, 64, (n, 1, 28, 28)) + 16 * y[:, None, None, None]).astype(np.uint8)
    return x, y


def make_setup(folder, n_train=256, n_val=64, batch=16, test_batch=32, dense_iters=20, seed=0):
    """Fashion-MNIST LMDBs, the small SqueezeNet trainval and a briefly trained dense caffemodel in ``folder``.
    Returns (trainval prototxt, dense caffemodel)."""
    from dsd_caffe import fileio, lmdbio, netgen, phases
    from dsd_caffe.solvers import Schedule

    folder = os.path.abspath(folder)
    x, y = fashion_arrays(n_train + n_val)
    lmdbio.write_array_lmdb(os.path.join(folder, "train_lmdb"), x[:n_train], y[:n_train])
    lmdbio.write_array_lmdb(os.path.join(folder, "val_lmdb"), x[n_train:], y[n_train:])
    net = netgen.small_squeezenet("train_lmdb", "val_lmdb", train_batch=batch, test_batch=test_batch)
    model = os.path.join(folder, "trainval.prototxt")
    fileio.write_prototxt(model, net)
    weights = phases.train_dense(phases.Inputs(model), os.path.join(folder, "dense"),
                                 Schedule(max_iter=dense_iters, base_lr=0.01), "fashion-mnist", seed=seed)
    return model, weights


def dsd_command(model, weights, out, seed=0, sparse_iters=SPARSE_ITERS, dense_iters=DENSE_ITERS,
                snapshot=SNAPSHOT, engine="binary"):
    return [sys.executable, os.path.join(ROOT, "tools", "dsd.py"), "--model", model, "--weights", weights,
            "--output", out, "--ratio", "3x", "--sparse-max-iter", str(sparse_iters), "--redense-max-iter",
            str(dense_iters), "--snapshot", str(snapshot), "--sparse-base-lr", "0.01", "--redense-base-lr", "0.001",
            "--iterations", "2", "--seed", str(seed), "--engine", engine]


def _env():
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def run_to_end(cmd, timeout=600):
    """Run ``cmd`` to completion; returns the CompletedProcess."""
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def finish(cmd, out):
    """Re-run ``cmd`` to the end, unless the killed run had already finished (a kill as it exited): the tool then
    rightly refuses the finished run, and there is nothing to resume."""
    import json

    try:
        with open(os.path.join(out, "dsd_state.json")) as f:
            if json.load(f).get("finished"):
                return subprocess.CompletedProcess(cmd, 0, "", "the killed run had finished")
    except (OSError, ValueError):
        pass
    return run_to_end(cmd)


# ------------------------------------------------------------------------------------------------ kill points
def _exists(out, *parts):
    return os.path.exists(os.path.join(out, *parts))


def _snap(out, phase_dir, prefix, it, ext):
    return _exists(out, phase_dir, "snapshots", f"{prefix}_iter_{it}.{ext}")


def _hidden_tmp(out, *parts):
    return bool(glob.glob(os.path.join(out, *parts)))


#: name -> condition on the run folder; the kill lands as soon as it holds (plus a seeded jitter). In phase order.
KILL_POINTS = {
    "startup": lambda out: True,  # before dsd.py even imports caffe
    "random-delay": lambda out: True,  # a seeded random time, anywhere in the run (see random_chain)
    "dense-eval": lambda out: _exists(out, "dsd_state.json"),
    "pruning": lambda out: _exists(out, "cycle1-sparse"),
    "pruned-model-written": lambda out: _exists(out, "cycle1-sparse", "pruned.caffemodel"),
    "sparse-training-started": lambda out: _exists(out, "cycle1-sparse", "train.log"),
    "sparse-first-snapshot-writing": lambda out: _snap(out, "cycle1-sparse", "sparse", SNAPSHOT, "caffemodel"),
    "sparse-mid-snapshot-state": lambda out: _snap(out, "cycle1-sparse", "sparse", 3 * SNAPSHOT, "solverstate"),
    "sparse-last-snapshot-writing": lambda out: _snap(out, "cycle1-sparse", "sparse", SPARSE_ITERS, "caffemodel"),
    "sparse-final-copy": lambda out: _hidden_tmp(out, "cycle1-sparse", ".sparse.caffemodel.tmp-*")
    or _exists(out, "cycle1-sparse", "sparse.caffemodel"),
    "sparse-eval": lambda out: _exists(out, "cycle1-sparse", "sparse.caffemodel.json"),
    "redense-setup": lambda out: _exists(out, "cycle1-redense"),
    "redense-first-snapshot-writing": lambda out: _snap(out, "cycle1-redense", "redense", SNAPSHOT, "caffemodel"),
    "redense-last-snapshot-state": lambda out: _snap(out, "cycle1-redense", "redense", DENSE_ITERS, "solverstate"),
    "redense-final-copy": lambda out: _exists(out, "cycle1-redense", "redense.caffemodel"),
    "final-eval-and-png": lambda out: _exists(out, "cycle1-redense", "redense.caffemodel.json"),
}


def describe(out):
    """A short description of what the run folder holds (for the kill log)."""
    from dsd_caffe import training

    parts = []
    for d, prefix in (("cycle1-sparse", "sparse"), ("cycle1-redense", "redense")):
        folder = os.path.join(out, d)
        if not os.path.isdir(folder):
            continue
        snaps = training.snapshots(os.path.join(folder, "snapshots"), prefix)
        files = set(os.listdir(folder))
        done = [f for f in ("pruned.caffemodel.json", "sparse.caffemodel.json", "redense.caffemodel.json")
                if f in files]
        parts.append(f"{d}: snaps {[s.iteration for s in snaps]}" + (f" {'+'.join(done)}" if done else ""))
    state = os.path.join(out, "dsd_state.json")
    if os.path.exists(state):
        try:
            from dsd_caffe import fileio

            st = fileio.read_json(state)
            parts.insert(0, f"recorded {[p['name'] for p in st['phases']]}")
        except ValueError:
            parts.insert(0, "state unreadable")
    return "; ".join(parts) or "empty"


def kill_at(cmd, out, point, jitter, poll=0.01, timeout=600):
    """Start ``cmd`` in its own process group, wait until KILL_POINTS[point] holds for ``out`` (then ``jitter``
    more seconds), SIGKILL the group. Returns a dict: killed (False if the run ended first), rc, t, where.
    A point whose condition already holds before the start (an earlier run got past it) is skipped: the run is
    not started and the dict says skipped."""
    cond = KILL_POINTS[point]
    if point not in ("startup", "random-delay") and cond(out):
        return {"point": point, "skipped": True, "killed": False, "rc": None, "t": 0.0, "where": describe(out),
                "stderr": ""}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        while proc.poll() is None and not cond(out):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"kill point {point} never reached in {timeout}s")
            time.sleep(poll)
        deadline = time.monotonic() + jitter
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(poll)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    return {"point": point, "skipped": False, "killed": killed, "rc": rc, "t": time.monotonic() - t0,
            "where": describe(out),
            "stderr": err if not killed else ""}


def chain(cmd, out, points, rng, max_jitter=0.4):
    """Kill the same command at each of ``points`` in turn (a resumed run killed again), then run it to the end.
    Returns (kill records, final CompletedProcess)."""
    kills = []
    for point in points:
        if point == "startup":
            jitter = float(rng.uniform(0.05, 1.0))
        elif point.endswith("-writing"):  # as soon as the file appears: likely before Caffe wrote its pair
            jitter = 0.0
        else:
            jitter = float(rng.uniform(0, max_jitter))
        rec = kill_at(cmd, out, point, jitter)
        rec["jitter"] = jitter
        kills.append(rec)
        if not rec["killed"] and not rec["skipped"] and rec["rc"] != 0:
            raise RuntimeError(f"run ended with status {rec['rc']} before kill point {point}: {rec['stderr']}")
    return kills, finish(cmd, out)


def random_chain(cmd, out, delays):
    """Kill the same command after each of ``delays`` seconds in turn, then run it to the end. Stops early when a
    run finishes before its kill (the final CompletedProcess is then that run's status)."""
    kills = []
    for d in delays:
        rec = kill_at(cmd, out, "random-delay", float(d))
        rec["jitter"] = float(d)
        kills.append(rec)
        if not rec["killed"]:
            if rec["rc"] != 0:
                raise RuntimeError(f"run ended with status {rec['rc']} before its kill at {d:.2f}s: {rec['stderr']}")
            return kills, subprocess.CompletedProcess(cmd, 0, "", "")
    return kills, finish(cmd, out)


# ------------------------------------------------------------------------------------------------ checks
def check_run(out, reference_out, dense_weights):
    """Raise AssertionError unless the run in ``out`` finished like the uninterrupted run in ``reference_out``:
    same masks (also equal to pruning ``dense_weights`` afresh), every sparse snapshot at exactly the pruned
    density with its masks, no truncated or unparsable output. Returns a dict of counts."""
    from dsd_caffe import fileio, masks, phases, pipeline, pruning, training

    state = fileio.read_json(os.path.join(out, pipeline.STATE))
    ref_state = fileio.read_json(os.path.join(reference_out, pipeline.STATE))
    assert state["finished"], "run not finished"
    names = [p["name"] for p in state["phases"]]
    assert names == [p["name"] for p in ref_state["phases"]] == ["dense", "cycle1-pruned", "cycle1-sparse",
                                                                 "cycle1-redense"], names
    assert state["phases"][0]["val"] == ref_state["phases"][0]["val"]  # same weights, same batches
    assert state["phases"][2]["density"] == ref_state["phases"][2]["density"]

    kept = masks.load_masks(os.path.join(out, "cycle1-sparse", phases.MASKS))
    ref = masks.load_masks(os.path.join(reference_out, "cycle1-sparse", phases.MASKS))
    assert set(kept) == set(ref) and kept, (sorted(kept), sorted(ref))
    dense = masks.weight_arrays(dense_weights)
    for name in ref:
        assert np.array_equal(kept[name], ref[name]), f"mask of {name} differs from the uninterrupted run"
        assert np.array_equal(kept[name], pruning.magnitude_mask(dense[name], 1 / 3)), name
    for model in ("pruned.caffemodel", "sparse.caffemodel"):
        inside = masks.read_masks(os.path.join(out, "cycle1-sparse", model))
        assert set(inside) == set(ref) and all(np.array_equal(inside[k], ref[k]) for k in ref), model

    snaps = training.snapshots(os.path.join(out, "cycle1-sparse", "snapshots"), "sparse")
    assert snaps and snaps[0].iteration == SPARSE_ITERS, [s.iteration for s in snaps]
    sparse_models = [s.caffemodel for s in snaps] + [os.path.join(out, "cycle1-sparse", m)
                                                     for m in ("pruned.caffemodel", "sparse.caffemodel")]
    for path in sparse_models:
        w = masks.weight_arrays(path)
        inside = masks.read_masks(path)  # the masks persist in every snapshot
        for name, m in ref.items():
            assert np.count_nonzero(w[name]) == m.sum() and not np.any(w[name][~m]), (path, name)
            assert np.array_equal(inside[name], m), (path, name)
    dsnaps = training.snapshots(os.path.join(out, "cycle1-redense", "snapshots"), "redense")
    assert dsnaps and dsnaps[0].iteration == DENSE_ITERS, [s.iteration for s in dsnaps]

    counts = {"caffemodel": 0, "solverstate": 0, "json": 0, "prototxt": 0, "npz": 0, "png": 0, "leftover_tmp": 0}
    for root, dirs, files in os.walk(out):
        for d in list(dirs):
            if d.startswith("."):  # an atomic write's temporary folder left by a kill: never under a real name
                counts["leftover_tmp"] += 1
                dirs.remove(d)
        for f in files:
            path = os.path.join(root, f)
            if f.startswith("."):
                counts["leftover_tmp"] += not f.endswith(".lock")  # a killed holder's lock file stays
                continue
            ext = f.rsplit(".", 1)[-1]
            if ext == "caffemodel":
                fileio.read_caffemodel(path)
            elif ext == "solverstate":
                stem = f.split("_iter_")[0]
                assert any(s.solverstate == path for s in training.snapshots(root, stem)), f"incomplete {path}"
            elif ext == "json":
                fileio.read_json(path)
            elif ext == "prototxt":
                (fileio.read_solver_prototxt if "solver" in f else fileio.read_net_prototxt)(path)
            elif ext == "npz":
                masks.load_masks(path)
            elif ext == "png":
                with open(path, "rb") as fh:
                    assert fh.read(8) == b"\x89PNG\r\n\x1a\n", path
                import matplotlib.image

                matplotlib.image.imread(path)
            else:
                continue
            counts[ext] += 1
    return counts


# ------------------------------------------------------------------------------------------------ script
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chains", type=int, default=3, help="kill chains (each: one run killed at several points)")
    p.add_argument("--per-chain", type=int, default=6, help="kill points per chain")
    p.add_argument("--random-kills", type=int, default=6,
                   help="fresh runs, each killed once at a seeded random time, then resumed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("binary", "pycaffe"), default="binary")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    a = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    work = os.path.abspath(a.keep) if a.keep else tempfile.mkdtemp(prefix="crash_resume-")
    os.makedirs(work, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    t0 = time.monotonic()
    model, weights = make_setup(work, seed=a.seed)
    ref = os.path.join(work, "reference")
    t1 = time.monotonic()
    r = run_to_end(dsd_command(model, weights, ref, seed=a.seed, engine=a.engine))
    if r.returncode:
        sys.exit(f"uninterrupted run failed: {r.stderr[-2000:]}")
    t_ref = time.monotonic() - t1
    print(f"set-up {t1 - t0:.1f} s; uninterrupted run {t_ref:.1f} s")
    names = [n for n in KILL_POINTS if n != "random-delay"]
    totals = {"kills": 0, "ended_first": 0, "skipped": 0, "chains_ok": 0, "failures": []}
    n_chains = a.chains + a.random_kills
    for c in range(n_chains):
        out = os.path.join(work, f"chain{c}")
        cmd = dsd_command(model, weights, out, seed=a.seed, engine=a.engine)
        try:
            if c < a.chains:
                points = sorted(rng.choice(len(names), size=min(a.per_chain, len(names)), replace=False))
                kills, final = chain(cmd, out, [names[i] for i in points], rng)
            else:  # a fresh run killed once at a seeded random time within an uninterrupted run's length
                kills, final = random_chain(cmd, out, rng.uniform(0.3, t_ref, size=1))
        except (RuntimeError, TimeoutError) as e:
            totals["failures"].append(f"chain {c}: {e}")
            print(f"chain {c}: FAILED {e}")
            continue
        for k in kills:
            what = "skipped (already past)" if k["skipped"] else "killed" if k["killed"] else "ended first"
            totals["kills"] += k["killed"]
            totals["ended_first"] += not k["killed"] and not k["skipped"]
            totals["skipped"] += k["skipped"]
            print(f"chain {c}: {k['point']:<32} +{k['jitter']:.2f}s  {what:<22} at {k['t']:5.1f}s  [{k['where']}]")
        if final.returncode:
            totals["failures"].append(f"chain {c}: resume failed: {final.stderr.strip()[-500:]}")
            print(f"chain {c}: resume FAILED: {final.stderr.strip()[-500:]}")
            continue
        try:
            counts = check_run(out, ref, weights)
        except AssertionError as e:
            totals["failures"].append(f"chain {c}: check failed: {e}")
            print(f"chain {c}: check FAILED: {e}")
            continue
        totals["chains_ok"] += 1
        print(f"chain {c}: resumed to the end; masks identical, sparse snapshots exact; files checked {counts}")
    print(f"\nsummary: {totals['kills']} kills ({totals['ended_first']} runs ended before their kill point, "
          f"{totals['skipped']} points already past) in "
          f"{n_chains} chains; {totals['chains_ok']}/{n_chains} chains resumed and passed every check; "
          f"{time.monotonic() - t0:.0f} s in all")
    for f in totals["failures"]:
        print("  " + f)
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if totals["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
