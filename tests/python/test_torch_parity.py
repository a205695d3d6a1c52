"""normkit.torch.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d (PyTorch 1.13):
the same module state in, the same outputs, gradients, buffers and errors out."""
import io

import numpy as np
import pytest
import torch

import normkit.torch as nkt
from _support import (assert_exact, assert_matches_torch, backward_reference, channel_shape,
                      forward_reference)

DTYPES = [torch.float32, torch.float64]

# (class, input shape, memory format): every class, both input ranks of BatchNorm1d, both
# memory formats of 2d and 3d, channel counts 1, below, at and above a SIMD width.
CASES = [
    ("BatchNorm1d", (32, 8), torch.contiguous_format),
    ("BatchNorm1d", (5, 33), torch.contiguous_format),
    ("BatchNorm1d", (8, 6, 10), torch.contiguous_format),
    ("BatchNorm2d", (4, 5, 6, 7), torch.contiguous_format),
    ("BatchNorm2d", (4, 5, 6, 7), torch.channels_last),
    ("BatchNorm2d", (3, 16, 9, 11), torch.contiguous_format),
    ("BatchNorm2d", (3, 16, 9, 11), torch.channels_last),
    ("BatchNorm2d", (6, 1, 4, 5), torch.contiguous_format),
    ("BatchNorm2d", (2, 17, 1, 1), torch.channels_last),
    ("BatchNorm3d", (2, 4, 3, 5, 6), torch.contiguous_format),
    ("BatchNorm3d", (2, 4, 3, 5, 6), torch.channels_last_3d),
    ("BatchNorm3d", (2, 9, 2, 3, 4), torch.channels_last_3d),
]


def case_id(case):
    name, shape, fmt = case
    return f"{name}-{'x'.join(map(str, shape))}-{str(fmt).replace('torch.', '')}"


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def make_pair(name, num_features, dtype, rng, **kwargs):
    """A torch module with non-trivial parameters and buffers, and normkit's copy of it."""
    ref = getattr(torch.nn, name)(num_features, dtype=dtype, **kwargs)
    with torch.no_grad():
        if ref.affine:
            ref.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, num_features)))
            ref.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, num_features)))
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.from_numpy(rng.uniform(-1, 1, num_features)))
            ref.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, num_features)))
            ref.num_batches_tracked.fill_(3)
    ours = getattr(nkt, name)(num_features, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_input(shape, dtype, rng, fmt=torch.contiguous_format):
    """Channels with different means and spreads, so that statistics matter."""
    channels = shape[1]
    per_channel = [1, channels] + [1] * (len(shape) - 2)
    loc = rng.uniform(-2, 2, channels).reshape(per_channel)
    spread = rng.uniform(0.5, 3, channels).reshape(per_channel)
    x = torch.from_numpy(rng.standard_normal(shape) * spread + loc).to(dtype)
    return x.contiguous(memory_format=fmt)


def step(module, x, grad_out):
    """One forward and backward; returns y, dx, dweight, dbias."""
    module.zero_grad(set_to_none=True)
    # A new leaf on the same memory: the strides under test reach the module unchanged.
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(grad_out)
    weight = module.weight
    return (y.detach(), x.grad,
            None if weight is None else weight.grad,
            None if module.bias is None else module.bias.grad)


def normalized(x, eps):
    """x̂ = (x - mean) / sqrt(biased var + eps) in float64, per channel (axis 1)."""
    x = x.detach().double()
    axes = [0] + list(range(2, x.dim()))
    return (x - x.mean(axes, keepdim=True)) / x.var(axes, unbiased=False, keepdim=True).add(eps).sqrt()


def term_scales(module, x, grad_out):
    """The size of the terms y, dx, dγ and dβ are computed from, for the tolerances of
    assert_matches_torch: the module's statistics (batch or running) in float64."""
    x = x.detach().double().numpy()
    shape = channel_shape(x.ndim, 1, x.shape[1])
    use_batch_stats = module.training or module.running_mean is None
    if use_batch_stats:
        _, mean, invstd, _, _ = forward_reference(x, None, None, module.eps)
    else:
        mean = module.running_mean.double().numpy()
        invstd = 1 / np.sqrt(module.running_var.double().numpy() + module.eps)
    weight = None if module.weight is None else module.weight.detach().double().numpy()
    bias = 0.0 if module.bias is None else module.bias.detach().double().numpy()
    gamma = 1.0 if weight is None else weight.reshape(shape)
    scaled = (x - mean.reshape(shape)) * invstd.reshape(shape) * gamma
    y_scale = np.abs(scaled).max() + np.abs(bias).max()
    *_, scales = backward_reference(x, grad_out.detach().double().numpy(), weight, mean, invstd,
                                    "training" if use_batch_stats else "frozen")
    return y_scale, scales


def same_layout(a, b):
    # Strides of size-1 axes address nothing; PyTorch itself is not consistent about them.
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def assert_state_matches(ours, ref):
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, expected in ref.state_dict().items():
        actual = ours.state_dict()[key]
        if expected.dtype == torch.int64:
            assert torch.equal(actual, expected), key
        else:
            assert_matches_torch(actual, expected, what=key)


def assert_step_matches(ours, ref, x, grad_out):
    y_scale, scales = term_scales(ref, x, grad_out)
    y, dx, dweight, dbias = step(ours, x, grad_out)
    y_ref, dx_ref, dweight_ref, dbias_ref = step(ref, x, grad_out)
    assert_matches_torch(y, y_ref, scale=y_scale, what="y")
    assert same_layout(y, y_ref), f"output strides {y.stride()}, torch's {y_ref.stride()}"
    assert_matches_torch(dx, dx_ref, scale=scales["dx"], what="dx")
    assert same_layout(dx, dx_ref), f"gradient strides {dx.stride()}, torch's {dx_ref.stride()}"
    if dbias_ref is not None:
        assert_matches_torch(dbias, dbias_ref, scale=scales["dbeta"], what="dbias")
    if dweight_ref is not None:
        assert_matches_torch(dweight, dweight_ref, scale=scales["dgamma"], what="dweight")
    assert_state_matches(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_training_step_matches_torch(case, dtype, rng):
    name, shape, fmt = case
    ref, ours = make_pair(name, shape[1], dtype, rng)
    x = make_input(shape, dtype, rng, fmt)
    grad_out = torch.from_numpy(rng.standard_normal(shape)).to(dtype).contiguous(memory_format=fmt)
    assert_step_matches(ours, ref, x, grad_out)
    assert int(ours.num_batches_tracked) == 4


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_eval_step_matches_torch(case, dtype, rng):
    # Running statistics, and gradients that treat them as constants ("frozen").
    name, shape, fmt = case
    ref, ours = make_pair(name, shape[1], dtype, rng)
    ref.eval()
    ours.eval()
    x = make_input(shape, dtype, rng, fmt)
    grad_out = torch.from_numpy(rng.standard_normal(shape)).to(dtype).contiguous(memory_format=fmt)
    assert_step_matches(ours, ref, x, grad_out)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["momentum0.1", "momentum0.5", "cumulative"])
def test_running_statistics_over_steps(momentum, dtype, rng):
    ref, ours = make_pair("BatchNorm2d", 6, dtype, rng, momentum=momentum)
    for batch in range(5):
        x = make_input((4, 6, 5, 5), dtype, rng)
        grad_out = torch.from_numpy(rng.standard_normal(x.shape)).to(dtype)
        assert_step_matches(ours, ref, x, grad_out)
    assert int(ours.num_batches_tracked) == 3 + 5
    ref.eval()
    ours.eval()
    x = make_input((4, 6, 5, 5), dtype, rng)
    assert_step_matches(ours, ref, x, torch.ones_like(x))


def test_cumulative_average_is_the_mean_of_batch_statistics(rng):
    # momentum=None: after k batches from a fresh module, the running mean is the plain
    # average of the k batch means (PyTorch's cumulative moving average).
    ours = nkt.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    means = []
    for _ in range(4):
        x = make_input((10, 3), torch.float64, rng)
        ours(x)
        means.append(x.mean(0))
    assert int(ours.num_batches_tracked) == 4
    assert_matches_torch(ours.running_mean, torch.stack(means).mean(0))


def test_cumulative_average_without_a_counter(rng):
    # A module whose num_batches_tracked was removed: PyTorch weights the batch by 0, so the
    # running statistics stay as they are.
    ref, ours = make_pair("BatchNorm1d", 4, torch.float32, rng, momentum=None)
    ref.num_batches_tracked = ours.num_batches_tracked = None
    x = make_input((6, 4), torch.float32, rng)
    assert_step_matches(ours, ref, x, torch.ones_like(x) - x)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[10]], ids=case_id)
def test_track_running_stats_false(case, dtype, rng):
    # No buffers at all: batch statistics in training and in eval.
    name, shape, fmt = case
    ref, ours = make_pair(name, shape[1], dtype, rng, track_running_stats=False)
    assert ours.running_mean is None and ours.running_var is None
    assert ours.num_batches_tracked is None
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        x = make_input(shape, dtype, rng, fmt)
        assert_step_matches(ours, ref, x, torch.ones_like(x) + x)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_track_running_stats_switched_off_after_construction(dtype, rng):
    # Buffers exist but are not updated in training; eval still normalizes with them.
    ref, ours = make_pair("BatchNorm2d", 4, dtype, rng)
    ref.track_running_stats = ours.track_running_stats = False
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        x = make_input((3, 4, 5, 5), dtype, rng)
        assert_step_matches(ours, ref, x, torch.ones_like(x))
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[6], CASES[10]], ids=case_id)
def test_affine_false(case, dtype, rng):
    name, shape, fmt = case
    ref, ours = make_pair(name, shape[1], dtype, rng, affine=False)
    assert ours.weight is None and ours.bias is None
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        x = make_input(shape, dtype, rng, fmt)
        assert_step_matches(ours, ref, x, x * 0.5 - 1)


def test_gradients_for_only_some_inputs(rng):
    ref, ours = make_pair("BatchNorm2d", 5, torch.float32, rng)
    x = make_input((4, 5, 3, 3), torch.float32, rng)
    # Input only: frozen parameters.
    for module in (ref, ours):
        module.weight.requires_grad_(False)
        module.bias.requires_grad_(False)
    assert_step_matches(ours, ref, x, torch.ones_like(x) * x)
    assert ours.weight.grad is None
    # Parameters only: an input that does not require grad.
    for module in (ref, ours):
        module.weight.requires_grad_(True)
        module.bias.requires_grad_(True)
    grads = []
    for module in (ref, ours):
        module.zero_grad(set_to_none=True)
        (module(x) * x).sum().backward()
        grads.append((module.weight.grad.clone(), module.bias.grad.clone()))
    # d/dγ Σ y·x = Σ x̂·x and d/dβ = Σ x: scaled by the sums of |terms|.
    assert_matches_torch(grads[1][0], grads[0][0],
                         scale=(normalized(x, ref.eps) * x.double()).abs().sum((0, 2, 3)))
    assert_matches_torch(grads[1][1], grads[0][1], scale=x.abs().sum((0, 2, 3)))


def test_gradient_of_sum_has_zero_strides(rng):
    # y.sum().backward() hands backward an expanded tensor of ones (all strides 0).
    ref, ours = make_pair("BatchNorm2d", 3, torch.float32, rng)
    x = make_input((4, 3, 5, 5), torch.float32, rng, torch.channels_last)
    results = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_()
        (module(xi) * 2).sum().backward()
        results.append(xi.grad)
    assert_matches_torch(results[1], results[0], scale=1.0)


def test_transposed_input_gives_torchs_output_layout(rng):
    # (N, L, C) data transposed to (N, C, L), as transformer code does: normkit reads it in
    # place; the output is contiguous, as PyTorch's is, so a .view() after it still works.
    ref, ours = make_pair("BatchNorm1d", 6, torch.float32, rng)
    x = make_input((4, 6, 9), torch.float32, rng).transpose(1, 2).contiguous().transpose(1, 2)
    grad_out = torch.from_numpy(rng.standard_normal(x.shape)).float()
    assert_step_matches(ours, ref, x, grad_out)
    assert ours(x).is_contiguous()


def test_input_whose_strides_cannot_be_viewed(rng):
    # A slice along W of a wider tensor cannot be addressed as [outer, C, inner] with one
    # stride each; the module copies it (as .contiguous()) rather than fail.
    ref, ours = make_pair("BatchNorm2d", 3, torch.float32, rng)
    x = make_input((2, 3, 4, 10), torch.float32, rng)[..., :7]
    assert not x.is_contiguous()
    assert_step_matches(ours, ref, x, torch.ones_like(x) + x)


@pytest.mark.parametrize("name, dims, message", [
    ("BatchNorm1d", 4, "expected 2D or 3D input (got 4D input)"),
    ("BatchNorm1d", 1, "expected 2D or 3D input (got 1D input)"),
    ("BatchNorm2d", 3, "expected 4D input (got 3D input)"),
    ("BatchNorm2d", 5, "expected 4D input (got 5D input)"),
    ("BatchNorm3d", 4, "expected 5D input (got 4D input)"),
])
def test_wrong_number_of_dimensions(name, dims, message):
    x = torch.randn((2, 3, 4, 5, 6)[:dims])
    for module in (getattr(torch.nn, name)(3), getattr(nkt, name)(3)):
        with pytest.raises(ValueError) as error:
            module(x)
        assert str(error.value) == message


@pytest.mark.parametrize("name, shape", [
    ("BatchNorm1d", (1, 3)), ("BatchNorm1d", (1, 3, 1)), ("BatchNorm2d", (1, 3, 1, 1)),
    ("BatchNorm3d", (1, 3, 1, 1, 1)),
])
def test_one_value_per_channel_when_training(name, shape):
    ref, ours = getattr(torch.nn, name)(3), getattr(nkt, name)(3)
    x = torch.randn(shape)
    messages = []
    for module in (ref, ours):
        with pytest.raises(ValueError) as error:
            module(x)
        messages.append(str(error.value))
    assert messages[1] == messages[0]
    assert messages[0] == f"Expected more than 1 value per channel when training, got input size {x.size()}"
    # Deliberate difference: PyTorch counts the batch before it raises; normkit changes no
    # state when it raises.
    assert int(ref.num_batches_tracked) == 1
    assert int(ours.num_batches_tracked) == 0
    assert torch.equal(ours.running_mean, torch.zeros(3))
    assert torch.equal(ours.running_var, torch.ones(3))
    # In eval the running statistics are used, and a single value is fine.
    ref.eval()
    ours.eval()
    assert_matches_torch(ours(x), ref(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_batch(shape, training, rng):
    ref, ours = make_pair("BatchNorm2d", 3, torch.float32, rng)
    ref.train(training)
    ours.train(training)
    x = torch.empty(shape)
    results = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.sum().backward()
        results.append((y, xi.grad, module.weight.grad, module.bias.grad))
    for actual, expected in zip(results[1], results[0]):
        assert actual.shape == expected.shape
        assert torch.equal(actual, expected)
    assert_state_matches(ours, ref)


def test_state_dict_round_trip_both_ways(rng):
    ref, ours = make_pair("BatchNorm2d", 5, torch.float32, rng)
    for _ in range(3):
        x = make_input((4, 5, 3, 3), torch.float32, rng)
        ref(x)
        ours(x)
    # torch -> normkit, through a file as people save checkpoints.
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    fresh_ours = nkt.BatchNorm2d(5)
    fresh_ours.load_state_dict(torch.load(buffer), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(fresh_ours.state_dict()[key], value), key
    # normkit -> torch.
    fresh_ref = torch.nn.BatchNorm2d(5)
    fresh_ref.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh_ref.state_dict()[key], value), key
    # The loaded copies behave like their sources.
    fresh_ref.eval()
    fresh_ours.eval()
    x = make_input((4, 5, 3, 3), torch.float32, rng)
    assert_matches_torch(fresh_ours(x), fresh_ref(x))


def test_same_interface_as_torch():
    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"):
        ref = getattr(torch.nn, name)(7, eps=1e-3, momentum=None, affine=False)
        ours = getattr(nkt, name)(7, eps=1e-3, momentum=None, affine=False)
        assert isinstance(ours, getattr(torch.nn, name))
        assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
        assert repr(ours) == repr(ref)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    ours = nkt.BatchNorm2d(4, 1e-4, 0.2, True, False, None, torch.float64)
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (1e-4, 0.2, True, False)
    assert ours.weight.dtype == torch.float64


def test_eval_under_no_grad_and_inference_mode(rng):
    ref, ours = make_pair("BatchNorm2d", 4, torch.float32, rng)
    ref.eval()
    ours.eval()
    x = make_input((2, 4, 5, 5), torch.float32, rng, torch.channels_last)
    with torch.no_grad():
        assert_matches_torch(ours(x), ref(x))
    with torch.inference_mode():
        assert_matches_torch(ours(x), ref(x))


def test_module_in_a_model_trains_like_torch(rng):
    # A few SGD steps of conv -> BN -> ReLU: parameters, buffers and losses stay together.
    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    our_model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), nkt.BatchNorm2d(4), torch.nn.ReLU())
    our_model.load_state_dict(ref_model.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref_model, our_model)]
    for _ in range(3):
        x = make_input((4, 2, 7, 7), torch.float32, rng)
        target = torch.from_numpy(rng.standard_normal((4, 4, 5, 5))).float()
        losses = []
        for model, optimizer in zip((ref_model, our_model), optimizers):
            optimizer.zero_grad()
            loss = ((model(x) - target) ** 2).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for key, value in ref_model.state_dict().items():
        if value.dtype == torch.int64:
            assert torch.equal(our_model.state_dict()[key], value)
        else:
            # Three steps of lr 0.1 let float rounding differences grow: relative 1e-4.
            np.testing.assert_allclose(our_model.state_dict()[key].numpy(), value.numpy(),
                                       rtol=1e-4, atol=1e-4 * value.abs().max().item(),
                                       err_msg=key)


def test_unsupported_inputs_raise():
    ours = nkt.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        ours(torch.randn(4, 3).half())
    with pytest.raises(RuntimeError, match="dtype torch.float32, expected torch.float64"):
        ours(torch.randn(4, 3, dtype=torch.float64))


def test_nan_in_training_batch_raises_and_keeps_buffers(rng):
    # Deliberate difference: PyTorch writes NaN into the running statistics.
    _, ours = make_pair("BatchNorm2d", 3, torch.float32, rng)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = make_input((2, 3, 4, 4), torch.float32, rng)
    x[1, 2, 3, 3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        ours(x)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_eps_and_momentum_are_checked():
    # Deliberate difference: PyTorch accepts eps = 0 and momentum > 1.
    with pytest.raises(ValueError, match="eps must be positive"):
        nkt.BatchNorm1d(3, eps=0.0)(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        nkt.BatchNorm1d(3, momentum=1.5)(torch.randn(4, 3))
    # Without running statistics momentum is unused, and not checked, as in PyTorch.
    nkt.BatchNorm1d(3, momentum=1.5, track_running_stats=False)(torch.randn(4, 3))


@pytest.mark.parametrize("shape, fmt", [((32, 64, 14, 14), torch.channels_last),
                                        ((32, 64, 14, 14), torch.contiguous_format)])
def test_exact_where_torch_is_not(shape, fmt, rng):
    # Both against the float64 formula. PyTorch 1.13 accumulates channels_last float32
    # statistics in float32 and lands ~10-20 ulps of the largest value away; normkit must
    # stay within the rounding of the formula (see _support.EXACT_ULPS).
    ref, ours = make_pair("BatchNorm2d", shape[1], torch.float32, rng)
    x = make_input(shape, torch.float32, rng, fmt)
    weight = ours.weight.detach().numpy()
    bias = ours.bias.detach().numpy()
    running_mean = ours.running_mean.numpy().astype(np.float64)
    running_var = ours.running_var.numpy().astype(np.float64)
    y_exact, mean, _, unbiased, scale = forward_reference(x.numpy(), weight, bias, ours.eps)
    y = ours(x)
    torch_y = ref(x)
    assert_exact(y.detach().numpy(), y_exact, scale, np.float32, "y")
    expected_mean = 0.9 * running_mean + 0.1 * mean
    expected_var = 0.9 * running_var + 0.1 * unbiased
    assert_exact(ours.running_mean, expected_mean, np.abs(expected_mean).max(), np.float32)
    assert_exact(ours.running_var, expected_var, np.abs(expected_var).max(), np.float32)
    # And PyTorch within the parity tolerance of normkit.
    assert_matches_torch(y, torch_y)
