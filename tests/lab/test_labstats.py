"""The lab's statistics (tools/lab/labstats.py) on data whose answers are known:
t intervals against hand-computed quantiles, paired tests, TOST, Holm, and the
way verdicts combine."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "lab"))
import labstats  # noqa: E402


def test_t_interval_matches_the_formula():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean, lo, hi = labstats.t_interval(x)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) · s / √n
    assert mean == 3.0
    assert lo == pytest.approx(3.0 - half, rel=1e-12)
    assert hi == pytest.approx(3.0 + half, rel=1e-12)


def test_t_interval_edge_cases():
    assert math.isnan(labstats.t_interval([])[0])
    m, lo, hi = labstats.t_interval([0.7])
    assert m == 0.7 and math.isnan(lo) and math.isnan(hi)
    assert labstats.t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_paired_removes_the_shared_seed_noise():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 5, 8)       # large, shared by both arms
    a = seed_effect + 1.0 + rng.normal(0, 0.01, 8)
    b = seed_effect
    r = labstats.paired(a, b)
    assert r["lo"] > 0.9 and r["hi"] < 1.1
    assert r["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    # Unpaired, the same data say nothing.
    _, lo, hi = labstats.t_interval(a - b.mean())
    assert lo < 0 < hi


def test_paired_rejects_unequal_lengths():
    with pytest.raises(ValueError):
        labstats.paired([1, 2, 3], [1, 2])


def test_tost_equivalence_and_its_failure():
    rng = np.random.default_rng(1)
    close = rng.normal(0.0, 0.001, 10)      # differences well inside ±0.005
    assert labstats.tost(close, 0.005)["equivalent"]
    shifted = [0.004, 0.005, 0.006, 0.0045, 0.0055]  # mean 0.005: the interval crosses +0.005
    assert not labstats.tost(shifted, 0.005)["equivalent"]
    noisy = rng.normal(0.0, 0.02, 3)        # too few, too noisy: not equivalent
    assert not labstats.tost(noisy, 0.005)["equivalent"]
    # TOST at alpha is the 90% interval inside the margin.
    t = labstats.tost(close, 0.005)
    m, lo, hi = labstats.t_interval(close, 0.90)
    assert (t["lo"], t["hi"]) == pytest.approx((lo, hi))
    with pytest.raises(ValueError):
        labstats.tost(close, 0.0)


def test_superiority_directions():
    assert labstats.superiority([1.0, 1.1, 0.9, 1.2], direction=1)["outcome"] == "supported"
    assert labstats.superiority([1.0, 1.1, 0.9, 1.2], direction=-1)["outcome"] == "not supported"
    assert labstats.superiority([-1.0, 1.0, -0.5, 0.4])["outcome"] == "inconclusive"
    assert labstats.superiority([1.0])["outcome"] == "inconclusive"


def test_holm_against_hand_computed_values():
    # p = 0.01, 0.04, 0.03 -> sorted 0.01·3, 0.03·2, 0.04·1 with the running maximum.
    assert labstats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert labstats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_combine():
    assert labstats.combine(["supported", "supported"]) == "supported"
    assert labstats.combine(["not supported"]) == "not supported"
    assert labstats.combine(["supported", "inconclusive"]) == "mixed"
    assert labstats.combine(["supported", "not supported"]) == "mixed"
    assert labstats.combine([]) == "inconclusive"


def test_best_setting_counts_missing_scores_as_worst():
    assert labstats.best_setting({0.1: [0.8, 0.82], 1.0: [0.9, float("nan")], 0.01: [0.7, 0.71]}) == 0.1
    assert labstats.best_setting({0.1: [0.5], 0.3: [0.6]}) == 0.3
