"""Drop-in replacements for torch.nn's normalization modules that run normkit's kernels.

One module per family, as in the C++ library:
- ``batch_norm``: BatchNorm1d/2d/3d;
- ``bn_variants``: BatchRenorm1d/2d/3d, GhostBatchNorm1d/2d/3d, FrozenBatchNorm1d/2d/3d and
  ``freeze_batch_norm``;
- ``batch_norm_fused``: BatchNormReLU1d/2d and BatchNormAddReLU1d/2d (BN [+ residual] + ReLU
  in one pass);
- ``layer_norm``: LayerNorm and RMSNorm;
- ``group_norm``: GroupNorm and InstanceNorm1d/2d/3d;
- ``bn_stats``: ``recalibrate_batch_norm`` (precise BN) and ``adapt_batch_norm`` (test-time
  adaptation) for any model with batch-norm modules, torch's or these.

The classes subclass PyTorch's own, so the constructor, parameters, buffers, state_dict
(both ways), repr, reset methods, input-dimension checks and ``isinstance(m,
torch.nn.BatchNorm2d)`` are PyTorch's; only ``forward`` (and through it the gradients) is
normkit's. Tensors reach the kernels as NumPy views of their own memory: contiguous and
channels_last inputs are not copied, outputs have PyTorch's memory format (channels_last for
channels_last input, contiguous otherwise), and running statistics are updated in the
module's buffers directly. Inputs in any other layout are first copied to the output's.

Deliberate differences from torch.nn's modules (see tests/python/test_torch_parity.py and
each family's module):
- an error leaves num_batches_tracked as it was (PyTorch counts the batch, then raises);
- NaN or infinity in a training batch raises RuntimeError instead of poisoning the running
  statistics; eps <= 0 and momentum outside [0, 1] raise ValueError;
- CPU tensors of float32 or float64 only; no double backward (the gradient is computed by a
  fused kernel, not by differentiable operations); not scriptable with torch.jit.script.
"""
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batch_norm_fused import (
    BatchNormAddReLU1d, BatchNormAddReLU2d, BatchNormReLU1d, BatchNormReLU2d)
from .bn_variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    freeze_batch_norm,
)
from .group_norm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm, RMSNorm
from .bn_stats import adapt_batch_norm, recalibrate_batch_norm

# The autograd functions behind the modules, for tests that check their gradients directly.
from .batch_norm import _BatchNormFunction  # noqa: F401
from .group_norm import _GroupStatsFunction  # noqa: F401
from .layer_norm import _RowsNormFunction  # noqa: F401

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze_batch_norm",
    "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormAddReLU1d", "BatchNormAddReLU2d",
    "LayerNorm", "RMSNorm",
    "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "recalibrate_batch_norm", "adapt_batch_norm",
]
