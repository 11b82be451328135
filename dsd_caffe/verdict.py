"""Did DSD help? The paired comparison of DSD with its control over seeds, and one plain sentence.

Each seed gives one paired gain: DSD's top-1 minus the control's (the dense model trained on for the same
iterations at the same learning rates), in points. Over n seeds: the mean, the sample standard deviation and the
95% interval of the mean from Student's t distribution with n - 1 degrees of freedom,
``mean +- t(0.975, n - 1) * std / sqrt(n)``. The sentence follows the interval: above 0, "DSD beat the control";
below 0, "the control beat DSD"; across 0 (or one seed, which gives no interval), "no difference detectable at n
seeds". Never more than that: a difference the seeds cannot resolve is not a finding.

Seeds that varied nothing (every gain the same, or every seed's models bit-identical: a net without dropout, crop
or mirror, read in a fixed order) give no interval either: a spread of 0 over identical runs is no measure of
certainty, and the sentence says so. The verdict names what the seeds varied (``varied``) and the split the
numbers are on (``split``: "val", the validation LMDB, or "holdout").
"""
import dataclasses
import math
import statistics

from .errors import UserError

CONFIDENCE = 0.95
SPLITS = {"val": "validation split", "holdout": "holdout split"}


@dataclasses.dataclass(frozen=True)
class Verdict:
    gains: tuple  # per seed, points of top-1 (DSD - control)
    mean: float
    std: float  # sample standard deviation (0 for one seed)
    low: float  # the interval (None for one seed)
    high: float
    sentence: str
    seeds: tuple = None  # the seed of each gain (default 0, 1, ...)
    varied: tuple = ()  # what the seeds varied, in words (empty: nothing)
    split: str = None  # "val" or "holdout": where the gains were measured

    def format(self):
        seeds = self.seeds or range(len(self.gains))
        where = f" on the {SPLITS[self.split]}" if self.split else ""
        lines = [f"seed {s}: DSD - control = {g:+.2f} points{where}" for s, g in zip(seeds, self.gains)]
        spread = f" (standard deviation {self.std:.2f})" if len(self.gains) > 1 else ""
        interval = (f", {100 * CONFIDENCE:.0f}% interval [{self.low:+.2f}, {self.high:+.2f}]"
                    if self.low is not None else "")
        lines.append(f"mean {self.mean:+.2f} points{spread} over {len(self.gains)} seed(s){interval}")
        if len(self.gains) > 1:
            lines.append(f"the seeds varied: {'; '.join(self.varied) if self.varied else 'nothing'}")
        lines.append(self.sentence)
        return "\n".join(lines)

    def as_json(self):
        """The verdict as verdict.json holds it (the spread named ``std``, the split and what varied)."""
        return dataclasses.asdict(self)


def t_quantile(p, df):
    """The p-quantile of Student's t distribution with ``df`` degrees of freedom."""
    from scipy import stats  # deferred: heavy, needed only for an interval

    return float(stats.t.ppf(p, df))


def paired_verdict(gains, seeds=None, varied=None, identical=False, split=None):
    """The :class:`Verdict` of paired gains (points of top-1, DSD - control), one per seed (``seeds`` names them).
    ``varied``: what the seeds varied, in words (None: not known); ``identical``: every seed's models are
    bit-identical; ``split``: "val" or "holdout"."""
    gains = tuple(float(g) for g in gains)
    seeds = tuple(seeds) if seeds is not None else None
    if not gains or not all(math.isfinite(g) for g in gains):
        raise UserError(f"the verdict needs one finite gain per seed, got {list(gains)}")
    if split is not None and split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    n = len(gains)
    mean = statistics.fmean(gains)
    known = dict(seeds=seeds, varied=tuple(varied or ()), split=split)
    if n == 1:
        return Verdict(gains, mean, 0.0, None, None,
                       "No difference detectable at 1 seed: one seed gives no interval; run --seeds 3 or more.",
                       **known)
    std = statistics.stdev(gains)
    same = identical or varied == () or len(set(gains)) == 1
    if same:
        why = ("their models are bit-identical" if identical else "they varied nothing this net uses"
               if varied == () else "every seed gave the same gain")
        return Verdict(gains, mean, std, None, None,
                       f"No verdict: the {n} seeds varied nothing ({why}), so their spread measures nothing; "
                       "vary the data order (--data-order shuffled) or the dense model "
                       "(--train-dense-per-seed).",
                       **known)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if low > 0:
        sentence = f"DSD beat the control (by {mean:.2f} points of top-1, {n} seeds)."
    elif high < 0:
        sentence = f"The control beat DSD (by {-mean:.2f} points of top-1, {n} seeds)."
    else:
        sentence = f"No difference detectable at {n} seeds."
    return Verdict(gains, mean, std, low, high, sentence, **known)
