"""The DSD run: (prune -> sparse -> redense) x cycles from a dense caffemodel, resumable after any interruption,
optionally beside its control arm, and over several seeds with a verdict (:mod:`dsd_caffe.verdict`). (Past 400
lines: the run, its resume checks, its read-outs and its seeds' worker processes share the run folder's layout and state; the seeds'
part could move to a module of its own once the per-seed device work on it has landed.)

The run folder (one writer: it is locked for the whole run):

- ``dsd_state.json``: the run's record: its settings (a folder is reused only with the same settings; the first
  that differs is named), the SHA-256 of the dense model both arms start from, and one entry per finished step
  (model, validation and holdout results, density), written after every step.
- ``cycle<c>-sparse/``, ``cycle<c>-redense/``: the DSD arm's phase folders (:mod:`dsd_caffe.phases`).
- ``control<c>-sparse/``, ``control<c>-redense/`` (``control=True``): the control arm: the same net without a mask
  layer, trained from the same starting model with the very solvers the DSD arm's phases ran (read back from their
  folders): the same iterations, learning rates, seeds and data order, and a fresh solver at each phase boundary
  as DSD's phases get.
- ``accuracy.png``: validation accuracy of both arms across the phases, the pruning dip marked.

With several seeds (:func:`run_seeds`), ``seed<k>/`` holds one run per seed and ``verdict.json`` the paired
comparison. A seed changes the solvers' ``random_seed`` (dropout and the random crop and mirror of the data
layers) and, with ``data_order="shuffled"`` (the default over several seeds), the order the TRAIN data is read in
(``train_lmdb-shuffled/``, a copy of the TRAIN LMDB in the seed's order: :mod:`dsd_caffe.dataorder`). The
verdict names what the seeds varied, and gives no interval when they varied nothing (:func:`varied`).

Several seeds run in worker processes, ``jobs`` at a time, each in its own process (its log lines carry its seed).
Ctrl-C or SIGTERM (to the process group or to the parent alone) stops every worker at a snapshot, and the parent
exits with :class:`~dsd_caffe.errors.Interrupted`; a worker whose parent dies (even by SIGKILL) gets SIGTERM from
the kernel (``PR_SET_PDEATHSIG``) and stops the same way. A re-run resumes every unfinished seed and reuses the
finished ones.
"""
import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import time

import numpy as np

from . import (caffelog, dataorder, devices, evaluate, fileio, masks, netcheck, netgen, phases, plots, solvers, sources,
               training, verdict)
from .errors import Interrupted, OutputExists, UserError
from .phases import Inputs, PruneConfig
from .solvers import Schedule

log = logging.getLogger(__name__)

STATE = "dsd_state.json"
SHUFFLED = "train_lmdb-shuffled"  # the run's TRAIN data in its seed's order (data_order="shuffled")
STOP_WAIT = 60  # seconds the workers get to stop at a snapshot after an interrupt, before SIGKILL
MAX_SEEDS = 1000  # a verdict needs a few dozen seeds at most; each seed is a whole run
VERDICT = "verdict.json"
PLOT = "accuracy.png"


def cycle_step(cycle, part):
    """A DSD-arm step's name, and its folder's: ``cycle<c>-pruned``, ``cycle<c>-sparse`` (the folder of both),
    ``cycle<c>-redense``."""
    return f"cycle{cycle}-{part}"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a DSD run is made of (validated once, at construction)."""
    model: str
    weights: str
    prune: PruneConfig
    sparse: Schedule = Schedule(flag="sparse")
    redense: Schedule = Schedule(flag="redense")
    cycles: int = 1
    recipe: str = None  # None: the one recorded beside the weights (see phases.recipe_of), else imagenet
    solver: str = None  # the user's solver prototxt: the template of every phase's solver (solvers.build)
    iterations: int = evaluate.WHOLE_TEST_LMDB  # evaluation batches
    train_source: str = None
    test_source: str = None
    holdout_source: str = None  # evaluated once per finished model, never used to choose anything
    control: bool = False
    seed: int = solvers.SEED
    data_order: str = None  # "fixed" (None: over several seeds "shuffled") or "shuffled": the seed's TRAIN order
    dense_per_seed: bool = False  # each seed trains its own dense model from the net's fillers seeded with it

    def __post_init__(self):
        if self.data_order is not None:
            dataorder.check_order(self.data_order)
        solvers.count(self.cycles, "cycles")
        solvers.count(self.seed, "seed", 0)
        if self.iterations is not evaluate.WHOLE_TEST_LMDB:
            solvers.count(self.iterations, "iterations")
        object.__setattr__(self, "recipe", phases.recipe_of(self.recipe, self.weights))
        object.__setattr__(self, "prune", dataclasses.replace(self.prune, seed=self.seed))  # one seed per run
        for field in ("model", "weights", "train_source", "test_source", "holdout_source", "solver"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, os.path.abspath(os.fspath(value)))

    def settings(self):
        """The run's settings as JSON values (what dsd_state.json records and compares)."""
        full = dataclasses.asdict(self)
        d = {k: v for k, v in full.items() if k not in ("prune", "sparse", "redense")}
        d["prune"] = full["prune"]  # JSON makes its skip tuple a list
        if self.prune.schedule == "oneshot":  # a one-shot run records what it recorded before gradual pruning
            d["prune"] = {k: v for k, v in d["prune"].items() if k not in ("schedule", "gradual")}
        d["sparse"], d["redense"] = self.sparse.settings(), self.redense.settings()
        return json.loads(json.dumps(d))

    def template(self):
        """The user's solver (a SolverParameter), or None."""
        return solvers.read_template(self.solver)

    def inputs(self, weights=None, net=None):
        return Inputs(self.model, weights or self.weights, self.train_source, self.test_source, net_param=net)


# ------------------------------------------------------------------------------------------------ state
def _open_state(out, config, force, reuse=False):
    """The run's state: resumed when its settings equal ``config``'s, refused when finished (unless ``force``,
    which starts over, or ``reuse``, which returns it) or different. A new run's inputs are checked before its
    state exists."""
    path = os.path.join(out, STATE)
    settings = config.settings()
    plan = None
    if os.path.exists(path):
        state = fileio.read_json(path)
        if force:
            plan = _check_run(config)  # before anything goes: a refused input leaves the old run as it was
            _clear(out)
        elif state.get("finished") and reuse and state.get("config") == settings:
            _check_start(out, state, config)
            log.info("DSD: reusing the finished run in %s", out)
            return state
        elif state.get("finished"):
            raise OutputExists(f"{out} already holds a finished DSD run ({STATE}); pass --force to start over")
        elif state.get("config") != settings:
            old = state.get("config", {})
            keys = [k for k in settings if k in old] + [k for k in settings if k not in old]
            first = next(k for k in keys if old.get(k) != settings.get(k))
            raise UserError(f"{out} holds an unfinished DSD run with other settings (first: {first}: "
                            f"{old.get(first)!r} there, {settings.get(first)!r} now); use the same command to "
                            "resume it, another --output, or --force to start over")
        else:
            _check_start(out, state, config)
            return state
    elif os.path.isdir(out) and os.listdir(out) and not force:
        raise OutputExists(f"output folder {out} is not empty and holds no DSD run; use an empty folder or "
                           "--force")
    plan = plan if plan is not None else _check_run(config)
    fileio.check_output(path, force=True)  # a real write probe (root ignores modes)
    state = {"config": settings, "phases": [], "finished": False,
             "dense_model": training.file_record(config.weights)}
    fileio.write_json(path, state)
    for level, line in plan:  # the run's plan, once nothing can refuse it any more
        log.log(level, "%s", line)
    return state


def _check_start(out, state, config):
    """Refuse to resume a run whose dense model is no longer the one it started from (the file was replaced):
    both arms must start from the model the state records."""
    recorded = state.get("dense_model", {}).get("sha256")
    now = training.file_record(config.weights)["sha256"]
    if recorded != now:
        raise UserError(f"{out} holds a DSD run started from {config.weights} with SHA-256 {recorded}, but that file "
                        f"now has SHA-256 {now} (it was replaced); put the original back to resume, or use another "
                        "--output, or --force to start over")


def _clear(out):
    for name in os.listdir(out):
        if name in (STATE, PLOT, VERDICT, "dense") or name.startswith(("cycle", "control", "seed", SHUFFLED)):
            p = os.path.join(out, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)


def _check_run(config):
    """Everything that can be checked before the run state names its inputs: net, data, weights, profile, and the
    phases' solvers (a length in epochs that Caffe's max_iter cannot hold). Returns the run's plan for people:
    [(logging level, line)]: each phase's solver, and a warning when the imagenet recipe is a fallback."""
    net, model_param = phases.check_inputs(config.inputs())
    if config.holdout_source is not None:
        netcheck.check_data_layers(_with_test(net, config.holdout_source), "TEST")
    weights = masks.weight_arrays(model_param)
    names = netgen.weighted_layers(net)
    config.prune.masks({n: weights[n] for n in names}, masks.shared_weights(net))
    (train, batch), _ = sources.data_sources(net)
    extra = (("dense", Schedule()),) if config.dense_per_seed else ()
    where = f"your solver {config.solver} with DSD's base_lr and length" if config.solver else \
        f"the {config.recipe} recipe"
    plan = []
    for phase, schedule in extra + (("sparse", config.sparse), ("redense", config.redense)):
        solver = phases._solver(phase, net, schedule, config.recipe, config.seed, config.template())
        if phase == "sparse":  # a gradual schedule must end within the sparse phase
            config.prune.plan({n: weights[n] for n in names}, solver.max_iter, config.recipe)
        plan.append((logging.INFO, f"{phases.describe(phase, solver, sources.lmdb_count(train), batch)} ({where})"))
    note = phases.fallback_note(None if config.recipe == "imagenet" else config.recipe, config.weights,
                                config.solver)
    return plan + ([(logging.WARNING, note)] if note else [])


def _with_test(net, source):
    from .sources import absolute_sources

    return absolute_sources(net, None, test=source)


# ------------------------------------------------------------------------------------------------ the run
def run_dsd(config, output_dir, engine="binary", gpu=None, force=False, reuse=False):
    """Run (or resume) one DSD run in ``output_dir``; returns its state (also in dsd_state.json). A finished run
    is refused unless ``force`` (start over) or ``reuse`` (return it when its settings are the same)."""
    training.check_engine(engine)
    out = os.path.abspath(os.fspath(output_dir))
    devices.check(gpu)  # before anything is written; Caffe's mode is left to the phases (and the caller)
    fileio.check_apart(out, (config.model, config.weights, config.train_source, config.test_source,
                             config.holdout_source, config.solver, *sources.data_paths(config.inputs().net(require=()))))
    try:
        return _run(config, out, engine, gpu, force, reuse)
    except Interrupted:
        raise
    except KeyboardInterrupt:  # between phases (an evaluation): the same hint as inside one
        # from None: the KeyboardInterrupt says no more
        raise Interrupted("interrupted; run the same command again to resume") from None


def _run(config, out, engine, gpu, force, reuse):
    with fileio.output_lock(out):
        state = _open_state(out, config, force, reuse)
        if state.get("finished"):
            return state
        if config.data_order == "shuffled":
            train = sources.data_sources(config.inputs().net())[0][0]
            config = dataclasses.replace(config, train_source=dataorder.shuffled_copy(
                train, os.path.join(out, SHUFFLED), config.seed))
        run = _Run(config, out, state, engine, gpu)
        run.step("dense", "both", "dense", run.dense)
        dsd = control = run.model("dense")
        for c in range(1, config.cycles + 1):
            sdir, rdir = os.path.join(out, cycle_step(c, "sparse")), os.path.join(out, cycle_step(c, "redense"))
            run.step(cycle_step(c, "pruned"), "dsd", "sparse", lambda: run.prune(dsd, sdir))
            run.step(cycle_step(c, "sparse"), "dsd", "sparse",
                     lambda: phases.train_sparse(sdir, engine=engine, gpu=gpu))
            run.step(cycle_step(c, "redense"), "dsd", "redense", lambda: phases.retrain_dense(
                config.inputs(os.path.join(sdir, phases.SPARSE), run.net), rdir, config.redense, config.recipe,
                engine, gpu, seed=config.seed, solver=config.solver))
            dsd = run.model(cycle_step(c, "redense"))
            if config.control:
                for phase, folder in (("sparse", sdir), ("redense", rdir)):
                    run.step(f"control{c}-{phase}", "control", "dense", lambda: run.control(control, folder, c, phase))
                    control = run.model(f"control{c}-{phase}")
        points, marks = curves(out, state)
        plots.accuracy_curves(os.path.join(out, PLOT), points, marks=marks, boundaries=boundaries(out, state),
                              title="DSD" + (" and its control" if config.control else "") + ": validation top-1",
                              density=density_curve(out, state))
        state["table"] = results_text(state)
        state["finished"] = True
        state["final_model"] = os.path.relpath(dsd, out)
        fileio.write_json(os.path.join(out, STATE), state)
    return state


class _Run:
    """The steps of one run: each runs once, is evaluated and recorded in the state."""

    def __init__(self, config, out, state, engine, gpu):
        self.config, self.out, self.state, self.engine, self.gpu = config, out, state, engine, gpu
        self.net = config.inputs().net()

    def done(self, name):
        return next((p for p in self.state["phases"] if p["name"] == name), None)

    def model(self, name):
        return os.path.join(self.out, self.done(name)["model"])

    def step(self, name, arm, phase, make):
        if self.done(name):
            return
        path = os.path.abspath(make())
        entry = {"name": name, "arm": arm, "phase": phase, "model": os.path.relpath(path, self.out),
                 "val": self.evaluate(path), "density": masks.sparsity_report(path)["total"]["density"]}
        sidecar = fileio.sidecar_path(path)
        curve = fileio.read_json(sidecar).get("density_curve") if os.path.exists(sidecar) else None
        if curve:  # gradual pruning: [iteration, target density] of each step of the phase
            entry["density_curve"] = curve
        if self.config.holdout_source:
            entry["holdout"] = self.evaluate(path, self.config.holdout_source)
        top = caffelog.top1(entry["val"])
        entry["accuracy"] = top[1] if top else None
        entry["diverged"] = entry["val"].diverged or (entry.get("holdout") or entry["val"]).diverged
        self.state["phases"].append(entry)
        fileio.write_json(os.path.join(self.out, STATE), self.state)
        if entry["diverged"]:
            log.warning("%s: the model %s; its accuracy is recorded as null", name, entry["diverged"])
        log.info("%s: validation top-1 %s, density %.4f", name,
                 f"{entry['accuracy']:.4f}" if entry["accuracy"] is not None else "-", entry["density"])

    def dense(self):
        """The dense model both arms start from: the given one, or with ``dense_per_seed`` one trained from the
        net's fillers seeded with the run's seed (the --solver's base_lr and max_iter, else the recipe's)."""
        c = self.config
        if not c.dense_per_seed:
            return c.weights
        return phases.train_dense(Inputs(c.model, None, c.train_source, c.test_source, net_param=self.net),
                                  os.path.join(self.out, "dense"), recipe=c.recipe, engine=self.engine, gpu=self.gpu,
                                  seed=c.seed, solver=c.solver)

    def evaluate(self, weights, test_source=None):
        net = _with_test(self.net, test_source) if test_source else self.net
        return evaluate.evaluate_param(net, weights, self.config.iterations, devices.first(self.gpu))

    def prune(self, weights, folder):
        """Prune ``weights`` into ``folder``; a folder pruned already (a resume) is reused only when it was pruned
        from these very weights with these settings (phases.prune compares its record), else refused."""
        path = os.path.join(folder, phases.PRUNED)
        done = training.finished(path)
        res = phases.prune(self.config.inputs(weights, self.net), folder, self.config.prune, self.config.sparse,
                           self.config.recipe, force=not done, solver=self.config.solver)
        if not done:
            log.info("%s pruning:\n%s", os.path.basename(folder), res["table"])
        return path

    def control(self, start, dsd_folder, cycle, phase):
        """The control arm's step: the DSD arm's ``phase`` solver, read back from its folder, on the mask-free
        net from ``start``."""
        solver = fileio.read_solver_prototxt(os.path.join(dsd_folder, phases.solver_file(phase)))
        return phases.train_plain("dense", self.net, os.path.join(self.out, f"control{cycle}-{phase}"), solver,
                                  start, self.engine, self.gpu, extra={"arm": "control", "schedule": phase,
                                                                       "desc": f"control ({phase} schedule)",
                                                                       "engine": self.engine,
                                                                       "recipe": self.config.recipe})


# ------------------------------------------------------------------------------------------------ read-outs
def _offsets(out, state, arm):
    """[(step name, its folder, the cumulative iteration it starts at)] of an arm's training steps."""
    steps, at = [], 0
    for entry in state["phases"]:
        if entry["arm"] != arm or entry["name"].endswith("-pruned"):
            continue
        folder = os.path.join(out, os.path.dirname(entry["model"]))
        steps.append((entry["name"], folder, at))
        record = training.record_of(folder)
        if record:
            at += training.recorded_solver(record, os.path.join(folder, training.RECORD)).max_iter
    return steps


def boundaries(out, state):
    """Cumulative iterations where the DSD arm's phases start."""
    return [at for _, _, at in _offsets(out, state, "dsd")]


def curves(out, state):
    """({label: [(cumulative iteration, validation top-1)]} of both arms from their training logs, starting at the
    dense model's evaluation; [(iteration, top-1, "pruned")] marking each pruning dip)."""
    dense = [(0, state["phases"][0]["accuracy"])] if state["phases"] else []
    points, marks = {}, []
    for arm in ("dsd", "control"):
        for name, folder, at in _offsets(out, state, arm):
            label = "control" if arm == "control" else name.split("-")[-1]
            pts = [(at + i, v) for i, v in caffelog.read_curve(os.path.join(folder, training.LOG))]
            pruned = next((p for p in state["phases"] if p["name"] == name[:-len("sparse")] + "pruned"), None) \
                if name.endswith("-sparse") else None
            if pruned and arm == "dsd":
                pts = [(at, pruned["accuracy"])] + pts
                gradual = "density_curve" in next(p for p in state["phases"] if p["name"] == name)
                marks.append((at, pruned["accuracy"], "gradual pruning starts" if gradual else "pruned"))
            points.setdefault(label, dense if label in ("sparse", "control") else [])
            points[label] = points[label] + pts
    return points, marks


def density_curve(out, state):
    """[(cumulative iteration, density)] of the DSD arm: each phase's starting density, and gradual pruning's steps
    (from the phase records); [] when no phase pruned gradually (the density then changes only at the phase
    boundaries, as the table says)."""
    if not any("density_curve" in p for p in state["phases"]):
        return []
    points = []
    for name, folder, at in _offsets(out, state, "dsd"):
        entry = next(p for p in state["phases"] if p["name"] == name)
        start = next((p for p in state["phases"] if p["name"] == name[:-len("sparse")] + "pruned"), entry) \
            if name.endswith("-sparse") else entry
        points.append((at, start["density"]))
        points += [(at + i, d) for i, d in entry.get("density_curve", [])]
        record = training.record_of(folder)
        if record:  # the phase's end, so the step line runs to it
            end = at + training.recorded_solver(record, os.path.join(folder, training.RECORD)).max_iter
            points.append((end, points[-1][1]))
    return points


ROWS = (("dense", "dense"), ("sparse", "sparse"), ("DSD", "redense"), ("control", "control"))


def results_table(state, split=None):
    """{row: {"top1", "top5", "density"}} of the last model of each kind, on the holdout split when the run has
    one (else validation); rows: dense, sparse, DSD, control (when run)."""
    split = split or ("holdout" if any("holdout" in p for p in state["phases"]) else "val")
    table = {}
    for row, kind in ROWS:
        entries = [p for p in state["phases"] if not p["name"].endswith("-pruned") and
                   (p["arm"] == "control" if kind == "control" else p["phase"] == kind and p["arm"] != "control")]
        if entries:
            e = entries[-1]
            r = e[split]
            table[row] = {"top1": _pick(r, 1), "top5": _pick(r, 5), "density": e["density"], "model": e["model"],
                          "diverged": e.get("diverged")}
    return table


def _pick(results, k):
    keys = [n for n in results if ("acc" in n.lower() or "top" in n.lower()) and str(k) in n]
    if k == 1 and not keys:
        top = caffelog.top1(results)
        return top[1] if top else None
    return results[keys[0]] if keys else None


def results_text(state, labels=None):
    """The run's table as text: model, top-1, top-5, density (rounded for people; the state keeps all digits)."""
    table = results_table(state)
    labels = labels or {}
    lines = [f"{'model':<10} {'top-1':>8} {'top-5':>8} {'density':>8}"]
    for row, r in table.items():
        fmt = (lambda v: f"{'diverged':>8}" if r["diverged"] else f"{100 * v:7.2f}%" if v is not None else f"{'-':>8}")
        lines.append(f"{labels.get(row, row):<10} {fmt(r['top1'])} {fmt(r['top5'])} {r['density']:8.3f}")
    if "control" in table and table["DSD"]["top1"] is not None and table["control"]["top1"] is not None:
        gain = 100 * (table["DSD"]["top1"] - table["control"]["top1"])
        lines.append(f"DSD - {labels.get('control', 'control')}: {gain:+.2f} points of top-1")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ seeds
def run_seeds(config, output_dir, seeds=1, jobs=1, engine="binary", gpu=None, force=False):
    """``seeds`` paired runs (DSD and its control; seeds ``config.seed``, +1, ...) in ``output_dir/seed<k>``,
    ``jobs`` at a time, then the verdict. One seed runs in ``output_dir`` itself, on all of ``gpu``'s devices
    (data-parallel); several seeds spread over them, one device each (``devices.of_seed``). ``config.data_order``
    None: "shuffled" over several seeds, else "fixed". Returns {"runs": {seed: state}, "verdict": Verdict or None,
    "refused": why there is no verdict, or None}."""
    solvers.count(seeds, "seeds", maximum=MAX_SEEDS)
    solvers.count(jobs, "jobs")
    if seeds > 1 and not config.control:
        raise UserError("seeds needs control: several seeds compare DSD with its control",
                        fields=["seeds", "control"])
    config = dataclasses.replace(config, data_order=config.data_order or ("shuffled" if seeds > 1 else "fixed"))
    out = os.path.abspath(os.fspath(output_dir))
    if seeds == 1:
        state = run_dsd(config, out, engine, gpu, force)
        runs = {config.seed: state}
    else:
        with fileio.output_lock(out):
            configs = {config.seed + k: dataclasses.replace(config, seed=config.seed + k) for k in range(seeds)}
            runs = _parallel(configs, out, jobs, engine, gpu, force)
    result = {"runs": runs, "verdict": None}
    if config.control:
        result.update(seeds_verdict(runs, out, "holdout" if config.holdout_source else "val", config))
    return result


def seeds_verdict(runs, out, split, config):
    """{"verdict": Verdict or None, "refused": why not or None} of finished runs ({seed: state}), written to
    ``out/verdict.json``. A seed with a diverged arm is refused: its accuracy means nothing. The verdict names
    what the seeds varied (:func:`varied`) and gives no interval when their models are bit-identical."""
    tables = {seed: results_table(s) for seed, s in runs.items()}
    refused = next((f"seed {seed}: the {row} arm's model {t[row]['diverged']}" for seed, t in tables.items()
                    for row in ("DSD", "control") if t[row]["diverged"]), None)
    if refused:
        refused = f"no verdict: {refused} (a diverged arm's accuracy means nothing)"
        fileio.write_json(os.path.join(out, VERDICT), {"verdict": None, "refused": refused, "split": split})
        return {"verdict": None, "refused": refused}
    several = len(runs) > 1
    v = verdict.paired_verdict([100 * (t["DSD"]["top1"] - t["control"]["top1"]) for t in tables.values()],
                               seeds=list(runs), varied=varied(config) if several else (),
                               identical=several and _identical_models(out, runs), split=split)
    fileio.write_json(os.path.join(out, VERDICT), v.as_json())
    return {"verdict": v, "refused": None}


def varied(config):
    """What the seeds of ``config``'s runs vary, in words, for the verdict: only what the net uses (a net with no
    dropout, crop or mirror gains nothing from a solver's random_seed)."""
    net = config.inputs().net()
    used = [f"dropout ({', '.join(l.name for l in net.layer if l.type == 'Dropout')})"] \
        if any(l.type == "Dropout" for l in net.layer) else []
    for layer, param in sources.source_fields(net):
        tp = layer.transform_param
        if sources.phase_of(layer) == "TEST":
            continue
        crop = tp.crop_size and (layer.type != "Data" or _larger_than(param.source, tp.crop_size))
        kinds = [w for w, on in (("crop", crop), ("mirror", tp.mirror)) if on]
        if kinds:
            used.append(f"the random {' and '.join(kinds)} of {layer.name}")
    out = [f"solver random_seed: {', '.join(used)}"] if used else []
    if config.data_order == "shuffled":
        out.append("the TRAIN data order (a copy of the TRAIN LMDB in each seed's order)")
    if config.dense_per_seed:
        out.append("the dense model (trained per seed from the net's fillers)")
    return tuple(out)


def _larger_than(source, crop):
    """True when the LMDB's images are larger than ``crop`` (a crop of the full size is no random choice)."""
    from .lmdbio import lmdb_info

    info = lmdb_info(source)
    return info["height"] > crop or info["width"] > crop


def _identical_models(out, runs):
    """True when every seed's DSD model, and every seed's control, hold bit-identical weights (the seeds varied
    nothing)."""
    digests = set()
    for seed, state in runs.items():
        table = results_table(state)
        digests.add(tuple(weights_digest(os.path.join(out, f"seed{seed}", table[row]["model"]))
                          for row in ("DSD", "control")))
    return len(digests) == 1


def weights_digest(path):
    """The SHA-256 of a caffemodel's blobs alone (its bytes also hold the net's text, sources included)."""
    import hashlib

    h = hashlib.sha256()
    for layer in fileio.read_caffemodel(path).layer:
        for blob in layer.blobs:
            h.update(layer.name.encode() + b"\0" + json.dumps(list(blob.shape.dim)).encode())
            h.update(np.asarray(blob.data, np.float32).tobytes())
    return h.hexdigest()


def seed_devices(seeds, gpu):
    """{seed: its device}: the seeds in order take ``gpu``'s devices round robin (:func:`devices.of_seed`; None
    without --gpu)."""
    return {seed: devices.of_seed(gpu, k) for k, seed in enumerate(sorted(seeds))}


def _parallel(configs, out, jobs, engine, gpu, force):
    """Run each seed's :func:`run_dsd` in its own worker process, ``jobs`` at a time (finished seeds are reused,
    unfinished ones resumed); {seed: state}. An interrupt stops every worker (:func:`_stop_workers`)."""
    ctx = multiprocessing.get_context("spawn")  # Caffe's state is per process; fork would copy a live one
    todo, running, runs, problems, alone = list(configs.items()), {}, {}, [], []
    device = seed_devices(configs, gpu)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                seed, config = todo.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_seed_worker, name=f"seed{seed}", args=(
                    send, os.getpid(), config, os.path.join(out, f"seed{seed}"), engine,
                    device[seed], force, jobs > 1))
                proc.start()
                send.close()
                running[seed] = (proc, receive)
            multiprocessing.connection.wait([proc.sentinel for proc, _ in running.values()])
            for seed, (kind, value) in _reap(running).items():
                if kind == "ok":
                    runs[seed] = value
                    log.info("seed %d: finished", seed)
                elif kind == "interrupted":  # a worker stopped alone (a signal to it): the run stops
                    alone.append(value)
                    raise KeyboardInterrupt
                else:
                    problems.append(value)
                    log.error("%s", value)
    except KeyboardInterrupt:
        stopped = _stop_workers(running)
        where = alone + stopped
        # from None: the KeyboardInterrupt says no more
        raise Interrupted(f"interrupted{' at ' + ', '.join(where) if where else ''}; run the same command again "
                          "to resume") from None
    if problems:
        raise UserError(problems[0])
    return dict(sorted(runs.items()))


def _reap(running):
    """{seed: (kind, value)} of the workers of ``running`` ({seed: (process, pipe)}) that ended; removed from it."""
    ended = {}
    for seed, (proc, receive) in list(running.items()):
        if proc.is_alive():
            continue
        proc.join()
        ended[seed] = receive.recv() if receive.poll() else (
            "error", f"seed {seed}: its worker process ended with status {proc.exitcode} and no result")
        receive.close()
        del running[seed]
    return ended


def _stop_workers(running):
    """Stop every live worker: SIGINT (a worker ignores a repeat within 2 s, so the terminal's Ctrl-C and ours
    count once), wait up to STOP_WAIT seconds for them to snapshot, then SIGKILL (their Caffe children die with
    them). A second interrupt, more than 2 s after the first, kills them at once. Returns where each stopped."""
    for proc, _ in running.values():
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGINT)
    started = time.monotonic()
    while running and time.monotonic() - started < STOP_WAIT:
        try:
            multiprocessing.connection.wait([p.sentinel for p, _ in running.values()], timeout=1)
        except KeyboardInterrupt:
            if time.monotonic() - started > 2:
                break
        if all(not p.is_alive() for p, _ in running.values()):
            break
    for proc, _ in running.values():
        if proc.is_alive():
            proc.kill()
    where = []
    for seed, (kind, value) in sorted(_reap(running).items()):
        if kind == "interrupted":
            where.append(value)
        elif kind == "ok":
            where.append(f"seed {seed} (finished)")
    return where


def _seed_worker(conn, parent, config, out, engine, gpu, force, quiet):
    """One seed's run in its own process; sends ("ok", state), ("error", message) or ("interrupted", where) to
    ``conn``. It dies with its ``parent`` (SIGTERM when the parent ends, however it ends)."""
    _follow_parent(parent)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # this child process is ours: parallel bars would interleave
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s seed {config.seed} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        result = "ok", run_dsd(config, out, engine, gpu, force, reuse=True)
    except Interrupted as e:
        m = re.match(r"(.*): interrupted at iteration (\d+)", str(e))
        result = "interrupted", (f"seed {config.seed} {m.group(1)} iteration {m.group(2)}" if m else
                                 f"seed {config.seed}")
    except KeyboardInterrupt:
        result = "interrupted", f"seed {config.seed} (between phases)"
    except UserError as e:  # anything else is a bug: its traceback shows here, and the parent says "no result"
        result = "error", f"seed {config.seed}: {e}"
    conn.send(result)
    conn.close()


_first_interrupt = [-10.0]


def _interrupt_once(signum, frame):
    """SIGINT/SIGTERM in a worker: KeyboardInterrupt, but a repeat within 2 s is the same interrupt (the terminal's
    Ctrl-C and the parent's forwarded one)."""
    now = time.monotonic()
    if now - _first_interrupt[0] > 2:
        _first_interrupt[0] = now
        raise KeyboardInterrupt


def _follow_parent(parent):
    """This worker gets SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG; elsewhere it polls nothing and
    relies on the parent's stop), and ends now when the parent is gone already."""
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        raise SystemExit(130)
