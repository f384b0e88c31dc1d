"""mCE against AlexNet: the benchmark's normalisation, checked by hand."""

import math

import pytest

from distortkd.benchmarks import ALEXNET_ERR, BENCHMARK_CORRUPTIONS, mce_vs_alexnet

BENCHMARK = BENCHMARK_CORRUPTIONS


def test_mce_matches_a_hand_computation():
    errors = {name: [0.5] * 5 for name in BENCHMARK}
    errors["fog"] = [0.1, 0.2, 0.3, 0.4, 0.5]  # mean 0.3
    errors["speckle_noise"] = [0.9] * 5  # extra corruption: no AlexNet reference, ignored
    mce, ce = mce_vs_alexnet(errors)
    assert ce["fog"] == pytest.approx(100 * 0.3 / 0.819324)
    assert ce["brightness"] == pytest.approx(100 * 0.5 / 0.564592)
    by_hand = sum(100 * (0.3 if n == "fog" else 0.5) / ALEXNET_ERR[n] for n in BENCHMARK) / 15
    assert mce == pytest.approx(by_hand) and len(ce) == 15 == len(BENCHMARK)


def test_alexnet_itself_scores_100():
    mce, ce = mce_vs_alexnet({n: [e] * 5 for n, e in ALEXNET_ERR.items()})
    assert mce == pytest.approx(100) and all(v == pytest.approx(100) for v in ce.values())


def test_missing_corruption_or_levels_gives_no_mce():
    """An mCE over fewer than the 15 corruptions, or fewer than 5 severities, is not the benchmark's:
    NaN (the report shows —), while the complete corruptions keep their CE."""
    errors = {name: [0.5] * 5 for name in BENCHMARK}
    mce, ce = mce_vs_alexnet({n: e for n, e in errors.items() if n != "snow"})
    assert math.isnan(mce) and "snow" not in ce and len(ce) == 14
    mce, ce = mce_vs_alexnet({**errors, "fog": [0.5] * 4})
    assert math.isnan(mce) and "fog" not in ce
