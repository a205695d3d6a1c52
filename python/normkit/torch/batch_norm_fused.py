"""Fused BatchNorm + ReLU and BatchNorm + residual add + ReLU (a ResNet block's tail):
torch.nn.BatchNorm1d/2d's constructor and state, one normkit pass (the op
normkit::batch_norm_relu; its autograd node keeps the ReLU mask as bits)."""
from typing import Optional

import torch

from ._common import _check_rank, _check_values_per_channel, _onnx_float, _register_onnx
from ._common import _torch_symbolic
from .batch_norm import _NormkitBatchNorm

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormAddReLU1d", "BatchNormAddReLU2d"]


def _batch_norm_relu(input: torch.Tensor, residual: Optional[torch.Tensor],
                     weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                     num_batches_tracked: Optional[torch.Tensor], use_batch_stats: bool,
                     momentum: Optional[float], eps: float, min_rank: int,
                     max_rank: int) -> torch.Tensor:
    """relu(batch_norm(input) [+ residual]), arguments as _batch_norm's."""
    _check_rank(input, min_rank, max_rank)
    if use_batch_stats:
        _check_values_per_channel(input.size())
    return torch.ops.normkit.batch_norm_relu(input, residual, weight, bias, running_mean,
                                             running_var, num_batches_tracked, use_batch_stats,
                                             momentum, eps)


torch.fx.wrap("_batch_norm_relu")


class _NormkitBatchNormReLU(_NormkitBatchNorm):
    """relu(_BatchNorm(x) [+ residual]), computed by normkit: the statistics, buffers and
    checks follow _NormkitBatchNorm (torch 1.13's _BatchNorm.forward)."""

    def _fused(self, input: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        running_mean, running_var, counter, use_batch_stats, momentum = self._arguments()
        return _batch_norm_relu(input, residual, self.weight, self.bias, running_mean,
                                running_var, counter, use_batch_stats, momentum, self.eps,
                                self._min_rank, self._max_rank)


class _NormkitBatchNormReLUModule(_NormkitBatchNormReLU):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._fused(input, None)


class _NormkitBatchNormAddReLUModule(_NormkitBatchNormReLU):
    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
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


def _batch_norm_relu_onnx(g, input, residual, weight, bias, running_mean, running_var,
                          num_batches_tracked, training, momentum, eps):
    from torch.onnx import symbolic_helper
    y = _torch_symbolic("aten::batch_norm")(
        g, input, weight, bias, running_mean, running_var, training,
        _onnx_float(momentum, 0.0), eps, False)
    if not symbolic_helper._is_none(residual):
        y = g.op("Add", y, residual)
    return g.op("Relu", y)


_register_onnx("batch_norm_relu", _batch_norm_relu_onnx)
