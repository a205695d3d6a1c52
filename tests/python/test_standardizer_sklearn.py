"""normkit.Standardizer as a scikit-learn estimator (Debian's python3-sklearn): a step of a
real sklearn.pipeline.Pipeline, cloned by cross-validation, compared with StandardScaler;
fit(X, y), fit_transform, get_params/set_params, pickling and deep copies; the data's dtype
kept (float32 stays float32, float64 is fitted and transformed in float64, integers become
float64, as in scikit-learn)."""
import copy
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

import normkit

EPS64 = float(np.finfo(np.float64).eps)


def wine():
    x, y = load_wine(return_X_y=True)  # 178 × 13, float64, features from 0.1 to 1680
    return x, y


def test_pipeline_predicts_as_with_standard_scaler():
    x, y = wine()
    ours = make_pipeline(normkit.Standardizer(), LogisticRegression(max_iter=2000)).fit(x, y)
    theirs = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    np.testing.assert_array_equal(ours.predict(x), theirs.predict(x))
    np.testing.assert_allclose(ours[-1].coef_, theirs[-1].coef_, rtol=1e-6, atol=1e-9)
    scaler, standardizer = theirs[0], ours[0]
    # float64 statistics: the same numbers to double rounding.
    np.testing.assert_allclose(standardizer.mean_, scaler.mean_, rtol=8 * EPS64)
    np.testing.assert_allclose(standardizer.var_, scaler.var_, rtol=64 * EPS64)
    np.testing.assert_allclose(standardizer.scale_, scaler.scale_, rtol=64 * EPS64)
    assert standardizer.n_features_in_ == scaler.n_features_in_ == 13
    assert standardizer.n_samples_seen_ == scaler.n_samples_seen_ == 178
    np.testing.assert_allclose(standardizer.transform(x), scaler.transform(x), rtol=1e-12, atol=1e-12)
    # cross-validation clones the pipeline, its steps included, for every fold.
    scores = cross_val_score(Pipeline([("scale", normkit.Standardizer()),
                                       ("model", LogisticRegression(max_iter=2000))]), x, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.8


def test_estimator_protocol():
    x, y = wine()
    s = normkit.Standardizer()
    assert s.get_params() == {"copy": True} and s.get_params(deep=False) == {"copy": True}
    assert s.fit(x, y) is s  # y is accepted and ignored
    assert s.partial_fit(x, y=y) is s and s.n_samples_seen_ == 2 * 178
    np.testing.assert_array_equal(normkit.Standardizer().fit_transform(x, y),
                                  normkit.Standardizer().fit(x).transform(x))
    assert s.set_params(copy=False) is s and s.get_params() == {"copy": False}
    with pytest.raises(ValueError, match="no parameter 'with_mean'"):
        s.set_params(with_mean=False)
    twin = clone(s)
    assert twin.get_params() == {"copy": False} and not hasattr(twin, "mean_")  # clone: unfitted
    assert normkit.Standardizer(copy=False).copy is False
    with pytest.raises(TypeError):
        normkit.Standardizer(False)  # keyword-only, as scikit-learn's parameters

    # copy=False on the estimator: transform works in place by default.
    work = x.copy()
    assert s.transform(work) is work
    np.testing.assert_allclose(work, normkit.Standardizer().fit(x).transform(x), rtol=1e-12, atol=1e-12)
    assert s.transform(x, copy=True) is not x


@pytest.mark.parametrize("fitted", [True, False])
def test_pickle_and_deepcopy(fitted):
    x, _ = wine()
    s = normkit.Standardizer(copy=False)
    if fitted:
        s.partial_fit(x[:50]).partial_fit(x[50:])
    for twin in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s), copy.copy(s)):
        assert twin is not s and twin.get_params() == {"copy": False}
        assert repr(twin) == repr(s)
        if fitted:
            for name in ("mean_", "var_", "scale_", "n_samples_seen_"):
                np.testing.assert_array_equal(getattr(twin, name), getattr(s, name))
            np.testing.assert_array_equal(twin.transform(x, copy=True), s.transform(x, copy=True))
            # The double statistics travel: fitting goes on exactly as the original's.
            np.testing.assert_array_equal(twin.partial_fit(x).var_, copy.deepcopy(s).partial_fit(x).var_)
        else:
            assert not hasattr(twin, "mean_")
    if fitted:  # a deep copy is independent of the original
        twin = copy.deepcopy(s)
        twin.fit(x[:10])
        assert s.n_samples_seen_ == 178


def test_dtype_is_kept():
    x, _ = wine()
    x32 = x.astype(np.float32)
    s64, s32 = normkit.Standardizer().fit(x), normkit.Standardizer().fit(x32)
    assert s64.transform(x).dtype == np.float64 and s64.inverse_transform(x).dtype == np.float64
    assert s32.transform(x32).dtype == np.float32
    assert s64.fit_transform(x.astype(np.int64)).dtype == np.float64  # integers: float64
    # float64 data is fitted and transformed in float64: exact where float32 cannot be.
    big = np.array([[1e8 + 1.0], [1e8 + 3.0]])  # float32 rounds both to 1e8
    y = normkit.Standardizer().fit_transform(big)
    np.testing.assert_array_equal(y, [[-1.0], [1.0]])
    np.testing.assert_array_equal(normkit.Standardizer().fit(big).inverse_transform(y), big)
    huge = np.full((3, 2), 1e300)  # beyond float32, fine in float64
    assert normkit.Standardizer().fit(huge).mean_[0] == 1e300
