"""Fused BatchNorm + ReLU and BatchNorm + residual add + ReLU (a ResNet block's tail):
torch.nn.BatchNorm1d/2d's constructor and state, one normkit pass."""
import torch

from .. import _normkit
from ._common import _array, _like_output, _output_like
from .batch_norm import _batch_norm_arguments

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormAddReLU1d", "BatchNormAddReLU2d"]


class _BatchNormReLUFunction(torch.autograd.Function):
    """y = relu(batch_norm(x) [+ residual]); the ReLU mask is saved as a uint8 tensor of
    bits (1/32 of a float mask), and backward returns dx, dresidual, dweight, dbias from
    one fused normkit kernel."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, num_batches_tracked,
                use_batch_stats, momentum, eps):
        y, source = _output_like(ctx, x)
        z = None if residual is None else _like_output(ctx, residual)
        ctx.mode = "training" if use_batch_stats else "frozen"
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None
        if x.numel() == 0:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            ctx.mean = ctx.invstd = None
            ctx.save_for_backward(source, weight, None)
            return y
        extra = () if z is None else (_array(z),)
        if use_batch_stats:
            run = (_normkit.batch_norm_relu_forward_training if z is None
                   else _normkit.batch_norm_add_relu_forward_training)
            _, mask, ctx.mean, ctx.invstd = run(
                _array(source), *extra, _array(weight), _array(bias), _array(running_mean),
                _array(running_var), _array(num_batches_tracked), momentum, eps, out=_array(y))
        else:
            run = (_normkit.batch_norm_relu_forward_inference if z is None
                   else _normkit.batch_norm_add_relu_forward_inference)
            _, mask = run(_array(source), *extra, _array(weight), _array(bias),
                          _array(running_mean), _array(running_var), eps, out=_array(y))
            ctx.mean = _array(running_mean).copy()
            ctx.invstd = _normkit.batch_norm_invstd(_array(running_var), eps)
        # Bits in the memory order of `source`, which backward sees again.
        ctx.save_for_backward(source, weight, torch.from_numpy(mask))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        source, weight, mask = ctx.saved_tensors
        want_dx, want_dz, want_dweight, want_dbias = ctx.needs_input_grad[:4]
        dx = dz = dweight = dbias = None
        if source.numel() == 0:
            dx = torch.zeros_like(source) if want_dx else None
            dz = torch.zeros_like(source) if ctx.has_residual and want_dz else None
            dweight = torch.zeros(source.shape[1], dtype=source.dtype)
            dbias = dweight.clone()
        else:
            dy = _like_output(ctx, dy)
            dx = torch.empty_like(source) if want_dx else None
            if ctx.has_residual:
                _, dz, dweight, dbias = _normkit.batch_norm_add_relu_backward(
                    _array(source), _array(dy), mask.numpy(), _array(weight), ctx.mean,
                    ctx.invstd, mode=ctx.mode, out=_array(dx), compute_dx=want_dx)
                dz = torch.from_numpy(dz) if want_dz else None
            else:
                _, dweight, dbias = _normkit.batch_norm_relu_backward(
                    _array(source), _array(dy), mask.numpy(), _array(weight), ctx.mean,
                    ctx.invstd, mode=ctx.mode, out=_array(dx), compute_dx=want_dx)
            dweight, dbias = torch.from_numpy(dweight), torch.from_numpy(dbias)
        return (dx, dz,
                dweight if weight is not None and want_dweight else None,
                dbias if ctx.has_bias and want_dbias else None,
                None, None, None, None, None, None)


class _NormkitBatchNormReLU:
    """forward() of relu(_BatchNorm(x) [+ residual]), computed by normkit: the statistics,
    buffers and checks follow _NormkitBatchNorm.forward (torch 1.13's _BatchNorm)."""

    def _fused(self, input, residual):
        self._check_input_dim(input)
        if residual is not None:
            if not isinstance(residual, torch.Tensor):
                raise TypeError(f"normkit.torch: residual must be a Tensor, got "
                                f"{type(residual).__name__}")
            if residual.shape != input.shape:
                raise ValueError(f"normkit.torch: residual has shape {tuple(residual.shape)}, "
                                 f"input {tuple(input.shape)} (no broadcasting)")
        running_mean, running_var, num_batches_tracked, use_batch_stats, momentum = \
            _batch_norm_arguments(self, input, [("residual", residual)])
        return _BatchNormReLUFunction.apply(
            input, residual, self.weight, self.bias, running_mean, running_var,
            num_batches_tracked, use_batch_stats, momentum, self.eps)


class _NormkitBatchNormReLUModule(_NormkitBatchNormReLU):
    def forward(self, input):
        return self._fused(input, None)


class _NormkitBatchNormAddReLUModule(_NormkitBatchNormReLU):
    def forward(self, input, residual):
        if residual is None:
            raise TypeError("normkit.torch: forward(input, residual) needs the residual")
        return self._fused(input, residual)


class BatchNormReLU1d(_NormkitBatchNormReLUModule, torch.nn.BatchNorm1d):
    """relu(torch.nn.BatchNorm1d(x)) in one normkit pass; BatchNorm1d's constructor and
    state_dict. Input (N, C) or (N, C, L)."""


class BatchNormReLU2d(_NormkitBatchNormReLUModule, torch.nn.BatchNorm2d):
    """relu(torch.nn.BatchNorm2d(x)) in one normkit pass; BatchNorm2d's constructor and
    state_dict. Input (N, C, H, W), contiguous or channels_last."""


class BatchNormAddReLU1d(_NormkitBatchNormAddReLUModule, torch.nn.BatchNorm1d):
    """relu(torch.nn.BatchNorm1d(x) + residual) in one normkit pass: forward(x, residual)."""


class BatchNormAddReLU2d(_NormkitBatchNormAddReLUModule, torch.nn.BatchNorm2d):
    """relu(torch.nn.BatchNorm2d(x) + residual) in one normkit pass (the tail of a ResNet
    basic block): forward(x, residual), residual of x's shape."""


