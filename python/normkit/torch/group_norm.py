"""GroupNorm and InstanceNorm1d/2d/3d (the ops normkit::group_norm and
normkit::instance_norm; instance norm with running statistics is normkit::batch_norm).

As for batch norm, the classes subclass PyTorch's own (constructor, parameters, buffers,
state_dict, repr are PyTorch's) and only the computation is normkit's. Contiguous and
channels_last inputs reach the kernels without copies, and the output keeps the input's
memory format. Deliberate differences from torch 1.13:
- InstanceNorm2d/3d return channels_last output for channels_last input (torch's
  instance_norm returns a contiguous tensor; the values are the same);
- InstanceNorm with track_running_stats raises RuntimeError for NaN or infinity in a
  training batch and leaves the running statistics as they were.
"""
from typing import Optional

import torch

from ._common import _check_rank, _check_values_per_channel, _onnx_float, _register_onnx
from ._common import _torch_symbolic, _tracing

__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


def _group_norm(input: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """torch.nn.functional.group_norm's checks (types and messages), then
    normkit::group_norm."""
    if input.dim() < 2:
        raise RuntimeError(
            f"normkit.torch: GroupNorm expects an input of shape (N, C, *), got {input.size()}")
    size = [input.size(0) * input.size(1) // num_groups, num_groups]
    _check_values_per_channel(size + list(input.size()[2:]))
    if not _tracing() and input.size(1) % num_groups != 0:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(input.size())} and num_groups={num_groups}")
    return torch.ops.normkit.group_norm(input, num_groups, weight, bias, eps)


def _instance_norm(input: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                   running_var: Optional[torch.Tensor], use_input_stats: bool,
                   momentum: Optional[float], eps: float, no_batch_dim: int) -> torch.Tensor:
    """_InstanceNorm.forward of torch 1.13 (the rank check, unbatched input), computed by
    normkit::instance_norm, or by normkit::batch_norm with the running statistics."""
    _check_rank(input, no_batch_dim, no_batch_dim + 1)
    unbatched = input.dim() == no_batch_dim
    if unbatched:
        input = input.unsqueeze(0)
    if use_input_stats and not _tracing():
        spatial = 1
        for extent in input.size()[2:]:
            spatial *= extent
        if spatial == 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input "
                             f"size {input.size()}")
    if use_input_stats:
        if running_mean is None:
            momentum = 0.1  # unused
        y = torch.ops.normkit.instance_norm(input, weight, bias, running_mean, running_var,
                                            momentum, eps)
    else:
        # Eval with running statistics: per-channel constants, which is batch norm's
        # inference (and its frozen backward).
        y = torch.ops.normkit.batch_norm(input, weight, bias, running_mean, running_var, None,
                                         False, 0.1, eps)
    return y.squeeze(0) if unbatched else y


torch.fx.wrap("_group_norm")
torch.fx.wrap("_instance_norm")


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by normkit: input (N, C, *), contiguous or channels_last
    (the output keeps the input's memory format, as PyTorch's does)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class _NormkitInstanceNorm:
    """forward() of torch.nn.modules.instancenorm._InstanceNorm, computed by normkit."""

    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine",
                     "_no_batch_dim"]
    _no_batch_dim = 2

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _instance_norm(input, self.weight, self.bias, self.running_mean, self.running_var,
                              self.training or not self.track_running_stats, self.momentum,
                              self.eps, self._no_batch_dim)


class InstanceNorm1d(_NormkitInstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by normkit: input (N, C, L) or (C, L)."""

    _no_batch_dim = 2


class InstanceNorm2d(_NormkitInstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by normkit: input (N, C, H, W) or (C, H, W),
    contiguous or channels_last."""

    _no_batch_dim = 3


class InstanceNorm3d(_NormkitInstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by normkit: input (N, C, D, H, W) or (C, D, H, W),
    contiguous or channels_last_3d."""

    _no_batch_dim = 4


def _group_norm_onnx(g, input, num_groups, weight, bias, eps):
    return _torch_symbolic("aten::group_norm")(g, input, num_groups, weight, bias, eps, False)


def _instance_norm_onnx(g, input, weight, bias, running_mean, running_var, momentum, eps):
    return _torch_symbolic("aten::instance_norm")(
        g, input, weight, bias, running_mean, running_var, True, _onnx_float(momentum, 0.0), eps,
        False)


_register_onnx("group_norm", _group_norm_onnx)
_register_onnx("instance_norm", _instance_norm_onnx)
