"""Gradual pruning's schedule (Zhu & Gupta, "To prune, or not to prune", 2017), in pure Python (no Caffe).

Each pruned layer goes from the initial density ``s_i`` (1.0: the dense model) to its own final density ``s_f``
(from the pruning profile: ``--ratio``, ``--density``, ``--profile``, ``--skip``) along the cubic

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3        for t in t0, t0 + dt, ..., t0 + n * dt

pruning at the ``n + 1`` scheduled iterations ``t_j = t0 + j * dt`` (j = 0..n; step 0 prunes to ``s_i``, a no-op
from a dense model); after ``t0 + n * dt`` the masks stay fixed to the end of the phase. At step j a layer of
``size`` weights keeps ``pruning.kept_count(size, s_j)`` = ``floor(s_j * size + 0.5)`` (at least 1) weights: the
largest ``|w|`` among those it still keeps, ties to the lower flat index (``pruning.shrink_mask``). A layer whose
final density is 1.0 (kept dense, ``--skip``) is never pruned. Iterations count the solver's iterations of the
phase (0-based: step j runs in the forward pass of iteration ``t_j``, before any convolution); with ``iter_size``
> 1 one iteration is still one step of the schedule.

:class:`Gradual` holds what a user sets (None: the default of ``solvers.DEFAULTS``, the sparse row:
``gradual_begin``/``gradual_end`` as fractions of the phase, ``gradual_steps``); :meth:`Gradual.resolve` turns it
into a :class:`Plan` for a phase of ``max_iter`` iterations, refusing a schedule that ends after the phase's last
iteration. The mask layer reads the plan from its ``param_str`` (:meth:`Plan.from_json`).
"""
import dataclasses
import math

from .errors import UserError
from .pruning import kept_count

SCHEDULES = ("oneshot", "gradual")


def _count(value, what, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{what} must be an integer >= {minimum}, got {value!r}", fields=[what])
    return value


def _initial(value, what="gradual.initial"):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise UserError(f"{what} must be a density in (0, 1], got {value!r}", fields=[what])
    return float(value)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A resolved schedule: prune at iterations ``begin + j * interval`` for j = 0..``steps``, from ``initial``."""
    begin: int
    interval: int
    steps: int
    initial: float = 1.0

    def __post_init__(self):
        _count(self.begin, "gradual begin", 0)
        _count(self.interval, "gradual interval (dt)", 1)
        _count(self.steps, "gradual steps (n)", 1)
        object.__setattr__(self, "initial", _initial(self.initial, "gradual initial density"))

    @property
    def end(self):
        """The iteration of the last step, ``t0 + n * dt``."""
        return self.begin + self.steps * self.interval

    def iteration(self, j):
        return self.begin + j * self.interval

    def density(self, j, final):
        """The target density of a layer whose final density is ``final`` at step ``j``; 1.0 for a layer kept
        dense (final 1.0)."""
        if final >= 1.0:
            return 1.0
        return final + (self.initial - final) * (1.0 - j / self.steps) ** 3

    def due(self, iteration):
        """The latest step whose iteration is at or before ``iteration``, or None before the first."""
        if iteration < self.begin:
            return None
        return min(self.steps, (iteration - self.begin) // self.interval)

    def check(self, finals, max_iter=None, phase="sparse"):
        """Refuse a final density above the initial one, or (with ``max_iter``) a schedule that ends after the
        phase's last iteration (``max_iter - 1``)."""
        for name, final in finals.items():
            if not 0 < final <= 1:
                raise UserError(f"layer {name!r}: final density {final!r} must be in (0, 1]")
            if final < 1.0 and self.initial < final:
                raise UserError(f"gradual initial density {self.initial:g} is below the final density {final:.4g} "
                                f"of layer {name!r}: pruning only removes weights")
        if max_iter is not None and self.end > max_iter - 1:
            raise UserError(f"the gradual schedule ends at iteration {self.end} (begin {self.begin} + {self.steps} "
                            f"steps x interval {self.interval}), after the {phase} phase's last iteration "
                            f"{max_iter - 1} (max_iter {max_iter}); give fewer gradual.steps, a shorter "
                            "gradual.interval or a longer phase", fields=["gradual.steps", "gradual.interval"])
        return self

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data, what="gradual schedule"):
        if not isinstance(data, dict) or set(data) != {"begin", "interval", "steps", "initial"}:
            raise UserError(f"{what} must be {{\"begin\", \"interval\", \"steps\", \"initial\"}}, got {data!r}")
        return cls(**data)

    def describe(self):
        return (f"from density {self.initial:g} at iteration {self.begin}, {self.steps} steps every "
                f"{self.interval} iterations, final at iteration {self.end}")


@dataclasses.dataclass(frozen=True)
class Gradual:
    """What a user sets of a gradual schedule (None: the default). ``begin`` is t0 (iteration), ``interval`` dt,
    ``steps`` n, ``initial`` s_i."""
    begin: int = None
    interval: int = None
    steps: int = None
    initial: float = None

    def __post_init__(self):
        if self.begin is not None:
            _count(self.begin, "gradual.begin", 0)
        if self.interval is not None:
            _count(self.interval, "gradual.interval", 1)
        if self.steps is not None:
            _count(self.steps, "gradual.steps", 1)
        if self.initial is not None:
            _initial(self.initial)

    def settings(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def resolve(self, max_iter, row):
        """The :class:`Plan` for a phase of ``max_iter`` iterations; ``row`` (a ``solvers.PhaseDefaults``) gives
        the defaults: begin at ``gradual_begin * max_iter``, end at ``gradual_end * max_iter`` (rounded down),
        ``gradual_steps`` steps (fewer when the span has fewer iterations), dt the span divided by the steps
        (rounded down). Refuses a schedule that ends after the phase."""
        begin = self.begin if self.begin is not None else math.floor(row.gradual_begin * max_iter)
        span = math.floor(row.gradual_end * max_iter) - begin
        steps, interval = self.steps, self.interval
        if steps is None and interval is None:
            steps = max(1, min(row.gradual_steps, span))
        if interval is None:
            interval = max(1, span // steps)
        if steps is None:
            steps = max(1, span // interval)
        plan = Plan(begin, interval, steps, self.initial if self.initial is not None else 1.0)
        return plan.check({}, max_iter)


def check_schedule(name):
    if name not in SCHEDULES:
        raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}", fields=["schedule"])
    return name


def targets(plan, sizes, finals):
    """Known answers: [(iteration, {layer: kept count})] at every step of ``plan`` for layers of ``sizes`` from a
    dense start (``pruning.kept_count`` of the formula's density)."""
    return [(plan.iteration(j), {n: kept_count(sizes[n], plan.density(j, finals[n])) for n in sizes})
            for j in range(plan.steps + 1)]


def density_curve(plan, sizes, finals):
    """[[iteration, overall target density]] at every step of ``plan`` (what the mask layer's lines print, at full
    precision): the kept counts of :func:`targets` over the total size."""
    total = sum(sizes.values())
    return [[t, sum(ks.values()) / total] for t, ks in targets(plan, sizes, finals)]
