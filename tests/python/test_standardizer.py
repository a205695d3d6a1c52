"""normkit.Standardizer: scikit-learn's StandardScaler names on normkit's standardizer (the
estimator protocol inside scikit-learn itself: test_standardizer_sklearn.py).

Oracles are NumPy's float64 formulas (mean, population variance and std). The statistics
come from the BN moments kernels, which accumulate float32 data in float32 lanes within
cache-sized pieces (and in double across them): they are exact to a few float32 roundings
of their terms, which is the tolerance here (_support.assert_exact, 4 ulps of the terms'
size: max|x| for the mean, the variance itself for the variance). partial_fit over chunks
must give what one fit gives; files round-trip exactly and bad files are refused with the
file named.
"""
import struct

import numpy as np
import pytest

import normkit
from _support import assert_exact

EPS32 = float(np.finfo(np.float32).eps)


def table(rows=1000, seed=0):
    """Features of different scales, some with means far larger than their spread."""
    rng = np.random.default_rng(seed)
    means = np.array([0.0, 1e4, -300.0, 5.0, 1e-3, 2e5, -7.0])
    stds = np.array([1.0, 3.0, 50.0, 1e-2, 1e-4, 10.0, 2.0])
    return (rng.standard_normal((rows, means.size)) * stds + means).astype(np.float32)


def numpy_stats(x):
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=0), x64.var(axis=0)  # population variance, as StandardScaler
    return mean, var, np.sqrt(var)


def assert_stats(s, x, what):
    """Statistics of float32 data are exact to float32 roundings of their terms: compared as
    float32 (mean_, var_ and scale_ themselves are float64)."""
    mean, var, std = numpy_stats(x)
    assert_exact(s.mean_.astype(np.float32), mean, np.abs(x).max(axis=0), np.float32, what + " mean_")
    assert_exact(s.var_.astype(np.float32), var, var, np.float32, what + " var_")
    assert_exact(s.scale_.astype(np.float32), std, std, np.float32, what + " scale_")


def test_fit_matches_numpy_formulas():
    x = table()
    s = normkit.Standardizer()
    assert s.fit(x) is s
    assert s.n_samples_seen_ == 1000 and s.n_features_in_ == 7
    for got in (s.mean_, s.var_, s.scale_):  # kept in double, as scikit-learn's
        assert got.dtype == np.float64 and got.shape == (7,)
    assert_stats(s, x, "fit")

    # transform of float32 data is the formula with the statistics rounded to float32.
    y = s.transform(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    mean32, scale32 = s.mean_.astype(np.float32), s.scale_.astype(np.float32)
    expected = (x.astype(np.float64) - mean32) / scale32.astype(np.float64)
    assert_exact(y, expected, np.abs(expected).max(axis=0), np.float32, "transform")
    # Standardized: mean 0 up to the float32 rounding of the feature's mean (its terms are
    # as large as max|x|), std 1.
    y64 = y.astype(np.float64)
    _, _, std = numpy_stats(x)
    assert np.all(np.abs(y64.mean(axis=0)) <= 8 * EPS32 * np.abs(x).max(axis=0) / std)
    np.testing.assert_allclose(y64.std(axis=0), 1, rtol=1e-5)


def test_partial_fit_over_chunks_equals_fit_on_all():
    x = table(rows=2311, seed=1)
    whole = normkit.Standardizer().fit(x)
    chunked = normkit.Standardizer()
    bounds = [0, 1, 3, 40, 41, 600, 1500, 2311]  # uneven chunks, one of a single row
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert chunked.partial_fit(x[lo:hi]) is chunked
    assert chunked.n_samples_seen_ == whole.n_samples_seen_ == 2311
    # Chunks merged with Chan's formula vs one pass: each is within float32 rounding of
    # its terms of the truth, so of each other.
    assert_stats(chunked, x, "chunked")
    assert_exact(chunked.mean_.astype(np.float32), whole.mean_, np.abs(x).max(axis=0), np.float32)
    assert_exact(chunked.var_.astype(np.float32), whole.var_, whole.var_, np.float32)
    assert_exact(chunked.scale_.astype(np.float32), whole.scale_, whole.scale_, np.float32)
    # fit starts over; partial_fit on a fresh object is fit.
    chunked.fit(x[:10])
    assert chunked.n_samples_seen_ == 10
    np.testing.assert_array_equal(chunked.mean_, normkit.Standardizer().partial_fit(x[:10]).mean_)


def test_transform_and_inverse_return_new_arrays_and_round_trip():
    x = table(rows=300, seed=2)
    before = x.copy()
    s = normkit.Standardizer().fit(x)
    y = s.transform(x)
    back = s.inverse_transform(y)
    np.testing.assert_array_equal(x, before)  # inputs are not touched
    assert not np.shares_memory(y, x) and not np.shares_memory(back, y)
    # Two roundings each way, relative to the size of x and of the feature's spread.
    tolerance = 8 * EPS32 * (np.abs(x).max(axis=0) + s.scale_)
    assert np.all(np.abs(back.astype(np.float64) - x) <= tolerance)

    # float64 stays float64 (the same values to float32 rounding); integers become float64.
    y64 = s.transform(x.astype(np.float64))
    assert y64.dtype == np.float64
    assert np.all(np.abs(y64 - y) <= 8 * EPS32 * (np.abs(x).max(axis=0) / s.scale_ + np.abs(y64)))
    ints = np.arange(14, dtype=np.int64).reshape(2, 7)
    assert s.transform(ints).dtype == np.float64
    np.testing.assert_array_equal(s.transform(ints), s.transform(ints.astype(np.float64)))


def test_copy_false_works_in_place():
    x = table(rows=50, seed=3)
    s = normkit.Standardizer().fit(x)
    expected = s.transform(x)
    work = x.copy()
    assert s.transform(work, copy=False) is work
    np.testing.assert_array_equal(work, expected)
    assert s.inverse_transform(work, copy=False) is work
    np.testing.assert_array_equal(work, s.inverse_transform(expected))
    for bad in (x.astype(np.int32), np.asfortranarray(x)):
        with pytest.raises(ValueError, match="copy=False works in place"):
            s.transform(bad, copy=False)
    frozen = x.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        s.transform(frozen, copy=False)
    np.testing.assert_array_equal(frozen, x)


def test_zero_variance_features_scale_one_and_map_to_zero():
    x = table(rows=64, seed=4)
    x[:, 2] = 5.25
    x[:, 4] = 0.0
    s = normkit.Standardizer().fit(x)
    assert s.var_[2] == 0 and s.var_[4] == 0
    assert s.scale_[2] == 1 and s.scale_[4] == 1
    y = s.transform(x)
    assert np.all(np.isfinite(y))
    assert np.all(y[:, 2] == 0) and np.all(y[:, 4] == 0)
    np.testing.assert_array_equal(s.inverse_transform(y)[:, 2], x[:, 2])
    # One sample: every feature has zero variance.
    one = normkit.Standardizer().fit(x[:1])
    np.testing.assert_array_equal(one.scale_, np.ones(7, np.float32))
    np.testing.assert_array_equal(one.transform(x[:1]), np.zeros((1, 7), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_input_is_a_value_error_and_changes_nothing(bad):
    x = table(rows=20, seed=5)
    s = normkit.Standardizer().fit(x)
    mean, count = s.mean_.copy(), s.n_samples_seen_
    spoiled = x.copy()
    spoiled[7, 3] = bad
    for method in (s.fit, s.partial_fit, s.transform, s.inverse_transform):
        with pytest.raises(ValueError, match="NaN or infinity at sample 7, feature 3"):
            method(spoiled)
    np.testing.assert_array_equal(s.mean_, mean)
    assert s.n_samples_seen_ == count


def test_wrong_shapes_and_feature_counts_are_value_errors():
    x = table(rows=30, seed=6)
    s = normkit.Standardizer().fit(x)
    for method in (s.partial_fit, s.transform, s.inverse_transform):
        with pytest.raises(ValueError, match="x has 6 features, the standardizer was fitted on 7"):
            method(x[:, :6])
    for bad_shape in (x[0], x[None], x[:0]):
        with pytest.raises(ValueError, match="2-D array|at least one sample"):
            s.transform(bad_shape)
    assert s.n_samples_seen_ == 30
    with pytest.raises(TypeError, match="real numbers"):
        s.fit(x.astype(np.complex64))
    with pytest.raises(TypeError, match="real numbers"):
        s.fit(np.array([["a", "b"]]))


def test_unfitted():
    s = normkit.Standardizer()
    assert repr(s) == "Standardizer(not fitted)"
    for name in ("mean_", "var_", "scale_", "n_samples_seen_", "n_features_in_"):
        assert not hasattr(s, name)
    with pytest.raises(ValueError, match="not fitted"):
        s.transform(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="not fitted"):
        s.save("unused.nkstd")
    assert repr(s.fit(np.zeros((4, 3), np.float32))) == "Standardizer(features=3, samples=4)"


def test_save_load_round_trip(tmp_path):
    x = table(rows=500, seed=7)
    s = normkit.Standardizer().partial_fit(x[:123]).partial_fit(x[123:])
    path = tmp_path / "stats.nkstd"
    s.save(path)
    assert path.stat().st_size == 16 + 24 * 7  # magic, count, then (count, mean, M2) per feature
    assert [p.name for p in tmp_path.iterdir()] == ["stats.nkstd"]  # no temporary left behind
    loaded = normkit.Standardizer.load(str(path))
    for name in ("mean_", "var_", "scale_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(s, name))
    assert loaded.n_samples_seen_ == 500
    np.testing.assert_array_equal(loaded.transform(x), s.transform(x))
    # The double statistics are stored, so fitting goes on exactly where it stopped.
    more = table(rows=77, seed=8)
    np.testing.assert_array_equal(loaded.partial_fit(more).var_, s.partial_fit(more).var_)
    # Saving again replaces the file.
    normkit.Standardizer().fit(more).save(path)
    assert normkit.Standardizer.load(path).n_samples_seen_ == 77


def test_bad_files_are_refused_naming_the_file(tmp_path):
    s = normkit.Standardizer().fit(table(rows=40, seed=9))
    path = tmp_path / "good.nkstd"
    s.save(path)
    good = path.read_bytes()
    bad = tmp_path / "bad.nkstd"

    def refused(data, words):
        bad.write_bytes(data)
        with pytest.raises(RuntimeError, match=words) as error:
            normkit.Standardizer.load(bad)
        assert "bad.nkstd" in str(error.value)

    for length in (0, 5, 8, 12, 16, 40, len(good) - 1):
        refused(good[:length], "bad magic|feature count|truncated")
    refused(good[:len(good) - 1], "truncated")
    refused(b"X" + good[1:], "bad magic")
    refused(good + b"\0", "unexpected bytes after the statistics")
    refused(good[:8] + struct.pack("<Q", 0) + good[16:], "feature count")
    negative_m2 = bytearray(good)
    negative_m2[16 + 16:16 + 24] = struct.pack("<d", -1.0)  # feature 0's M2
    refused(bytes(negative_m2), "feature 0 has invalid statistics")
    nan_mean = bytearray(good)
    nan_mean[16 + 24 + 8:16 + 24 + 16] = struct.pack("<d", float("nan"))  # feature 1's mean
    refused(bytes(nan_mean), "feature 1 has invalid statistics")

    with pytest.raises(FileNotFoundError):
        normkit.Standardizer.load(tmp_path / "missing.nkstd")
    with pytest.raises(OSError):
        s.save(tmp_path / "no-such-directory" / "x.nkstd")
    assert path.read_bytes() == good


def test_results_do_not_depend_on_the_thread_count():
    x = table(rows=20000, seed=10)  # large enough for the kernels to split the work
    saved = normkit.num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            normkit.set_num_threads(threads)
            s = normkit.Standardizer().fit(x)
            results.append((s.mean_, s.var_, s.transform(x)))
    finally:
        normkit.set_num_threads(saved)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
