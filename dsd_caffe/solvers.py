"""Solvers for DSD's three phases, ``dense``, ``sparse`` and ``redense``, from one table of defaults.

:data:`DEFAULTS` is the only place a phase's default learning rate, policy, length, momentum, weight decay,
batch and snapshot cadence is written. Two recipes:

- ``imagenet`` (the default for any net): SqueezeNet v1.0 as published. Dense: DeepScale's solver (batch 32 x
  iter_size 16, base_lr 0.04, poly, 170,000 iterations, about 68 epochs). Sparse: the same shape at a tenth of
  the rate for 20 epochs (the DSD release publishes no sparse solver; this is ours). Redense: base_lr 1e-4 for 20
  epochs, as the DSD paper. Sparse and redense take iter_size 1 (the net's own batch) unless told: the
  ImageNet commands of docs/imagenet.md pass ``--iter-size 16`` for DeepScale's effective batch of 512.
- ``fashion-mnist``: the small net of ``make demo``, chosen on the validation split (docs/results.md,
  "Regimes tried on validation"): dense 4,000 iterations at 0.04, sparse and redense 1,000 at 0.004, batch 64.

The tools, the pipeline, the demo and ``tools/generate.py`` (the committed ``solvers/``) all read it; a test checks
the committed files against it. A :class:`Schedule` holds what a user overrides (None: the table's value).

Epochs become ``max_iter`` = ceil(epochs * train_size / (batch_size * iter_size)); ``test_iter`` =
ceil(test_size / test_batch) covers the whole test set; snapshots are taken every ceil(max_iter / snapshots).

Your solver as the template. ``build(..., template=)`` (the tools' ``--solver my_solver.prototxt``) starts the
phase's solver from a copy of the user's: its momentum, weight decay, lr policy and its parameters, ``test_iter``,
``test_interval``, ``iter_size``, type and every other field, but for :data:`OWN_FIELDS`: what DSD defines for a
phase (its base_lr and length, from the recipe or the flags), its files, snapshots and seed, and the device
(``solver_mode``/``device_id``: the tools' ``--gpu`` decides, as everywhere). Flags given explicitly still win.
The dense phase (``--train-dense-per-seed``) is the user's own training: it takes the template's base_lr and
max_iter too.

Paths. Caffe resolves a solver's ``net`` and ``snapshot_prefix`` against the working folder of the ``caffe``
process. The toolkit writes them relative to the solver file's own folder and runs ``caffe train`` *from that
folder*; :func:`resolve_paths` gives a copy with absolute paths, for running from anywhere else.
"""
import dataclasses
import logging
import math
import os

from .caffeproto import caffe_pb2
from .checks import INT_MAX, count, positive  # noqa: F401 (read here by other modules)
from .errors import UserError
from .fileio import read_solver_prototxt

log = logging.getLogger(__name__)

PHASES = ("dense", "sparse", "redense")
RECIPES = ("imagenet", "fashion-mnist")
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


@dataclasses.dataclass(frozen=True)
class PhaseDefaults:
    """One row of the table. ``max_iter`` or ``epochs`` (one of them) sets the length; ``snapshots`` and
    ``tests`` are per run (None tests: every 1,000 iterations)."""
    base_lr: float
    max_iter: int = None
    epochs: float = None
    lr_policy: str = "poly"
    power: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0002
    batch_size: int = 32
    iter_size: int = 1
    test_batch: int = 50
    snapshots: int = 10
    tests: int = None
    display: int = 40
    #: gradual pruning (sparse phase, ``--schedule gradual``; dsd_caffe.gradual): from the phase's start, from the
    #: dense model, to the final densities at 2/3 of the phase, in 15 steps (Zhu & Gupta's cubic schedule)
    gradual_begin: float = 0.0
    gradual_end: float = 2 / 3
    gradual_steps: int = 15


#: The one table of per-phase defaults: DEFAULTS[recipe][phase].
DEFAULTS = {
    "imagenet": {
        "dense": PhaseDefaults(base_lr=0.04, max_iter=170000, iter_size=16),
        "sparse": PhaseDefaults(base_lr=0.004, epochs=20),
        "redense": PhaseDefaults(base_lr=1e-4, epochs=20),
    },
    "fashion-mnist": {
        "dense": PhaseDefaults(base_lr=0.04, max_iter=4000, batch_size=64, iter_size=1, test_batch=100,
                               snapshots=4, tests=8, display=100),
        "sparse": PhaseDefaults(base_lr=0.004, max_iter=1000, batch_size=64, iter_size=1, test_batch=100,
                                snapshots=2, tests=8, display=50),
        "redense": PhaseDefaults(base_lr=0.004, max_iter=1000, batch_size=64, iter_size=1, test_batch=100,
                                 snapshots=2, tests=8, display=50),
    },
}

#: DeepScale's published dense solver values for SqueezeNet v1.0 (the imagenet recipe's dense row).
DEEPSCALE_DENSE = dict(batch_size=32, iter_size=16, base_lr=0.04, lr_policy="poly", power=1.0, max_iter=170000,
                       momentum=0.9, weight_decay=0.0002)

#: ILSVRC-2012 sizes (train images, val images).
IMAGENET_TRAIN, IMAGENET_VAL = 1281167, 50000


def defaults(phase, recipe="imagenet"):
    if recipe not in DEFAULTS:
        raise UserError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if phase not in PHASES:
        raise UserError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    return DEFAULTS[recipe][phase]


#: The one seed default: every solver's ``random_seed``, the demo's initial weights, every tool's ``--seed``.
SEED = 0


def snapshot_interval(max_iter, snapshots):
    """Iterations between snapshots when a run of ``max_iter`` takes ``snapshots`` of them."""
    return max(1, math.ceil(max_iter / snapshots))


def epochs_to_iters(epochs, train_size, batch_size, iter_size=1):
    """Solver iterations for ``epochs`` passes over ``train_size`` images at ``batch_size * iter_size`` per
    iteration (rounded up, at least 1)."""
    positive(epochs, "epochs")
    count(train_size, "train_size")
    count(batch_size, "batch_size")
    count(iter_size, "iter_size")
    # exact for integer epochs; a float epoch count is rounded to 1e-9 first so 0.1 * 10 is not 1.0000000001
    images = round(epochs * train_size, 9)
    return max(1, math.ceil(images / (batch_size * iter_size)))


def test_iters(test_size, batch):
    """``test_iter`` covering all ``test_size`` images at ``batch`` per iteration (rounded up)."""
    count(test_size, "test_size")
    count(batch, "batch")
    return math.ceil(test_size / batch)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What a user sets for one phase's training; None takes the value from :data:`DEFAULTS`. Validated once, at
    construction; ``flag`` ("sparse", "redense" or "": the phase's field in its config) prefixes the fields that
    messages name (``sparse.base_lr``; the tools print ``--sparse-base-lr``)."""
    base_lr: float = None
    epochs: float = None
    max_iter: int = None
    snapshot: int = None
    iter_size: int = None
    lr_policy: str = None
    momentum: float = None
    weight_decay: float = None
    test_interval: int = None
    display: int = None
    flag: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        name = (lambda field: f"{self.flag}.{field}" if self.flag else field)
        for field in ("base_lr", "epochs"):
            if getattr(self, field) is not None:
                positive(getattr(self, field), name(field), float32=field == "base_lr")
        for field in ("max_iter", "snapshot", "iter_size", "test_interval"):
            if getattr(self, field) is not None:
                count(getattr(self, field), name(field))
        if self.epochs is not None and self.max_iter is not None:
            raise UserError(f"give {name('epochs')} ({self.epochs}) or {name('max_iter')} ({self.max_iter}), "
                            "not both", fields=[name("epochs"), name("max_iter")])
        if self.lr_policy is not None and self.lr_policy not in LR_POLICIES:
            raise UserError(f"lr_policy {self.lr_policy!r} is not one of {', '.join(LR_POLICIES)}")
        for field in ("momentum", "weight_decay"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf):
                raise UserError(f"{field} must be a finite number >= 0, got {v!r}")
        if self.display is not None:
            count(self.display, "display", 0)

    def settings(self):
        """The values the user set, {field: value} (what a phase's record compares)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "flag" and getattr(self, f.name) is not None}


@dataclasses.dataclass(frozen=True)
class DataSizes:
    """What turns epochs and test sets into iterations: the LMDBs' record counts (``train`` may be None when the
    length is given in iterations) and the net's own batch sizes (None: the table's)."""
    train: int = None
    test: int = None
    batch: int = None
    test_batch: int = None


#: solver fields with no Schedule flag, settable through build()'s ``extra``
EXTRA = {"gamma": 0.1, "stepsize": None, "power": None, "average_loss": 40, "test_initialization": False,
         "solver_type": "SGD"}


#: solver fields a phase never takes from a template: DSD's (the phase's base_lr and length), the files the
#: toolkit writes and reads (net, snapshots in its format) the seed and the device
OWN_FIELDS = ("net", "net_param", "train_net", "test_net", "train_net_param", "test_net_param", "train_state",
              "test_state", "base_lr", "max_iter", "snapshot", "snapshot_prefix", "snapshot_format", "snapshot_diff",
              "random_seed",
              "solver_mode", "device_id")  # the device is the tools' choice (--gpu), never a template's


def read_template(path):
    """The SolverParameter of a user's solver prototxt (``--solver``), or None for None."""
    return None if path is None else read_solver_prototxt(path)


def build(phase, net, sizes, schedule=Schedule(), recipe="imagenet", snapshot_prefix=None, random_seed=SEED,
          template=None, **extra):
    """The SolverParameter of ``phase`` for ``net`` (a prototxt path, written into the solver): the table's row for
    ``recipe`` with ``schedule``'s settings over it, or with a ``template`` (a SolverParameter: the user's solver)
    that row's base_lr and length over the template (see the module doc); ``sizes`` (:class:`DataSizes`) turn
    epochs and the test set into iterations. ``extra`` holds the rarer solver fields of :data:`EXTRA`."""
    unknown = set(extra) - set(EXTRA)
    if unknown:
        raise TypeError(f"unknown solver argument(s): {', '.join(sorted(unknown))}")
    row = dataclasses.replace(defaults(phase, recipe), **{k: v for k, v in schedule.settings().items()
                                                          if k in _DEFAULT_FIELDS})
    if template is not None:
        row = dataclasses.replace(row, iter_size=schedule.iter_size or template.iter_size or 1)
        if phase == "dense" and template.max_iter:  # the user's solver is their dense training: its rate, length
            row = dataclasses.replace(row, base_lr=schedule.base_lr or template.base_lr,
                                      max_iter=template.max_iter, epochs=schedule.epochs)
    max_iter = schedule.max_iter
    if max_iter is None:
        epochs = row.epochs  # the schedule's epochs, when given, are already in the row
        if epochs is None:
            max_iter = row.max_iter
        elif sizes.train is None:
            raise UserError(f"the {phase} phase's length is given in epochs ({epochs:g}) but the TRAIN data is not "
                            "on this machine to count its images; give the iterations (--max-iter)")
        else:
            max_iter = epochs_to_iters(epochs, sizes.train, sizes.batch or row.batch_size, row.iter_size)
            if max_iter > INT_MAX:
                raise UserError(f"{epochs:g} epochs of the {phase} phase are {max_iter:.3g} iterations, more than "
                                f"Caffe's max_iter holds ({INT_MAX}); give fewer epochs")
    test_interval = schedule.test_interval or (math.ceil(max_iter / row.tests) if row.tests else
                                               max(1, min(1000, max_iter)))
    if template is not None:
        s = _inherited(template, net, row, schedule)
        test_interval = s.test_interval if s.HasField("test_interval") and not schedule.test_interval else \
            test_interval
    else:
        s = _solver(net, row, dict(EXTRA, **extra))
    if not s.test_iter:
        s.test_iter.append(test_iters(sizes.test, sizes.test_batch or row.test_batch))
    s.max_iter, s.test_interval = count(max_iter, "max_iter"), test_interval
    s.snapshot = schedule.snapshot or snapshot_interval(max_iter, row.snapshots)
    s.snapshot_prefix = os.fspath(snapshot_prefix or phase)
    if random_seed is not None:
        s.random_seed = count(random_seed, "random_seed", 0)  # Caffe takes -1 as "a random seed": never reproducible
    return s


def _solver(net, row, extra):
    """The solver fields that come from a table row (with a Schedule's settings over it) and ``extra``."""
    pb2 = caffe_pb2()
    if not isinstance(net, (str, os.PathLike)) or not os.fspath(net):
        raise TypeError(f"net must be a prototxt path, got {net!r}")
    s = pb2.SolverParameter(net=os.fspath(net), test_initialization=bool(extra["test_initialization"]),
                            base_lr=positive(row.base_lr, "base_lr", float32=True), display=row.display,
                            average_loss=count(extra["average_loss"], "average_loss"),
                            iter_size=count(row.iter_size, "iter_size"), lr_policy=row.lr_policy,
                            momentum=float(row.momentum), weight_decay=float(row.weight_decay),
                            solver_mode=pb2.SolverParameter.CPU, type=extra["solver_type"])
    if row.lr_policy in ("poly", "inv"):
        s.power = float(row.power if extra["power"] is None else extra["power"])
    if row.lr_policy in ("step", "exp", "inv", "multistep", "sigmoid"):
        s.gamma = float(extra["gamma"])
    if row.lr_policy in ("step", "sigmoid"):
        s.stepsize = count(extra["stepsize"], "stepsize")
    return s


def _inherited(template, net, row, schedule):
    """The template's fields but :data:`OWN_FIELDS`, with the row's base_lr and iter_size and the flags the user
    gave (``schedule``) over them."""
    pb2 = caffe_pb2()
    asked_gpu = template.HasField("solver_mode") and template.solver_mode == pb2.SolverParameter.GPU
    s = pb2.SolverParameter()
    s.CopyFrom(template)
    for field in OWN_FIELDS:
        s.ClearField(field)
    s.net = os.fspath(net)
    s.base_lr = positive(row.base_lr, "base_lr", float32=True)
    s.iter_size = count(row.iter_size, "iter_size")
    for field in ("lr_policy", "momentum", "weight_decay", "display"):
        if getattr(schedule, field) is not None:
            setattr(s, field, getattr(schedule, field))
    s.solver_mode = pb2.SolverParameter.CPU  # as a recipe's solver: the device is the tools' --gpu (caffe -gpu N)
    if asked_gpu:
        log.info("your solver says solver_mode GPU: the device is chosen by --gpu (without it, the CPU)")
    return s


_SCHEDULE_FIELDS = {f.name for f in dataclasses.fields(Schedule)} - {"flag"}
_DEFAULT_FIELDS = {f.name for f in dataclasses.fields(PhaseDefaults)}


def _builder(phase):
    def solver(net, train_size=IMAGENET_TRAIN, test_size=IMAGENET_VAL, **kw):
        sizes = DataSizes(train_size, test_size, kw.pop("batch_size", None), kw.pop("test_batch", None))
        args = {k: kw.pop(k) for k in ("recipe", "snapshot_prefix", "random_seed") if k in kw}
        schedule = Schedule(**{k: kw.pop(k) for k in list(kw) if k in _SCHEDULE_FIELDS})
        return build(phase, net, sizes, schedule, **args, **kw)

    solver.__name__ = f"{phase}_solver"
    solver.__doc__ = (f"The {phase} phase's solver for ``net`` from :data:`DEFAULTS` (``recipe=``), with any "
                      "Schedule field (base_lr, epochs, max_iter, snapshot, iter_size, lr_policy, momentum, "
                      "weight_decay, test_interval, display), batch_size/test_batch (the net's), snapshot_prefix, "
                      "random_seed or an EXTRA field (gamma, stepsize, power, average_loss, test_initialization, "
                      "solver_type) overriding it.")
    return solver


dense_solver = _builder("dense")
sparse_solver = _builder("sparse")
redense_solver = _builder("redense")


def relative_net(solver_path, net_path):
    """``net_path`` written relative to the folder of ``solver_path`` (what a solver file should hold)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(solver_path)))
    return os.path.relpath(os.path.abspath(os.fspath(net_path)), folder)


def resolve_paths(solver_param, folder):
    """A copy of ``solver_param`` whose relative ``net`` and ``snapshot_prefix`` are made absolute against
    ``folder`` (the solver file's folder), so Caffe can run it from any working folder."""
    s = caffe_pb2().SolverParameter()
    s.CopyFrom(solver_param)
    folder = os.path.abspath(os.fspath(folder))
    if s.net and not os.path.isabs(s.net):
        s.net = os.path.normpath(os.path.join(folder, s.net))
    if s.snapshot_prefix and not os.path.isabs(s.snapshot_prefix):
        s.snapshot_prefix = os.path.normpath(os.path.join(folder, s.snapshot_prefix))
    return s


def load_solver(path):
    """Read a solver prototxt and return it with paths resolved against its folder (see resolve_paths)."""
    return resolve_paths(read_solver_prototxt(path), os.path.dirname(os.path.abspath(os.fspath(path))))
