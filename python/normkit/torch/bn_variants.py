"""Batch Renormalization, Ghost BN and frozen BN (normkit's bn_variants.hpp; the ops
normkit::batch_renorm and normkit::ghost_batch_norm in training, normkit::batch_norm with
the running statistics otherwise). Each module subclasses torch.nn.BatchNorm1d/2d/3d, so
parameters, buffers and state_dict are BN's: a BatchNorm's state loads into any of them and
back."""
from typing import Optional

import torch

from .. import _normkit
from ._common import _check_rank, _check_values_per_channel, _onnx_float, _register_onnx
from ._common import _torch_symbolic
from .batch_norm import _batch_norm, _BatchNormRanks, _momentum, _NormkitBatchNorm

__all__ = [
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "freeze_batch_norm",
]


def _batch_renorm(input: torch.Tensor, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                  running_var: torch.Tensor, num_batches_tracked: torch.Tensor, rmax: float,
                  dmax: float, hold_steps: int, rmax_warmup_steps: int, dmax_warmup_steps: int,
                  momentum: Optional[float], eps: float, min_rank: int,
                  max_rank: int) -> torch.Tensor:
    """Batch renormalization in training: the op reads the step from num_batches_tracked
    and takes the limits of the schedule at it."""
    _check_rank(input, min_rank, max_rank)
    _check_values_per_channel(input.size())
    return torch.ops.normkit.batch_renorm(
        input, weight, bias, running_mean, running_var, num_batches_tracked, rmax, dmax,
        hold_steps, rmax_warmup_steps, dmax_warmup_steps, momentum, eps)


def _ghost_batch_norm(input: torch.Tensor, virtual_batch_size: int,
                      weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                      num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
                      eps: float, min_rank: int, max_rank: int) -> torch.Tensor:
    _check_rank(input, min_rank, max_rank)
    return torch.ops.normkit.ghost_batch_norm(input, virtual_batch_size, weight, bias,
                                              running_mean, running_var, num_batches_tracked,
                                              momentum, eps)


torch.fx.wrap("_batch_norm")
torch.fx.wrap("_batch_renorm")
torch.fx.wrap("_ghost_batch_norm")


class _NormkitBatchRenorm:
    """Batch Renormalization (Ioffe 2017): in training, x̂ = (x − μ_B)/σ_B·r + d with
    r = clip(σ_B/σ, 1/rmax, rmax) and d = clip((μ_B − μ)/σ, −dmax, dmax) from the running
    statistics (σ = sqrt(running_var + eps)), r and d constants for the gradient; in eval,
    BatchNorm's inference. Running statistics are updated as BatchNorm updates them
    (unbiased variance), so the state is BatchNorm's.

    rmax and dmax are the final limits; the limits in force at a step (num_batches_tracked
    before it) rise linearly from 1 and 0: they stay there for ``hold_steps``, then reach
    rmax after ``rmax_warmup_steps`` more steps and dmax after ``dmax_warmup_steps`` more
    (both default to ``warmup_steps``). The paper: hold_steps=5000, rmax_warmup_steps=35000,
    dmax_warmup_steps=20000. ``limits()`` gives the current (rmax, dmax).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, rmax=3.0, dmax=5.0,
                 warmup_steps=0, hold_steps=0, rmax_warmup_steps=None, dmax_warmup_steps=None):
        if not track_running_stats:
            raise ValueError("normkit.torch: batch renormalization needs running statistics "
                             "(track_running_stats=True): r and d are defined by them")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.hold_steps = int(hold_steps)
        self.rmax_warmup_steps = int(warmup_steps if rmax_warmup_steps is None else rmax_warmup_steps)
        self.dmax_warmup_steps = int(warmup_steps if dmax_warmup_steps is None else dmax_warmup_steps)
        self.limits(0)  # bad limits or step counts raise ValueError here

    def limits(self, step=None):
        """(rmax, dmax) at `step` (default: the next training step)."""
        if step is None:
            step = int(self.num_batches_tracked)
        return _normkit.batch_renorm_limits(
            step, rmax=self.rmax, dmax=self.dmax, hold_steps=self.hold_steps,
            rmax_ramp_steps=self.rmax_warmup_steps, dmax_ramp_steps=self.dmax_warmup_steps)

    def extra_repr(self):
        return (super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, "
                f"hold_steps={self.hold_steps}, rmax_warmup_steps={self.rmax_warmup_steps}, "
                f"dmax_warmup_steps={self.dmax_warmup_steps}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._batch_norm_forward(input)
        return _batch_renorm(input, self.weight, self.bias, self.running_mean, self.running_var,
                             self.num_batches_tracked, self.rmax, self.dmax, self.hold_steps,
                             self.rmax_warmup_steps, self.dmax_warmup_steps, self.momentum,
                             self.eps, self._min_rank, self._max_rank)


class BatchRenorm1d(_NormkitBatchRenorm, _NormkitBatchNorm, torch.nn.BatchNorm1d):
    """Batch Renormalization for (N, C) or (N, C, L) input; see _NormkitBatchRenorm."""


class BatchRenorm2d(_NormkitBatchRenorm, _NormkitBatchNorm, torch.nn.BatchNorm2d):
    """Batch Renormalization for (N, C, H, W) input; see _NormkitBatchRenorm."""


class BatchRenorm3d(_NormkitBatchRenorm, _NormkitBatchNorm, torch.nn.BatchNorm3d):
    """Batch Renormalization for (N, C, D, H, W) input; see _NormkitBatchRenorm."""


class _NormkitGhostBatchNorm:
    """Ghost Batch Normalization (Hoffer et al. 2017): in training, BatchNorm applied to
    each of input.split(virtual_batch_size) in turn (the last virtual batch may be smaller;
    this is not always input.chunk(ceil(N / virtual_batch_size))), the running statistics
    updated once per virtual batch, so num_batches_tracked counts virtual batches. In eval,
    BatchNorm's inference. Every virtual batch needs more than one value per channel.
    """

    def __init__(self, num_features, virtual_batch_size=32, eps=1e-5, momentum=0.1,
                 affine=True, track_running_stats=True, device=None, dtype=None):
        if int(virtual_batch_size) != virtual_batch_size or virtual_batch_size < 1:
            raise ValueError(f"normkit.torch: virtual_batch_size must be a positive integer, "
                             f"got {virtual_batch_size!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self):
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return self._batch_norm_forward(input)
        updating = self.training and self.track_running_stats
        running_mean = self.running_mean if updating else None
        running_var = self.running_var if updating else None
        counter = self.num_batches_tracked if updating else None
        momentum = _momentum(self.momentum, running_mean is not None, counter)
        return _ghost_batch_norm(input, self.virtual_batch_size, self.weight, self.bias,
                                 running_mean, running_var, counter, momentum, self.eps,
                                 self._min_rank, self._max_rank)


class GhostBatchNorm1d(_NormkitGhostBatchNorm, _NormkitBatchNorm, torch.nn.BatchNorm1d):
    """Ghost BatchNorm for (N, C) or (N, C, L) input; see _NormkitGhostBatchNorm."""


class GhostBatchNorm2d(_NormkitGhostBatchNorm, _NormkitBatchNorm, torch.nn.BatchNorm2d):
    """Ghost BatchNorm for (N, C, H, W) input; see _NormkitGhostBatchNorm."""


class GhostBatchNorm3d(_NormkitGhostBatchNorm, _NormkitBatchNorm, torch.nn.BatchNorm3d):
    """Ghost BatchNorm for (N, C, D, H, W) input; see _NormkitGhostBatchNorm."""


class _NormkitFrozenBatchNorm(_BatchNormRanks):
    """BatchNorm frozen at its running statistics: the forward is BatchNorm's inference
    whatever the mode, the running statistics never change (a parent's .train() does not
    unfreeze it), and weight and bias still receive gradients (dx = weight·dy/sqrt(var +
    eps)) unless freeze_affine=True, which sets their requires_grad to False. The state_dict
    is BatchNorm's (weight, bias, running_mean, running_var, num_batches_tracked).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, freeze_affine=False):
        if not track_running_stats:
            raise ValueError("normkit.torch: a frozen BatchNorm needs running statistics "
                             "(track_running_stats=True)")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        if freeze_affine and affine:
            self.weight.requires_grad_(False)
            self.bias.requires_grad_(False)

    __constants__ = _NormkitBatchNorm.__constants__

    def extra_repr(self):
        return super().extra_repr() + ", frozen"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _batch_norm(input, self.weight, self.bias, self.running_mean, self.running_var,
                           None, False, 0.1, self.eps, self._min_rank, self._max_rank)


class FrozenBatchNorm1d(_NormkitFrozenBatchNorm, torch.nn.BatchNorm1d):
    """Frozen BatchNorm for (N, C) or (N, C, L) input; see _NormkitFrozenBatchNorm."""


class FrozenBatchNorm2d(_NormkitFrozenBatchNorm, torch.nn.BatchNorm2d):
    """Frozen BatchNorm for (N, C, H, W) input; see _NormkitFrozenBatchNorm."""


class FrozenBatchNorm3d(_NormkitFrozenBatchNorm, torch.nn.BatchNorm3d):
    """Frozen BatchNorm for (N, C, D, H, W) input; see _NormkitFrozenBatchNorm."""


_FROZEN_BY_DIM = ((torch.nn.BatchNorm1d, FrozenBatchNorm1d),
                  (torch.nn.BatchNorm2d, FrozenBatchNorm2d),
                  (torch.nn.BatchNorm3d, FrozenBatchNorm3d))


def _frozen_copy(bn, freeze_affine):
    for base, frozen_class in _FROZEN_BY_DIM:
        if isinstance(bn, base):
            break
    else:
        raise ValueError(f"normkit.torch.freeze_batch_norm: cannot freeze {type(bn).__name__} "
                         "(BatchNorm1d/2d/3d and their subclasses only)")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"normkit.torch.freeze_batch_norm: {type(bn).__name__} has no running "
                         "statistics (track_running_stats=False), nothing to freeze at")
    frozen = frozen_class(bn.num_features, bn.eps, bn.momentum, bn.affine,
                          device=bn.running_mean.device, dtype=bn.running_mean.dtype,
                          freeze_affine=freeze_affine)
    # The same Parameter objects, so an optimizer built before freezing keeps training them.
    if bn.affine:
        frozen.weight, frozen.bias = bn.weight, bn.bias
        if freeze_affine:
            frozen.weight.requires_grad_(False)
            frozen.bias.requires_grad_(False)
    with torch.no_grad():
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
    frozen.train(bn.training)
    return frozen


def freeze_batch_norm(module, freeze_affine=False):
    """Replaces every BatchNorm1d/2d/3d in `module` (torch's, normkit's drop-ins and
    variants, subclasses) by the matching FrozenBatchNorm, in place, and returns the module
    (the frozen copy when `module` itself is a BatchNorm). Weight and bias are the same
    Parameter objects as before; freeze_affine=True stops their gradients too."""
    if isinstance(module, _NormkitFrozenBatchNorm):
        return module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return _frozen_copy(module, freeze_affine)
    for name, child in module.named_children():
        replacement = freeze_batch_norm(child, freeze_affine)
        if replacement is not child:
            setattr(module, name, replacement)
    return module




def _batch_renorm_onnx(g, input, weight, bias, running_mean, running_var, num_batches_tracked,
                       rmax, dmax, hold_steps, rmax_ramp_steps, dmax_ramp_steps, momentum, eps):
    # Exported as what it is in eval (BatchNormalization); training export is torch's
    # batch norm's, which refuses it below opset 14.
    return _torch_symbolic("aten::batch_norm")(
        g, input, weight, bias, running_mean, running_var, True, _onnx_float(momentum, 0.0), eps,
        False)


def _ghost_batch_norm_onnx(g, input, virtual_batch_size, weight, bias, running_mean,
                           running_var, num_batches_tracked, momentum, eps):
    return _torch_symbolic("aten::batch_norm")(
        g, input, weight, bias, running_mean, running_var, True, _onnx_float(momentum, 0.0), eps,
        False)


_register_onnx("batch_renorm", _batch_renorm_onnx)
_register_onnx("ghost_batch_norm", _ghost_batch_norm_onnx)
