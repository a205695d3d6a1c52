"""SyncBatchNorm: torch.nn.SyncBatchNorm on CPU tensors, over torch.distributed (gloo).

PyTorch 1.13's SyncBatchNorm refuses CPU tensors. This one keeps its constructor,
``process_group``, parameters, buffers, state_dict and ``convert_sync_batchnorm``, and
computes with normkit's synchronized batch norm:

- forward: each process's per-channel moments (count, mean, M2) are all-gathered and
  merged in rank order (Chan's formula), so every process normalizes its shard with the
  statistics of the global batch (the shards concatenated in rank order) and updates the
  running statistics as BatchNorm would with that batch;
- backward: each process's Σdy and Σdy·x̂ are all-gathered and added in rank order,
  giving dx of the global batch; dweight and dbias are this process's parts (as torch's:
  DistributedDataParallel averages them with the other gradients).

A fixed order makes the results the same on every process and from run to run. Shards
may be uneven, and empty. In eval mode, without torch.distributed initialized, or in a
group of one process, the module is normkit's BatchNorm (torch's raises in training when
torch.distributed is not initialized).
"""
import numpy as np
import torch
import torch.distributed as dist

from .. import _normkit
from ._common import _check_values_per_channel
from .batch_norm import _NormkitBatchNorm, _batch_norm
from .batch_norm_fused import (
    BatchNormAddReLU1d, BatchNormAddReLU2d, BatchNormReLU1d, BatchNormReLU2d)
from .bn_variants import (
    BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, FrozenBatchNorm1d, FrozenBatchNorm2d,
    FrozenBatchNorm3d, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d)

__all__ = ["SyncBatchNorm"]

# NumPy views of tensor memory and PyTorch's output memory format (the NumPy API's
# calling conventions; the other modules call torch ops).
def _array(tensor):
    # detach() shares storage, and numpy() of a CPU tensor shares it again, strides included.
    return None if tensor is None else tensor.detach().numpy()


def _laid_out(tensor, strides, memory_format):
    """`tensor` itself when it has these strides, else a copy in `memory_format`.

    The kernels get x, y, dy and dx with one set of strides, so they stream all of them
    the same way and the fast paths apply. Strides of size-1 axes address nothing and are
    not compared.
    """
    if all(s == t for s, t, n in zip(tensor.stride(), strides, tensor.shape) if n > 1):
        return tensor
    return tensor.contiguous(memory_format=memory_format)


def _output_like(ctx, x):
    """(y, source): a new output in the memory format PyTorch gives x's output, and x laid
    out as y; ctx keeps the layout for backward's _like_output."""
    memory_format = _output_format(x)
    y = torch.empty_like(x, memory_format=memory_format)
    ctx.memory_format, ctx.strides = memory_format, y.stride()
    return y, _laid_out(x, y.stride(), memory_format)


def _like_output(ctx, tensor):
    """`tensor` laid out as forward's output (backward's x and dy, a residual)."""
    return _laid_out(tensor, ctx.strides, ctx.memory_format)


def _output_format(x):
    # PyTorch's batch_norm returns channels_last output for channels_last input and
    # contiguous output otherwise, however x's other strides are permuted; code after a
    # BatchNorm may rely on that (e.g. .view() on the output).
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format



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

    momentum = module.momentum
    if not (use_batch_stats and running_mean is not None):
        # Unused without running statistics to update; PyTorch does not check it then.
        momentum = 0.1
    elif momentum is None and num_batches_tracked is None:
        # PyTorch's cumulative average without a counter weights the batch by 0.
        momentum = 0.0
    return running_mean, running_var, num_batches_tracked, use_batch_stats, momentum



# BatchNorm subclasses with semantics of their own: convert_sync_batchnorm keeps them.
_KEPT_BY_CONVERSION = (
    BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, GhostBatchNorm1d, GhostBatchNorm2d,
    GhostBatchNorm3d, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
    BatchNormReLU1d, BatchNormReLU2d, BatchNormAddReLU1d, BatchNormAddReLU2d)


def _gather(tensor, group, world_size, what, note=""):
    """Every process's `tensor` (same shape everywhere), in rank order. A process that
    died, hangs past the group's timeout or runs other collectives makes gloo raise; the
    error says which exchange failed (nothing has been changed by then)."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    try:
        dist.all_gather(parts, tensor, group=group)
    except RuntimeError as error:
        raise RuntimeError(
            f"SyncBatchNorm: exchanging the {what} with the other {world_size - 1} "
            f"process(es) of the group failed (one died, did not answer within the "
            f"process group's timeout, or runs a different sequence of collectives)"
            f"{note}: {error}") from error
    return parts


def _moments_of(parts, channels):
    """Rank-ordered (C, 3) float64 tensors of (count, mean, m2) as moments arrays."""
    return [part.numpy().view(_normkit.moments_dtype).reshape(channels) for part in parts]


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                eps, group, world_size):
        y, source = _output_like(ctx, x)
        channels = x.shape[1]
        empty = x.numel() == 0
        local = (np.zeros(channels, _normkit.moments_dtype) if empty
                 else _normkit.batch_norm_moments(_array(source)))
        parts = _moments_of(
            _gather(torch.from_numpy(local.view(np.float64).reshape(channels, 3)), group,
                    world_size, "batch statistics",
                    "; running statistics left unchanged"), channels)
        merged = parts[0]
        for part in parts[1:]:
            merged = _normkit.merge_moments(merged, part)
        if empty:
            # Nothing to normalize here, but the running statistics move on every process.
            _normkit.batch_norm_update_running(
                merged, _array(running_mean), _array(running_var), _array(num_batches_tracked),
                momentum, eps)
            ctx.mean = ctx.invstd = None
        else:
            _, ctx.mean, ctx.invstd = _normkit.batch_norm_forward_from_moments(
                _array(source), _array(weight), _array(bias), merged, _array(running_mean),
                _array(running_var), _array(num_batches_tracked), momentum, eps, out=_array(y))
        ctx.save_for_backward(x, weight)
        ctx.count = float(merged["count"][0])
        ctx.group, ctx.world_size, ctx.has_bias = group, world_size, bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        want_dx, want_dweight, want_dbias = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        source = x
        if x.numel() == 0:
            sum_dy = sum_dy_xhat = np.zeros(channels)
        else:
            source = _like_output(ctx, x)
            dy = _like_output(ctx, dy)  # the gradient of y.sum() arrives with zero strides
            sum_dy, sum_dy_xhat = _normkit.batch_norm_backward_reduce(
                _array(source), _array(dy), ctx.mean, ctx.invstd)
        dx = None
        if want_dx:
            parts = _gather(torch.from_numpy(np.concatenate([sum_dy, sum_dy_xhat])), ctx.group,
                            ctx.world_size, "gradient sums")
            total = parts[0].clone()
            for part in parts[1:]:
                total += part
            total = total.numpy()
            dx = torch.empty_like(source)
            if x.numel() > 0:
                _normkit.batch_norm_backward_apply(
                    _array(source), _array(dy), _array(weight), ctx.mean, ctx.invstd,
                    total[:channels], total[channels:], ctx.count, out=_array(dx))
        dweight = torch.from_numpy(sum_dy_xhat).to(x.dtype)
        dbias = torch.from_numpy(sum_dy).to(x.dtype)
        return (dx,
                dweight if weight is not None and want_dweight else None,
                dbias if ctx.has_bias and want_dbias else None,
                None, None, None, None, None, None, None)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm for CPU tensors, computed by normkit over torch.distributed
    (gloo): input (N, C, *), contiguous or channels_last; the statistics of the batch all
    processes of ``process_group`` (default: the world) hold together.

    Not a subclass of torch.nn.SyncBatchNorm: DistributedDataParallel refuses those in CPU
    modules ("SyncBatchNorm layers only work with GPU modules"). Everything else is its:
    constructor, attributes, input checks, state_dict and repr."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def _group(self):
        """(process group, world size) when this forward synchronizes, else (None, 1)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group if self.process_group else dist.group.WORLD
        return group, dist.get_world_size(group)

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group, world_size = self._group()
        if world_size == 1:
            # normkit's BatchNorm (its op takes any (N, C, *) input).
            running_mean, running_var, counter, use_batch_stats, momentum = \
                _NormkitBatchNorm._arguments(self)
            return _batch_norm(input, self.weight, self.bias, running_mean, running_var, counter,
                               use_batch_stats, momentum, self.eps, 2, 5)
        running_mean, running_var, num_batches_tracked, use_batch_stats, momentum = \
            _batch_norm_arguments(self, input)
        assert use_batch_stats
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, num_batches_tracked,
            momentum, self.eps, group, world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm, giving normkit's SyncBatchNorm:
        every batch-norm layer in `module` (torch's BatchNorm*d and SyncBatchNorm, normkit's
        BatchNorm*d) becomes a SyncBatchNorm sharing its parameters and buffers. normkit's
        variants with semantics of their own (renorm, ghost, frozen, fused) are kept."""
        module_output = module
        if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                and not isinstance(module, _KEPT_BY_CONVERSION + (SyncBatchNorm,))):
            module_output = cls(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output

