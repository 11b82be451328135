"""The one-command DSD demo on Fashion-MNIST (``make demo``): the small SqueezeNet trained dense from seeded random
weights (:func:`phases.train_dense`), then the DSD run beside its control (:func:`pipeline.run_dsd` with
``control=True``): prune 3x -> sparse -> redense, and the dense model trained on for the same iterations at the
same learning rates (the "control" row of the table). Everything is real Caffe.

Settings: the lengths and learning rates are the ``fashion-mnist`` recipe of ``solvers.DEFAULTS`` (chosen on the
validation split; ``scale`` multiplies the iteration counts), the net's width and the pruning are :data:`DEMO`.
Every net tests on the validation split while it trains (the curves of accuracy.png); the table reports the held-out
test split, evaluated once per finished model. Re-running reuses every finished step and resumes an interrupted
one; other settings in the same folder are refused unless ``force``.

Layout of ``output_dir`` (default ``runs/demo``)::

    data/{train,val,test}_lmdb   Fashion-MNIST; val = 5,000 images carved out of train (fixed seed 0)
    dense/                       the dense phase (dense.caffemodel + JSON, its trainval, solver, log)
    dsd/                         the DSD run and its control (see dsd_caffe.pipeline)
    results.json, accuracy.png, weights_histogram.png, demo_config.json
"""
import logging
import math
import os

from . import (caffelog, fashion_mnist, fileio, masks, netgen, phases, pipeline, plots, runreport, solvers, sources,
               training)
from .errors import UserError
from .phases import Inputs, PruneConfig
from .solvers import Schedule

log = logging.getLogger(__name__)

RECIPE = "fashion-mnist"
#: The demo's net and pruning: the small net at width 1, pruned 3x uniformly per layer with conv1 kept dense.
DEMO = dict(width=1.0, density=1 / 3, profile="uniform", skip=("conv1",))
ROWS = ("dense", "sparse", "DSD", "control")
#: the demo folder: the Fashion-MNIST LMDBs' folder, the dense phase's folder, the DSD run's folder, the settings and
#: the numbers; the accuracy plot and the weight histograms are named as a run's (pipeline.PLOT) and a prune folder's
#: (phases.HISTOGRAM)
DATA_DIR, DENSE_DIR, RUN_DIR, CONFIG, RESULTS = "data", "dense", "dsd", "demo_config.json", "results.json"
#: everything the demo writes in its folder (see the module doc): what --force may replace
OWNED = (DATA_DIR, DENSE_DIR, RUN_DIR, RESULTS, pipeline.PLOT, phases.HISTOGRAM, CONFIG)
#: demo_config.json keys of earlier releases -> today's (named like the flags), read when resuming
OLD_KEYS = {f"{p}_{old}": f"{p}_{new}" for p in solvers.PHASES
            for old, new in (("iters", "max_iter"), ("lr", "base_lr"))}


def config_for(seed=solvers.SEED, scale=1.0, **overrides):
    """The demo's settings: DEMO and the recipe's lengths and rates, with ``overrides`` (any key of the result but
    seed/scale), iteration counts multiplied by ``scale``."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 100 or math.isnan(scale):
        raise UserError(f"scale must be a number in (0, 100], got {scale!r}")
    solvers.count(seed, "seed", 0)
    cfg = dict(DEMO, tests_per_phase=solvers.DEFAULTS[RECIPE]["sparse"].tests)
    for phase in solvers.PHASES:
        row = solvers.DEFAULTS[RECIPE][phase]
        cfg[f"{phase}_max_iter"], cfg[f"{phase}_base_lr"] = row.max_iter, row.base_lr
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"unknown demo setting(s): {', '.join(sorted(unknown))}")
    cfg.update(overrides)
    cfg["skip"] = list(cfg["skip"])
    # checked here, before any folder or phase: the net's width, the pruning (profile, density, skip)
    netgen.small_squeezenet(width=cfg["width"])
    PruneConfig(density=cfg["density"], profile=cfg["profile"], skip=tuple(cfg["skip"]), seed=seed)
    for phase in solvers.PHASES:
        cfg[f"{phase}_max_iter"] = max(10, int(round(cfg[f"{phase}_max_iter"] * scale)))
    cfg.update(seed=seed, scale=scale)
    return cfg


def _schedule(cfg, phase):
    iters = cfg[f"{phase}_max_iter"]
    return Schedule(base_lr=cfg[f"{phase}_base_lr"], max_iter=iters,
                    test_interval=max(1, math.ceil(iters / cfg["tests_per_phase"])))


def untrained(top1, classes=10):
    """True when a dense model's validation top-1 is near chance (below 1.5 / classes): its training diverged or
    its ReLUs died, and DSD and its control would compare untrained nets."""
    return top1 < 1.5 / classes


def _warn_if_untrained(log_path, classes):
    """Warn when dense training ended near chance (see :func:`untrained`)."""
    curve = caffelog.read_curve(log_path)
    if curve and untrained(curve[-1][1], classes):
        log.warning("dense training ended at validation top-1 %.3f, about chance (1/%d): it diverged or its ReLUs "
                    "died; lower the learning rate or change the seed before reading the comparison",
                    curve[-1][1], classes)


def _open(out, cfg, force):
    cfg_path = os.path.join(out, CONFIG)
    if os.path.exists(cfg_path) and not force:
        old = {OLD_KEYS.get(k, k): v for k, v in fileio.read_json(cfg_path).items()}
        if old != cfg:
            diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            raise UserError(f"{out} holds a demo run with other settings ({', '.join(diff)}); use another "
                            "--output, the same settings, or --force to start over")
    if force:  # the Fashion-MNIST import is kept (it checks itself), and the config is written again below
        fileio.clear_owned(out, OWNED, "the demo", keep=(DATA_DIR, CONFIG))
    fileio.write_json(cfg_path, cfg)  # makes the folder (a file in the way is named)


def run_demo(output_dir="runs/demo", seed=solvers.SEED, scale=1.0, engine="binary", force=False, gpu=None, **overrides):
    """Run (or resume) the whole demo in ``output_dir``; returns the results dict (also in results.json):
    {"table", "test": {row: {"top1", "top5", "density"}}, "val": {...}, "config", "models", "gain"}.
    ``gpu``: the devices every phase trains on (``dsd_caffe.devices``; None: Caffe's current mode)."""
    cfg = config_for(seed=seed, scale=scale, **overrides)
    out = os.path.abspath(os.fspath(output_dir))
    with fileio.output_lock(out):
        _open(out, cfg, force)
        log.info("1/5 data: Fashion-MNIST LMDBs")
        lmdbs = fashion_mnist.import_fashion_mnist(os.path.join(out, DATA_DIR), val_size=5000, seed=0)
        net = sources.absolute_sources(netgen.small_squeezenet(
            train_source=lmdbs["train"], test_source=lmdbs["val"], train_batch=64, test_batch=100,
            width=cfg["width"]), None)
        log.info("2/5 dense: %d iterations at lr %g", cfg["dense_max_iter"], cfg["dense_base_lr"])
        dense = phases.train_dense(Inputs(net_param=net), os.path.join(out, DENSE_DIR), _schedule(cfg, "dense"),
                                   RECIPE, engine, gpu, seed=seed)
        _warn_if_untrained(os.path.join(out, DENSE_DIR, training.LOG), classes=10)
        log.info("3/5 DSD and its control: prune to %.3f, sparse %d iterations at lr %g, redense %d at lr %g; the "
                 "control trains the dense model on for as long at the same rates", cfg["density"],
                 cfg["sparse_max_iter"], cfg["sparse_base_lr"], cfg["redense_max_iter"], cfg["redense_base_lr"])
        run = pipeline.RunConfig(
            model=os.path.join(out, DENSE_DIR, phases.net_file("dense")), weights=dense,
            prune=PruneConfig(density=cfg["density"], profile=cfg["profile"], skip=tuple(cfg["skip"]), seed=seed),
            sparse=_schedule(cfg, "sparse"), redense=_schedule(cfg, "redense"), recipe=RECIPE,
            holdout_source=lmdbs["test"], control=True, seed=seed)
        state = pipeline.run_dsd(run, os.path.join(out, RUN_DIR), engine, gpu, reuse=True)
        log.info("4/5 results on the test split (%s)", lmdbs["test"])
        results = _results(out, cfg, state)
        log.info("5/5 plots")
        _plots(out, cfg, state, results["models"])
        fileio.write_json(os.path.join(out, RESULTS), results)
    return results


def _results(out, cfg, state):
    test, val = (runreport.results_table(state, split) for split in ("holdout", "val"))
    return {"config": cfg, "test": test, "val": val, "table": runreport.results_text(state),
            "gain": test["DSD"]["top1"] - test["control"]["top1"],
            "val_gain": val["DSD"]["top1"] - val["control"]["top1"],
            "models": {k: os.path.normpath(os.path.join(RUN_DIR, v["model"])) for k, v in test.items()},
            "dsd_phases": [dict(p, model=os.path.normpath(os.path.join(RUN_DIR, p["model"]))) for p in state["phases"]]}


def _plots(out, cfg, state, models):
    dense_iters = cfg["dense_max_iter"]
    points, marks = runreport.curves(os.path.join(out, RUN_DIR), state)
    shift = (lambda pts: [(i + dense_iters, v) for i, v in pts])
    curves = {"dense": caffelog.read_curve(os.path.join(out, DENSE_DIR, training.LOG))}
    curves.update({label: shift(pts) for label, pts in points.items()})
    curves.setdefault("control", [])
    boundaries = [dense_iters + b for b in runreport.boundaries(os.path.join(out, RUN_DIR), state)]
    plots.accuracy_curves(os.path.join(out, pipeline.PLOT), curves, boundaries,
                          [(i + dense_iters, v, t) for i, v, t in marks],
                          title="DSD vs its equal-length dense control (Fashion-MNIST validation)",
                          zoom_from=dense_iters)
    paths = {"dense": models["dense"], "pruned": os.path.join(RUN_DIR, pipeline.cycle_step(1, "sparse"), phases.PRUNED),
             "sparse": models["sparse"], "DSD": models["DSD"], "control": models["control"]}
    plots.weight_histograms(os.path.join(out, phases.HISTOGRAM),
                            {k: masks.flat(masks.weight_arrays(os.path.join(out, p))) for k, p in paths.items()},
                            "conv weights per phase", zeros="hidden")
