"""GroupNorm and InstanceNorm1d/2d/3d.

As for batch norm, the classes subclass PyTorch's own (constructor, parameters, buffers,
state_dict, repr, input checks are PyTorch's) and only the computation is normkit's.
Contiguous and channels_last inputs reach the kernels without copies, and the output keeps
the input's memory format. Deliberate differences from torch 1.13:
- InstanceNorm2d/3d return channels_last output for channels_last input (torch's
  instance_norm returns a contiguous tensor; the values are the same);
- InstanceNorm with track_running_stats raises RuntimeError for NaN or infinity in a
  training batch and leaves the running statistics as they were;
- float32/float64 CPU tensors only; no double backward.
"""
import torch

from .. import _normkit
from ._common import (
    _array, _check_supported, _check_values_per_channel, _like_output, _output_like)
from .batch_norm import _BatchNormFunction

__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


def _kernel_array(tensor):
    # The kernels take 2 to 5 dimensions; beyond that (GroupNorm takes any (N, C, *)),
    # a contiguous tensor is the same data as (N, C, L).
    if tensor is not None and tensor.dim() > 5:
        tensor = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
    return _array(tensor)


class _GroupStatsFunction(torch.autograd.Function):
    """y = group_norm(x) with per-(n, group) statistics; groups = None is instance norm
    (groups = C), which may update running statistics. backward: dx, dweight, dbias."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, running_mean, running_var, momentum):
        y, source = _output_like(ctx, x)
        ctx.save_for_backward(source, weight)
        ctx.groups, ctx.has_bias = groups, bias is not None
        if x.numel() == 0:
            ctx.mean = ctx.invstd = None
            return y
        if groups is None:
            _, ctx.mean, ctx.invstd = _normkit.instance_norm_forward_training(
                _kernel_array(source), _array(weight), _array(bias), _array(running_mean),
                _array(running_var), None, momentum, eps, out=_kernel_array(y))
        else:
            _, ctx.mean, ctx.invstd = _normkit.group_norm_forward(
                _kernel_array(source), groups, _array(weight), _array(bias), eps,
                out=_kernel_array(y))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        want_dx, want_dweight, want_dbias = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        if x.numel() == 0:
            dx = torch.zeros_like(x) if want_dx else None
            dweight, dbias = torch.zeros(channels, dtype=x.dtype), torch.zeros(channels, dtype=x.dtype)
        else:
            dy = _like_output(ctx, dy)
            dx = torch.empty_like(x) if want_dx else None
            groups = channels if ctx.groups is None else ctx.groups
            _, dweight, dbias = _normkit.group_norm_backward(
                _kernel_array(x), _kernel_array(dy), groups, _array(weight), ctx.mean,
                ctx.invstd, out=_kernel_array(dx), compute_dx=want_dx)
            dweight, dbias = torch.from_numpy(dweight), torch.from_numpy(dbias)
        return (dx,
                dweight if weight is not None and want_dweight else None,
                dbias if ctx.has_bias and want_dbias else None,
                None, None, None, None, None)


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by normkit: input (N, C, *), contiguous or channels_last
    (the output keeps the input's memory format, as PyTorch's does)."""

    def forward(self, input):
        if input.dim() < 2:
            raise RuntimeError(
                f"normkit.torch: GroupNorm expects an input of shape (N, C, *), got "
                f"{tuple(input.shape)}")
        # PyTorch's checks, types and messages (F.group_norm, native_group_norm).
        size = [input.size(0) * input.size(1) // self.num_groups, self.num_groups]
        _check_values_per_channel(size + list(input.size()[2:]))
        if input.size(1) % self.num_groups != 0:
            raise RuntimeError(
                "Expected number of channels in input to be divisible by num_groups, but got "
                f"input of shape {list(input.shape)} and num_groups={self.num_groups}")
        _check_supported("group_norm", input, [("weight", self.weight), ("bias", self.bias)])
        return _GroupStatsFunction.apply(input, self.weight, self.bias, self.num_groups, self.eps,
                                         None, None, 0.1)


class _NormkitInstanceNorm:
    """_apply_instance_norm of torch.nn.modules.instancenorm._InstanceNorm, computed by
    normkit (PyTorch's forward keeps its input checks and unbatched-input handling)."""

    def _apply_instance_norm(self, input):
        use_input_stats = self.training or not self.track_running_stats
        _check_supported("instance_norm", input,
                         [("weight", self.weight), ("bias", self.bias),
                          ("running_mean", self.running_mean), ("running_var", self.running_var)])
        if not use_input_stats:
            # Eval with running statistics: per-channel constants, which is batch norm's
            # inference (and its frozen backward).
            return _BatchNormFunction.apply(input, self.weight, self.bias, self.running_mean,
                                            self.running_var, None, False, 0.1, self.eps)
        size = input.size()
        spatial = 1
        for extent in size[2:]:
            spatial *= extent
        if spatial == 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size {size}")
        momentum = self.momentum
        if self.running_mean is None:
            momentum = 0.1  # unused
        return _GroupStatsFunction.apply(input, self.weight, self.bias, None, self.eps,
                                         self.running_mean, self.running_var, momentum)


class InstanceNorm1d(_NormkitInstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by normkit: input (N, C, L) or (C, L)."""


class InstanceNorm2d(_NormkitInstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by normkit: input (N, C, H, W) or (C, H, W),
    contiguous or channels_last."""


class InstanceNorm3d(_NormkitInstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by normkit: input (N, C, D, H, W) or (C, D, H, W),
    contiguous or channels_last_3d."""

