"""normkit.torch.LayerNorm against torch.nn.LayerNorm / F.layer_norm (PyTorch 1.13), and
normkit.torch.RMSNorm against its formula written in torch ops (1.13 has no RMSNorm):
outputs, every gradient, saved statistics, gradcheck, state_dict, errors; and the NumPy
functional API (layer_norm_forward/backward, rms_norm_forward/backward)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
import normkit.torch as nkt
from _support import assert_matches_torch

DTYPES = [torch.float32, torch.float64]

# (input shape, normalized_shape): one and several normalized dimensions, lengths below,
# at and above SIMD widths, a transformer row (768), several leading dims. Rows of one
# value are tested on their own (test_*_one_value_rows): every output is then a
# cancellation to (near) zero, and a relative comparison with PyTorch says nothing.
CASES = [
    ((6, 10), (10,)),
    ((4, 2), (2,)),
    ((5, 17), (17,)),
    ((2, 3, 64), (64,)),
    ((3, 4, 5, 6), (5, 6)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((8, 768), (768,)),
    ((33,), (33,)),
]


def case_id(case):
    shape, normalized = case
    return f"{'x'.join(map(str, shape))}-over-{'x'.join(map(str, normalized))}"


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def random_input(rng, shape, dtype, mean=0.5):
    return torch.from_numpy(rng.uniform(-1.5, 2.5, size=shape) + mean).to(dtype)


def row_sums(tensor, k):
    """Σ over the leading (row) dimensions: the per-column scale of dγ and dβ."""
    return tensor.abs().sum(dim=tuple(range(tensor.dim() - k))) if tensor.dim() > k else tensor.abs()


def dx_term_scale(x, dy, module, normalized):
    """invstd·max|dy·γ| over the rows: the size of the terms dx is a difference of. With
    2 values per row (x̂ = ±1) dx cancels to far below them."""
    k = len(normalized)
    dims = tuple(range(x.dim() - k, x.dim()))
    invstd = 1 / torch.sqrt(x.double().var(dim=dims, unbiased=False, keepdim=True) + module.eps)
    g = dy.double() * (module.weight.detach().double() if module.weight is not None else 1.0)
    return (invstd * g.abs().amax(dim=dims, keepdim=True)).max().to(x.dtype)


def randomize_affine(module, rng):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.uniform(-1.5, 1.5, size=p.shape)))


# ------------------------------------------------------------------ LayerNorm vs torch


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer_norm_matches_torch(case, dtype, affine, rng):
    # torch.nn.LayerNorm runs in float64 on the same values: PyTorch's float32 kernel has
    # rounding errors of its own (its float mean makes x - mean of a 1-value row ~1e-7
    # instead of 0, times invstd = 1/sqrt(eps) = 316), which are not the subject here.
    shape, normalized = case
    ours = nkt.LayerNorm(normalized, eps=1e-5, elementwise_affine=affine).to(dtype)
    theirs = torch.nn.LayerNorm(normalized, eps=1e-5, elementwise_affine=affine).to(dtype)
    randomize_affine(theirs, rng)
    ours.load_state_dict(theirs.state_dict())
    theirs = theirs.double()

    x = random_input(rng, shape, dtype)
    dy = torch.from_numpy(rng.uniform(-1, 1, size=shape)).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.double().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    y1.backward(dy)
    y2.backward(dy.double())
    assert y1.dtype == dtype and x1.grad.dtype == dtype
    assert_matches_torch(y1, y2.to(dtype), what="y")
    assert_matches_torch(x1.grad, x2.grad.to(dtype), scale=dx_term_scale(x, dy, ours, normalized),
                         what="dx")
    if affine:
        k = len(normalized)
        xhat = F.layer_norm(x.double(), normalized, eps=1e-5)
        assert_matches_torch(ours.weight.grad, theirs.weight.grad.to(dtype),
                             scale=row_sums(dy.double() * xhat, k).to(dtype), what="dweight")
        assert_matches_torch(ours.bias.grad, theirs.bias.grad.to(dtype),
                             scale=row_sums(dy, k), what="dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_layer_norm_matches_torch_in_its_own_dtype(dtype, rng):
    # The same module as PyTorch's in float32 too, where rows are long enough for its
    # float32 statistics to be accurate (the transformer case).
    x = random_input(rng, (16, 768), dtype)
    dy = torch.from_numpy(rng.uniform(-1, 1, size=(16, 768))).to(dtype)
    ours, theirs = nkt.LayerNorm(768).to(dtype), torch.nn.LayerNorm(768).to(dtype)
    randomize_affine(theirs, rng)
    ours.load_state_dict(theirs.state_dict())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    y1.backward(dy)
    y2.backward(dy)
    assert_matches_torch(y1, y2, what="y")
    assert_matches_torch(x1.grad, x2.grad, what="dx")
    xhat = F.layer_norm(x.double(), (768,), eps=1e-5)
    assert_matches_torch(ours.weight.grad, theirs.weight.grad,
                         scale=row_sums(dy.double() * xhat, 1).to(dtype), what="dweight")
    assert_matches_torch(ours.bias.grad, theirs.bias.grad, scale=row_sums(dy, 1), what="dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_layer_norm_statistics_match_native_layer_norm(dtype, rng):
    x = random_input(rng, (7, 3, 40), dtype, mean=100.0)
    weight = torch.from_numpy(rng.uniform(0.5, 1.5, size=(3, 40))).to(dtype)
    bias = torch.from_numpy(rng.uniform(-1, 1, size=(3, 40))).to(dtype)
    y_ref, mean_ref, rstd_ref = torch.native_layer_norm(x, [3, 40], weight, bias, 1e-5)
    y, mean, invstd = normkit.layer_norm_forward(x.numpy(), [3, 40], weight.numpy(), bias.numpy(),
                                                 1e-5)
    assert mean.shape == (7,) and invstd.shape == (7,)
    assert_matches_torch(torch.from_numpy(y), y_ref, what="y")
    assert_matches_torch(torch.from_numpy(mean), mean_ref.reshape(7), what="mean")
    assert_matches_torch(torch.from_numpy(invstd), rstd_ref.reshape(7), what="invstd")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_layer_norm_one_value_rows_are_exact(dtype, rng):
    # x - mean = 0 exactly: y = bias, dx = 0, dweight = 0, dbias = Σdy (exact by
    # construction; PyTorch's float32 gives ~1e-5 instead of 0, from its float mean).
    ln = nkt.LayerNorm(1).to(dtype)
    randomize_affine(ln, rng)
    x = random_input(rng, (5, 1), dtype).requires_grad_()
    dy = torch.from_numpy(rng.uniform(-1, 1, size=(5, 1))).to(dtype)
    y = ln(x)
    y.backward(dy)
    assert torch.equal(y, ln.bias.detach().expand(5, 1))
    assert torch.equal(x.grad, torch.zeros(5, 1, dtype=dtype))
    assert torch.equal(ln.weight.grad, torch.zeros(1, dtype=dtype))
    assert_matches_torch(ln.bias.grad, dy.double().sum(0).to(dtype), what="dbias")


def test_layer_norm_is_a_torch_layer_norm_with_its_state_dict():
    ln = nkt.LayerNorm([4, 5])
    assert isinstance(ln, torch.nn.LayerNorm)
    assert list(ln.state_dict()) == ["weight", "bias"]
    assert ln.normalized_shape == (4, 5) and ln.weight.shape == (4, 5)
    assert repr(ln) == repr(torch.nn.LayerNorm([4, 5]))
    assert list(nkt.LayerNorm(3, elementwise_affine=False).state_dict()) == []


def test_layer_norm_non_contiguous_and_expanded_inputs(rng):
    x = random_input(rng, (12, 9), torch.float32).t()  # (9, 12), transposed
    ours, theirs = nkt.LayerNorm(12), torch.nn.LayerNorm(12)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    y1.sum().backward()  # dy arrives expanded (zero strides)
    y2.sum().backward()
    assert_matches_torch(y1, y2, what="y")
    assert_matches_torch(x1.grad, x2.grad, scale=1.0, what="dx")
    assert_matches_torch(ours.weight.grad, theirs.weight.grad, scale=9.0, what="dweight")


def test_layer_norm_empty_batch():
    ln, ref = nkt.LayerNorm(8), torch.nn.LayerNorm(8)
    x = torch.empty(0, 8, requires_grad=True)
    y = ln(x)
    assert y.shape == ref(x).shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.equal(ln.weight.grad, torch.zeros(8)) and torch.equal(ln.bias.grad, torch.zeros(8))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_gradcheck(affine, rng):
    ln = nkt.LayerNorm((3, 4), eps=1e-3, elementwise_affine=affine).double()
    randomize_affine(ln, rng)
    x = random_input(rng, (2, 3, 4), torch.float64).requires_grad_()
    params = tuple(ln.parameters())

    def f(x, *p):
        return torch.ops.normkit.layer_norm(x, [3, 4], *(p if affine else (None, None)), 1e-3)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-8, rtol=1e-7)


def test_layer_norm_errors():
    ln = nkt.LayerNorm(6)
    with pytest.raises(RuntimeError, match=r"normalized_shape=\[6\]"):
        ln(torch.randn(4, 5))
    with pytest.raises(ValueError, match="eps"):
        nkt.LayerNorm(6, eps=0.0)(torch.randn(2, 6))
    x = torch.randn(3, 6)
    x[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="row 1"):
        ln(x)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        ln(torch.ones(2, 6, dtype=torch.float16))


# ------------------------------------------------------------------ RMSNorm


def rms_formula(x, normalized_shape, weight, eps):
    """y = x / sqrt(mean(x²) + eps) · weight, in torch ops (differentiable)."""
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rms_norm_matches_formula(case, dtype, affine, rng):
    shape, normalized = case
    rms = nkt.RMSNorm(normalized, elementwise_affine=affine).to(dtype)
    randomize_affine(rms, rng)
    eps = torch.finfo(dtype).eps  # eps=None means this
    x = random_input(rng, shape, dtype, mean=0.0)
    dy = torch.from_numpy(rng.uniform(-1, 1, size=shape)).to(dtype)

    x1 = x.clone().requires_grad_()
    y1 = rms(x1)
    y1.backward(dy)
    # The oracle in float64, from the same values.
    x2 = x.double().requires_grad_()
    w2 = rms.weight.detach().double().requires_grad_() if affine else None
    y2 = rms_formula(x2, normalized, w2, eps)
    y2.backward(dy.double())
    assert_matches_torch(y1, y2.to(dtype), what="y")
    assert_matches_torch(x1.grad, x2.grad.to(dtype), what="dx")
    if affine:
        k = len(normalized)
        # dweight = Σ_rows dy·x·inv_rms: its terms set the scale.
        scale = row_sums(dy.double() * rms_formula(x.double(), normalized, None, eps), k)
        assert_matches_torch(rms.weight.grad, w2.grad.to(dtype), scale=scale.to(dtype),
                             what="dweight")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_one_value_rows(dtype, rng):
    # y = x / sqrt(x² + eps)·w and dx = w·dy·r·(1 - x²·r²): the two terms of dx cancel
    # to ~eps/x², so dx is held to the size of its terms, r·|w·dy|.
    rms = nkt.RMSNorm(1).to(dtype)
    randomize_affine(rms, rng)
    eps = torch.finfo(dtype).eps
    x = random_input(rng, (6, 1), dtype)
    dy = torch.from_numpy(rng.uniform(-1, 1, size=(6, 1))).to(dtype)
    x1 = x.clone().requires_grad_()
    rms(x1).backward(dy)
    x2 = x.double().requires_grad_()
    w2 = rms.weight.detach().double()
    y2 = rms_formula(x2, (1,), w2, eps)
    y2.backward(dy.double())
    terms = (dy.double() * w2).abs() / torch.sqrt(x.double() ** 2 + eps)
    assert_matches_torch(x1.grad, x2.grad.to(dtype), scale=terms.max().to(dtype), what="dx")


def test_rms_norm_default_eps_is_the_dtype_epsilon(rng):
    # Rows of tiny values: mean(x²) ~ 1e-8 is below float32's eps (1.2e-7), so eps shows.
    x = torch.from_numpy(rng.uniform(-1e-4, 1e-4, size=(4, 32))).float()
    y = nkt.RMSNorm(32)(x)
    expected = rms_formula(x.double(), (32,), None, torch.finfo(torch.float32).eps)
    assert_matches_torch(y, expected.float(), what="y")
    with_other_eps = rms_formula(x.double(), (32,), None, 1e-6).float()
    assert not torch.allclose(y, with_other_eps, rtol=1e-3)
    y_explicit = nkt.RMSNorm(32, eps=1e-6)(x)
    assert_matches_torch(y_explicit, with_other_eps, what="y with eps=1e-6")


def test_rms_norm_module_shape_and_state_dict():
    rms = nkt.RMSNorm([3, 4])
    assert rms.normalized_shape == (3, 4) and rms.eps is None
    assert list(rms.state_dict()) == ["weight"]
    assert torch.equal(rms.weight, torch.ones(3, 4))
    assert list(nkt.RMSNorm(5, elementwise_affine=False).state_dict()) == []
    assert "eps=None" in repr(rms)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_rms_norm_gradcheck(affine, rng):
    x = random_input(rng, (3, 2, 5), torch.float64, mean=0.0).requires_grad_()
    w = torch.from_numpy(rng.uniform(-1.5, 1.5, size=(2, 5))).requires_grad_()

    def f(x, *p):
        return torch.ops.normkit.rms_norm(x, [2, 5], p[0] if affine else None, 1e-3)

    assert torch.autograd.gradcheck(f, (x, w) if affine else (x,), eps=1e-6, atol=1e-8, rtol=1e-7)


def test_rms_norm_errors():
    with pytest.raises(RuntimeError, match=r"normalized_shape=\[4\]"):
        nkt.RMSNorm(4)(torch.randn(3, 5))
    x = torch.randn(3, 4)
    x[2, 0] = float("inf")
    with pytest.raises(RuntimeError, match="row 2"):
        nkt.RMSNorm(4)(x)
    with pytest.raises(ValueError, match="eps"):
        nkt.RMSNorm(4, eps=-1.0)(torch.randn(3, 4))


# ------------------------------------------------------------------ NumPy API


def test_numpy_rows_with_a_stride_are_used_in_place(rng):
    wide = rng.standard_normal((16, 100)).astype(np.float32)
    sliced = wide[:, :64]  # rows of 64 values, 100 apart
    y_sliced, mean_s, invstd_s = normkit.layer_norm_forward(sliced, [64])
    y_dense, mean_d, invstd_d = normkit.layer_norm_forward(np.ascontiguousarray(sliced), [64])
    np.testing.assert_array_equal(y_sliced, y_dense)
    np.testing.assert_array_equal(invstd_s, invstd_d)
    out = np.full((16, 100), np.nan, np.float32)
    normkit.layer_norm_forward(sliced, [64], out=out[:, :64])
    np.testing.assert_array_equal(out[:, :64], y_dense)
    assert np.isnan(out[:, 64:]).all()  # the rest of the rows untouched


def test_numpy_backward_parts_and_threads(rng):
    x = rng.standard_normal((300, 96)).astype(np.float32)
    dy = rng.standard_normal((300, 96)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 96).astype(np.float32)
    _, mean, invstd = normkit.layer_norm_forward(x, [96], w)
    results = []
    for threads in (1, 2, 3):
        normkit.set_num_threads(threads)
        results.append(normkit.layer_norm_backward(x, dy, [96], w, mean, invstd))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    dx, dw, db = normkit.layer_norm_backward(x, dy, [96], w, mean, invstd, compute_dx=False,
                                             compute_dbias=False)
    assert dx is None and db is None
    np.testing.assert_array_equal(dw, results[0][1])
    _, inv_rms = normkit.rms_norm_forward(x, [96], w)
    dx, dw = normkit.rms_norm_backward(x, dy, [96], w, inv_rms)
    assert dx.shape == x.shape and dw.shape == (96,)


def test_numpy_argument_errors(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="expected 6 values"):
        normkit.layer_norm_forward(x, [6], np.ones(5, np.float32))
    with pytest.raises(ValueError, match=r"normalized_shape"):
        normkit.layer_norm_forward(x, [5])
    with pytest.raises(ValueError, match="one per row"):
        normkit.layer_norm_backward(x, x, [6], None, np.zeros(3), np.ones(4))
    with pytest.raises(TypeError, match="float32 or float64"):
        normkit.rms_norm_forward(x.astype(np.int32), [6])
