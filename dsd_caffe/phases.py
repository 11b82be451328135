"""DSD's phases, ``dense``, ``sparse`` and ``redense``, each a short function over the training engine
(:mod:`dsd_caffe.training`), which resumes, reuses and refuses folders by their record.

- :func:`train_dense`: train a plain net from given weights or from its own seeded fillers (the first dense
  phase; the demo's).
- :func:`prune`: a dense caffemodel -> a sparse-phase folder (below). Pruning is pure numpy (:mod:`pruning`): it
  needs no data. The sparse trainval is written when the net has data layers; the solver when the LMDBs can be
  counted (on this machine, or through the JSON beside them); otherwise :func:`train_sparse` writes it, where the
  data is, from the settings recorded in ``pruned.caffemodel.json``.
- :func:`train_sparse`: the sparse phase in that folder, under the mask layer.
- :func:`retrain_dense`: DSD's release (:func:`dsd_caffe.masks.release_masks`: pruned weights exactly 0.0,
  survivors as they are, written as ``released.caffemodel``), then the redense phase with a fresh solver.

A phase folder holds ``<phase>_trainval.prototxt``, ``<phase>_solver.prototxt`` (paths relative to the folder:
``cd`` there and ``caffe train --solver=<phase>_solver.prototxt --weights=<start>`` works), ``snapshots/``,
``train.log``, ``training.json`` (the record) and, when done, ``<phase>.caffemodel`` with its JSON. A prune folder
adds ``pruned.caffemodel`` (+ JSON), ``masks.npz`` and ``weights_histogram.png``.

Past 400 lines: the phases share the folder layout, the inputs' checks and the provenance written here; one-shot
and gradual pruning are one prune phase with one folder.
"""
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import tempfile

import numpy as np

from . import fileio, gradual, masks, netcheck, netgen, plots, pruning, solvers, sources, training
from .caffe_env import import_caffe, make_net
from .caffeproto import caffe_pb2
from .errors import InputMissing, UserError
from .solvers import Schedule

log = logging.getLogger(__name__)

PRUNED, MASKS, HISTOGRAM, RELEASED, INIT = ("pruned.caffemodel", "masks.npz", "weights_histogram.png",
                                            "released.caffemodel", "init.caffemodel")


def model_file(phase):
    return f"{phase}.caffemodel"


def net_file(phase):
    return f"{phase}_trainval.prototxt"


def solver_file(phase):
    return f"{phase}_solver.prototxt"


def snapshot_prefix(phase):
    """The solver's snapshot_prefix, relative to the phase folder (Caffe writes ``<prefix>_iter_N.caffemodel``)."""
    return f"{training.SNAPSHOT_DIR}/{phase}"


SPARSE, SPARSE_NET, SPARSE_SOLVER = model_file("sparse"), net_file("sparse"), solver_file("sparse")
REDENSE, DENSE = model_file("redense"), model_file("dense")
#: what a prune folder may hold (``--force`` replaces nothing else)
SPARSE_FOLDER = (PRUNED, MASKS, HISTOGRAM, SPARSE_NET, SPARSE_SOLVER, SPARSE, "*.json", training.SNAPSHOT_DIR,
                 training.LOG, ".*")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Where a phase starts: a trainval prototxt (or ``net_param``, a NetParameter with absolute sources) and a
    caffemodel, with optional TRAIN/TEST data-source overrides."""
    model: str = None
    weights: str = None
    train_source: str = None
    test_source: str = None
    net_param: object = dataclasses.field(default=None, compare=False)

    @property
    def name(self):
        return os.fspath(self.model) if self.model is not None else (self.net_param.name or "net")

    def net(self, require=("TRAIN", "TEST", "BOTH")):
        """The dense net (no mask layer), sources absolute; sources of the ``require``d phases must exist."""
        if self.net_param is not None:
            net = sources.absolute_sources(self.net_param, None, self.train_source, self.test_source, require)
        else:
            net = sources.read_net(self.model, self.train_source, self.test_source, require)
        return masks.remove_mask_layer(net)


def check_inputs(inputs, need_data=True):
    """The dense net and the caffemodel (None without ``inputs.weights``), checked before Caffe sees them:
    structure, data (when needed), fit."""
    net = inputs.net(require=("TRAIN", "TEST", "BOTH") if need_data else ())
    netcheck.check_net(net, name=inputs.name)
    if need_data:
        netcheck.check_data(net, name=inputs.name)
    if inputs.weights is None:
        return net, None
    model_param = fileio.read_caffemodel(inputs.weights)
    netcheck.check_fits(net, model_param, os.fspath(inputs.weights), inputs.name)
    return net, model_param


def _provenance(job, snap, phase, seed, extra, densities=None):
    """The JSON beside a phase's final model, from the run that trained it (its record names the start weights);
    ``densities`` when the caller has them already; ``devices``: the GPUs of the last run, null for none."""
    record = training.record_of(job.folder)
    start = record["weights"]
    if densities is None:
        densities = masks.layer_densities_of(snap.caffemodel)
    return dict(source=start["path"], source_sha256=start["sha256"], devices=record.get("devices"),
                densities=densities, phase=phase, iteration=snap.iteration,
                seed=seed, net=job.net_name, solver=job.solver_name, settings=training.solver_summary(job.solver),
                **extra)


# ------------------------------------------------------------------------------------------------ dense
def train_plain(phase, net, out, solver, start, engine="binary", gpu=None, force=False, extra=None, notes=()):
    """Train the mask-free ``net`` (absolute sources) in ``out`` with ``solver`` (its net and snapshot prefix set
    here) from ``start`` (a caffemodel path, or a (source path, NetParameter) pair written into the folder as
    ``released.caffemodel``/``init.caffemodel``). Files are named after ``phase``; ``extra`` goes into the
    provenance (arm, ...), but for its "desc" (the progress bar's name); ``notes`` are warned before training
    starts (see training.train). Returns the final model's path."""
    out = os.path.abspath(os.fspath(out))
    solver = sources.copy_message(solver)
    solver.net, solver.snapshot_prefix = net_file(phase), snapshot_prefix(phase)
    source, param = start if isinstance(start, tuple) else (start, None)
    fileio.check_apart(out, [source, *sources.data_paths(net)])  # --force clears the folder's own outputs
    start_path = os.path.join(out, RELEASED if source else INIT) if param is not None else source
    extra = dict(extra or {})
    job = training.Job(out, extra.pop("desc", phase), solver_file(phase), solver, net_file(phase),
                       sources.relative_sources(net, out), start_path, param, source,
                       os.path.join(out, model_file(phase)))
    with fileio.output_lock(out):
        snap = training.train(job, engine, gpu, force, notes)
        if snap is not None:
            training.finish(snap, job.final, _provenance(job, snap, phase, solver.random_seed, extra))
    return job.final


def initial_weights(net, seed):
    """The net's own fillers with Caffe's RNG seeded: a caffemodel NetParameter to train from. Filled in a child
    process: pycaffe can seed Caffe's global RNG but not read it back, so seeding it here would change the
    caller's random stream for good."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        data = pool.submit(_filled, net.SerializeToString(), seed).result()
    param = caffe_pb2().NetParameter()
    param.ParseFromString(data)
    return param


def _filled(net_bytes, seed):
    """(In the child) the serialized caffemodel of the net in ``net_bytes`` filled with Caffe's RNG at ``seed``."""
    net = caffe_pb2().NetParameter()
    net.ParseFromString(net_bytes)
    import_caffe().set_random_seed(seed)
    fresh = make_net(netgen.deploy(net, input_shape=netcheck.input_shape(net)), "TEST")
    with tempfile.TemporaryDirectory() as tmp:
        fresh.save(os.path.join(tmp, INIT))
        return fileio.read_caffemodel(os.path.join(tmp, INIT)).SerializeToString()


def train_dense(inputs, output_dir, dense=Schedule(), recipe=None, engine="binary", gpu=None, force=False,
                seed=solvers.SEED, solver=None):
    """The dense phase: ``inputs.weights``, or the net's fillers seeded with ``seed`` when None, trained into
    ``output_dir/dense.caffemodel``. ``recipe`` (see :func:`recipe_of`) picks the defaults of solvers.DEFAULTS;
    ``solver`` (a solver prototxt path) is the template of the phase's solver (solvers.build)."""
    net, _ = check_inputs(inputs)
    note = fallback_note(recipe, inputs.weights, solver)
    recipe = recipe_of(recipe, inputs.weights)
    solver = _solver("dense", net, dense, recipe, seed, solvers.read_template(solver))
    start = os.fspath(inputs.weights) if inputs.weights is not None else (None, initial_weights(net, seed))
    return train_plain("dense", net, output_dir, solver, start, engine, gpu, force,
                       extra={"engine": engine, "recipe": recipe}, notes=[note] if note else ())


def recipe_of(recipe, weights):
    """``recipe`` when given; else the one recorded in the JSON beside ``weights`` (a model this toolkit made
    records the recipe it was trained with, so the next phase takes the same defaults); else "imagenet"."""
    if recipe is not None:
        solvers.defaults("sparse", recipe)  # refuses an unknown recipe
        return recipe
    recorded = _recorded_recipe(weights)
    return recorded if recorded in solvers.RECIPES else "imagenet"


def _recorded_recipe(weights):
    sidecar = fileio.sidecar_path(weights) if weights is not None else None
    return fileio.read_json(sidecar).get("recipe") if sidecar and os.path.isfile(sidecar) else None


def fallback_note(recipe, weights, template):
    """The warning to give, once the inputs are checked and before anything trains, when the phases fall back to
    the imagenet recipe: no ``recipe`` and no ``template`` given, none recorded beside ``weights`` (a user's own
    model would train by another net's recipe); else None."""
    if recipe is None and template is None and weights is not None and \
            _recorded_recipe(weights) not in solvers.RECIPES:
        d = solvers.DEFAULTS["imagenet"]
        return (f"{weights} records no recipe and no --solver was given: the phases take the imagenet recipe "
                f"(solvers.DEFAULTS: sparse base_lr {d['sparse'].base_lr:g} for {d['sparse'].epochs:g} epochs, "
                f"redense {d['redense'].base_lr:g} for {d['redense'].epochs:g} epochs, lr_policy poly, momentum "
                "0.9, weight_decay 0.0002); pass --solver your_solver.prototxt to train with your own solver's "
                "settings")
    return None


def _solver(phase, net, schedule, recipe, seed, template=None):
    (train_src, batch), (test_src, test_batch) = sources.data_sources(net)
    sizes = solvers.DataSizes(sources.lmdb_count(train_src), sources.lmdb_count(test_src), batch, test_batch)
    return solvers.build(phase, net_file(phase), sizes, schedule, recipe, snapshot_prefix(phase), seed, template)


def describe(phase, solver, train_size, batch):
    """One line for people: a phase's length in iterations and epochs and the solver settings it trains with."""
    s = solver
    epochs = s.max_iter * batch * s.iter_size / train_size
    policy = s.lr_policy + "".join(f" {k} {getattr(s, k):g}" for k in ("gamma", "power", "stepsize")
                                   if s.HasField(k))
    return (f"{phase}: {s.max_iter} iterations ({epochs:.3g} epochs of {train_size} images at batch {batch} x "
            f"iter_size {s.iter_size}), base_lr {s.base_lr:g}, lr_policy {policy}, momentum {s.momentum:g}, "
            f"weight_decay {s.weight_decay:g}, type {s.type or 'SGD'}, test_iter {list(s.test_iter)} every "
            f"{s.test_interval}")


# ------------------------------------------------------------------------------------------------ prune
@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """How to prune: one of ``ratio`` ("3x"), ``density`` or ``sparsity`` (see ``pruning.parse_ratio``), a
    ``profile`` (uniform, global, squeezenet-3x or a JSON file), layers to ``skip`` (kept dense) and the seed the
    sparse solver gets. Validated at construction; ``target`` is the density asked for (None: the profile's).
    ``schedule`` "oneshot" prunes now; "gradual" leaves the weights dense and lets the mask layer prune in the
    sparse phase (:mod:`dsd_caffe.gradual`), with ``gradual`` (a ``gradual.Gradual``) over its defaults."""
    ratio: str = None
    density: object = None
    sparsity: object = None
    profile: str = "uniform"
    skip: tuple = ()
    seed: int = solvers.SEED
    schedule: str = "oneshot"
    gradual: object = None
    target: float = dataclasses.field(init=False, default=None)

    def __post_init__(self):
        given = (self.ratio, self.density, self.sparsity) != (None, None, None)
        target = pruning.parse_ratio(self.ratio, self.density, self.sparsity) if given else None
        profile = pruning.check_profile(self.profile)
        if target is None and profile in ("uniform", "global"):
            raise UserError(f"profile {profile!r} needs ratio, density or sparsity; {pruning.ACCEPTED_FORMS}",
                            fields=["ratio", "density", "sparsity"])
        solvers.count(self.seed, "seed", 0)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "profile", profile)
        object.__setattr__(self, "skip", tuple([self.skip] if isinstance(self.skip, str) else self.skip))
        gradual.check_schedule(self.schedule)
        if self.schedule != "gradual" and self.gradual is not None and self.gradual.settings():
            raise UserError(f"gradual settings ({self.gradual.settings()}) need schedule gradual",
                            fields=["schedule"])
        if self.schedule == "gradual" and self.gradual is None:
            object.__setattr__(self, "gradual", gradual.Gradual())

    def masks(self, weights, shared=()):
        """The kept masks for ``weights`` ({weighted layer: array}), refused when they prune nothing (gradual
        pruning: the final masks the schedule heads for from these weights). ``shared`` (:func:`masks.shared_weights`)
        groups layers that share one weight blob: one setting per blob, so different densities for them (--skip, a
        profile) are refused, and they get one mask."""
        densities = self.densities(weights)
        for group in shared:
            first, other = group[0], next((n for n in group if densities[n] != densities[group[0]]), None)
            if other is not None:
                raise UserError(f"layers {first!r} and {other!r} share one weight blob, but skip or the profile "
                                f"gives them densities {densities[first]:g} and {densities[other]:g}; a shared blob "
                                "takes one setting: give both layers the same", fields=["skip"])
        kept = pruning.make_masks(weights, densities)
        for group in shared:
            for name in group[1:]:
                kept[name] = kept[group[0]]  # the same blob: one mask (the same weights give the same anyway)
        if all(m.all() for m in kept.values()):
            field = next((k for k in ("ratio", "density", "sparsity") if getattr(self, k) is not None), "profile")
            raise UserError(f"{field} {getattr(self, field)} keeps every weight of every layer (each layer's kept "
                            "count rounds up to all of it); nothing to prune", fields=[field])
        return kept

    def densities(self, weights):
        """{layer: density} of the profile for ``weights`` (1.0 for a skipped layer)."""
        return pruning.layer_densities(weights, self.target, profile=self.profile, skip=self.skip)

    def plan(self, weights, max_iter, recipe="imagenet"):
        """Gradual pruning's (gradual.Plan, {layer: final density}) for a sparse phase of ``max_iter`` iterations,
        its defaults from ``solvers.DEFAULTS[recipe]["sparse"]``, checked (the schedule ends within the phase, no
        final density above the initial one); None for one-shot. The final densities are the profile's (those
        one-shot pruning would reach at once: the same kept counts)."""
        if self.schedule != "gradual":
            return None
        self.masks(weights)  # refuses what one-shot pruning refuses (nothing pruned, a density above a layer's)
        finals = self.densities(weights)
        row = solvers.defaults("sparse", recipe)
        return self.gradual.resolve(max_iter, row).check(finals, max_iter), finals


#: what a prune folder's JSON records of the command that made it: the folder is reused only when they match
PRUNE_SETTINGS = ("source_sha256", "target_density", "profile", "skip", "seed", "recipe", "sparse_schedule",
                  "trainval_sha256", "gradual", "solver_template")


def prune(inputs, output_dir, config, sparse=Schedule(), recipe=None, force=False, solver=None):
    """Prune ``inputs.weights`` into ``output_dir`` (written whole or not at all: staged in a temporary folder).
    A folder pruned by the same command is reused; other settings are refused, naming the first that differs;
    ``force`` prunes again from scratch. ``solver`` (a solver prototxt path) is the sparse solver's template; its
    text is recorded for :func:`train_sparse`. Returns {"table", "rows", "densities", "model", "output_dir",
    "notes"}."""
    out = os.path.abspath(os.fspath(output_dir))
    given, recipe = recipe, recipe_of(recipe, inputs.weights)
    fileio.check_apart(out, (inputs.model, inputs.weights, *sources.data_paths(inputs.net(require=()))))
    with fileio.output_lock(out):
        fileio.check_replaceable(out, SPARSE_FOLDER, True, "prune.py")  # never a folder of other files
        plan = _plan(inputs, config, sparse, recipe, out, solvers.read_template(solver))

        pruned = os.path.join(out, PRUNED)
        if training.finished(pruned) and not force:
            old = fileio.read_json(fileio.sidecar_path(pruned))
            first = next((k for k in PRUNE_SETTINGS if old.get(k) != plan["record"][k]), None)
            if first is not None:
                raise UserError(f"{out} already holds a pruned model made with other settings (first: {first}: "
                                f"{old.get(first)!r} there, {plan['record'][first]!r} now); use the same command "
                                "to reuse it, another --output, or --force to prune again from scratch")
            log.info("reusing %s: pruned by the same command", pruned)
        else:
            fileio.check_replaceable(out, SPARSE_FOLDER, force, "prune.py")
            _write_prune_folder(out, plan, inputs)
            log.info("pruned %s -> %s", inputs.weights, pruned)
    for note in plan["notes"]:
        log.info("%s", note)
    fallback = fallback_note(given, inputs.weights, solver)
    if fallback:
        log.warning("%s", fallback)
    rows = plan["rows"]
    return {"table": pruning.format_table(rows), "rows": rows, "densities": {r["name"]: r["density"] for r in rows},
            "model": pruned, "output_dir": out, "notes": plan["notes"]}


def _plan(inputs, config, sparse, recipe, out, template):
    """Everything prune writes, computed in memory first (so a refusal writes nothing)."""
    net = inputs.net(require=())
    data_layers = [p.source for _, p in sources.source_fields(net)]
    present = bool(data_layers) and all(os.path.exists(s) for s in data_layers)
    net, model_param = check_inputs(inputs, need_data=present)
    names = netgen.weighted_layers(net)
    if not names:
        raise UserError(f"net {net.name!r} has no Convolution/InnerProduct layer to prune")
    weights = {n: w for n, w in masks.weight_arrays(model_param).items() if n in names}
    shared = masks.shared_weights(net)
    kept = config.masks(weights, shared)
    shapes = {n: w.shape for n, w in weights.items()}
    solver, notes = _sparse_solver(masks.sparse_net(net, shapes), sparse, recipe, config.seed, bool(data_layers),
                                   template)
    gradual_plan = None
    if config.schedule == "gradual":
        if solver is None:
            raise UserError(f"schedule gradual needs the sparse phase's length to place its steps: {notes[0]}",
                            fields=["schedule"])
        gradual_plan = config.plan(weights, solver.max_iter, recipe)
        kept = pruning.make_masks(weights, {n: 1.0 for n in weights})  # the mask layer prunes while training
        final = sum(gradual_plan[1][n] * w.size for n, w in weights.items()) / sum(w.size for w in weights.values())
        notes.append(f"gradual pruning: {gradual_plan[0].describe()}, of the sparse phase's {solver.max_iter}; final "
                     f"density {final:.4f}")
    rows = pruning.summary_rows(weights, kept)
    for group in shared:  # the table counts a shared blob once
        for row in rows:
            if row["name"] in group[1:]:
                row["shares"] = group[0]
    sparse_net = masks.sparse_net(net, shapes, gradual=gradual_plan)  # the solver only names it and reads its data
    relative = sources.relative_sources(sparse_net, out) if data_layers else None
    record = dict(source_sha256=training.file_record(inputs.weights)["sha256"], target_density=config.target,
                  profile=config.profile, skip=list(config.skip), seed=config.seed, recipe=recipe,
                  sparse_schedule=sparse.settings(),
                  trainval_sha256=training.text_digest(relative) if relative is not None else None,
                  gradual=dict(gradual_plan[0].to_json(), final_densities=gradual_plan[1]) if gradual_plan else None,
                  solver_template=training.text_of(template) if template is not None else None)
    return dict(weights=weights, kept=kept, rows=rows, model_param=model_param, sparse_net=sparse_net,
                relative=relative, solver=solver, notes=notes, record=record)


def _write_prune_folder(out, plan, inputs):
    rows, kept, weights = plan["rows"], plan["kept"], plan["weights"]
    with fileio.atomic_path(out, force=True, directory=True) as tmp:
        if plan["relative"] is not None:
            fileio.write_prototxt(os.path.join(tmp, SPARSE_NET), plan["relative"])
            os.mkdir(os.path.join(tmp, training.SNAPSHOT_DIR))  # caffe train does not create it
        if plan["solver"] is not None:
            fileio.write_prototxt(os.path.join(tmp, SPARSE_SOLVER), plan["solver"])
        masks.save_masks(os.path.join(tmp, MASKS), kept, force=True)
        plots.weight_histograms(os.path.join(tmp, HISTOGRAM), {
            "before": masks.flat(weights), "after": masks.flat(pruning.apply_masks(weights, kept))},
            f"{os.path.basename(os.fspath(inputs.weights))}: pruned to "
            f"{sum(r['kept'] for r in rows) / sum(r['size'] for r in rows):.3f}", zeros="hidden")
        pruned = os.path.join(tmp, PRUNED)
        fileio.write_caffemodel(pruned, masks.add_masks_to_caffemodel(plan["model_param"], kept, plan["sparse_net"]))
        fileio.write_provenance(pruned, source=os.path.abspath(os.fspath(inputs.weights)),
                                densities={r["name"]: r["density"] for r in rows}, phase="sparse", iteration=0,
                                made_by="prune", thresholds={r["name"]: r["threshold"] for r in rows}, masks=MASKS,
                                net=SPARSE_NET if plan["relative"] is not None else None,
                                solver=SPARSE_SOLVER if plan["solver"] is not None else None, **plan["record"])


def _sparse_solver(net, schedule, recipe, seed, trainable, template):
    """(the sparse solver or None, notes saying why not)."""
    if not trainable:
        return None, ["the model is a deploy net (no data layers): wrote the pruned caffemodel and masks; prune "
                      "the trainval prototxt to get the sparse trainval and solver"]
    (train_src, batch), (test_src, test_batch) = sources.data_sources(net)
    train_n, test_n = sources.known_count(train_src), sources.known_count(test_src)
    if test_n is None or (train_n is None and schedule.max_iter is None):
        missing = ", ".join(s for s, n in ((train_src, train_n), (test_src, test_n)) if n is None)
        return None, [f"no {SPARSE_SOLVER}: the LMDB(s) {missing} are not on this machine to count their images; "
                      f"tools/train_sparse.py writes it where the data is, from the settings recorded in "
                      f"{fileio.sidecar_path(PRUNED)}"]
    sizes = solvers.DataSizes(train_n, test_n, batch, test_batch)
    return solvers.build("sparse", SPARSE_NET, sizes, schedule, recipe, snapshot_prefix("sparse"), seed, template), []


# ------------------------------------------------------------------------------------------------ sparse
def _sparse_folder(out):
    """The masks of a prune folder and its sparse trainval (sources as written), checked: the sparse trainval's
    structure (netcheck) first, then masks.npz, the pruned model's mask layer and the net's agree."""
    for f in (PRUNED, SPARSE_NET, MASKS):
        if not os.path.exists(os.path.join(out, f)):
            raise InputMissing(f"{out} is not a folder written by tools/prune.py with a sparse trainval "
                               f"(no {f})")
    net = fileio.read_net_prototxt(os.path.join(out, SPARSE_NET))
    netcheck.check_net(net, name=os.path.join(out, SPARSE_NET))  # a misspelt type, module or class is named first
    stored = masks.load_masks(os.path.join(out, MASKS))
    net_spec = masks.mask_layer_spec(net)
    pruned = fileio.read_caffemodel(os.path.join(out, PRUNED))
    model_spec = masks.mask_layer_spec(pruned)
    if net_spec is None or model_spec is None:
        raise UserError(f"{out}: {SPARSE_NET if net_spec is None else PRUNED} holds no mask layer")
    for (ln, ls), (mn, ms) in zip(net_spec[1], model_spec[1]):
        if (ln, ls) != (mn, ms):
            raise UserError(f"{out}: the mask of layer {mn!r} in {PRUNED} is {ms}, but {SPARSE_NET} masks {ln!r} "
                            f"{ls}; the mask does not fit the net")
    if len(net_spec[1]) != len(model_spec[1]) or net_spec[0] != model_spec[0]:
        raise UserError(f"{out}: the mask layers of {SPARSE_NET} and {PRUNED} differ")
    inside = masks.read_masks(pruned)
    k = masks.same_masks(stored, inside)
    if k is not None:
        raise UserError(f"{out}: {MASKS} and the masks inside {PRUNED} differ, first at layer {k!r} (shape "
                        f"{getattr(stored.get(k), 'shape', None)} in {MASKS}, "
                        f"{getattr(inside.get(k), 'shape', None)} in {PRUNED})")
    return stored, net


def train_sparse(output_dir, sparse=Schedule(), engine="binary", gpu=None, force=False, solver=None):
    """The sparse phase in a folder written by :func:`prune`: train from pruned.caffemodel (or resume, or reuse a
    finished phase of the same settings), check that every pruned weight is still 0.0, write sparse.caffemodel and
    its JSON. ``sparse`` overrides the solver's settings (the solver is rebuilt from those recorded at pruning), as
    does ``solver`` (a solver prototxt path: the template, instead of the one recorded); without either the
    folder's own sparse_solver.prototxt is used as it is. Returns the final model's path."""
    out = os.path.abspath(os.fspath(output_dir))
    with fileio.output_lock(out):
        stored, net_rel = _sparse_folder(out)
        prov = fileio.read_json(fileio.sidecar_path(os.path.join(out, PRUNED)))
        dense_net = masks.remove_mask_layer(sources.absolute_sources(net_rel, out))
        netcheck.check_data(dense_net, name=os.path.join(out, SPARSE_NET))
        solver_path = os.path.join(out, SPARSE_SOLVER)
        if sparse.settings() or solver is not None or not os.path.exists(solver_path):
            recorded = dict(prov.get("sparse_schedule", {}))
            if {"epochs", "max_iter"} & set(sparse.settings()):  # a length given now replaces the recorded one
                recorded.pop("epochs", None)
                recorded.pop("max_iter", None)
            schedule = dataclasses.replace(Schedule(**recorded), **sparse.settings())
            recorded = prov.get("solver_template")
            template = solvers.read_template(solver) if solver is not None else fileio.parse_prototxt(
                recorded, caffe_pb2().SolverParameter(), fileio.sidecar_path(PRUNED)) if recorded is not None else None
            solver = _solver("sparse", dense_net, schedule, prov.get("recipe", "imagenet"), prov.get("seed", 0),
                             template)
        else:
            solver = fileio.read_solver_prototxt(solver_path)
        plan = masks.gradual_spec(net_rel)
        if plan is not None:
            plan[0].check({}, solver.max_iter)  # a --max-iter given now may end the phase before the schedule
        job = training.Job(out, "sparse", SPARSE_SOLVER, solver, SPARSE_NET, net_rel, os.path.join(out, PRUNED),
                           final=os.path.join(out, SPARSE))
        snap = training.train(job, engine, gpu, force)
        if snap is None:
            return job.final
        extra = dict(engine=engine, masked_layers=sorted(stored), recipe=prov.get("recipe", "imagenet"))
        if plan is None:
            trained = fileio.read_caffemodel(snap.caffemodel)
            dens = masks.check_masked(trained, stored, snap.caffemodel)
            if masks.same_masks(masks.read_masks(trained), stored) is not None:
                raise UserError(f"{snap.caffemodel}: the masks in the snapshot differ from {MASKS}")
            training.finish(snap, job.final, _provenance(job, snap, "sparse", prov.get("seed"), extra, dens))
        else:
            _finish_gradual(job, snap, stored, plan, prov, extra)
    return job.final


def _finish_gradual(job, snap, stored, plan, prov, extra):
    """The final model of a gradual sparse phase: the snapshot with the weights its masks prune at exactly 0.0
    (:func:`masks.zero_pruned`), after checking that no mask grew; its JSON adds the schedule and its density
    curve (the targets of every step, which the layer's log lines print; a killed run loses the tail of its log)."""
    trained, residual = masks.zero_pruned(fileio.read_caffemodel(snap.caffemodel))
    inside = masks.read_masks(trained)
    grown = next((n for n in stored if np.any(inside[n] & ~stored[n])), None)
    if grown is not None:
        raise UserError(f"{snap.caffemodel}: the mask of layer {grown!r} keeps weights that {MASKS} prunes")
    dens = masks.check_masked(trained, inside, snap.caffemodel)
    log.info("sparse: final density %.4f; the solver's momentum residual zeroed under the masks: largest %.3g",
             sum(m.sum() for m in inside.values()) / sum(m.size for m in inside.values()), residual)
    sizes = {n: int(m.size) for n, m in inside.items()}
    extra = dict(extra, gradual=dict(plan[0].to_json(), final_densities=plan[1]),
                 density_curve=gradual.density_curve(plan[0], sizes, plan[1]))
    fileio.write_caffemodel(job.final, trained)
    fileio.write_provenance(job.final, force=True, **_provenance(job, snap, "sparse", prov.get("seed"), extra, dens))


# ------------------------------------------------------------------------------------------------ redense
def retrain_dense(inputs, output_dir, redense=Schedule(), recipe=None, engine="binary", gpu=None, force=False,
                  seed=solvers.SEED, solver=None):
    """The redense phase: release the masks of ``inputs.weights`` (a sparse-phase caffemodel; a caffemodel with no
    mask layer is taken as it is) and train the dense net from it with a fresh solver into
    ``output_dir/redense.caffemodel``; ``solver`` (a solver prototxt path) is its template. Returns its path."""
    net, model_param = check_inputs(inputs)
    note = fallback_note(recipe, inputs.weights, solver)
    recipe = recipe_of(recipe, inputs.weights)
    if masks.mask_layer_spec(model_param) is not None:
        released = masks.release_masks(model_param, os.fspath(inputs.weights))[0]
        log.info("redense: masks released; training starts at density %.4f",
                 masks.sparsity_report(released)["total"]["density"])
    else:
        released = model_param
    solver = _solver("redense", net, redense, recipe, seed, solvers.read_template(solver))
    return train_plain("redense", net, output_dir, solver, (os.fspath(inputs.weights), released), engine, gpu,
                       force, extra={"engine": engine, "recipe": recipe}, notes=[note] if note else ())
