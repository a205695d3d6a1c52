"""normkit.torch's BatchRenorm, GhostBatchNorm and FrozenBatchNorm modules against pure-torch
implementations of the same algorithms (autograd, float64 on the same inputs):

- renorm: Ioffe 2017, Algorithm 1, written below with r and d detached (the paper's
  stop_gradient) and the running statistics updated as torch's BatchNorm updates them;
- ghost: torch.nn.BatchNorm applied to each of x.split(virtual_batch_size) in turn;
- frozen: torch.nn.BatchNorm in eval mode.
"""
import copy

import numpy as np
import pytest
import torch

import normkit.torch as nkt

DTYPES = [torch.float32, torch.float64]
# float32 results against float64 references: a few float32 roundings of the terms each
# value is computed from (the terms' scale is the tensor's largest value, or Σ|terms| per
# channel for the reductions dweight and dbias).
RTOL = {torch.float32: 1e-5, torch.float64: 1e-11}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def assert_close(actual, expected, dtype, scale=None, what=""):
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, what
    rtol = RTOL[dtype]
    if scale is None:
        scale = expected.abs().max()
    limit = rtol * (scale + expected.abs())
    error = (actual - expected).abs()
    bad = ~(error <= limit)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} out of tolerance; worst error "
        f"{float((error / limit).max()):.3g} of its bound")


def channel_dims(x):
    return [0] + list(range(2, x.dim()))


def per_channel(v, x):
    return v.view([1, -1] + [1] * (x.dim() - 2))


def make_input(shape, dtype, memory_format, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    mean = torch.linspace(-2, 3, c, dtype=torch.float64)
    std = torch.linspace(0.5, 4, c, dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * per_channel(std, torch.empty(shape)) \
        + per_channel(mean, torch.empty(shape))
    return x.to(dtype).contiguous(memory_format=memory_format)


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    c = module.num_features
    with torch.no_grad():
        if module.affine:
            module.weight.copy_(torch.rand(c, generator=g) + 0.5)
            module.bias.copy_(torch.randn(c, generator=g))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(c, generator=g))
            module.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
    return module


# ---------------------------------------------------------------- batch renormalization

def renorm_reference(x, weight, bias, running_mean, running_var, eps, momentum, rmax, dmax):
    """The paper's Algorithm 1 in plain torch (autograd); returns y and the new running
    statistics (BatchNorm's update: momentum on the new value, unbiased variance)."""
    dims = channel_dims(x)
    mu = x.mean(dims)
    var = x.var(dims, unbiased=False)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(running_var + eps)
    r = (sigma_b / sigma).clamp(1.0 / rmax, rmax).detach()
    d = ((mu - running_mean) / sigma).clamp(-dmax, dmax).detach()
    x_hat = (x - per_channel(mu, x)) / per_channel(sigma_b, x) * per_channel(r, x) + per_channel(d, x)
    y = per_channel(weight, x) * x_hat + per_channel(bias, x)
    n = x.numel() / x.shape[1]
    new_mean = (1 - momentum) * running_mean + momentum * mu.detach()
    new_var = (1 - momentum) * running_var + momentum * var.detach() * n / (n - 1)
    return y, new_mean, new_var, r, d


RENORM_CASES = [
    ("BatchRenorm1d", (16, 6), torch.contiguous_format),
    ("BatchRenorm1d", (6, 5, 7), torch.contiguous_format),
    ("BatchRenorm2d", (4, 6, 5, 3), torch.contiguous_format),
    ("BatchRenorm2d", (4, 6, 5, 3), torch.channels_last),
    ("BatchRenorm3d", (2, 3, 3, 4, 2), torch.channels_last_3d),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", RENORM_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-"
                         f"{str(c[2]).replace('torch.', '')}")
def test_renorm_matches_the_papers_algorithm(case, dtype):
    name, shape, memory_format = case
    module = getattr(nkt, name)(shape[1], eps=1e-3, momentum=0.3, rmax=1.5, dmax=0.5,
                                warmup_steps=2, dtype=dtype)
    torch.manual_seed(0)
    randomize(module, 1)
    weight = module.weight.detach().double().clone().requires_grad_(True)
    bias = module.bias.detach().double().clone().requires_grad_(True)
    running_mean = module.running_mean.double().clone()
    running_var = module.running_var.double().clone()
    clipped_seen = unclipped_seen = False
    for step in range(4):
        rmax, dmax = [(1.0, 0.0), (1.25, 0.25), (1.5, 0.5), (1.5, 0.5)][step]
        assert module.limits() == (rmax, dmax)
        x = make_input(shape, dtype, memory_format, 10 + step).requires_grad_(True)
        dy = make_input(shape, dtype, memory_format, 20 + step)
        module.weight.grad = module.bias.grad = None
        y = module(x)
        y.backward(dy)
        assert y.is_contiguous(memory_format=memory_format)

        x_ref = x.detach().double().requires_grad_(True)
        weight.grad = bias.grad = None
        y_ref, running_mean, running_var, r, d = renorm_reference(
            x_ref, weight, bias, running_mean, running_var, 1e-3, 0.3, rmax, dmax)
        y_ref.backward(dy.double())
        clipped_seen |= bool(((r == rmax) | (r == 1 / rmax) | (d.abs() == dmax)).any()) and rmax > 1
        unclipped_seen |= bool(((r < rmax) & (r > 1 / rmax) & (d.abs() < dmax)).any())

        what = f"step {step}"
        assert_close(y, y_ref, dtype, what=f"y, {what}")
        assert_close(x.grad, x_ref.grad, dtype, what=f"dx, {what}")
        terms = (dy.double().abs() * (1 + y_ref.detach().abs())).sum(channel_dims(x))
        assert_close(module.weight.grad, weight.grad, dtype, scale=terms, what=f"dweight, {what}")
        assert_close(module.bias.grad, bias.grad, dtype, scale=terms, what=f"dbias, {what}")
        assert_close(module.running_mean, running_mean, dtype, what=f"running_mean, {what}")
        assert_close(module.running_var, running_var, dtype, what=f"running_var, {what}")
        assert int(module.num_batches_tracked) == step + 1
    assert clipped_seen and unclipped_seen

    # Eval: BatchNorm's inference with the same state.
    reference = getattr(torch.nn, name.replace("BatchRenorm", "BatchNorm"))(shape[1], eps=1e-3, dtype=dtype)
    reference.load_state_dict(module.state_dict())
    module.eval()
    reference.eval()
    x = make_input(shape, dtype, memory_format, 99)
    assert_close(module(x), reference(x), dtype, what="eval y")


def test_renorm_with_limits_one_and_zero_is_batch_norm():
    module = nkt.BatchRenorm2d(5, rmax=1.0, dmax=0.0)
    reference = torch.nn.BatchNorm2d(5)
    randomize(module, 3)
    reference.load_state_dict(module.state_dict())
    x = make_input((4, 5, 3, 3), torch.float32, torch.contiguous_format, 4)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = module(xa), reference(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert_close(ya, yb, torch.float32, what="y")
    assert_close(xa.grad, xb.grad, torch.float32, what="dx")
    assert_close(module.running_var, reference.running_var, torch.float32, what="running_var")


def test_renorm_state_dict_is_batch_norms_and_arguments_are_checked():
    bn = randomize(torch.nn.BatchNorm2d(4), 5)
    renorm = nkt.BatchRenorm2d(4)
    renorm.load_state_dict(bn.state_dict())
    assert renorm.state_dict().keys() == bn.state_dict().keys()
    for key, value in bn.state_dict().items():
        assert torch.equal(renorm.state_dict()[key], value), key
    assert isinstance(renorm, torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="rmax"):
        nkt.BatchRenorm2d(4, rmax=0.5)
    with pytest.raises(ValueError, match="dmax"):
        nkt.BatchRenorm2d(4, dmax=-1)
    with pytest.raises(ValueError, match="track_running_stats"):
        nkt.BatchRenorm2d(4, track_running_stats=False)
    paper = nkt.BatchRenorm2d(4, hold_steps=5000, rmax_warmup_steps=35000, dmax_warmup_steps=20000)
    assert paper.limits(4999) == (1.0, 0.0)
    assert paper.limits(25000) == pytest.approx((1 + 2 * 20000 / 35000, 5.0))
    assert paper.limits(40000) == (3.0, 5.0)


# ---------------------------------------------------------------- ghost batch norm

GHOST_CASES = [
    ("GhostBatchNorm1d", (12, 5), 4, torch.contiguous_format),
    ("GhostBatchNorm1d", (11, 5), 4, torch.contiguous_format),     # 4, 4, 3
    ("GhostBatchNorm1d", (7, 3, 6), 2, torch.contiguous_format),   # 2, 2, 2, 1 (6 values)
    ("GhostBatchNorm2d", (7, 6, 3, 4), 3, torch.contiguous_format),
    ("GhostBatchNorm2d", (7, 6, 3, 4), 3, torch.channels_last),
    ("GhostBatchNorm2d", (5, 4, 2, 3), 32, torch.contiguous_format),  # one virtual batch
    ("GhostBatchNorm3d", (5, 3, 2, 3, 2), 2, torch.channels_last_3d),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", GHOST_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-"
                         f"size{c[2]}-{str(c[3]).replace('torch.', '')}")
def test_ghost_is_batch_norm_applied_to_each_virtual_batch(case, dtype):
    name, shape, size, memory_format = case
    module = getattr(nkt, name)(shape[1], size, eps=1e-3, momentum=0.2, dtype=dtype)
    randomize(module, 6)
    reference = getattr(torch.nn, name.replace("Ghost", ""))(shape[1], eps=1e-3, momentum=0.2,
                                                             dtype=torch.float64)
    reference.load_state_dict(module.state_dict())
    for step in range(2):
        x = make_input(shape, dtype, memory_format, 30 + step)
        # Virtual batches with different statistics, as in an unshuffled batch.
        x = (x + torch.arange(shape[0], dtype=dtype).view([-1] + [1] * (x.dim() - 1)) * 0.3)
        x = x.contiguous(memory_format=memory_format).requires_grad_(True)
        dy = make_input(shape, dtype, memory_format, 40 + step)
        module.zero_grad()
        reference.zero_grad()
        y = module(x)
        y.backward(dy)
        x_ref = x.detach().double().requires_grad_(True)
        y_ref = torch.cat([reference(chunk) for chunk in x_ref.split(size)])
        y_ref.backward(dy.double())
        what = f"step {step}"
        assert y.is_contiguous(memory_format=memory_format)
        assert_close(y, y_ref, dtype, what=f"y, {what}")
        assert_close(x.grad, x_ref.grad, dtype, what=f"dx, {what}")
        terms = (dy.double().abs() * (1 + y_ref.detach().abs())).sum(channel_dims(x))
        assert_close(module.weight.grad, reference.weight.grad, dtype, scale=terms, what=f"dweight, {what}")
        assert_close(module.bias.grad, reference.bias.grad, dtype, scale=terms, what=f"dbias, {what}")
        assert_close(module.running_mean, reference.running_mean, dtype, what=f"running_mean, {what}")
        assert_close(module.running_var, reference.running_var, dtype, what=f"running_var, {what}")
        assert int(module.num_batches_tracked) == int(reference.num_batches_tracked)
    module.eval()
    reference.eval()
    x = make_input(shape, dtype, memory_format, 50)
    assert_close(module(x), reference(x.double()), dtype, what="eval y")


def test_ghost_without_running_statistics_and_errors():
    module = nkt.GhostBatchNorm1d(3, 4, track_running_stats=False)
    reference = torch.nn.BatchNorm1d(3, track_running_stats=False)
    x = make_input((10, 3), torch.float32, torch.contiguous_format, 7)
    for mode in (True, False):
        module.train(mode)
        reference.train(mode)
        expected = torch.cat([reference(chunk) for chunk in x.split(4)])
        assert_close(module(x), expected, torch.float32, what=f"y, training={mode}")
    with pytest.raises(ValueError, match="virtual_batch_size"):
        nkt.GhostBatchNorm2d(3, 0)
    module = nkt.GhostBatchNorm1d(3, 4)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(make_input((9, 3), torch.float32, torch.contiguous_format, 8))  # 4, 4, 1
    for key, value in before.items():
        assert torch.equal(module.state_dict()[key], value), key
    bn = randomize(torch.nn.BatchNorm1d(3), 9)
    module.load_state_dict(bn.state_dict())  # BatchNorm's state loads


# ---------------------------------------------------------------- frozen batch norm

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name,shape,memory_format", [
    ("BatchNorm1d", (6, 4), torch.contiguous_format),
    ("BatchNorm2d", (3, 5, 4, 4), torch.contiguous_format),
    ("BatchNorm2d", (3, 5, 4, 4), torch.channels_last),
    ("BatchNorm3d", (2, 3, 2, 3, 4), torch.contiguous_format),
])
def test_frozen_is_batch_norm_in_eval_whatever_the_mode(name, shape, memory_format, dtype):
    frozen = getattr(nkt, "Frozen" + name)(shape[1], eps=1e-3, dtype=dtype)
    randomize(frozen, 11)
    reference = getattr(torch.nn, name)(shape[1], eps=1e-3, dtype=dtype)
    reference.load_state_dict(frozen.state_dict())
    reference.eval()
    before = copy.deepcopy(frozen.state_dict())
    for training in (True, False):
        frozen.train(training)
        x = make_input(shape, dtype, memory_format, 12)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        frozen.zero_grad()
        reference.zero_grad()
        ya, yb = frozen(xa), reference(xb)
        dy = make_input(shape, dtype, memory_format, 13)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(ya, yb, dtype, what="y")
        assert_close(xa.grad, xb.grad, dtype, what="dx")
        terms = (dy.double().abs() * (1 + yb.detach().double().abs())).sum(channel_dims(x))
        assert_close(frozen.weight.grad, reference.weight.grad, dtype, scale=terms, what="dweight")
        assert_close(frozen.bias.grad, reference.bias.grad, dtype, scale=terms, what="dbias")
    for key, value in before.items():
        assert torch.equal(frozen.state_dict()[key], value), f"{key} changed"


def test_state_dict_round_trip_with_torch_batch_norm():
    bn = torch.nn.BatchNorm2d(4)
    for _ in range(3):  # running statistics that are not the initial ones
        bn(torch.randn(8, 4, 3, 3) * 2 + 1)
    frozen = nkt.FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())
    assert list(frozen.state_dict().keys()) == list(bn.state_dict().keys())
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(frozen.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_parent_train_does_not_unfreeze_and_freeze_batch_norm_converts_a_model():
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(nkt.GhostBatchNorm2d(4, 2), nkt.BatchRenorm2d(4)),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 8), nkt.BatchNorm1d(8))
    for _ in range(2):
        model(torch.randn(6, 3, 6, 6))
    weight_before = model[1].weight
    reference = copy.deepcopy(model).eval()
    frozen = nkt.freeze_batch_norm(model)
    assert frozen is model
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == ["FrozenBatchNorm2d", "FrozenBatchNorm2d", "FrozenBatchNorm2d", "FrozenBatchNorm1d"]
    assert model[1].weight is weight_before  # an optimizer built before keeps training it
    state = copy.deepcopy(model.state_dict())

    model.train()  # the parent's train() must not unfreeze anything
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 3, 6, 6)
    assert torch.allclose(model(x), reference(x), rtol=1e-5, atol=1e-5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(6, 3, 6, 6)).square().mean().backward()
        assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0
        optimizer.step()
    after = model.state_dict()
    for key, value in state.items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(after[key], value), f"{key} changed"
    assert not torch.equal(after["1.weight"], state["1.weight"]), "weight did not train"

    single = nkt.freeze_batch_norm(torch.nn.BatchNorm1d(3), freeze_affine=True)
    assert isinstance(single, nkt.FrozenBatchNorm1d)
    assert not single.weight.requires_grad and not single.bias.requires_grad
    x = torch.randn(4, 3, requires_grad=True)
    single(x).sum().backward()
    assert x.grad is not None and single.weight.grad is None
    with pytest.raises(ValueError, match="running statistics"):
        nkt.freeze_batch_norm(torch.nn.BatchNorm2d(3, track_running_stats=False))
    assert nkt.freeze_batch_norm(single) is single
