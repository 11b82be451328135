"""The verdict's statistics against known answers: fixed gains give a known t interval and sentence."""
import math

import pytest

from dsd_caffe import verdict


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
    ((0.0, 0.0), 0.0, 0.0, "No difference detectable at 2 seeds."),
])
def test_interval_and_sentence(gains, low, high, sentence):
    v = verdict.paired_verdict(gains)
    assert v.mean == pytest.approx(sum(gains) / len(gains))
    if low is not None:
        assert (v.low, v.high) == (pytest.approx(low), pytest.approx(high))
    assert v.sentence == sentence
    text = v.format()
    assert text.splitlines()[-1] == sentence and f"seed {len(gains) - 1}:" in text and "95% interval" in text


def test_one_seed_gives_no_interval():
    v = verdict.paired_verdict([0.7])
    assert (v.low, v.high, v.std) == (None, None, 0.0)
    assert v.sentence.startswith("No difference detectable at 1 seed") and "--seeds 3" in v.sentence


@pytest.mark.parametrize("bad", [[], [float("nan")], [1.0, float("inf")]])
def test_bad_gains_are_refused(bad):
    with pytest.raises(ValueError, match="one finite gain per seed"):
        verdict.paired_verdict(bad)
