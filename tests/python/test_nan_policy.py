"""NaN and infinity at every public entry point, against docs/nan-and-inf.md.

Each entry point does one of two things with a non-finite input, decided per operation:
- rejects it: RuntimeError naming the channel (or row) that holds it, with every running
  statistic, counter and saved statistic as it was (y may be written): the operations that
  update running statistics, and LayerNorm/RMSNorm;
- propagates it as PyTorch does: the same elements of the output are NaN or infinite as in
  PyTorch 1.13's result for the same input, and the rest agree.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normkit
import normkit.torch as nkt

C = 3
SHAPE = (4, C, 2, 3)
BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


def batch(value, dtype=np.float32):
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(dtype)
    x[1, 2, 0, 1] = value  # channel 2, sample 1
    return x


class Running:
    """Running statistics and counter (and saved statistics) with copies to compare."""

    def __init__(self):
        self.mean = np.linspace(-1, 1, C).astype(np.float32)
        self.var = np.linspace(0.5, 2, C).astype(np.float32)
        self.count = np.array(4, np.int64)
        self.before = [a.copy() for a in (self.mean, self.var, self.count)]

    def unchanged(self):
        return all(np.array_equal(a, b) for a, b in zip((self.mean, self.var, self.count), self.before))


# Entry points that update running statistics: (call with x and a Running).
REJECTS_KEEPING_STATE = {
    "batch_norm_forward_training": lambda x, r: normkit.batch_norm_forward_training(
        x, None, None, r.mean, r.var, r.count),
    "batch_norm_relu_forward_training": lambda x, r: normkit.batch_norm_relu_forward_training(
        x, None, None, r.mean, r.var, r.count),
    "batch_norm_add_relu_forward_training": lambda x, r: normkit.batch_norm_add_relu_forward_training(
        x, np.zeros_like(x), None, None, r.mean, r.var, r.count),
    "batch_renorm_forward_training": lambda x, r: normkit.batch_renorm_forward_training(
        x, None, None, r.mean, r.var, r.count),
    "ghost_batch_norm_forward_training": lambda x, r: normkit.ghost_batch_norm_forward_training(
        x, 2, None, None, r.mean, r.var, r.count),
    "instance_norm_forward_training": lambda x, r: normkit.instance_norm_forward_training(
        x, None, None, r.mean, r.var, r.count),
    "batch_norm_update_running": lambda x, r: normkit.batch_norm_update_running(
        normkit.batch_norm_moments(x), r.mean, r.var, r.count),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", list(REJECTS_KEEPING_STATE))
def test_running_statistics_are_never_poisoned(name, bad):
    running = Running()
    with pytest.raises(RuntimeError, match=r"x: channel 2 contains NaN or infinite values; .*"
                                           r"running statistics left unchanged"):
        REJECTS_KEEPING_STATE[name](batch(BAD[bad]), running)
    assert running.unchanged()


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", ["layer_norm_forward", "rms_norm_forward"])
def test_layer_and_rms_norm_reject_the_row(name, bad):
    with pytest.raises(RuntimeError, match=r"x: row 1 contains NaN or infinite values"):
        getattr(normkit, name)(batch(BAD[bad]), [C, 2, 3])


def same_non_finite(ours, theirs):
    """The same elements are not finite as in PyTorch's result, and the others agree. Where an
    infinity meets a reduction (inf - inf), whether an element comes out NaN or infinite depends
    on the order of the formula's terms, which normkit's fused formulas do not share with
    PyTorch's: NaN inputs give NaN in the same places, infinite ones non-finite values."""
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    if not np.isinf(theirs).any() and not np.isinf(ours).any():
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def statistics():
    return np.linspace(-1, 1, C).astype(np.float32), np.linspace(0.5, 2, C).astype(np.float32)


@pytest.mark.parametrize("bad", list(BAD))
def test_stateless_forwards_propagate_as_pytorch(bad):
    x = batch(BAD[bad])
    mean, var = statistics()
    weight, bias = np.linspace(0.5, 1.5, C).astype(np.float32), np.linspace(-1, 1, C).astype(np.float32)
    same_non_finite(normkit.batch_norm_forward_inference(x, weight, bias, mean, var),
                    F.batch_norm(t(x), t(mean), t(var), t(weight), t(bias), training=False))
    same_non_finite(normkit.batch_norm_relu_forward_inference(x, weight, bias, mean, var)[0],
                    F.relu(F.batch_norm(t(x), t(mean), t(var), t(weight), t(bias), training=False)))
    invstd = (1 / np.sqrt(var + 1e-5)).astype(np.float32)
    same_non_finite(normkit.batch_norm_forward_apply(x, weight, bias, mean, invstd),
                    F.batch_norm(t(x), t(mean), t(var), t(weight), t(bias), training=False))
    same_non_finite(normkit.group_norm_forward(x, 3, weight, bias)[0],
                    F.group_norm(t(x), 3, t(weight), t(bias)))
    same_non_finite(normkit.instance_norm_forward_training(x, weight, bias)[0],
                    F.instance_norm(t(x), weight=t(weight), bias=t(bias)))


@pytest.mark.parametrize("bad", list(BAD))
def test_backwards_propagate_as_pytorch(bad):
    x = batch(0.5)
    dy = batch(BAD[bad])
    weight = np.linspace(0.5, 1.5, C).astype(np.float32)
    # BatchNorm in training: torch's autograd through the same forward.
    _, mean, invstd = normkit.batch_norm_forward_training(x, weight)
    xt, wt = t(x).requires_grad_(), t(weight).requires_grad_()
    F.batch_norm(xt, None, None, wt, None, training=True).backward(t(dy))
    dx, dweight, dbias = normkit.batch_norm_backward(x, dy, weight, mean, invstd)
    same_non_finite(dx, xt.grad)
    same_non_finite(dweight, wt.grad)
    # GroupNorm and LayerNorm.
    _, mean, invstd = normkit.group_norm_forward(x, 3, weight)
    xt, wt = t(x).requires_grad_(), t(weight).requires_grad_()
    F.group_norm(xt, 3, wt).backward(t(dy))
    dx, dweight, _ = normkit.group_norm_backward(x, dy, 3, weight, mean, invstd)
    same_non_finite(dx, xt.grad)
    same_non_finite(dweight, wt.grad)
    _, mean, invstd = normkit.layer_norm_forward(x, [C, 2, 3])
    xt = t(x).requires_grad_()
    F.layer_norm(xt, [C, 2, 3]).backward(t(dy))
    same_non_finite(normkit.layer_norm_backward(x, dy, [C, 2, 3], None, mean, invstd)[0], xt.grad)


@pytest.mark.parametrize("bad", list(BAD))
def test_torch_modules_keep_their_buffers(bad):
    x = torch.from_numpy(batch(BAD[bad]))
    for module in (nkt.BatchNorm2d(C), nkt.BatchRenorm2d(C), nkt.GhostBatchNorm2d(C, 2),
                   nkt.BatchNormReLU2d(C), nkt.InstanceNorm2d(C, track_running_stats=True)):
        before = {k: b.clone() for k, b in module.named_buffers()}
        with pytest.raises(RuntimeError, match=r"contains NaN or infinite values"):
            module.train()(x)
        for k, b in module.named_buffers():
            assert torch.equal(b, before[k]), (type(module).__name__, k)
        # In eval mode (running statistics, no state to protect) it propagates as torch does.
        same_non_finite(module.eval()(x).detach().numpy(),
                        F.batch_norm(x, module.running_mean, module.running_var, module.weight,
                                     module.bias, training=False).relu()
                        if isinstance(module, nkt.BatchNormReLU2d) else
                        F.batch_norm(x, module.running_mean, module.running_var, module.weight,
                                     module.bias, training=False))
    frozen = nkt.FrozenBatchNorm2d(C)
    same_non_finite(frozen.train()(x).detach().numpy(),
                    F.batch_norm(x, frozen.running_mean, frozen.running_var, frozen.weight,
                                 frozen.bias, training=False))


def test_a_finite_batch_whose_variance_overflows_float32_poisons_nothing():
    # Two values ±1.414e19 per channel: unbiased variance 4e38, beyond float32. With
    # momentum 1 PyTorch makes the running variance inf; normkit refuses the batch.
    x = np.array([[1.414e19], [-1.414e19]], np.float32)
    rm, rv = np.zeros(1, np.float32), np.ones(1, np.float32)
    with pytest.raises(RuntimeError, match=r"would make the running variance .* beyond the range "
                                           r"of float32; running statistics left unchanged"):
        normkit.batch_norm_forward_training(x, None, None, rm, rv, momentum=1.0)
    assert rm[0] == 0 and rv[0] == 1
    trm, trv = torch.zeros(1), torch.ones(1)
    F.batch_norm(torch.from_numpy(x), trm, trv, training=True, momentum=1.0)
    assert torch.isinf(trv).all()  # what PyTorch does instead


@pytest.mark.parametrize("bad", list(BAD))
def test_the_standardizer_rejects_non_finite_values(bad):
    standardizer = normkit.Standardizer()
    with pytest.raises(ValueError, match=r"fit: NaN or infinity at sample 1"):
        standardizer.fit(batch(BAD[bad]).reshape(4, -1))
    standardizer.fit(batch(0.5).reshape(4, -1))
    with pytest.raises(ValueError, match=r"transform: NaN or infinity at sample 1"):
        standardizer.transform(batch(BAD[bad]).reshape(4, -1))


def test_invstd_of_a_non_finite_variance():
    with pytest.raises(ValueError, match=r"var\[1\] \+ eps must be positive, got nan"):
        normkit.batch_norm_invstd(np.array([1, np.nan, 1], np.float32), 1e-5)
    invstd = normkit.batch_norm_invstd(np.array([1, np.inf, 1], np.float32), 1e-5)
    same_non_finite(invstd, torch.rsqrt(torch.tensor([1, np.inf, 1]) + 1e-5))
