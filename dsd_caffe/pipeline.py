"""The DSD run: (prune -> sparse -> redense) x cycles from a dense caffemodel, resumable after any interruption,
optionally beside its control arm. Its read-outs (table, curves, the seeds' verdict) are :mod:`dsd_caffe.runreport`;
several seeds in worker processes are :mod:`dsd_caffe.seedpool`.

The run folder (one writer: it is locked for the whole run):

- ``dsd_state.json``: the run's record: its settings (a folder is reused only with the same settings; the first
  that differs is named), the SHA-256 of the dense model both arms start from, and one entry per finished step
  (model, validation and holdout results, density), written after every step.
- ``cycle<c>-sparse/``, ``cycle<c>-redense/``: the DSD arm's phase folders (:mod:`dsd_caffe.phases`).
- ``control<c>-dense-as-sparse/``, ``control<c>-dense-as-redense/`` (``control=True``, named by
  :func:`control_step`): the control arm: the same net without a mask layer, trained dense from the same starting
  model with the very solvers the DSD arm's sparse and redense phases ran (read back from their folders): the same
  iterations, learning rates, seeds and data order, and a fresh solver at each phase boundary as DSD's phases get.
- ``accuracy.png``: validation accuracy of both arms across the phases, the pruning dip marked.

A seed changes the solvers' ``random_seed`` (dropout and the random crop and mirror of the data layers) and, with
``data_order="shuffled"`` (the default over several seeds), the order the TRAIN data is read in
(``train_lmdb-shuffled/``, a copy of the TRAIN LMDB in the seed's order: :mod:`dsd_caffe.dataorder`).
"""
import dataclasses
import json
import logging
import os
import re

from . import (caffelog, dataorder, devices, evaluate, fileio, masks, netcheck, netgen, phases, plots, solvers, sources,
               training)
from .errors import Interrupted, OutputExists, UserError
from .phases import Inputs, PruneConfig
from .runreport import VERDICT, boundaries, curves, density_curve, results_text
from .solvers import Schedule

log = logging.getLogger(__name__)

STATE = "dsd_state.json"
SHUFFLED = "train_lmdb-shuffled"  # the run's TRAIN data in its seed's order (data_order="shuffled")
PLOT = "accuracy.png"
#: everything a run writes in its folder (with several seeds, its seed folders and verdict): what --force may replace
OWNED = (STATE, PLOT, VERDICT, "dense", "cycle*", "control*", "seed*", SHUFFLED + "*")
TOOL = "dsd.py"
#: the control arm's step names of earlier releases (control<c>-sparse, control<c>-redense: both trained dense)
OLD_CONTROL = re.compile(r"control\d+-(sparse|redense)")


def control_step(cycle, phase):
    """The name (and folder) of the control arm's step that mirrors DSD's ``phase`` step ("sparse", "redense") of
    ``cycle``: it trains phase dense, for as long as that step and with its solver."""
    return f"control{cycle}-dense-as-{phase}"


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
        elif state.get("finished") and reuse and state.get("config") == settings:
            _check_start(out, state, config)
            log.info("DSD: reusing the finished run in %s", out)
            return state
        elif state.get("finished"):
            raise OutputExists(f"{out} already holds a finished DSD run ({STATE}); pass --force to start over")
        elif old_steps := _old_control(out, state):
            raise UserError(f"{out} holds an unfinished DSD run whose control arm is in "
                            f"{os.path.join(out, old_steps[0])}, a folder name of an earlier release "
                            f"(now {control_step(1, 'sparse')} and the like); re-run with --force to start over")
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
    if force:  # starting over: what the run owns goes; a foreign file is refused, named (fileio.clear_owned)
        fileio.clear_owned(out, OWNED, TOOL)
    fileio.check_output(path, force=True)  # a real write probe (root ignores modes)
    state = {"config": settings, "phases": [], "finished": False,
             "dense_model": training.file_record(config.weights)}
    fileio.write_json(path, state)
    for level, line in plan:  # the run's plan, once nothing can refuse it any more
        log.log(level, "%s", line)
    return state


def _old_control(out, state):
    """The control steps (state entries or folders) of ``out`` named as in an earlier release, sorted: such a run
    is not resumed (its records name those folders, so they cannot be renamed under it)."""
    return sorted({p["name"] for p in state.get("phases", []) if OLD_CONTROL.fullmatch(p["name"])} |
                  {n for n in os.listdir(out) if OLD_CONTROL.fullmatch(n)})


def _check_start(out, state, config):
    """Refuse to resume a run whose dense model is no longer the one it started from (the file was replaced):
    both arms must start from the model the state records."""
    recorded = state.get("dense_model", {}).get("sha256")
    now = training.file_record(config.weights)["sha256"]
    if recorded != now:
        raise UserError(f"{out} holds a DSD run started from {config.weights} with SHA-256 {recorded}, but that file "
                        f"now has SHA-256 {now} (it was replaced); put the original back to resume, or use another "
                        "--output, or --force to start over")


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
    return sources.absolute_sources(net, None, test=source)


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
                    run.step(control_step(c, phase), "control", "dense", lambda: run.control(control, folder, c, phase))
                    control = run.model(control_step(c, phase))
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
        return phases.train_plain("dense", self.net, os.path.join(self.out, control_step(cycle, phase)), solver,
                                  start, self.engine, self.gpu, extra={"arm": "control", "schedule": phase,
                                                                       "desc": f"control ({phase} schedule)",
                                                                       "engine": self.engine,
                                                                       "recipe": self.config.recipe})
