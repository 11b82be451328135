"""The one-command DSD demo on Fashion-MNIST: dense -> prune 3x -> sparse -> re-dense, against an equal-length
dense baseline, all through the toolkit (data, netgen, solvers, phases, evaluate) and real Caffe.

Layout of ``output_dir`` (default ``runs/demo``)::

    data/{train,val,test}_lmdb     Fashion-MNIST; val = 5000 images carved out of train (fixed seed 0)
    dense/                         trainval + solver + snapshots + train.log, dense.caffemodel (+ JSON)
    dsd/                           phases.run_dsd: cycle1-sparse/ (pruned, masks, sparse.caffemodel), cycle1-dense/
    baseline/step1, baseline/step2 the dense model trained on for exactly the sparse and re-dense iterations,
                                   at exactly their learning-rate schedules (phases.retrain_dense on a dense net)
    results.json, accuracy.png, weights_histogram.png, demo_config.json, evaluations.json (cache)

Every net tests on the validation split while it trains (the curves in accuracy.png); the table reports the
held-out test split, evaluated once per finished model. The hyperparameters (DEFAULTS) were chosen on the
validation split only. Re-running the same command reuses every finished step and resumes an interrupted one
from its newest snapshot; other settings in the same folder are refused unless ``force``.
"""
import logging
import math
import os
import re
import shutil

import numpy as np

from . import fashion_mnist, fileio, lmdbio, masklayer, netgen, phases, solvers
from .errors import UserError

log = logging.getLogger(__name__)

#: Settings chosen on the validation split (see README "DSD demo"); ``scale`` multiplies every iteration count.
#: Dense: poly decay from 0.04 to 0 (the dense net ends at its schedule's plateau). Prune 3x uniformly, conv1 kept
#: dense. Sparse and re-dense both at 0.004 (poly): re-dense at 0.0004 barely moved the revived weights in 1000
#: iterations and lost more to the baseline on val (-0.72 vs -0.26 points, one seed).
DEFAULTS = dict(
    width=1.0,
    batch=64,
    dense_iters=4000, dense_lr=0.04,
    sparse_iters=1000, sparse_lr=0.004,
    redense_iters=1000, redense_lr=0.004,
    lr_policy="poly", weight_decay=0.0002, momentum=0.9,
    density=1 / 3, profile="uniform", skip=("conv1",),
    tests_per_phase=8,
)

ROWS = ("dense", "sparse", "DSD", "baseline")


def _iters(n, scale):
    return max(10, int(round(n * scale)))


def config_for(seed=0, scale=1.0, **overrides):
    """The demo's settings: DEFAULTS with ``overrides``, iteration counts multiplied by ``scale``."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 100 or math.isnan(scale):
        raise UserError(f"scale must be a number in (0, 100], got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown demo setting(s): {', '.join(sorted(unknown))}")
    cfg = dict(DEFAULTS, **overrides)
    cfg["skip"] = list(cfg["skip"])
    for k in ("dense_iters", "sparse_iters", "redense_iters"):
        cfg[k] = _iters(cfg[k], scale)
    cfg["seed"] = seed
    cfg["scale"] = scale
    return cfg


def _solver_args(cfg, iters, seed):
    return dict(batch_size=cfg["batch"], iter_size=1, test_batch=100, lr_policy=cfg["lr_policy"],
                momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], random_seed=seed,
                test_interval=max(1, iters // cfg["tests_per_phase"]), display=max(1, min(100, iters // 20)))


def _finished(path):
    return os.path.exists(path) and os.path.exists(fileio.sidecar_path(path))


# ------------------------------------------------------------------------------------------------ steps
def _trainval(lmdbs, cfg):
    """The small SqueezeNet trainval with absolute sources: TRAIN on train, TEST on val."""
    net = netgen.small_squeezenet(train_source=lmdbs["train"], test_source=lmdbs["val"], train_batch=cfg["batch"],
                                  test_batch=100, width=cfg["width"])
    return phases.absolute_sources(net, None)


def _init_weights(net, path, seed):
    """Random initial weights from the net's own fillers, seeded (Caffe's RNG), as a caffemodel."""
    from .caffe_env import import_caffe

    caffe = import_caffe()
    caffe.set_mode_cpu()
    caffe.set_random_seed(seed)
    deploy = netgen.deploy(net, input_shape=(1, 1, 28, 28))
    tmp = path + ".deploy.prototxt"
    fileio.write_prototxt(tmp, deploy)
    try:
        n = caffe.Net(tmp, caffe.TEST)
        with fileio.atomic_path(path) as t:
            n.save(t)
    finally:
        os.unlink(tmp)
    return path


def train_dense(out, net, cfg, engine="binary"):
    """Dense training from seeded random weights in ``out``; returns ``out/dense.caffemodel`` (reused if done)."""
    final = os.path.join(out, "dense.caffemodel")
    if _finished(final):
        log.info("dense: reusing %s", final)
        return final
    os.makedirs(out, exist_ok=True)
    seed, iters = cfg["seed"], cfg["dense_iters"]
    fileio.write_prototxt(os.path.join(out, "trainval.prototxt"), phases.relative_sources(net, out))
    (train_src, _), (test_src, _) = phases.data_sources(net)
    s = solvers.dense_solver("trainval.prototxt", train_size=lmdbio.lmdb_info(train_src)["count"],
                             test_size=lmdbio.lmdb_info(test_src)["count"], base_lr=cfg["dense_lr"],
                             max_iter=iters, snapshot=max(1, iters // 4), snapshot_prefix="snapshots/dense",
                             **_solver_args(cfg, iters, seed))
    solver_path = os.path.join(out, "solver.prototxt")
    fileio.write_prototxt(solver_path, s)
    init = os.path.join(out, "init.caffemodel")
    if not os.path.exists(init):
        _init_weights(net, init, seed)
    snap = phases.train(solver_path, init, engine=engine, desc="dense")
    dens = {k: v["density"] for k, v in masklayer.sparsity_report(snap).items() if k != "total"}
    phases.finish_model(snap, final, dict(source="init.caffemodel", densities=dens, phase="dense", iteration=iters,
                                          seed=seed, net="trainval.prototxt", engine=engine))
    return final


def run_dsd(out, trainval_path, dense, cfg, engine="binary"):
    """prune -> sparse -> re-dense via phases.run_dsd in ``out``; returns its state (reused if finished)."""
    state_path = os.path.join(out, phases.STATE)
    if os.path.exists(state_path):
        state = fileio.read_json(state_path)
        if state.get("finished"):
            log.info("DSD: reusing the finished run in %s", out)
            return state
    seed = cfg["seed"]
    return phases.run_dsd(trainval_path, dense, out, density=cfg["density"], profile=cfg["profile"],
                          skip=tuple(cfg["skip"]), sparse_iters=cfg["sparse_iters"], sparse_lr=cfg["sparse_lr"],
                          dense_iters=cfg["redense_iters"], dense_lr=cfg["redense_lr"],
                          snapshot=max(1, min(cfg["sparse_iters"], cfg["redense_iters"]) // 2),
                          solver_args=_solver_args(cfg, min(cfg["sparse_iters"], cfg["redense_iters"]), seed),
                          engine=engine, seed=seed)


def run_baseline(out, trainval_path, dense, cfg, engine="binary"):
    """The equal-length baseline: the dense model trained on, without pruning, for the sparse phase's iterations at
    its LR schedule, then the re-dense phase's iterations at its LR schedule (fresh solver history at each step,
    like DSD). Returns the final model's path."""
    seed = cfg["seed"]
    current = dense
    for step, (iters, lr) in enumerate(((cfg["sparse_iters"], cfg["sparse_lr"]),
                                        (cfg["redense_iters"], cfg["redense_lr"])), 1):
        folder = os.path.join(out, f"step{step}")
        final = os.path.join(folder, phases.DENSE)
        if not _finished(final):
            phases.retrain_dense(trainval_path, current, folder, base_lr=lr, max_iter=iters, engine=engine,
                                 seed=seed, snapshot=max(1, iters // 2), solver_args=_solver_args(cfg, iters, seed))
        else:
            log.info("baseline step %d: reusing %s", step, final)
        current = final
    return current


# ------------------------------------------------------------------------------------------------ read-outs
_TEST_RE = re.compile(r"Iteration (\d+), Testing net")
_OUT_RE = re.compile(r"Test net output #\d+: (\S+) = ([-+0-9.eE]+|nan|inf)")


def val_curve(log_path, key="accuracy_top1"):
    """[(iteration, value)] of the periodic validation tests in a ``caffe train`` log (resumed runs appended;
    the last value per iteration wins)."""
    points, it = {}, None
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        for line in f:
            m = _TEST_RE.search(line)
            if m:
                it = int(m.group(1))
                continue
            m = _OUT_RE.search(line)
            if m and it is not None and m.group(1) == key:
                points[it] = float(m.group(2))
    return sorted(points.items())


def _warn_if_untrained(log_path, classes):
    """Warn when dense training ended near chance (diverged or dead ReLUs): DSD and baseline would then compare
    untrained nets."""
    curve = val_curve(log_path)
    if curve and curve[-1][1] < 1.5 / classes:
        log.warning("dense training ended at validation top-1 %.3f, about chance (1/%d): it diverged or its ReLUs "
                    "died; lower the learning rate or change the seed before reading the comparison",
                    curve[-1][1], classes)


def evaluate_split(trainval, weights, split_source):
    """{"top1", "top5", "loss", "density"} of ``weights`` on the LMDB ``split_source`` (one full pass)."""
    net = phases.absolute_sources(trainval, None, test=split_source)
    res = phases.evaluate_model(net, weights)
    dens = masklayer.sparsity_report(weights)["total"]["density"]
    return {"top1": res.get("accuracy_top1"), "top5": res.get("accuracy_top5"), "loss": res.get("loss"),
            "density": dens}


def format_table(results):
    """The demo's table: one row per model (dense, sparse, DSD, baseline) with test top-1/top-5 and density."""
    lines = [f"{'model':<10} {'top-1':>7} {'top-5':>7} {'density':>8}"]
    for name in ROWS:
        r = results[name]
        lines.append(f"{name:<10} {100 * r['top1']:6.2f}% {100 * r['top5']:6.2f}% {r['density']:8.3f}")
    gain = 100 * (results["DSD"]["top1"] - results["baseline"]["top1"])
    lines.append(f"DSD - baseline: {gain:+.2f} points of top-1")
    return "\n".join(lines)


def _plot_accuracy(path, curves, boundaries):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    styles = {"dense": ("k", "-"), "sparse": ("tab:orange", "-"), "re-dense": ("tab:green", "-"),
              "baseline": ("tab:blue", "--")}
    for name, pts in curves.items():
        if pts:
            x, y = zip(*pts)
            c, ls = styles[name]
            ax.plot(x, [100 * v for v in y], color=c, ls=ls, marker=".", label=name)
    for b in boundaries:
        ax.axvline(b, color="grey", lw=0.8, ls=":")
    ys = [100 * v for pts in curves.values() for _, v in pts]
    if ys:
        top = max(ys)
        ax.set_ylim(max(min(ys), top - 15), top + 1)
    ax.set_xlabel("iteration (cumulative)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("DSD vs the equal-length dense baseline (Fashion-MNIST val)")
    ax.legend(loc="lower right")
    fileio.save_figure(fig, path, dpi=90)


def _plot_histograms(path, models):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = {name: np.concatenate([w.ravel() for w in masklayer.weight_arrays(p).values()])
              for name, p in models.items()}
    lim = max(float(np.abs(a).max()) for a in arrays.values()) or 1.0
    bins = np.linspace(-lim, lim, 121)
    fig, axes = plt.subplots(1, len(arrays), figsize=(3.2 * len(arrays), 3), sharey=True)
    for ax, (name, a) in zip(np.atleast_1d(axes), arrays.items()):
        nz = a[a != 0]
        ax.stairs(np.histogram(nz, bins)[0], bins, fill=True)
        ax.set_title(f"{name}\n{nz.size}/{a.size} non-zero", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("weight")
    fig.suptitle("conv weights per phase (zeros not drawn)")
    fileio.save_figure(fig, path, dpi=80)


# ------------------------------------------------------------------------------------------------ the demo
def run_demo(output_dir="runs/demo", seed=0, scale=1.0, engine="binary", force=False, **overrides):
    """Run (or resume) the whole demo in ``output_dir``; returns the results dict (also in results.json):
    {"table", "test": {row: {"top1","top5","loss","density"}}, "val": {...}, "config", "models", "gain"}."""
    cfg = config_for(seed=seed, scale=scale, **overrides)
    out = os.path.abspath(os.fspath(output_dir))
    cfg_path = os.path.join(out, "demo_config.json")
    if os.path.exists(cfg_path):
        old = fileio.read_json(cfg_path)
        if old != cfg:
            if not force:
                diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
                raise UserError(f"{out} holds a demo run with other settings ({', '.join(diff)}); use another "
                                 "--output, the same settings, or --force to start over")
    if force:
        for name in ("dense", "dsd", "baseline", "results.json", "evaluations.json", "accuracy.png",
                     "weights_histogram.png"):
            p = os.path.join(out, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)
    os.makedirs(out, exist_ok=True)
    fileio.write_json(cfg_path, cfg)

    log.info("1/6 data: Fashion-MNIST LMDBs")
    lmdbs = fashion_mnist.import_fashion_mnist(os.path.join(out, "data"), val_size=5000, seed=0)
    net = _trainval(lmdbs, cfg)
    dense_dir = os.path.join(out, "dense")
    log.info("2/6 dense training: %d iterations at lr %g (%s)", cfg["dense_iters"], cfg["dense_lr"],
             cfg["lr_policy"])
    dense = train_dense(dense_dir, net, cfg, engine)
    _warn_if_untrained(os.path.join(dense_dir, "train.log"), classes=10)
    trainval_path = os.path.join(dense_dir, "trainval.prototxt")
    log.info("3/6 DSD: prune to %.3f, sparse %d iterations at lr %g, re-dense %d iterations at lr %g",
             cfg["density"], cfg["sparse_iters"], cfg["sparse_lr"], cfg["redense_iters"], cfg["redense_lr"])
    state = run_dsd(os.path.join(out, "dsd"), trainval_path, dense, cfg, engine)
    log.info("4/6 baseline: the dense model trained on for the same %d iterations at the same LRs",
             cfg["sparse_iters"] + cfg["redense_iters"])
    base = run_baseline(os.path.join(out, "baseline"), trainval_path, dense, cfg, engine)

    models = {"dense": dense, "sparse": os.path.join(out, "dsd", "cycle1-sparse", phases.SPARSE),
              "DSD": os.path.join(out, "dsd", "cycle1-dense", phases.DENSE), "baseline": base}
    log.info("5/6 evaluation on the test split (%s)", lmdbs["test"])
    cache_path = os.path.join(out, "evaluations.json")
    cache = fileio.read_json(cache_path) if os.path.exists(cache_path) else {}

    def cached(weights, split):
        """evaluate_split, reused while the model file is unchanged (size and mtime)."""
        st = os.stat(weights)
        key = f"{os.path.relpath(weights, out)}|{split}"
        stamp = [st.st_size, st.st_mtime_ns]
        if cache.get(key, {}).get("stamp") != stamp:
            cache[key] = {"stamp": stamp, "result": evaluate_split(net, weights, lmdbs[split])}
            fileio.write_json(cache_path, cache)
        return cache[key]["result"]

    test = {name: cached(p, "test") for name, p in models.items()}
    val = {name: cached(p, "val") for name, p in models.items()}
    val["pruned"] = cached(os.path.join(out, "dsd", "cycle1-sparse", phases.PRUNED), "val")

    log.info("6/6 plots")
    d_it = cfg["dense_iters"]
    s_it = d_it + cfg["sparse_iters"]
    shift = lambda pts, k: [(i + k, v) for i, v in pts]
    curves = {
        "dense": val_curve(os.path.join(dense_dir, "train.log")),
        "sparse": shift(val_curve(os.path.join(out, "dsd", "cycle1-sparse", "train.log")), d_it),
        "re-dense": shift(val_curve(os.path.join(out, "dsd", "cycle1-dense", "train.log")), s_it),
        "baseline": shift(val_curve(os.path.join(out, "baseline", "step1", "train.log")), d_it)
        + shift(val_curve(os.path.join(out, "baseline", "step2", "train.log")), s_it),
    }
    dense_val = [(d_it, val["dense"]["top1"])]
    curves["sparse"] = dense_val + [(d_it, val["pruned"]["top1"])] + curves["sparse"]
    curves["baseline"] = dense_val + curves["baseline"]
    _plot_accuracy(os.path.join(out, "accuracy.png"), curves, (d_it, s_it))
    _plot_histograms(os.path.join(out, "weights_histogram.png"),
                     {"dense": dense, "pruned": os.path.join(out, "dsd", "cycle1-sparse", phases.PRUNED),
                      "sparse": models["sparse"], "DSD": models["DSD"], "baseline": base})
    results = {"config": cfg, "test": test, "val": val, "table": format_table(test),
               "gain": test["DSD"]["top1"] - test["baseline"]["top1"],
               "val_gain": val["DSD"]["top1"] - val["baseline"]["top1"],
               "models": {k: os.path.relpath(v, out) for k, v in models.items()},
               "dsd_phases": state.get("phases", []), "curves": curves}
    fileio.write_json(os.path.join(out, "results.json"), results)
    return results
