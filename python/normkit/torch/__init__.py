"""normkit's normalization layers as PyTorch modules, on normkit's ops registered with
PyTorch's dispatcher (torch.ops.normkit, a C++ extension: forward, backward and double
backward run normkit's kernels on the tensors' own memory).

One module per family, as in the C++ library:
- ``batch_norm``: BatchNorm1d/2d/3d;
- ``bn_variants``: BatchRenorm1d/2d/3d, GhostBatchNorm1d/2d/3d, FrozenBatchNorm1d/2d/3d and
  ``freeze_batch_norm``;
- ``batch_norm_fused``: BatchNormReLU1d/2d and BatchNormAddReLU1d/2d (BN [+ residual] + ReLU
  in one pass);
- ``layer_norm``: LayerNorm and RMSNorm;
- ``group_norm``: GroupNorm and InstanceNorm1d/2d/3d;
- ``bn_stats``: ``recalibrate_batch_norm`` (precise BN) and ``adapt_batch_norm`` (test-time
  adaptation) for any model with batch-norm modules, torch's or these;
- ``sync_batch_norm``: SyncBatchNorm (CPU tensors over torch.distributed with gloo);
and ``convert`` (``convert.py``), which swaps torch.nn's normalization modules in a model
for these, optionally fusing BatchNorm and ReLU.

The classes subclass PyTorch's own, so the constructor, parameters, buffers, state_dict
(both ways), repr, reset methods and ``isinstance(m, torch.nn.BatchNorm2d)`` are PyTorch's;
only ``forward`` (and through it the gradients) is normkit's. Contiguous and channels_last
inputs are not copied, outputs have PyTorch's memory format (channels_last for
channels_last input, contiguous otherwise), and running statistics are updated in the
module's buffers directly. The modules work with torch.jit.script, torch.jit.trace,
torch.fx.symbolic_trace and torch.onnx.export (exported as torch exports the module they
replace), take float32, float64 and bfloat16 (computed in float32) CPU tensors, and have
double backward (second derivatives by autograd through the ops' formulas).

Deliberate differences from torch.nn's modules (see tests/python/test_torch_parity.py and
each family's module):
- an error leaves num_batches_tracked as it was (PyTorch counts the batch, then raises);
- NaN or infinity in a training batch raises RuntimeError instead of poisoning the running
  statistics.
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
from .convert import convert
from .group_norm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm, RMSNorm
from .bn_stats import adapt_batch_norm, recalibrate_batch_norm
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze_batch_norm",
    "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormAddReLU1d", "BatchNormAddReLU2d",
    "LayerNorm", "RMSNorm",
    "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "convert", "recalibrate_batch_norm", "adapt_batch_norm",
    "SyncBatchNorm",
]
