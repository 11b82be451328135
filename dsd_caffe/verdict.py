"""Did DSD help? The paired comparison of DSD with its control over seeds, and one plain sentence.

Each seed gives one paired gain: DSD's top-1 minus the control's (the dense model trained on for the same
iterations at the same learning rates), in points. Over n seeds: the mean, the sample standard deviation and the
95% interval of the mean from Student's t distribution with n - 1 degrees of freedom,
``mean +- t(0.975, n - 1) * std / sqrt(n)``. The sentence follows the interval: above 0, "DSD beat the control";
below 0, "the control beat DSD"; across 0 (or one seed, which gives no interval), "no difference detectable at n
seeds". Never more than that: a difference the seeds cannot resolve is not a finding.
"""
import dataclasses
import math
import statistics

from .errors import UserError

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Verdict:
    gains: tuple  # per seed, points of top-1 (DSD - control)
    mean: float
    std: float  # sample standard deviation (0 for one seed)
    low: float  # the interval (None for one seed)
    high: float
    sentence: str
    seeds: tuple = None  # the seed of each gain (default 0, 1, ...)

    def format(self):
        seeds = self.seeds or range(len(self.gains))
        lines = [f"seed {s}: DSD - control = {g:+.2f} points" for s, g in zip(seeds, self.gains)]
        spread = f" +- {self.std:.2f}" if len(self.gains) > 1 else ""
        interval = (f", {100 * CONFIDENCE:.0f}% interval [{self.low:+.2f}, {self.high:+.2f}]"
                    if self.low is not None else "")
        lines.append(f"mean {self.mean:+.2f}{spread} points over {len(self.gains)} seed(s){interval}")
        lines.append(self.sentence)
        return "\n".join(lines)


def t_quantile(p, df):
    """The p-quantile of Student's t distribution with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


def paired_verdict(gains, seeds=None):
    """The :class:`Verdict` of paired gains (points of top-1, DSD - control), one per seed (``seeds`` names them)."""
    gains = tuple(float(g) for g in gains)
    seeds = tuple(seeds) if seeds is not None else None
    if not gains or not all(math.isfinite(g) for g in gains):
        raise UserError(f"the verdict needs one finite gain per seed, got {list(gains)}")
    n = len(gains)
    mean = statistics.fmean(gains)
    if n == 1:
        return Verdict(gains, mean, 0.0, None, None,
                       "No difference detectable at 1 seed: one seed gives no interval; run --seeds 3 or more.", seeds)
    std = statistics.stdev(gains)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if low > 0:
        sentence = f"DSD beat the control (by {mean:.2f} points of top-1, {n} seeds)."
    elif high < 0:
        sentence = f"The control beat DSD (by {-mean:.2f} points of top-1, {n} seeds)."
    else:
        sentence = f"No difference detectable at {n} seeds."
    return Verdict(gains, mean, std, low, high, sentence, seeds)
