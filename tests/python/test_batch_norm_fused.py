"""normkit.torch.BatchNormReLU1d/2d and BatchNormAddReLU1d/2d against PyTorch 1.13's
relu(bn(x)) and relu(bn(x) + residual): outputs, gradients (x, residual, weight, bias),
running statistics, train and eval, float32/64, contiguous and channels_last; and the
mask bits of the NumPy API.

Gradients through a ReLU are only comparable away from its kink (float32 rounds a
pre-activation within an ulp of 0 to either side), so the gradient tests build data whose
pre-activations are at least ~0.1 from 0: for BN+ReLU, channels of x = m + s·v with
|v| in [1, 2] and bias 0 (the kink is at x = mean, and mean(v) is far below 1); for
BN+Add+ReLU, residual = p - bn(x) for a chosen p with |p| in [0.1, 1].
"""
import numpy as np
import pytest
import torch

import normkit
import normkit.torch as nkt
from _support import assert_matches_torch

DTYPES = [torch.float32, torch.float64]

CASES = [
    ("BatchNormReLU1d", (128, 8), torch.contiguous_format),
    ("BatchNormReLU1d", (8, 6, 13), torch.contiguous_format),
    ("BatchNormReLU2d", (4, 5, 6, 7), torch.contiguous_format),
    ("BatchNormReLU2d", (4, 5, 6, 7), torch.channels_last),
    ("BatchNormReLU2d", (3, 16, 9, 11), torch.contiguous_format),
    ("BatchNormReLU2d", (3, 16, 9, 11), torch.channels_last),
    ("BatchNormAddReLU1d", (8, 6, 13), torch.contiguous_format),
    ("BatchNormAddReLU2d", (4, 5, 6, 7), torch.contiguous_format),
    ("BatchNormAddReLU2d", (4, 5, 6, 7), torch.channels_last),
    ("BatchNormAddReLU2d", (3, 16, 9, 11), torch.contiguous_format),
    ("BatchNormAddReLU2d", (3, 16, 9, 11), torch.channels_last),
]


def case_id(case):
    name, shape, fmt = case
    return f"{name}-{'x'.join(map(str, shape))}-{str(fmt).replace('torch.', '')}"


def torch_class(name):
    return torch.nn.BatchNorm1d if name.endswith("1d") else torch.nn.BatchNorm2d


def make_pair(name, channels, dtype, rng, centers, zero_bias):
    ref = torch_class(name)(channels, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, channels)))
        ref.bias.copy_(torch.from_numpy(np.zeros(channels) if zero_bias
                                        else rng.uniform(-1, 1, channels)))
        ref.running_mean.copy_(torch.from_numpy(centers))
        ref.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, channels)))
        ref.num_batches_tracked.fill_(3)
    ours = getattr(nkt, name)(channels, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_input(shape, dtype, fmt, rng, centers, scales):
    """x = m + s·v per channel, |v| in [1, 2]: far from each channel's mean."""
    v = rng.uniform(1, 2, shape) * rng.choice([-1.0, 1.0], shape)
    view = [1] * len(shape)
    view[1] = shape[1]
    x = centers.reshape(view) + scales.reshape(view) * v
    return torch.from_numpy(x).to(dtype).contiguous(memory_format=fmt).requires_grad_()


def residual_for(ref, x, rng, training):
    """residual = p - bn(x) with |p| in [0.1, 1], bn evaluated in float64."""
    with torch.no_grad():
        bn = torch.nn.functional.batch_norm(
            x.double(), ref.running_mean.double(), ref.running_var.double(),
            ref.weight.double(), ref.bias.double(), training=False, eps=ref.eps) \
            if not training else torch.nn.functional.batch_norm(
                x.double(), None, None, ref.weight.double(), ref.bias.double(), training=True,
                eps=ref.eps)
    p = rng.uniform(0.1, 1, tuple(x.shape)) * rng.choice([-1.0, 1.0], tuple(x.shape))
    z = (torch.from_numpy(p) - bn).to(x.dtype)
    return z.contiguous(memory_format=_format_of(x)).requires_grad_()


def _format_of(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def grad_scales(x, g, module):
    """Per-channel sizes of the terms of dweight (Σ|g·x̂|) and dbias (Σ|g|)."""
    dims = [d for d in range(x.dim()) if d != 1]
    xd, gd = x.detach().double(), g.double()
    mean = xd.mean(dim=dims, keepdim=True)
    var = xd.var(dim=dims, unbiased=False, keepdim=True)
    x_hat = (xd - mean) / torch.sqrt(var + module.eps)
    return (gd * x_hat).abs().sum(dim=dims), gd.abs().sum(dim=dims)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_torch(case, training, dtype):
    name, shape, fmt = case
    add = "Add" in name
    rng = np.random.default_rng(abs(hash((name, shape, str(fmt), training))) % 2**32)
    channels = shape[1]
    centers = rng.uniform(-2, 2, channels)
    scales = rng.uniform(0.3, 2, channels)
    # The kink of BN+ReLU is at x = mean (bias 0): the batch mean in training, the
    # running mean (= the data's centres) in eval.
    ref, ours = make_pair(name, channels, dtype, rng, centers, zero_bias=not add)
    ref.train(training)
    ours.train(training)
    x_ref = make_input(shape, dtype, fmt, rng, centers, scales)
    x_ours = x_ref.detach().clone().requires_grad_()
    if add:
        z_ref = residual_for(ref, x_ref, rng, training)
        z_ours = z_ref.detach().clone().requires_grad_()
        y_ref = torch.relu(ref(x_ref) + z_ref)
        y_ours = ours(x_ours, z_ours)
    else:
        y_ref = torch.relu(ref(x_ref))
        y_ours = ours(x_ours)

    assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape
    assert y_ours.stride() == y_ref.stride()
    assert_matches_torch(y_ours, y_ref, what="y")
    for buffer in ("running_mean", "running_var"):
        assert_matches_torch(getattr(ours, buffer), getattr(ref, buffer), what=buffer)
    assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)

    dy = torch.from_numpy(rng.uniform(-1, 1, shape)).to(dtype)
    y_ref.backward(dy)
    y_ours.backward(dy)
    assert_matches_torch(x_ours.grad, x_ref.grad, what="dx")
    if add:
        # dresidual = mask ? dy : 0, exactly.
        assert torch.equal(z_ours.grad, z_ref.grad)
    g = dy * (y_ref.detach() > 0)
    w_scale, b_scale = grad_scales(x_ref, g, ref)
    assert_matches_torch(ours.weight.grad, ref.weight.grad, scale=w_scale, what="dweight")
    assert_matches_torch(ours.bias.grad, ref.bias.grad, scale=b_scale, what="dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_forward_with_bias_and_plain_data(fmt, dtype):
    """Outputs are continuous at the kink: any data, any bias."""
    rng = np.random.default_rng(7)
    ref = torch.nn.BatchNorm2d(6, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    for name in ("BatchNormReLU2d", "BatchNormAddReLU2d"):
        ours = getattr(nkt, name)(6, dtype=dtype)
        ours.load_state_dict(ref.state_dict())
        x = torch.from_numpy(rng.normal(1, 2, (5, 6, 7, 9))).to(dtype).contiguous(memory_format=fmt)
        z = torch.from_numpy(rng.normal(0, 1, (5, 6, 7, 9))).to(dtype).contiguous(memory_format=fmt)
        r = ref.__class__(6, dtype=dtype)
        r.load_state_dict(ref.state_dict())
        with torch.no_grad():
            expected = torch.relu(r(x) + z) if "Add" in name else torch.relu(r(x))
            got = ours(x, z) if "Add" in name else ours(x)
        assert_matches_torch(got, expected, what=name)
        assert_matches_torch(ours.running_var, r.running_var, what="running_var")


def test_drop_in():
    module = nkt.BatchNormAddReLU2d(8, eps=1e-3, momentum=0.2, affine=True)
    assert isinstance(module, torch.nn.BatchNorm2d)
    assert list(module.state_dict()) == list(torch.nn.BatchNorm2d(8).state_dict())
    assert module.eps == 1e-3 and module.momentum == 0.2
    assert isinstance(nkt.BatchNormReLU1d(3), torch.nn.BatchNorm1d)


def test_errors():
    module = nkt.BatchNormAddReLU2d(4)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="residual"):
        module(x, torch.randn(2, 4, 3, 4))
    with pytest.raises(RuntimeError, match="residual"):
        module(x, torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        normkit.batch_norm_relu_forward_training(x.numpy(), mask=np.zeros(8, np.uint8))
    with pytest.raises(ValueError, match="mask"):
        normkit.batch_norm_relu_backward(x.numpy(), x.numpy(), np.zeros(8, np.uint8), None,
                                         np.zeros(4, np.float32), np.ones(4, np.float32))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_mask_bits_in_memory_order(fmt):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(0, 1, (3, 5, 4, 7)).astype(np.float32))
    x = x.contiguous(memory_format=fmt)
    z = torch.from_numpy(rng.normal(0, 1, (3, 5, 4, 7)).astype(np.float32))
    z = z.contiguous(memory_format=fmt)
    y, mask, _, _ = normkit.batch_norm_add_relu_forward_training(x.numpy(), z.numpy())
    assert mask.dtype == np.uint8 and mask.shape == ((x.numel() + 7) // 8,)
    memory_order = y if fmt == torch.contiguous_format else y.transpose(0, 2, 3, 1)
    expected = np.packbits(np.ascontiguousarray(memory_order).reshape(-1) > 0, bitorder="little")
    np.testing.assert_array_equal(mask, expected)
