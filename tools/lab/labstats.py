"""The statistics behind the lab's verdicts: t intervals over seeds, paired
comparisons, equivalence tests (TOST), Holm's correction, and helpers to pick
each arm's best setting. Plain numpy + scipy.stats (Debian's python3-scipy).

Every function takes plain sequences and returns plain floats/dicts, so the
tests (tests/lab/test_labstats.py) check them on data whose answer is known.
"""
import math

import numpy as np
from scipy import stats


def t_interval(values, level=0.95):
    """Mean and two-sided `level` t interval of the mean; (mean, lo, hi).
    One value: the interval is (nan, nan); identical values: zero width."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def paired(a, b, alpha=0.05):
    """Paired comparison of a and b (same seeds, same order): d = a - b.
    Returns mean, the (1 - alpha) t interval, the two-sided p of the paired t
    test (1.0 when every difference is 0), n and the per-pair differences."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired: {a.shape} values against {b.shape}")
    d = a - b
    mean, lo, hi = t_interval(d, 1 - alpha)
    n = len(d)
    if n < 2:
        p = math.nan
    elif np.all(d == d[0]):
        p = 0.0 if d[0] != 0 else 1.0
    else:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return {"mean": mean, "lo": lo, "hi": hi, "p": p, "n": n, "diffs": d.tolist()}


def tost(d, margin, alpha=0.05):
    """Two one-sided tests for equivalence of paired differences d within
    (-margin, +margin). Equivalent at level alpha iff the (1 - 2·alpha) t interval
    lies inside the margin. Returns the interval, the TOST p value (the larger of
    the two one-sided p values) and `equivalent`."""
    if margin <= 0:
        raise ValueError("tost: the margin must be positive")
    x = np.asarray(d, dtype=float)
    n = len(x)
    mean, lo, hi = t_interval(x, 1 - 2 * alpha)
    if n < 2:
        return {"mean": mean, "lo": lo, "hi": hi, "p": math.nan, "equivalent": False, "n": n}
    se = x.std(ddof=1) / math.sqrt(n)
    if se == 0:
        p = 0.0 if abs(mean) < margin else 1.0
    else:
        p_low = 1 - stats.t.cdf((mean + margin) / se, n - 1)   # H0: mean <= -margin
        p_high = stats.t.cdf((mean - margin) / se, n - 1)      # H0: mean >= +margin
        p = float(max(p_low, p_high))
    return {"mean": mean, "lo": lo, "hi": hi, "p": p, "equivalent": bool(p < alpha), "n": n}


def holm(pvalues):
    """Holm-Bonferroni adjusted p values, in the input order."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def superiority(d, alpha=0.05, direction=1):
    """Classifies paired differences d (a - b) for a claim that a is better in
    `direction` (+1: larger is better, -1: smaller is better):
    'supported' when the (1 - alpha) interval excludes 0 on the claimed side,
    'not supported' when it excludes 0 on the other side, else 'inconclusive'."""
    r = paired(np.asarray(d, dtype=float), np.zeros(len(d)), alpha)
    lo, hi = r["lo"] * direction, r["hi"] * direction
    if direction < 0:
        lo, hi = hi, lo
    if math.isnan(r["lo"]):
        r["outcome"] = "inconclusive"
    elif lo > 0:
        r["outcome"] = "supported"
    elif hi < 0:
        r["outcome"] = "not supported"
    else:
        r["outcome"] = "inconclusive"
    return r


def combine(outcomes):
    """One verdict from the verdicts of a claim's parts (e.g. per model): the
    common one when they agree, 'mixed' when they differ, 'inconclusive' when
    there is none."""
    s = set(outcomes)
    if not s:
        return "inconclusive"
    return s.pop() if len(s) == 1 else "mixed"


def best_setting(scores):
    """The key with the highest mean score: scores maps a setting (e.g. a
    learning rate) to per-seed scores; NaN scores count as the lowest."""
    best, best_value = None, -math.inf
    for key in sorted(scores):
        v = np.asarray(scores[key], dtype=float)
        value = float(np.mean(np.where(np.isnan(v), -1e30, v))) if len(v) else -math.inf
        if value > best_value:
            best, best_value = key, value
    return best
