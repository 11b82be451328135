"""The verdict's statistics against known answers: fixed gains give a known t interval and sentence."""
import math

import pytest

from dsd_caffe import verdict
from dsd_caffe.errors import UserError


def test_t_quantiles_known_answers():
    assert verdict.t_quantile(0.975, 1) == pytest.approx(12.706204736174698, rel=1e-9)
    assert verdict.t_quantile(0.975, 2) == pytest.approx(4.302652729911275, rel=1e-9)
    assert verdict.t_quantile(0.975, 9) == pytest.approx(2.2621571627409915, rel=1e-9)


@pytest.mark.parametrize("gains, low, high, sentence", [
    ((1.0, 2.0, 3.0), 2 - 4.302652729911275 / math.sqrt(3), 2 + 4.302652729911275 / math.sqrt(3),
     "No difference detectable at 3 seeds."),
    ((2.0, 2.1, 1.9), 2 - 0.4302652729911275 / math.sqrt(3), 2 + 0.4302652729911275 / math.sqrt(3),
     "DSD beat the control (by 2.00 points of top-1, 3 seeds)."),
    ((-1.48, -0.90, -1.32), None, None, "The control beat DSD (by 1.23 points of top-1, 3 seeds)."),  # the demo's
])
def test_interval_and_sentence(gains, low, high, sentence):
    v = verdict.paired_verdict(gains)
    assert v.mean == pytest.approx(sum(gains) / len(gains))
    if low is not None:
        assert (v.low, v.high) == (pytest.approx(low), pytest.approx(high))
    assert v.sentence == sentence
    text = v.format()
    assert text.splitlines()[-1] == sentence and f"seed {len(gains) - 1}:" in text and "95% interval" in text


@pytest.mark.parametrize("gains, varied, identical, why", [
    ((-0.29, -0.29, -0.29), None, False, "every seed gave the same gain"),  # the LeNet: bit-identical runs
    ((0.1, -0.2), ("the TRAIN data order",), True, "their models are bit-identical"),
    ((0.1, -0.2), (), False, "they varied nothing this net uses"),
])
def test_seeds_that_varied_nothing_give_no_interval(gains, varied, identical, why):
    v = verdict.paired_verdict(gains, varied=varied, identical=identical, split="val")
    assert (v.low, v.high) == (None, None)
    assert v.sentence == (f"No verdict: the {len(gains)} seeds varied nothing ({why}), so their spread measures "
                          "nothing; vary the data order (--data-order shuffled) or the dense model "
                          "(--train-dense-per-seed).")
    text = v.format()
    assert "interval" not in text and "beat" not in text and text.splitlines()[-1] == v.sentence
    assert f"the seeds varied: {'; '.join(varied) if varied else 'nothing'}" in text


def test_the_verdict_names_what_varied_the_spread_and_the_split():
    v = verdict.paired_verdict([1.0, 2.0, 3.0], seeds=[4, 5, 6], varied=("dropout (drop9)", "the TRAIN data order"),
                               split="holdout")
    lines = v.format().splitlines()
    assert lines == ["seed 4: DSD - control = +1.00 points on the holdout split",
                     "seed 5: DSD - control = +2.00 points on the holdout split",
                     "seed 6: DSD - control = +3.00 points on the holdout split",
                     f"mean +2.00 points (standard deviation 1.00) over 3 seed(s), 95% interval "
                     f"[{v.low:+.2f}, {v.high:+.2f}]",
                     "the seeds varied: dropout (drop9); the TRAIN data order",
                     "No difference detectable at 3 seeds."]
    assert v.as_json() == {"gains": (1.0, 2.0, 3.0), "mean": 2.0, "std": 1.0, "low": v.low, "high": v.high,
                           "sentence": "No difference detectable at 3 seeds.", "seeds": (4, 5, 6),
                           "varied": ("dropout (drop9)", "the TRAIN data order"), "split": "holdout"}


def test_one_seed_gives_no_interval():
    v = verdict.paired_verdict([0.7])
    assert (v.low, v.high, v.std) == (None, None, 0.0)
    assert v.sentence.startswith("No difference detectable at 1 seed") and "--seeds 3" in v.sentence


@pytest.mark.parametrize("bad", [[], [float("nan")], [1.0, float("inf")]])
def test_bad_gains_are_refused(bad):
    with pytest.raises(UserError, match="one finite gain per seed"):
        verdict.paired_verdict(bad)
