"""Gradients of normkit.torch's modules beyond first order, and bfloat16.

- gradcheck and gradgradcheck in float64 (finite differences of the first and second
  derivatives), with batched gradients (vmap over the backward ops), for every module;
- second derivatives of every drop-in equal to torch's own module's (double backward is
  what gradient penalties, MAML and Hessian-vector products use), and a third;
- bfloat16 input computed in float32, as torch's CPU kernels do: outputs and gradients
  within bfloat16 rounding of the exact formula, buffers kept in their dtype.
"""
import copy

import numpy as np
import pytest
import torch
from torch.nn.utils.stateless import functional_call

import normkit.torch as nkt

from _support import assert_matches_torch

D = torch.float64


def _module_cases():
    return [
        ("BatchNorm2d-train", lambda: nkt.BatchNorm2d(3), True),
        ("BatchNorm2d-eval", lambda: nkt.BatchNorm2d(3), False),
        ("BatchNorm1d-noaffine", lambda: nkt.BatchNorm1d(3, affine=False), True),
        ("BatchNormReLU2d", lambda: nkt.BatchNormReLU2d(3), True),
        ("BatchNormReLU2d-eval", lambda: nkt.BatchNormReLU2d(3), False),
        ("BatchNormAddReLU2d", lambda: nkt.BatchNormAddReLU2d(3), True),
        ("BatchRenorm2d", lambda: nkt.BatchRenorm2d(3, rmax=1.5, dmax=0.5), True),
        ("GhostBatchNorm2d", lambda: nkt.GhostBatchNorm2d(3, virtual_batch_size=3), True),
        ("FrozenBatchNorm2d", lambda: nkt.FrozenBatchNorm2d(3), True),
        ("GroupNorm", lambda: nkt.GroupNorm(3, 3), True),
        ("InstanceNorm2d", lambda: nkt.InstanceNorm2d(3, affine=True), True),
        ("InstanceNorm2d-running", lambda: nkt.InstanceNorm2d(3, affine=True,
                                                              track_running_stats=True), False),
        ("LayerNorm", lambda: nkt.LayerNorm([3, 2]), True),
        ("RMSNorm", lambda: nkt.RMSNorm([3, 2]), True),
    ]


def _prepared(make, train, rng):
    module = make().to(D).train(train)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, p.shape) if name == "weight"
                                     else rng.normal(0, 1, p.shape)))
        if getattr(module, "running_var", None) is not None:
            module.running_mean.copy_(torch.from_numpy(rng.normal(0, 1, module.num_features)))
            module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, module.num_features)))
        if isinstance(module, nkt.BatchRenorm2d):
            # r and d are constants of the gradient (Ioffe 2017): finite differences see
            # them constant where the limits clip them, i.e. with running statistics far
            # from the batch's.
            module.running_mean.fill_(10.0)
            module.running_var.fill_(0.01)
    return module


def _function(module):
    """(x[, residual], *parameters) -> y for gradcheck, through the module's forward."""
    names = [n for n, _ in module.named_parameters()]
    fused_add = isinstance(module, nkt.BatchNormAddReLU2d)

    def f(x, *rest):
        inputs = (x, rest[0]) if fused_add else (x,)
        parameters = rest[1:] if fused_add else rest
        # A fresh copy per call: buffers must not drift between finite-difference runs.
        return functional_call(copy.deepcopy(module), dict(zip(names, parameters)), inputs)
    return f


@pytest.mark.parametrize("name, make, train", _module_cases(), ids=[c[0] for c in _module_cases()])
def test_gradcheck_and_gradgradcheck(name, make, train, rng):
    module = _prepared(make, train, rng)
    shape = (6, 3, 4) if isinstance(module, torch.nn.BatchNorm1d) else (6, 3, 3, 2)
    x = torch.from_numpy(rng.normal(0, 1, shape)).requires_grad_()
    inputs = [x]
    if isinstance(module, nkt.BatchNormAddReLU2d):
        inputs.append(torch.from_numpy(rng.normal(0, 1, x.shape)).requires_grad_())
    inputs += [p.detach().clone().requires_grad_() for p in module.parameters()]
    f = _function(module)
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs, check_batched_grad=True)


PAIRS = [
    ("BatchNorm2d", lambda: torch.nn.BatchNorm2d(3), lambda: nkt.BatchNorm2d(3), (5, 3, 4, 3)),
    ("BatchNorm1d", lambda: torch.nn.BatchNorm1d(3), lambda: nkt.BatchNorm1d(3), (7, 3)),
    ("GroupNorm", lambda: torch.nn.GroupNorm(2, 4), lambda: nkt.GroupNorm(2, 4), (3, 4, 5)),
    ("InstanceNorm2d", lambda: torch.nn.InstanceNorm2d(3, affine=True),
     lambda: nkt.InstanceNorm2d(3, affine=True), (3, 3, 4, 3)),
    ("LayerNorm", lambda: torch.nn.LayerNorm([4, 3]), lambda: nkt.LayerNorm([4, 3]), (5, 4, 3)),
    ("BatchNormReLU2d", lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU()),
     lambda: nkt.BatchNormReLU2d(3), (5, 3, 4, 3)),
]


def _second_derivatives(module, x, train):
    """∂/∂(x, weight) of Σ (∂L/∂x)², L = Σ y³: a gradient penalty's derivatives."""
    module.train(train)
    x = x.clone().requires_grad_()
    y = module(x)
    (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    weight = module[0].weight if isinstance(module, torch.nn.Sequential) else module.weight
    return torch.autograd.grad(gx.pow(2).sum(), (x, weight))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, make_ref, make_ours, shape", PAIRS, ids=[p[0] for p in PAIRS])
def test_double_backward_matches_torch(name, make_ref, make_ours, shape, train, rng):
    ref, ours = make_ref().to(D), make_ours().to(D)
    target = ref[0] if isinstance(ref, torch.nn.Sequential) else ref
    with torch.no_grad():
        for p in target.parameters():
            p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, p.shape)))
        if getattr(target, "running_var", None) is not None:
            target.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, target.num_features)))
    ours.load_state_dict(target.state_dict())
    x = torch.from_numpy(rng.normal(0, 1, shape))
    expected = _second_derivatives(ref, x, train)
    actual = _second_derivatives(ours, x, train)
    for a, e, what in zip(actual, expected, ("d/dx", "d/dweight")):
        assert_matches_torch(a, e, what=f"{name} {what}")


def test_third_derivative_by_finite_differences(rng):
    # gradgradcheck of the gradient: finite differences of the second derivative against
    # the third. (torch 1.13's own BatchNorm fails this check: its double backward is not
    # differentiated correctly; normkit's agrees with the formula differentiated thrice.)
    module = nkt.BatchNorm1d(2).to(D)
    x = torch.from_numpy(rng.normal(0, 1, (6, 2, 3))).requires_grad_()

    def gradient(x):
        (g,) = torch.autograd.grad(copy.deepcopy(module)(x).pow(3).sum(), x, create_graph=True)
        return g
    assert torch.autograd.gradgradcheck(gradient, (x,))


def test_first_order_gradient_is_normkit_s_kernel(rng):
    # create_graph=True builds the graph of the gradient; its value is still the kernel's.
    module = nkt.BatchNorm2d(3)
    x = torch.from_numpy(rng.normal(0, 1, (4, 3, 5, 5)).astype(np.float32)).requires_grad_()
    (plain,) = torch.autograd.grad(module(x).pow(2).sum(), x)
    (graphed,) = torch.autograd.grad(module(x).pow(2).sum(), x, create_graph=True)
    assert graphed.requires_grad
    assert torch.equal(plain, graphed.detach())


# ---------------------------------------------------------------------------------------
# bfloat16: computed in float32 like torch's CPU kernels, results rounded to bfloat16.

BF16_CASES = [
    ("BatchNorm2d", lambda: nkt.BatchNorm2d(4), lambda: torch.nn.BatchNorm2d(4)),
    ("BatchNormReLU2d", lambda: nkt.BatchNormReLU2d(4),
     lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU())),
    ("GroupNorm", lambda: nkt.GroupNorm(2, 4), lambda: torch.nn.GroupNorm(2, 4)),
    ("InstanceNorm2d", lambda: nkt.InstanceNorm2d(4, affine=True),
     lambda: torch.nn.InstanceNorm2d(4, affine=True)),
    ("LayerNorm", lambda: nkt.LayerNorm([5, 6]), lambda: torch.nn.LayerNorm([5, 6])),
]

# One bfloat16 rounding (half an ulp, 2^-9 relative) plus float32 work (far smaller),
# with a margin of 2: 2^-8 relative to each value, and an absolute floor of float32
# rounding of the terms (values near zero come from differences of terms of size ~scale).
BF16_RTOL = 2.0 ** -8


def _assert_bf16_close(actual, exact, what):
    assert actual.dtype == torch.bfloat16, what
    actual, exact = actual.detach().double().numpy(), exact.detach().numpy()
    limit = BF16_RTOL * np.abs(exact) + 1e-5 * np.abs(exact).max()
    assert (np.abs(actual - exact) <= limit).all(), \
        f"{what}: max error {np.abs(actual - exact).max()}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, make_ours, make_ref", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bfloat16_within_rounding_of_the_exact_result(name, make_ours, make_ref, train, rng):
    ours = make_ours().to(torch.bfloat16).train(train)
    exact_module = make_ref().to(D).train(train)  # torch's module in float64: the exact result
    target = exact_module[0] if isinstance(exact_module, torch.nn.Sequential) else exact_module
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, p.shape)))
    target.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.from_numpy(rng.normal(1, 2, (4, 4, 5, 6))).bfloat16()
    dy = torch.from_numpy(rng.normal(0, 1, x.shape)).bfloat16()
    xi = x.clone().requires_grad_()
    y = ours(xi)
    (dx,) = torch.autograd.grad(y, xi, dy)
    xe = x.double().requires_grad_()
    ye = exact_module(xe)
    (dxe,) = torch.autograd.grad(ye, xe, dy.double())
    _assert_bf16_close(y, ye.detach(), f"{name} y")
    _assert_bf16_close(dx, dxe, f"{name} dx")
    for key, value in ours.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.bfloat16, key


def test_bfloat16_input_with_float32_parameters():
    # torch's mixed precision: bfloat16 activations, float32 parameters and statistics.
    ours, ref = nkt.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5).bfloat16()
    y, expected = ours(x), ref(x)
    assert y.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    assert (y.float() - expected.float()).abs().max() <= 2 * BF16_RTOL * expected.float().abs().max()
    assert torch.allclose(ours.running_mean, ref.running_mean, rtol=1e-2, atol=1e-3)


def test_unsupported_dtypes_say_what_is_supported():
    with pytest.raises(RuntimeError, match="float32 and float64 input .and bfloat16"):
        nkt.LayerNorm(4)(torch.randn(2, 4).half())
