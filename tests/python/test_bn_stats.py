"""normkit.torch.recalibrate_batch_norm / adapt_batch_norm (python/normkit/torch/bn_stats.py):
the running statistics written equal the exact population moments computed in float64 by a
reference that knows nothing of the implementation (the model copied to float64, each
batch-norm layer's inputs captured over all samples at once), for torch.nn's modules and
normkit's drop-ins, in both passes; nothing else of the model changes; errors change nothing.
"""
import copy

import pytest
import torch

import normkit.torch as nkt


def make_model(norm2d=torch.nn.BatchNorm2d, norm1d=torch.nn.BatchNorm1d):
    """The same weights on every call (the reference is built from a second one)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1, bias=False), norm2d(3), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Dropout(0.5),
        torch.nn.Linear(12, 6, bias=False), norm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                m.running_mean.fill_(7.0)
                m.running_var.fill_(40.0)
                m.num_batches_tracked.fill_(17)
    return model


def data(n=70, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 + 2.0 * torch.randn(n, 2, 4, 4, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def population(x):
    """Mean and population variance per channel (dim 1), in float64."""
    v = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean = v.mean(dim=1)
    return mean, ((v - mean[:, None]) ** 2).mean(dim=1)


def reference_eval(model, x):
    """Layer by layer in float64: each BN's statistics from its inputs with the ones before set."""
    ref = copy.deepcopy(model).double().eval()
    out = []
    for bn in batch_norms(ref):
        seen = {}
        hook = bn.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
        with torch.no_grad():
            ref(x.double())
        hook.remove()
        mean, var = population(seen["x"])
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        out.append((mean, var))
    return out


def assert_statistics(model, expected):
    for bn, (mean, var) in zip(batch_norms(model), expected):
        scale = mean.abs() + var.sqrt()
        assert torch.all((bn.running_mean.double() - mean).abs() <= 2e-6 * scale), (bn.running_mean, mean)
        assert torch.all((bn.running_var.double() - var).abs() <= 4e-6 * var), (bn.running_var, var)


@pytest.mark.parametrize("drop_in", [False, True])
def test_eval_pass_writes_the_exact_population_statistics(drop_in):
    model = make_model(nkt.BatchNorm2d, nkt.BatchNorm1d) if drop_in else make_model()
    before = copy.deepcopy(model.state_dict())
    model.train()
    loader = torch.utils.data.DataLoader(data(), batch_size=16, shuffle=False)
    assert nkt.recalibrate_batch_norm(model, loader, samples=50) is model
    expected = reference_eval(make_model(), data().tensors[0][:50])
    assert_statistics(model, expected)
    assert model.training and all(m.training for m in model.modules())  # flags as they were
    for key, value in model.state_dict().items():
        if not key.endswith(("running_mean", "running_var")):
            assert torch.equal(value, before[key]), key
    # On those samples, each BN now outputs mean β per channel (eval mode).
    outputs = {}
    for i, bn in enumerate(batch_norms(model)):
        bn.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, out))
    model.eval()
    with torch.no_grad():
        model(data().tensors[0][:50])
    for i, bn in enumerate(batch_norms(model)):
        dims = [0] + list(range(2, outputs[i].dim()))
        assert torch.allclose(outputs[i].double().mean(dim=dims), bn.bias.double(), atol=1e-5)


def test_train_pass_pools_the_inputs_of_training_mode_normalization():
    model = make_model()
    model.eval()
    loader = torch.utils.data.DataLoader(data(), batch_size=16, shuffle=False)
    nkt.recalibrate_batch_norm(model, loader, samples=50, mode="train")
    assert not model.training and not any(m.training for m in model.modules())
    # Reference: the batches (16, 16, 16, 2) through a float64 copy whose BNs use batch
    # statistics (train mode) while dropout stays off; every BN's inputs gathered.
    ref = make_model().double().eval()
    captured = {bn: [] for bn in batch_norms(ref)}
    for bn in batch_norms(ref):
        bn.train()
        bn.register_forward_pre_hook(lambda m, args: captured[m].append(args[0]))
    x = data().tensors[0][:50].double()
    with torch.no_grad():
        for first in range(0, 50, 16):
            ref(x[first:first + 16])
    expected = [population(torch.cat(captured[bn])) for bn in batch_norms(ref)]
    assert_statistics(model, expected)
    assert all(bn.num_batches_tracked.item() == 17 for bn in batch_norms(model))


def test_adapt_ignores_labels_and_follows_a_shift():
    model = make_model()
    shifted = torch.utils.data.TensorDataset(data().tensors[0] * 0.5 + 4.0, data().tensors[1])
    nkt.adapt_batch_norm(model, torch.utils.data.DataLoader(shifted, batch_size=10), samples=30)
    assert_statistics(model, reference_eval(make_model(), shifted.tensors[0][:30]))


def test_errors_change_nothing():
    model = make_model()
    before = copy.deepcopy(model.state_dict())

    def unchanged():
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key

    loader = torch.utils.data.DataLoader(data(), batch_size=16)
    with pytest.raises(ValueError, match="fewer than samples=100"):
        nkt.recalibrate_batch_norm(model, loader, samples=100)
    unchanged()
    shuffled = torch.utils.data.DataLoader(data(), batch_size=16, shuffle=True)
    with pytest.raises(ValueError, match="other samples on another pass"):
        nkt.recalibrate_batch_norm(model, shuffled, samples=64)
    unchanged()
    bad = data()
    bad.tensors[0][3, 1, 2, 2] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        nkt.recalibrate_batch_norm(model, torch.utils.data.DataLoader(bad, batch_size=16), samples=20)
    unchanged()
    for wrong in (dict(samples=0), dict(samples=2.5), dict(mode="ema")):
        with pytest.raises(ValueError):
            nkt.recalibrate_batch_norm(model, loader, **wrong)
    unchanged()
    with pytest.raises(ValueError, match="no batch-norm"):
        nkt.recalibrate_batch_norm(torch.nn.Linear(3, 2), loader, samples=5)
    with pytest.raises(TypeError, match="tensors"):
        nkt.recalibrate_batch_norm(model, [{"x": 1}], samples=5)
    unchanged()
