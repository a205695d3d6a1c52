"""Oracles and tolerances shared by the Python tests.

Two kinds of comparison, with different jobs:

- against the formula evaluated in float64 on the same inputs (`assert_exact`): normkit
  claims results exact to float rounding, so the tolerance is a few units of rounding of
  the terms each value is computed from;
- against PyTorch 1.13 (`assert_matches_torch`): PyTorch is the reference users trust but
  is not exact itself, so the tolerance is a relative one (1e-5 for float32).
"""
import numpy as np
import torch

# Parity with PyTorch. A value computed as a difference or a sum of signed terms
# (x - mean, y = x̂·γ + β, Σdy·x̂, and the statistics behind every output) carries an
# absolute error the size of those terms, not of the result, so an output that lands
# near zero can only be held to the relative tolerance *of the terms it came from*:
# atol = rtol · scale, where scale is the largest |expected| in the tensor for
# elementwise outputs and Σ|terms| per channel for the reductions dγ and dβ. This is
# not slack for normkit: PyTorch 1.13 itself sums channels_last float32 statistics in
# float and lands up to ~20 float32 ulps of the largest output away from the exact
# value (32x64x14x14, measured), while normkit stays within ~1 (see test_torch_parity).
TORCH_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

# Exactness against the float64 formula: each output of the fused kernels is a few
# roundings (at most half an ulp each) of terms no larger than `scale`, plus the error
# of statistics accumulated in float lanes (about one ulp); 4 ulps of `scale` bounds
# that with margin. In float64 the "exact" formula is itself a float64 evaluation whose
# sums (NumPy's pairwise, normkit's sequential per piece) round differently over up to
# M terms, so float64 gets 64 ulps: still 1e-14 relative.
EXACT_ULPS = {np.dtype(np.float32): 4, np.dtype(np.float64): 64}


def as_numpy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    return np.asarray(value)


def _assert_within(actual, expected, rtol, atol, what):
    """|actual - expected| <= atol + rtol·|expected| elementwise; atol may be an array
    (per channel), which numpy.testing.assert_allclose cannot report."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    limit = np.broadcast_to(atol + rtol * np.abs(expected), expected.shape)
    error = np.abs(actual - expected)
    bad = ~(error <= limit)  # NaN anywhere fails
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, error / np.maximum(limit, 1e-300), -1)),
                                 expected.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values out of tolerance; worst at {worst}: "
            f"actual {actual[worst]!r}, expected {expected[worst]!r}, error {error[worst]:.3g} "
            f"> allowed {limit[worst]:.3g} (rtol {rtol}, atol {np.max(atol):.3g} at most)")


def assert_matches_torch(actual, expected, scale=None, what=""):
    actual, expected = as_numpy(actual), as_numpy(expected)
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    rtol = TORCH_RTOL[expected.dtype]
    if scale is None:
        scale = np.abs(expected).max() if expected.size else 0.0
    _assert_within(actual, expected, rtol, rtol * as_numpy(scale).astype(np.float64), what)


def assert_exact(actual, expected, scale, dtype, what=""):
    """`expected` is the float64 formula; `scale` the size of its terms (broadcastable)."""
    dtype = np.dtype(dtype)
    actual = as_numpy(actual)
    assert actual.dtype == dtype, what
    assert actual.shape == np.shape(expected), what
    atol = EXACT_ULPS[dtype] * np.finfo(dtype).eps * as_numpy(scale).astype(np.float64)
    _assert_within(actual, expected, 0.0, atol, what)


# ---------------------------------------------------------------------------------------
# The batch-normalization formulas in float64, written out the long way: the oracle.

def channel_shape(ndim, channel_axis, channels):
    shape = [1] * ndim
    shape[channel_axis] = channels
    return shape


def reduced_axes(ndim, channel_axis):
    return tuple(axis for axis in range(ndim) if axis != channel_axis)


def forward_reference(x, weight, bias, eps, channel_axis=1):
    """y, batch mean, invstd = 1/sqrt(biased var + eps), unbiased var, and the size of y's terms."""
    x = np.asarray(x, dtype=np.float64)
    axes = reduced_axes(x.ndim, channel_axis)
    channels = x.shape[channel_axis]
    shape = channel_shape(x.ndim, channel_axis, channels)
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
    count = x.size // channels
    unbiased = var * count / (count - 1)
    invstd = 1.0 / np.sqrt(var + eps)
    gamma = np.ones(channels) if weight is None else np.asarray(weight, np.float64)
    beta = np.zeros(channels) if bias is None else np.asarray(bias, np.float64)
    scaled = (x - mean.reshape(shape)) * invstd.reshape(shape) * gamma.reshape(shape)
    y = scaled + beta.reshape(shape)
    scale = np.abs(scaled).max() + np.abs(beta).max()
    return y, mean, invstd, unbiased, scale


def backward_reference(x, dy, weight, mean, invstd, mode, channel_axis=1):
    """dx, dγ, dβ from the given statistics, and the size of the terms of each.

    dβ = Σdy, dγ = Σdy·x̂ with x̂ = (x - mean)·invstd;
    training: dx = γ·invstd·(dy - dβ/M - x̂·dγ/M)   (the statistics depend on x)
    frozen:   dx = γ·invstd·dy                      (the statistics are constants)
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axes = reduced_axes(x.ndim, channel_axis)
    channels = x.shape[channel_axis]
    shape = channel_shape(x.ndim, channel_axis, channels)
    count = x.size // channels
    mean = np.asarray(mean, np.float64).reshape(shape)
    invstd = np.asarray(invstd, np.float64).reshape(shape)
    gamma = (np.ones(channels) if weight is None else np.asarray(weight, np.float64)).reshape(shape)
    xhat = (x - mean) * invstd
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    a = gamma * invstd
    if mode == "training":
        term_dy = a * dy
        term_dbeta = a * dbeta.reshape(shape) / count
        term_dgamma = a * xhat * dgamma.reshape(shape) / count
        dx = term_dy - term_dbeta - term_dgamma
        dx_scale = np.abs(term_dy).max() + np.abs(term_dbeta).max() + np.abs(term_dgamma).max()
    else:
        dx = a * dy
        dx_scale = np.abs(dx).max()
    return (dx, dgamma, dbeta,
            {"dx": dx_scale, "dgamma": np.abs(dy * xhat).sum(axis=axes),
             "dbeta": np.abs(dy).sum(axis=axes)})


def running_reference(running_mean, running_var, batch_mean, batch_unbiased_var, momentum):
    """PyTorch's update: running = (1 - momentum)·running + momentum·batch."""
    new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * batch_mean
    new_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * batch_unbiased_var
    return new_mean, new_var
