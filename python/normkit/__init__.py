"""normkit: batch normalization for CPUs, exact against PyTorch and deterministic.

The functional NumPy API lives here; ``normkit.torch`` holds drop-in replacements for
``torch.nn.BatchNorm1d/2d/3d`` (importing it imports torch; importing ``normkit`` does not).
"""
from ._normkit import (
    Standardizer,
    __version__,
    batch_norm_backward,
    batch_norm_forward_apply,
    batch_norm_forward_inference,
    batch_norm_forward_training,
    batch_norm_invstd,
    batch_norm_moments,
    batch_norm_update_running,
    batch_renorm_backward,
    batch_renorm_forward_training,
    batch_renorm_limits,
    ghost_batch_norm_backward,
    ghost_batch_norm_forward_training,
    group_norm_backward,
    group_norm_forward,
    instance_norm_backward,
    instance_norm_forward_training,
    keras_options,
    layer_norm_backward,
    layer_norm_forward,
    merge_moments,
    moments_dtype,
    num_threads,
    pytorch_options,
    rms_norm_backward,
    rms_norm_forward,
    set_num_threads,
)

__all__ = [
    "Standardizer",
    "__version__",
    "batch_norm_backward",
    "batch_norm_forward_apply",
    "batch_norm_forward_inference",
    "batch_norm_forward_training",
    "batch_norm_invstd",
    "batch_norm_moments",
    "batch_norm_update_running",
    "batch_renorm_backward",
    "batch_renorm_forward_training",
    "batch_renorm_limits",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_forward_training",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm_backward",
    "instance_norm_forward_training",
    "keras_options",
    "layer_norm_backward",
    "layer_norm_forward",
    "merge_moments",
    "moments_dtype",
    "num_threads",
    "pytorch_options",
    "rms_norm_backward",
    "rms_norm_forward",
    "set_num_threads",
]

# Fused BN+ReLU and BN+Add+ReLU (ReLU mask as bits).
from ._normkit import (  # noqa: E402
    batch_norm_add_relu_backward,
    batch_norm_add_relu_forward_inference,
    batch_norm_add_relu_forward_training,
    batch_norm_relu_backward,
    batch_norm_relu_forward_inference,
    batch_norm_relu_forward_training,
    relu_mask_bytes,
)

__all__ += [
    "batch_norm_add_relu_backward",
    "batch_norm_add_relu_forward_inference",
    "batch_norm_add_relu_forward_training",
    "batch_norm_relu_backward",
    "batch_norm_relu_forward_inference",
    "batch_norm_relu_forward_training",
    "relu_mask_bytes",
]
