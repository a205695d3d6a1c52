"""normkit.torch.convert on torchvision's ResNet-18 and on small models: every torch.nn
norm module replaced, the state kept (same Parameters, buffers, state_dict keys both
ways), outputs and gradients equal to the unconverted model's within float rounding, and
fuse_relu's BN->ReLU and BN->add->ReLU fusions."""
import copy

import pytest
import torch
import torchvision

import normkit.torch as nkt

from _support import assert_matches_torch

NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.LayerNorm,
         torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d,
         torch.nn.InstanceNorm3d)


def _resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # running statistics that are not (0, 1), so eval tests them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _torch_norms(model):
    return [m for m in model.modules() if type(m) in NORMS]


def _loss_and_gradients(model, x):
    model.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fuse_relu", [False, True], ids=["plain", "fuse_relu"])
def test_resnet18_converted_computes_the_same(fuse_relu):
    ref = _resnet18()
    ours = nkt.convert(copy.deepcopy(ref), fuse_relu=fuse_relu)
    assert not _torch_norms(ours)
    kinds = [type(m) for m in ours.modules()]
    if fuse_relu:
        assert isinstance(ours, torch.fx.GraphModule)
        # The stem and each block's first BN feed a ReLU; each block's second BN feeds
        # the residual addition; the downsample BNs feed the addition's other side.
        assert kinds.count(nkt.BatchNormReLU2d) == 9
        assert kinds.count(nkt.BatchNormAddReLU2d) == 8
        assert kinds.count(nkt.BatchNorm2d) == 3
    else:
        assert kinds.count(nkt.BatchNorm2d) == 20
    assert list(ours.state_dict()) == list(ref.state_dict())
    # 64x64 leaves 2x2 positions in the last stage: 16 values per channel for the batch
    # statistics there (at 32x32 and batch 2 there would be 2, and rounding differences of
    # any two implementations grow without bound through such statistics).
    x = torch.randn(4, 3, 64, 64)
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        for step in range(2):
            expected_loss, expected = _loss_and_gradients(ref, x)
            actual_loss, actual = _loss_and_gradients(ours, x)
            assert_matches_torch(actual_loss, expected_loss, what=f"loss train={train}")
            for name, grad in expected.items():
                assert_matches_torch(actual[name], grad, what=f"{name}.grad train={train}")
            for key, value in ref.state_dict().items():
                assert_matches_torch(ours.state_dict()[key], value, what=key) \
                    if value.is_floating_point() else torch.equal(ours.state_dict()[key], value)


def test_state_dict_loads_both_ways():
    ref, fresh = _resnet18(), torchvision.models.resnet18(num_classes=10)
    for fuse_relu in (False, True):
        ours = nkt.convert(torchvision.models.resnet18(num_classes=10), fuse_relu=fuse_relu)
        ours.load_state_dict(ref.state_dict(), strict=True)
        fresh.load_state_dict(ours.state_dict(), strict=True)
        for key, value in ref.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key


def test_state_is_kept_not_copied():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                                torch.nn.LayerNorm(144))
    model[1].register_forward_hook(lambda m, i, o: None)
    before = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    converted = nkt.convert(model)
    assert converted is model
    assert [type(m) for m in model] == [torch.nn.Conv2d, nkt.BatchNorm2d, nkt.GroupNorm,
                                        torch.nn.Flatten, nkt.LayerNorm]
    for name, p in model.named_parameters():
        assert p is before[name], name  # the optimizer keeps training the same objects
    for name, b in model.named_buffers():
        assert b is buffers[name], name
    assert not model[1].training
    assert len(model[1]._forward_hooks) == 1
    model.train()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()  # reaches the converted modules' Parameters
    assert model[1].num_batches_tracked == 1


def test_converts_a_module_itself_and_leaves_subclasses():
    bn = torch.nn.BatchNorm1d(3)
    assert type(nkt.convert(bn)) is nkt.BatchNorm1d
    already = nkt.GhostBatchNorm1d(3, virtual_batch_size=2)
    assert nkt.convert(already) is already
    for cls in (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d):
        assert type(nkt.convert(cls(3))).__name__ == cls.__name__
    assert isinstance(nkt.convert(torch.nn.BatchNorm3d(2)), nkt.BatchNorm3d)


class _Shared(torch.nn.Module):
    """One BN called twice (before a ReLU and before an addition): not fused."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return torch.relu(self.bn(x)) + self.bn(x * 2)


class _Broad(torch.nn.Module):
    """BN -> ReLU with functional and method spellings, and a BN whose output has two users."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.BatchNorm1d(4) for _ in range(3))

    def forward(self, x):
        y = torch.nn.functional.relu(self.a(x))
        z = self.b(y).relu()
        w = self.c(z)
        return w + torch.relu(w)


def test_fuse_relu_only_where_the_graph_allows():
    for model, fused in ((_Shared(), 0), (_Broad(), 2)):
        ref = copy.deepcopy(model)
        ours = nkt.convert(model, fuse_relu=True)
        kinds = [type(m) for m in ours.modules()]
        assert kinds.count(nkt.BatchNormReLU1d) == fused, type(model).__name__
        x = torch.randn(5, 4)
        assert_matches_torch(ours(x), ref(x))


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on data: torch.fx cannot trace it
            return torch.relu(self.bn(x))
        return self.bn(x)


def test_fuse_relu_on_an_untraceable_model_raises_fx_error():
    with pytest.raises(torch.fx.proxy.TraceError):
        nkt.convert(_Untraceable(), fuse_relu=True)
    assert isinstance(nkt.convert(_Untraceable()).bn, nkt.BatchNorm1d)
