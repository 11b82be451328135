"""The DSD run: (prune -> sparse -> redense) x cycles from a dense caffemodel, resumable after any interruption,
optionally beside its control arm, and over several seeds with a verdict (:mod:`dsd_caffe.verdict`). (Past 400
lines: the run, its resume checks and its read-outs, table, curves and verdict, all read one state format.)

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
comparison. A seed changes the solvers' ``random_seed``: dropout and the random crop and mirror of the data
layers (Caffe's LMDB reader has a fixed order); the demo, which trains its own dense model, also seeds its init.

Past 400 lines: the run, its state file and the read-outs of that state (tables, curves, the density curve) are
one format, kept together.
"""
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import signal

from . import (caffelog, devices, evaluate, fileio, masks, netcheck, netgen, phases, plots, solvers, sources,
               training, verdict)
from .errors import Interrupted, UserError
from .phases import Inputs, PruneConfig
from .solvers import Schedule

log = logging.getLogger(__name__)

STATE = "dsd_state.json"
MAX_SEEDS = 1000  # a verdict needs a few dozen seeds at most; each seed is a whole run
VERDICT = "verdict.json"
PLOT = "accuracy.png"


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
    iterations: int = None  # evaluation batches (None: the whole TEST LMDB)
    train_source: str = None
    test_source: str = None
    holdout_source: str = None  # evaluated once per finished model, never used to choose anything
    control: bool = False
    seed: int = solvers.SEED

    def __post_init__(self):
        solvers.count(self.cycles, "--cycles")
        solvers.count(self.seed, "--seed", 0)
        if self.iterations is not None:
            solvers.count(self.iterations, "--iterations")
        object.__setattr__(self, "recipe", phases.recipe_of(self.recipe, self.weights))
        object.__setattr__(self, "prune", dataclasses.replace(self.prune, seed=self.seed))  # one seed per run
        for field in ("model", "weights", "train_source", "test_source", "holdout_source"):
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

    def inputs(self, weights=None, net=None):
        return Inputs(self.model, weights or self.weights, self.train_source, self.test_source, net_param=net)


# ------------------------------------------------------------------------------------------------ state
def _open_state(out, config, force, reuse=False):
    """The run's state: resumed when its settings equal ``config``'s, refused when finished (unless ``force``,
    which starts over, or ``reuse``, which returns it) or different. A new run's inputs are checked before its
    state exists."""
    path = os.path.join(out, STATE)
    settings = config.settings()
    checked = False
    if os.path.exists(path):
        state = fileio.read_json(path)
        if force:
            _check_run(config)  # before anything goes: a refused input leaves the old run as it was
            checked = True
            _clear(out)
        elif state.get("finished") and reuse and state.get("config") == settings:
            _check_start(out, state, config)
            log.info("DSD: reusing the finished run in %s", out)
            return state
        elif state.get("finished"):
            raise FileExistsError(f"{out} already holds a finished DSD run ({STATE}); pass --force to start over")
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
        raise FileExistsError(f"output folder {out} is not empty and holds no DSD run; use an empty folder or "
                              "--force")
    if not checked:
        _check_run(config)
    fileio.check_output(path, force=True)  # a real write probe (root ignores modes)
    state = {"config": settings, "phases": [], "finished": False,
             "dense_model": training.file_record(config.weights)}
    fileio.write_json(path, state)
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
        if name in (STATE, PLOT, VERDICT) or name.startswith(("cycle", "control", "seed")):
            p = os.path.join(out, name)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)


def _check_run(config):
    """Everything that can be checked before the run state names its inputs: net, data, weights, profile, and the
    phases' solvers (a length in epochs that Caffe's max_iter cannot hold)."""
    net, model_param = phases.check_inputs(config.inputs())
    if config.holdout_source is not None:
        netcheck.check_data_layers(_with_test(net, config.holdout_source), "TEST")
    weights = masks.weight_arrays(model_param)
    names = netgen.weighted_layers(net)
    config.prune.masks({n: weights[n] for n in names}, masks.shared_weights(net))
    for phase, schedule in (("sparse", config.sparse), ("redense", config.redense)):
        solver = phases._solver(phase, net, schedule, config.recipe, config.seed)
        if phase == "sparse":  # a gradual schedule must end within the sparse phase
            config.prune.plan({n: weights[n] for n in names}, solver.max_iter, config.recipe)


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
                             config.holdout_source, *sources.data_paths(config.inputs().net(require=()))))
    try:
        return _run(config, out, engine, gpu, force, reuse)
    except Interrupted:
        raise
    except KeyboardInterrupt:  # between phases (an evaluation): the same hint as inside one
        raise Interrupted("interrupted; run the same command again to resume") from None


def _run(config, out, engine, gpu, force, reuse):
    with fileio.output_lock(out):
        state = _open_state(out, config, force, reuse)
        if state.get("finished"):
            return state
        run = _Run(config, out, state, engine, gpu)
        run.step("dense", "both", "dense", lambda: config.weights)
        dsd = control = config.weights
        for c in range(1, config.cycles + 1):
            sdir, rdir = os.path.join(out, f"cycle{c}-sparse"), os.path.join(out, f"cycle{c}-redense")
            run.step(f"cycle{c}-pruned", "dsd", "sparse", lambda: run.prune(dsd, sdir))
            run.step(f"cycle{c}-sparse", "dsd", "sparse", lambda: phases.train_sparse(sdir, engine=engine, gpu=gpu))
            run.step(f"cycle{c}-redense", "dsd", "redense", lambda: phases.retrain_dense(
                config.inputs(os.path.join(sdir, phases.SPARSE), run.net), rdir, config.redense, config.recipe,
                engine, gpu, seed=config.seed))
            dsd = run.model(f"cycle{c}-redense")
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

    def evaluate(self, weights, test_source=None):
        net = _with_test(self.net, test_source) if test_source else self.net
        return evaluate.evaluate_param(net, weights, self.config.iterations, devices.first(self.gpu))

    def prune(self, weights, folder):
        """Prune ``weights`` into ``folder``; a folder pruned already (a resume) is reused only when it was pruned
        from these very weights with these settings (phases.prune compares its record), else refused."""
        path = os.path.join(folder, phases.PRUNED)
        done = training.finished(path)
        res = phases.prune(self.config.inputs(weights, self.net), folder, self.config.prune, self.config.sparse,
                           self.config.recipe, force=not done)
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
    (data-parallel); several seeds spread over them, one device each (``devices.of_seed``). Returns {"runs": {seed:
    state}, "verdict": Verdict or None}."""
    solvers.count(seeds, "--seeds", maximum=MAX_SEEDS)
    solvers.count(jobs, "--jobs")
    if seeds > 1 and not config.control:
        raise UserError("--seeds compares DSD with its control over seeds: add --control")
    out = os.path.abspath(os.fspath(output_dir))
    if seeds == 1:
        state = run_dsd(config, out, engine, gpu, force)
        runs = {config.seed: state}
    else:
        with fileio.output_lock(out):
            runs = _parallel(config, out, seeds, jobs, engine, gpu, force)
    result = {"runs": runs, "verdict": None}
    if config.control:
        result.update(seeds_verdict(runs, out, "holdout" if config.holdout_source else "val"))
    return result


def seeds_verdict(runs, out, split):
    """{"verdict": Verdict or None, "refused": why not or None} of finished runs ({seed: state}), written to
    ``out/verdict.json``. A seed with a diverged arm is refused: its accuracy means nothing."""
    tables = {seed: results_table(s) for seed, s in runs.items()}
    refused = next((f"seed {seed}: the {row} arm's model {t[row]['diverged']}" for seed, t in tables.items()
                    for row in ("DSD", "control") if t[row]["diverged"]), None)
    if refused:
        refused = f"no verdict: {refused} (a diverged arm's accuracy means nothing)"
        fileio.write_json(os.path.join(out, VERDICT), {"verdict": None, "refused": refused, "split": split})
        return {"verdict": None, "refused": refused}
    v = verdict.paired_verdict([100 * (t["DSD"]["top1"] - t["control"]["top1"]) for t in tables.values()],
                               seeds=list(runs))
    fileio.write_json(os.path.join(out, VERDICT), dict(dataclasses.asdict(v), split=split))
    return {"verdict": v, "refused": None}


def _parallel(config, out, seeds, jobs, engine, gpu, force):
    ctx = multiprocessing.get_context("spawn")  # Caffe's state is per process; fork would copy a live one
    configs = {config.seed + k: dataclasses.replace(config, seed=config.seed + k) for k in range(seeds)}
    runs, problems = {}, []
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    try:
        futures = {pool.submit(_seed_worker, c, os.path.join(out, f"seed{s}"), engine,
                               devices.of_seed(gpu, s - config.seed), force, jobs > 1): s for s, c in configs.items()}
        for fut in concurrent.futures.as_completed(futures):
            kind, value = fut.result()
            if kind == "ok":
                runs[futures[fut]] = value
                log.info("seed %d done", futures[fut])
            else:
                problems.append((kind, value))
    except KeyboardInterrupt:
        for proc in list(getattr(pool, "_processes", {}).values()):  # a SIGTERM may have reached only this process
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        raise Interrupted("interrupted; run the same command again to resume") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if problems:
        kind, message = problems[0]
        raise (Interrupted(message) if kind == "interrupted" else UserError(message))
    return dict(sorted(runs.items()))


def _seed_worker(config, out, engine, gpu, force, quiet):
    """One seed's run in a child process; returns ("ok", state), ("error", message) or ("interrupted", ...)."""
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # this child process is ours: parallel bars would interleave
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s seed{config.seed} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return "ok", run_dsd(config, out, engine, gpu, force)
    except Interrupted as e:
        return "interrupted", str(e)
    except KeyboardInterrupt:
        return "interrupted", f"seed {config.seed}: interrupted; run the same command again to resume"
    except (UserError, OSError) as e:
        return "error", f"seed {config.seed}: {e}"
