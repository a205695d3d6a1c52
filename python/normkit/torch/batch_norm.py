"""BatchNorm1d/2d/3d: torch.nn's modules with normkit's forward and gradients
(the op normkit::batch_norm)."""
from typing import Optional, Tuple

import torch

from ._common import _check_rank, _check_values_per_channel, _onnx_float, _register_onnx
from ._common import _torch_symbolic

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def _batch_norm(input: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
                use_batch_stats: bool, momentum: Optional[float], eps: float, min_rank: int,
                max_rank: int) -> torch.Tensor:
    """torch.nn.functional.batch_norm's checks, then normkit::batch_norm: the batch's
    statistics (use_batch_stats; running statistics and the counter updated when given)
    or the running ones."""
    _check_rank(input, min_rank, max_rank)
    if use_batch_stats:
        _check_values_per_channel(input.size())
    return torch.ops.normkit.batch_norm(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, use_batch_stats, momentum, eps)


torch.fx.wrap("_batch_norm")


def _momentum(module_momentum: Optional[float], used: bool,
              counter: Optional[torch.Tensor]) -> Optional[float]:
    """The op's momentum: None (cumulative average, counted by the op) when the module's
    is None and its counter moves; otherwise torch's exponential_average_factor (0 for a
    None momentum), which is also what torch's ONNX export shows when it is unused."""
    if module_momentum is None and (counter is None or not used):
        return 0.0
    return module_momentum


class _BatchNormRanks:
    """_min_rank and _max_rank: the input ranks torch's BatchNorm1d/2d/3d base of the class
    accepts (its _check_input_dim), for the TorchScript functions that check them."""

    _min_rank, _max_rank = 2, 5

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for base, ranks in ((torch.nn.BatchNorm1d, (2, 3)), (torch.nn.BatchNorm2d, (4, 4)),
                            (torch.nn.BatchNorm3d, (5, 5))):
            if issubclass(cls, base):
                cls._min_rank, cls._max_rank = ranks


class _NormkitBatchNorm(_BatchNormRanks):
    """forward() of torch.nn.modules.batchnorm._BatchNorm, computed by normkit.

    Which statistics, and which buffers change, follow _BatchNorm.forward in torch 1.13:
    batch statistics in training, and in eval when there are no running statistics;
    running statistics (and the batch count) updated only in training with
    track_running_stats.
    """

    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine",
                     "_min_rank", "_max_rank"]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._batch_norm_forward(input)

    def _batch_norm_forward(self, input: torch.Tensor) -> torch.Tensor:
        running_mean, running_var, counter, use_batch_stats, momentum = self._arguments()
        return _batch_norm(input, self.weight, self.bias, running_mean, running_var, counter,
                           use_batch_stats, momentum, self.eps, self._min_rank, self._max_rank)

    def _arguments(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                                  Optional[torch.Tensor], bool, Optional[float]]:
        """(running_mean, running_var, num_batches_tracked, use_batch_stats, momentum) as
        the op takes them for this module's state."""
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        updating = self.training and self.track_running_stats
        pass_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_buffers else None
        running_var = self.running_var if pass_buffers else None
        counter = self.num_batches_tracked if updating else None
        momentum = _momentum(self.momentum, use_batch_stats and running_mean is not None, counter)
        return running_mean, running_var, counter, use_batch_stats, momentum


class BatchNorm1d(_NormkitBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by normkit: input (N, C) or (N, C, L)."""


class BatchNorm2d(_NormkitBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by normkit: input (N, C, H, W), contiguous or
    channels_last (the output keeps the input's memory format)."""


class BatchNorm3d(_NormkitBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by normkit: input (N, C, D, H, W), contiguous or
    channels_last_3d."""


def _batch_norm_onnx(g, input, weight, bias, running_mean, running_var, num_batches_tracked,
                     training, momentum, eps):
    return _torch_symbolic("aten::batch_norm")(
        g, input, weight, bias, running_mean, running_var, training,
        _onnx_float(momentum, 0.0), eps, False)


_register_onnx("batch_norm", _batch_norm_onnx)
