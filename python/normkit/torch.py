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

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

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
# Fused BatchNorm + ReLU and BatchNorm + residual add + ReLU (a ResNet block's tail).

__all__ += ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormAddReLU1d", "BatchNormAddReLU2d"]


class _BatchNormReLUFunction(torch.autograd.Function):
    """y = relu(batch_norm(x) [+ residual]); the ReLU mask is saved as a uint8 tensor of
    bits (1/32 of a float mask), and backward returns dx, dresidual, dweight, dbias from
    one fused normkit kernel."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, num_batches_tracked,
                use_batch_stats, momentum, eps):
        memory_format = _output_format(x)
        y = torch.empty_like(x, memory_format=memory_format)
        source = _laid_out(x, y.stride(), memory_format)
        z = None if residual is None else _laid_out(residual, y.stride(), memory_format)
        ctx.memory_format, ctx.strides = memory_format, y.stride()
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
            dy = _laid_out(dy, ctx.strides, ctx.memory_format)
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
            _NormkitBatchNorm._check_batch_size(input)
        _check_supported(input, [("residual", residual), ("weight", self.weight),
                                 ("bias", self.bias), ("running_mean", running_mean),
                                 ("running_var", running_var),
                                 ("num_batches_tracked", num_batches_tracked)])
        momentum = self.momentum
        if not (use_batch_stats and running_mean is not None):
            momentum = 0.1
        elif momentum is None and num_batches_tracked is None:
            momentum = 0.0
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
