"""BatchNorm1d/2d/3d: torch.nn's modules with normkit's forward and gradients."""
import torch

from .. import _normkit
from ._common import (
    _array, _check_supported, _check_values_per_channel, _like_output, _output_like)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def _batch_norm_arguments(module, input, extra_tensors=()):
    """(running_mean, running_var, num_batches_tracked, use_batch_stats, momentum) for a
    forward of `module` (a torch _BatchNorm), after the checks torch makes.

    Which statistics, and which buffers change, follow _BatchNorm.forward in torch 1.13:
    batch statistics in training, and in eval when there are no running statistics;
    running statistics (and the batch count) updated only in training with
    track_running_stats. extra_tensors ((name, tensor) pairs) are checked with the rest.
    """
    use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    updating = module.training and module.track_running_stats
    pass_buffers = not module.training or module.track_running_stats
    running_mean = module.running_mean if pass_buffers else None
    running_var = module.running_var if pass_buffers else None
    num_batches_tracked = module.num_batches_tracked if updating else None

    if not use_batch_stats and (running_mean is None or running_var is None):
        raise RuntimeError(
            "normkit.torch: running_mean and running_var must both be defined in "
            "evaluation mode")
    if use_batch_stats:
        _check_values_per_channel(input.size())
    _check_supported("batch_norm", input,
                     [*extra_tensors, ("weight", module.weight), ("bias", module.bias),
                      ("running_mean", running_mean), ("running_var", running_var),
                      ("num_batches_tracked", num_batches_tracked)])

    momentum = module.momentum
    if not (use_batch_stats and running_mean is not None):
        # Unused without running statistics to update; PyTorch does not check it then.
        momentum = 0.1
    elif momentum is None and num_batches_tracked is None:
        # PyTorch's cumulative average without a counter weights the batch by 0.
        momentum = 0.0
    return running_mean, running_var, num_batches_tracked, use_batch_stats, momentum


class _BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x) with the batch's statistics ("training") or given running ones
    ("frozen"); backward returns dx, dweight, dbias from one fused normkit kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                use_batch_stats, momentum, eps):
        y, source = _output_like(ctx, x)
        ctx.save_for_backward(x, weight)
        ctx.mode = "training" if use_batch_stats else "frozen"
        ctx.has_bias = bias is not None
        if x.numel() == 0:
            # PyTorch returns an empty result and, in training, still counts the batch.
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            ctx.mean = ctx.invstd = None
            return y
        if use_batch_stats:
            _, ctx.mean, ctx.invstd = _normkit.batch_norm_forward_training(
                _array(source), _array(weight), _array(bias), _array(running_mean),
                _array(running_var), _array(num_batches_tracked), momentum, eps,
                out=_array(y))
        else:
            _normkit.batch_norm_forward_inference(
                _array(source), _array(weight), _array(bias), _array(running_mean),
                _array(running_var), eps, out=_array(y))
            # Copies: backward must see the statistics this forward used, even if the
            # buffers change before it runs.
            ctx.mean = _array(running_mean).copy()
            ctx.invstd = _normkit.batch_norm_invstd(_array(running_var), eps)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        want_dx, want_dweight, want_dbias = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        dx = dweight = dbias = None
        if x.numel() == 0:
            dx = torch.zeros_like(x) if want_dx else None
            sums = torch.zeros(channels, dtype=x.dtype)
            dweight, dbias = sums, sums.clone()
        else:
            source = _like_output(ctx, x)
            # The gradient of y.sum() arrives expanded, with zero strides.
            dy = _like_output(ctx, dy)
            dx = torch.empty_like(source) if want_dx else None
            _, dweight, dbias = _normkit.batch_norm_backward(
                _array(source), _array(dy), _array(weight), ctx.mean, ctx.invstd,
                mode=ctx.mode, out=_array(dx), compute_dx=want_dx)
            dweight, dbias = torch.from_numpy(dweight), torch.from_numpy(dbias)
        return (dx,
                dweight if weight is not None and want_dweight else None,
                dbias if ctx.has_bias and want_dbias else None,
                None, None, None, None, None, None)


class _NormkitBatchNorm:
    """forward() of torch.nn.modules.batchnorm._BatchNorm, computed by normkit."""

    def forward(self, input):
        self._check_input_dim(input)
        running_mean, running_var, num_batches_tracked, use_batch_stats, momentum = \
            _batch_norm_arguments(self, input)
        return _BatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, num_batches_tracked,
            use_batch_stats, momentum, self.eps)


class BatchNorm1d(_NormkitBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by normkit: input (N, C) or (N, C, L)."""


class BatchNorm2d(_NormkitBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by normkit: input (N, C, H, W), contiguous or
    channels_last (the output keeps the input's memory format)."""


class BatchNorm3d(_NormkitBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by normkit: input (N, C, D, H, W), contiguous or
    channels_last_3d."""


