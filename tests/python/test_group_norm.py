"""normkit.torch.GroupNorm and InstanceNorm1d/2d/3d against torch 1.13's modules (outputs,
gradients, running statistics, state_dict, errors), against the float64 formula, gradcheck,
and the NumPy functions group_norm_forward/backward and instance_norm_*."""
import numpy as np
import pytest
import torch

import normkit
import normkit.torch as nkt
from _support import assert_exact, assert_matches_torch

DTYPES = [torch.float32, torch.float64]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def fmt_id(fmt):
    return str(fmt).replace("torch.", "")


def make_input(shape, dtype, rng, fmt=torch.contiguous_format):
    """Channels of different means and spreads, so a group mixes them."""
    channels = shape[1]
    per_channel = [1, channels] + [1] * (len(shape) - 2)
    loc = rng.uniform(-2, 2, channels).reshape(per_channel)
    spread = rng.uniform(0.5, 3, channels).reshape(per_channel)
    x = torch.from_numpy(rng.standard_normal(shape) * spread + loc).to(dtype)
    return x.contiguous(memory_format=fmt)


def step(module, x, grad_out):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(grad_out)
    return (y.detach(), x.grad,
            None if module.weight is None else module.weight.grad,
            None if module.bias is None else module.bias.grad)


def group_reference(x, groups, weight, bias, eps, dy):
    """GroupNorm in float64, the long way: y, dx, dγ, dβ and the size of their terms.

    Per (n, g) over M = C/G·S values: x̂ = (x - mean)/sqrt(var + eps), y = x̂·γ + β;
    dx = invstd·(γ·dy - Σ(γ·dy)/M - x̂·Σ(γ·dy·x̂)/M); dγ = Σ_n,s dy·x̂; dβ = Σ_n,s dy.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    n, c = x.shape[:2]
    shape = [1, c] + [1] * (x.ndim - 2)
    gamma = (np.ones(c) if weight is None else np.asarray(weight, np.float64)).reshape(shape)
    beta = (np.zeros(c) if bias is None else np.asarray(bias, np.float64)).reshape(shape)
    blocks = x.reshape(n, groups, -1)
    mean = blocks.mean(axis=2, keepdims=True)
    invstd = 1 / np.sqrt(((blocks - mean) ** 2).mean(axis=2, keepdims=True) + eps)
    xhat = ((blocks - mean) * invstd).reshape(x.shape)
    y = xhat * gamma + beta
    g = (dy * gamma).reshape(n, groups, -1)
    m = g.shape[2]
    gx = g * xhat.reshape(n, groups, -1)
    dx = (invstd * (g - g.sum(axis=2, keepdims=True) / m
                    - xhat.reshape(n, groups, -1) * gx.sum(axis=2, keepdims=True) / m)).reshape(x.shape)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    scales = {
        "y": np.abs(xhat * gamma).max() + np.abs(beta).max(),
        "dx": 3 * np.abs(gamma).max() * invstd.max() * np.abs(dy).max(),
        "dgamma": np.abs(dy * xhat).sum(axis=axes),
        "dbeta": np.abs(dy).sum(axis=axes),
    }
    return y, dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes), scales, mean.reshape(n, groups), invstd.reshape(n, groups)


# ---------------------------------------------------------------------------------------
# GroupNorm

GROUP_CASES = [
    ((3, 8), 4, torch.contiguous_format),
    ((2, 6, 7), 2, torch.contiguous_format),
    ((4, 12, 5, 6), 1, torch.contiguous_format),
    ((4, 12, 5, 6), 3, torch.contiguous_format),
    ((4, 12, 5, 6), 3, torch.channels_last),
    ((4, 12, 5, 6), 12, torch.channels_last),
    ((2, 32, 1, 1), 32, torch.contiguous_format),
    ((2, 64, 9, 9), 32, torch.channels_last),
    ((2, 4, 3, 5, 6), 2, torch.contiguous_format),
    ((2, 4, 3, 5, 6), 2, torch.channels_last_3d),
    ((2, 6, 2, 2, 2, 3), 3, torch.contiguous_format),
]


def group_id(case):
    shape, groups, fmt = case
    return f"{'x'.join(map(str, shape))}-G{groups}-{fmt_id(fmt)}"


def make_group_pair(groups, channels, dtype, rng, affine=True):
    ref = torch.nn.GroupNorm(groups, channels, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(rng.uniform(-1.5, 1.5, channels)))
            ref.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, channels)))
    ours = nkt.GroupNorm(groups, channels, affine=affine, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", GROUP_CASES, ids=group_id)
def test_group_norm_matches_torch_and_the_formula(case, dtype, rng):
    shape, groups, fmt = case
    ref, ours = make_group_pair(groups, shape[1], dtype, rng)
    x = make_input(shape, dtype, rng, fmt)
    grad_out = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    y, dx, dw, db = step(ours, x, grad_out)
    y_ref, dx_ref, dw_ref, db_ref = step(ref, x, grad_out)
    assert isinstance(ours, torch.nn.GroupNorm)
    assert y.is_contiguous(memory_format=fmt) and y.stride() == y_ref.stride()

    expected = group_reference(x.double(), groups, ref.weight.detach().double(),
                               ref.bias.detach().double(), ref.eps, grad_out.double())
    y64, dx64, dw64, db64, scales, _, _ = expected
    values_per_group = x.numel() // (shape[0] * groups)
    if values_per_group > 1:
        assert_matches_torch(y, y_ref, scales["y"], "y")
        assert_matches_torch(dx, dx_ref, scales["dx"], "dx")
        assert_matches_torch(dw, dw_ref, scales["dgamma"], "dweight")
    else:
        # One value per group: x - mean is exactly 0, so y = β and dγ = 0 exactly (dx = 0
        # up to the rounding of its terms, checked against the formula below). torch 1.13
        # forms the variance as E[x²] - E[x]², whose rounding (~ulp(x²)) divided by
        # sqrt(eps) leaves noise of ~1e-4 in its y; only the formula can judge this case.
        assert torch.equal(y, ref.bias.detach().reshape(1, -1, 1, 1).expand_as(y))
        assert not dw.any()
    assert_matches_torch(db, db_ref, scales["dbeta"], "dbias")
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    assert_exact(y, y64, scales["y"], np_dtype, "y vs formula")
    assert_exact(dx, dx64, scales["dx"], np_dtype, "dx vs formula")
    assert_exact(dw, dw64, scales["dgamma"], np_dtype, "dweight vs formula")
    assert_exact(db, db64, scales["dbeta"], np_dtype, "dbias vs formula")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_group_norm_without_affine(dtype, rng):
    ref, ours = make_group_pair(2, 6, dtype, rng, affine=False)
    assert ours.weight is None and list(ours.state_dict()) == []
    x = make_input((3, 6, 4, 5), dtype, rng)
    grad_out = torch.from_numpy(rng.standard_normal(x.shape)).to(dtype)
    y, dx, _, _ = step(ours, x, grad_out)
    y_ref, dx_ref, _, _ = step(ref, x, grad_out)
    assert_matches_torch(y, y_ref, what="y")
    assert_matches_torch(dx, dx_ref, 3 * dx_ref.abs().max(), "dx")


def test_group_norm_gradcheck_float64(rng):
    for shape, groups, fmt in [((2, 6, 3, 4), 3, torch.contiguous_format),
                               ((2, 6, 3, 4), 2, torch.channels_last), ((3, 4), 2, torch.contiguous_format)]:
        x = make_input(shape, torch.float64, rng, fmt).requires_grad_()
        w = torch.from_numpy(rng.uniform(-1.5, 1.5, shape[1])).requires_grad_()
        b = torch.from_numpy(rng.uniform(-1, 1, shape[1])).requires_grad_()
        module = nkt.GroupNorm(groups, shape[1], dtype=torch.float64)

        def f(x, w, b):
            with torch.no_grad():
                module.weight.copy_(w)
                module.bias.copy_(b)
            return torch.ops.normkit.group_norm(x, groups, w, b, module.eps)

        assert torch.autograd.gradcheck(f, (x, w, b))


def test_group_norm_state_dict_and_interface(rng):
    ref, ours = make_group_pair(4, 8, torch.float32, rng)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert repr(ours) == repr(ref)
    back = torch.nn.GroupNorm(4, 8)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, ref.weight) and torch.equal(back.bias, ref.bias)


def test_group_norm_errors_match_torch(rng):
    x = make_input((2, 6, 3), torch.float32, rng)
    # (The constructor already checks num_channels; an input of other channels reaches forward.)
    with pytest.raises(RuntimeError, match="divisible by num_groups") as ours:
        nkt.GroupNorm(4, 8, affine=False)(x)
    with pytest.raises(RuntimeError, match="divisible by num_groups") as theirs:
        torch.nn.GroupNorm(4, 8, affine=False)(x)
    assert str(ours.value) == str(theirs.value)
    one = make_input((1, 4, 1, 1), torch.float32, rng)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nkt.GroupNorm(4, 4)(one)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.GroupNorm(4, 4)(one)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        nkt.GroupNorm(2, 6)(x.half())
    with pytest.raises(ValueError, match="divisible by num_groups"):
        nkt.GroupNorm(4, 6)


# ---------------------------------------------------------------------------------------
# InstanceNorm

INSTANCE_CASES = [
    ("InstanceNorm1d", (3, 5, 9), torch.contiguous_format),
    ("InstanceNorm2d", (4, 6, 5, 7), torch.contiguous_format),
    ("InstanceNorm2d", (4, 6, 5, 7), torch.channels_last),
    ("InstanceNorm2d", (2, 33, 3, 3), torch.channels_last),
    ("InstanceNorm3d", (2, 4, 3, 4, 5), torch.contiguous_format),
    ("InstanceNorm3d", (2, 4, 3, 4, 5), torch.channels_last_3d),
]


def instance_id(case):
    name, shape, fmt = case
    return f"{name}-{'x'.join(map(str, shape))}-{fmt_id(fmt)}"


def make_instance_pair(name, channels, dtype, rng, **kwargs):
    ref = getattr(torch.nn, name)(channels, dtype=dtype, **kwargs)
    with torch.no_grad():
        if ref.affine:
            ref.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, channels)))
            ref.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, channels)))
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.from_numpy(rng.uniform(-1, 1, channels)))
            ref.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, channels)))
    ours = getattr(nkt, name)(channels, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_state_matches(ours, ref):
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, expected in ref.state_dict().items():
        actual = ours.state_dict()[key]
        if expected.dtype == torch.int64:
            assert torch.equal(actual, expected), key
        else:
            assert_matches_torch(actual, expected, what=key)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("track", [False, True], ids=["no_running", "running"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("case", INSTANCE_CASES, ids=instance_id)
def test_instance_norm_matches_torch(case, affine, track, dtype, rng):
    name, shape, fmt = case
    ref, ours = make_instance_pair(name, shape[1], dtype, rng, affine=affine,
                                   track_running_stats=track, momentum=0.3)
    assert isinstance(ours, getattr(torch.nn, name))
    for training in (True, False, True):
        ours.train(training)
        ref.train(training)
        x = make_input(shape, dtype, rng, fmt)
        grad_out = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
        y, dx, dw, db = step(ours, x, grad_out)
        y_ref, dx_ref, dw_ref, db_ref = step(ref, x, grad_out)
        # The output keeps x's memory format (torch's instance_norm returns contiguous).
        assert y.is_contiguous(memory_format=fmt)
        uses_input_stats = training or not track
        if uses_input_stats:
            n, c = shape[:2]
            _, dx64, dw64, db64, scales, _, _ = group_reference(
                x.double(), c, None if ref.weight is None else ref.weight.detach().double(),
                None if ref.bias is None else ref.bias.detach().double(), ref.eps, grad_out.double())
            dx_scale, dw_scale, db_scale = scales["dx"], scales["dgamma"], scales["dbeta"]
        else:
            invstd = 1 / (ref.running_var.double() + ref.eps).sqrt()
            gamma = torch.ones(shape[1], dtype=torch.float64) if ref.weight is None else ref.weight.double()
            dx_scale = (gamma.abs().max() * invstd.max() * grad_out.abs().max()).item()
            dw_scale = db_scale = None
        y_scale = (y_ref.double().abs().max() + (0 if ref.bias is None else ref.bias.abs().max())).item()
        assert_matches_torch(y, y_ref, y_scale, "y")
        assert_matches_torch(dx, dx_ref, dx_scale, "dx")
        if affine:
            assert_matches_torch(dw, dw_ref, dw_scale, "dweight")
            assert_matches_torch(db, db_ref, db_scale, "dbias")
        assert_state_matches(ours, ref)


def test_instance_norm_unbatched_input(rng):
    for name, shape in [("InstanceNorm1d", (5, 9)), ("InstanceNorm2d", (3, 4, 5))]:
        ref, ours = make_instance_pair(name, shape[0], torch.float32, rng, affine=True,
                                       track_running_stats=True)
        x = torch.from_numpy(rng.standard_normal(shape)).float()
        assert_matches_torch(ours(x), ref(x), what=name)
        assert_state_matches(ours, ref)


def test_instance_norm_gradcheck_float64(rng):
    # The functions the modules apply: instance statistics (training, or no running
    # statistics) and running statistics (eval with track_running_stats).
    for shape in [(2, 3, 3, 4), (2, 3, 5)]:
        x = make_input(shape, torch.float64, rng).requires_grad_()
        w = torch.from_numpy(rng.uniform(0.5, 1.5, shape[1])).requires_grad_()
        b = torch.from_numpy(rng.uniform(-1, 1, shape[1])).requires_grad_()
        rm = torch.from_numpy(rng.uniform(-1, 1, shape[1]))
        rv = torch.from_numpy(rng.uniform(0.5, 2, shape[1]))

        def training(x, w, b):
            return torch.ops.normkit.instance_norm(x, w, b, None, None, 0.1, 1e-5)

        def running(x, w, b):
            return torch.ops.normkit.batch_norm(x, w, b, rm, rv, None, False, 0.1, 1e-5)

        assert torch.autograd.gradcheck(training, (x, w, b))
        assert torch.autograd.gradcheck(running, (x, w, b))


def test_instance_norm_errors_match_torch(rng):
    one = make_input((2, 3, 1, 1), torch.float32, rng)
    for module in (nkt.InstanceNorm2d(3), torch.nn.InstanceNorm2d(3)):
        with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
            module(one)
    for module in (nkt.InstanceNorm2d(3), torch.nn.InstanceNorm2d(3)):
        with pytest.raises(ValueError, match="expected 3D or 4D input"):
            module(make_input((2, 3, 4, 5, 6), torch.float32, rng))


def test_instance_norm_nan_keeps_running_statistics(rng):
    module = nkt.InstanceNorm2d(3, track_running_stats=True)
    x = make_input((2, 3, 4, 4), torch.float32, rng)
    x[1, 2, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        module(x)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------------------
# The NumPy functions

@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_numpy_group_norm_statistics_are_torchs(np_dtype, rng):
    x = rng.standard_normal((3, 8, 5, 4)).astype(np_dtype) * 2 + 1
    weight = rng.uniform(0.5, 1.5, 8).astype(np_dtype)
    bias = rng.uniform(-1, 1, 8).astype(np_dtype)
    y, mean, invstd = normkit.group_norm_forward(x, 4, weight, bias, 1e-5)
    assert mean.shape == invstd.shape == (3, 4) and mean.dtype == np_dtype
    t = torch.from_numpy(x)
    y_ref, mean_ref, rstd_ref = torch.ops.aten.native_group_norm(
        t, torch.from_numpy(weight), torch.from_numpy(bias), 3, 8, 20, 4, 1e-5)
    assert_matches_torch(y, y_ref, what="y")
    assert_matches_torch(mean, mean_ref, np.abs(x).max(), what="mean")
    assert_matches_torch(invstd, rstd_ref, what="invstd")
    dy = rng.standard_normal(x.shape).astype(np_dtype)
    dx, dw, db = normkit.group_norm_backward(x, dy, 4, weight, mean, invstd)
    _, dw_only, db_only = normkit.group_norm_backward(x, dy, 4, weight, mean, invstd,
                                                      compute_dx=False)
    assert np.array_equal(dw, dw_only) and np.array_equal(db, db_only)
    y64, dx64, dw64, db64, scales, _, _ = group_reference(x, 4, weight, bias, 1e-5, dy)
    assert_exact(dx, dx64, scales["dx"], np_dtype, "dx")
    assert_exact(dw, dw64, scales["dgamma"], np_dtype, "dweight")


def test_numpy_channels_last_layout_names(rng):
    x = rng.standard_normal((2, 5, 6, 8)).astype(np.float32)  # N, H, W, C
    y, mean, _ = normkit.group_norm_forward(x, 2, layout="NHWC")
    y_first, mean_first, _ = normkit.group_norm_forward(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), 2)
    np.testing.assert_allclose(mean, mean_first, rtol=1e-6)
    assert_matches_torch(y.transpose(0, 3, 1, 2), y_first, what="y")


def test_numpy_instance_norm_running_statistics(rng):
    x = rng.standard_normal((4, 3, 10)).astype(np.float64) * 3 + 2
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, invstd = normkit.instance_norm_forward_training(x, running_mean=rm, running_var=rv,
                                                            momentum=0.2)
    assert mean.shape == (4, 3)
    expected_mean = 0.8 * 0 + 0.2 * x.mean(axis=2).mean(axis=0)
    expected_var = 0.8 * 1 + 0.2 * x.var(axis=2, ddof=1).mean(axis=0)
    np.testing.assert_allclose(rm, expected_mean, rtol=1e-13)
    np.testing.assert_allclose(rv, expected_var, rtol=1e-13)
    dx, dw, db = normkit.instance_norm_backward(x, np.ones_like(x), None, mean, invstd)
    np.testing.assert_allclose(dx, 0, atol=1e-12)  # y sums to zero over each instance


def test_numpy_errors(rng):
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        normkit.group_norm_forward(x, 4)
    with pytest.raises(ValueError, match="num_groups must be positive"):
        normkit.group_norm_forward(x, 0)
    with pytest.raises(ValueError, match="eps"):
        normkit.group_norm_forward(x, 3, eps=0.0)
    with pytest.raises(ValueError, match="weight"):
        normkit.group_norm_forward(x, 3, np.ones(5, np.float32))
    with pytest.raises(ValueError, match="mean should contain 6"):
        normkit.group_norm_backward(x, x, 3, None, np.zeros(5, np.float32), np.ones(6, np.float32))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        normkit.instance_norm_forward_training(x[:, :, :1])
