"""normkit: batch normalization for CPUs, exact against PyTorch and deterministic.

The functional NumPy API lives here; ``normkit.torch`` holds drop-in replacements for
``torch.nn.BatchNorm1d/2d/3d`` (importing it imports torch; importing ``normkit`` does not).
"""
from ._normkit import (
    __version__,
    batch_norm_backward,
    batch_norm_forward_apply,
    batch_norm_forward_inference,
    batch_norm_forward_training,
    batch_norm_invstd,
    batch_norm_moments,
    batch_norm_update_running,
    group_norm_backward,
    group_norm_forward,
    instance_norm_backward,
    instance_norm_forward_training,
    keras_options,
    merge_moments,
    moments_dtype,
    num_threads,
    pytorch_options,
    set_num_threads,
)

__all__ = [
    "__version__",
    "batch_norm_backward",
    "batch_norm_forward_apply",
    "batch_norm_forward_inference",
    "batch_norm_forward_training",
    "batch_norm_invstd",
    "batch_norm_moments",
    "batch_norm_update_running",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm_backward",
    "instance_norm_forward_training",
    "keras_options",
    "merge_moments",
    "moments_dtype",
    "num_threads",
    "pytorch_options",
    "set_num_threads",
]
