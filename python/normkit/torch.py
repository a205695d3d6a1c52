"""Drop-in replacements for torch.nn.BatchNorm1d/2d/3d that run normkit's kernels.

The classes subclass PyTorch's own, so the constructor, parameters, buffers, state_dict
(both ways), repr, reset methods, input-dimension checks and ``isinstance(m,
torch.nn.BatchNorm2d)`` are PyTorch's; only ``forward`` (and through it the gradients) is
normkit's. Tensors reach the kernels as NumPy views of their own memory: contiguous and
channels_last inputs are not copied, outputs have PyTorch's memory format (channels_last for
channels_last input, contiguous otherwise), and running statistics are updated in the
module's buffers directly. Inputs in any other layout are first copied to the output's.

Deliberate differences from torch.nn.BatchNorm* (see tests/python/test_torch_parity.py):
- an error leaves num_batches_tracked as it was (PyTorch counts the batch, then raises);
- NaN or infinity in a training batch raises RuntimeError instead of poisoning the running
  statistics; eps <= 0 and momentum outside [0, 1] raise ValueError;
- CPU tensors of float32 or float64 only; no double backward (the gradient is computed by a
  fused kernel, not by differentiable operations); not scriptable with torch.jit.script.
"""
import torch

from . import _normkit

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)


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


class _BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x) with the batch's statistics ("training") or given running ones
    ("frozen"); backward returns dx, dweight, dbias from one fused normkit kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                use_batch_stats, momentum, eps):
        memory_format = _output_format(x)
        y = torch.empty_like(x, memory_format=memory_format)
        source = _laid_out(x, y.stride(), memory_format)
        ctx.save_for_backward(x, weight)
        ctx.memory_format, ctx.strides = memory_format, y.stride()
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
            source = _laid_out(x, ctx.strides, ctx.memory_format)
            # The gradient of y.sum() arrives expanded, with zero strides.
            dy = _laid_out(dy, ctx.strides, ctx.memory_format)
            dx = torch.empty_like(source) if want_dx else None
            _, dweight, dbias = _normkit.batch_norm_backward(
                _array(source), _array(dy), _array(weight), ctx.mean, ctx.invstd,
                mode=ctx.mode, out=_array(dx), compute_dx=want_dx)
            dweight, dbias = torch.from_numpy(dweight), torch.from_numpy(dbias)
        return (dx,
                dweight if weight is not None and want_dweight else None,
                dbias if ctx.has_bias and want_dbias else None,
                None, None, None, None, None, None)


def _check_supported(input, tensors):
    if input.layout != torch.strided or input.device.type != "cpu":
        raise RuntimeError(
            f"normkit.torch: batch_norm runs on dense CPU tensors, got {input.layout} on "
            f"{input.device}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(
            f"normkit.torch: batch_norm supports float32 and float64 input, got {input.dtype}")
    for name, tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type != "cpu":
            raise RuntimeError(f"normkit.torch: {name} is on {tensor.device}, input on cpu")
        expected = torch.int64 if name == "num_batches_tracked" else input.dtype
        if tensor.dtype != expected:
            raise RuntimeError(
                f"normkit.torch: {name} has dtype {tensor.dtype}, expected {expected} "
                f"(the input's)")


class _NormkitBatchNorm:
    """forward() of torch.nn.modules.batchnorm._BatchNorm, computed by normkit."""

    def forward(self, input):
        self._check_input_dim(input)

        # Which statistics, and which buffers change, follow _BatchNorm.forward in torch 1.13:
        # batch statistics in training, and in eval when there are no running statistics;
        # running statistics (and the batch count) updated only in training with
        # track_running_stats.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        updating = self.training and self.track_running_stats
        pass_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_buffers else None
        running_var = self.running_var if pass_buffers else None
        num_batches_tracked = self.num_batches_tracked if updating else None

        if not use_batch_stats and (running_mean is None or running_var is None):
            raise RuntimeError(
                "normkit.torch: running_mean and running_var must both be defined in "
                "evaluation mode")
        if use_batch_stats:
            self._check_batch_size(input)
        _check_supported(input, [("weight", self.weight), ("bias", self.bias),
                                 ("running_mean", running_mean), ("running_var", running_var),
                                 ("num_batches_tracked", num_batches_tracked)])

        momentum = self.momentum
        if not (use_batch_stats and running_mean is not None):
            # Unused without running statistics to update; PyTorch does not check it then.
            momentum = 0.1
        elif momentum is None and num_batches_tracked is None:
            # PyTorch's cumulative average without a counter weights the batch by 0.
            momentum = 0.0

        return _BatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, num_batches_tracked,
            use_batch_stats, momentum, self.eps)

    @staticmethod
    def _check_batch_size(input):
        # Same condition, type and message as torch.nn.functional.batch_norm in training,
        # checked before anything changes.
        size = input.size()
        values_per_channel = size[0]
        for extent in size[2:]:
            values_per_channel *= extent
        if values_per_channel == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{size}")


class BatchNorm1d(_NormkitBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by normkit: input (N, C) or (N, C, L)."""


class BatchNorm2d(_NormkitBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by normkit: input (N, C, H, W), contiguous or
    channels_last (the output keeps the input's memory format)."""


class BatchNorm3d(_NormkitBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by normkit: input (N, C, D, H, W), contiguous or
    channels_last_3d."""


# ---------------------------------------------------------------------------
# GroupNorm and InstanceNorm1d/2d/3d.
#
# As for batch norm, the classes subclass PyTorch's own (constructor, parameters, buffers,
# state_dict, repr, input checks are PyTorch's) and only the computation is normkit's.
# Contiguous and channels_last inputs reach the kernels without copies, and the output keeps
# the input's memory format. Deliberate differences from torch 1.13:
# - InstanceNorm2d/3d return channels_last output for channels_last input (torch's
#   instance_norm returns a contiguous tensor; the values are the same);
# - InstanceNorm with track_running_stats raises RuntimeError for NaN or infinity in a
#   training batch and leaves the running statistics as they were;
# - float32/float64 CPU tensors only; no double backward.


def _check_supported_op(op, input, tensors):
    if input.layout != torch.strided or input.device.type != "cpu":
        raise RuntimeError(
            f"normkit.torch: {op} runs on dense CPU tensors, got {input.layout} on "
            f"{input.device}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(
            f"normkit.torch: {op} supports float32 and float64 input, got {input.dtype}")
    for name, tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type != "cpu":
            raise RuntimeError(f"normkit.torch: {name} is on {tensor.device}, input on cpu")
        if tensor.dtype != input.dtype:
            raise RuntimeError(
                f"normkit.torch: {name} has dtype {tensor.dtype}, expected {input.dtype} "
                f"(the input's)")


def _kernel_array(tensor):
    # The kernels take 2 to 5 dimensions; beyond that (GroupNorm takes any (N, C, *)),
    # a contiguous tensor is the same data as (N, C, L).
    if tensor is not None and tensor.dim() > 5:
        tensor = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
    return _array(tensor)


class _GroupStatsFunction(torch.autograd.Function):
    """y = group_norm(x) with per-(n, group) statistics; groups = None is instance norm
    (groups = C), which may update running statistics. backward: dx, dweight, dbias."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, running_mean, running_var, momentum):
        memory_format = _output_format(x)
        y = torch.empty_like(x, memory_format=memory_format)
        source = _laid_out(x, y.stride(), memory_format)
        ctx.save_for_backward(source, weight)
        ctx.memory_format, ctx.strides = memory_format, y.stride()
        ctx.groups, ctx.has_bias = groups, bias is not None
        if x.numel() == 0:
            ctx.mean = ctx.invstd = None
            return y
        if groups is None:
            _, ctx.mean, ctx.invstd = _normkit.instance_norm_forward_training(
                _kernel_array(source), _array(weight), _array(bias), _array(running_mean),
                _array(running_var), None, momentum, eps, out=_kernel_array(y))
        else:
            _, ctx.mean, ctx.invstd = _normkit.group_norm_forward(
                _kernel_array(source), groups, _array(weight), _array(bias), eps,
                out=_kernel_array(y))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        want_dx, want_dweight, want_dbias = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        if x.numel() == 0:
            dx = torch.zeros_like(x) if want_dx else None
            dweight, dbias = torch.zeros(channels, dtype=x.dtype), torch.zeros(channels, dtype=x.dtype)
        else:
            dy = _laid_out(dy, ctx.strides, ctx.memory_format)
            dx = torch.empty_like(x) if want_dx else None
            groups = channels if ctx.groups is None else ctx.groups
            _, dweight, dbias = _normkit.group_norm_backward(
                _kernel_array(x), _kernel_array(dy), groups, _array(weight), ctx.mean,
                ctx.invstd, out=_kernel_array(dx), compute_dx=want_dx)
            dweight, dbias = torch.from_numpy(dweight), torch.from_numpy(dbias)
        return (dx,
                dweight if weight is not None and want_dweight else None,
                dbias if ctx.has_bias and want_dbias else None,
                None, None, None, None, None)


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by normkit: input (N, C, *), contiguous or channels_last
    (the output keeps the input's memory format, as PyTorch's does)."""

    def forward(self, input):
        if input.dim() < 2:
            raise RuntimeError(
                f"normkit.torch: GroupNorm expects an input of shape (N, C, *), got "
                f"{tuple(input.shape)}")
        # PyTorch's checks, types and messages (F.group_norm, native_group_norm).
        size = [input.size(0) * input.size(1) // self.num_groups, self.num_groups]
        size += list(input.size()[2:])
        values = size[0]
        for extent in size[2:]:
            values *= extent
        if values == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}")
        if input.size(1) % self.num_groups != 0:
            raise RuntimeError(
                "Expected number of channels in input to be divisible by num_groups, but got "
                f"input of shape {list(input.shape)} and num_groups={self.num_groups}")
        _check_supported_op("group_norm", input, [("weight", self.weight), ("bias", self.bias)])
        return _GroupStatsFunction.apply(input, self.weight, self.bias, self.num_groups, self.eps,
                                         None, None, 0.1)


class _NormkitInstanceNorm:
    """_apply_instance_norm of torch.nn.modules.instancenorm._InstanceNorm, computed by
    normkit (PyTorch's forward keeps its input checks and unbatched-input handling)."""

    def _apply_instance_norm(self, input):
        use_input_stats = self.training or not self.track_running_stats
        _check_supported_op("instance_norm", input,
                            [("weight", self.weight), ("bias", self.bias),
                             ("running_mean", self.running_mean),
                             ("running_var", self.running_var)])
        if not use_input_stats:
            # Eval with running statistics: per-channel constants, which is batch norm's
            # inference (and its frozen backward).
            return _BatchNormFunction.apply(input, self.weight, self.bias, self.running_mean,
                                            self.running_var, None, False, 0.1, self.eps)
        size = input.size()
        spatial = 1
        for extent in size[2:]:
            spatial *= extent
        if spatial == 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size {size}")
        momentum = self.momentum
        if self.running_mean is None:
            momentum = 0.1  # unused
        return _GroupStatsFunction.apply(input, self.weight, self.bias, None, self.eps,
                                         self.running_mean, self.running_var, momentum)


class InstanceNorm1d(_NormkitInstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by normkit: input (N, C, L) or (C, L)."""


class InstanceNorm2d(_NormkitInstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by normkit: input (N, C, H, W) or (C, H, W),
    contiguous or channels_last."""


class InstanceNorm3d(_NormkitInstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by normkit: input (N, C, D, H, W) or (C, D, H, W),
    contiguous or channels_last_3d."""
