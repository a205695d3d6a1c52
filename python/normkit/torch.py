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
        _NormkitBatchNorm._check_batch_size(input)
    _check_supported(input, [*extra_tensors, ("weight", module.weight), ("bias", module.bias),
                             ("running_mean", running_mean), ("running_var", running_var),
                             ("num_batches_tracked", num_batches_tracked)])

    momentum = module.momentum
    if not (use_batch_stats and running_mean is not None):
        # Unused without running statistics to update; PyTorch does not check it then.
        momentum = 0.1
    elif momentum is None and num_batches_tracked is None:
        # PyTorch's cumulative average without a counter weights the batch by 0.
        momentum = 0.0
    return running_mean, running_var, num_batches_tracked, use_batch_stats, momentum


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

        running_mean, running_var, num_batches_tracked, use_batch_stats, momentum = \
            _batch_norm_arguments(self, input)
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
# LayerNorm and RMSNorm over the trailing dimensions.

__all__ += ["LayerNorm", "RMSNorm"]


def _normalized_tuple(normalized_shape):
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def _check_rows_input(input, normalized_shape, tensors, op):
    if input.layout != torch.strided or input.device.type != "cpu":
        raise RuntimeError(
            f"normkit.torch: {op} runs on dense CPU tensors, got {input.layout} on "
            f"{input.device}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(
            f"normkit.torch: {op} supports float32 and float64 input, got {input.dtype}")
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != normalized_shape:
        # torch.nn.functional.layer_norm's message and type.
        raise RuntimeError(
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(str(n) for n in normalized_shape)}], but got input of size"
            f"{input.size()}")
    for name, tensor in tensors:
        if tensor is not None and (tensor.device.type != "cpu" or tensor.dtype != input.dtype):
            raise RuntimeError(
                f"normkit.torch: {name} is {tensor.dtype} on {tensor.device}, expected "
                f"{input.dtype} on cpu (the input's)")


def _rows_source(x):
    # The kernels take any tensor whose trailing (normalized) values are contiguous and
    # whose rows are equally spaced; a C-contiguous copy otherwise.
    return x if x.is_contiguous() else x.contiguous()


class _RowsNormFunction(torch.autograd.Function):
    """y = layer_norm(x) (rms=False) or rms_norm(x) (rms=True) over the trailing
    normalized_shape; backward returns dx, dweight (and dbias) from normkit's kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps, rms):
        source = _rows_source(x)
        y = torch.empty_like(source, memory_format=torch.contiguous_format)
        ctx.normalized_shape, ctx.rms = normalized_shape, rms
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(source, weight)
        if x.numel() == 0:
            ctx.stats = None
            return y
        if rms:
            _, inv_rms = _normkit.rms_norm_forward(
                _array(source), list(normalized_shape), _array(weight), eps, out=_array(y))
            ctx.stats = (None, inv_rms)
        else:
            _, mean, invstd = _normkit.layer_norm_forward(
                _array(source), list(normalized_shape), _array(weight), _array(bias), eps,
                out=_array(y))
            ctx.stats = (mean, invstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        want_dx, want_dweight, want_dbias = ctx.needs_input_grad[:3]
        want_dweight = want_dweight and ctx.has_weight
        want_dbias = want_dbias and ctx.has_bias
        dx = dweight = dbias = None
        if x.numel() == 0:
            dx = torch.zeros_like(x) if want_dx else None
            if want_dweight:
                dweight = torch.zeros(ctx.normalized_shape, dtype=x.dtype)
            if want_dbias:
                dbias = torch.zeros(ctx.normalized_shape, dtype=x.dtype)
            return dx, dweight, dbias, None, None, None
        # The gradient of y.sum() arrives expanded, with zero strides.
        dy = dy.contiguous()
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if want_dx else None
        shape = list(ctx.normalized_shape)
        if ctx.rms:
            _, dweight = _normkit.rms_norm_backward(
                _array(x), _array(dy), shape, _array(weight), ctx.stats[1], out=_array(dx),
                compute_dx=want_dx, compute_dweight=want_dweight)
        else:
            _, dweight, dbias = _normkit.layer_norm_backward(
                _array(x), _array(dy), shape, _array(weight), ctx.stats[0], ctx.stats[1],
                out=_array(dx), compute_dx=want_dx, compute_dweight=want_dweight,
                compute_dbias=want_dbias)
        return (dx,
                torch.from_numpy(dweight) if dweight is not None else None,
                torch.from_numpy(dbias) if dbias is not None else None,
                None, None, None)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by normkit: same constructor (normalized_shape, eps=1e-5,
    elementwise_affine=True), parameters ``weight`` and ``bias``, state_dict and repr.

    Output is contiguous. eps must be positive (PyTorch accepts 0); float32 and float64
    CPU tensors only; no double backward."""

    def forward(self, input):
        _check_rows_input(input, self.normalized_shape,
                          [("weight", self.weight), ("bias", self.bias)], "layer_norm")
        return _RowsNormFunction.apply(input, self.weight, self.bias, self.normalized_shape,
                                       self.eps, False)


class RMSNorm(torch.nn.Module):
    """Root-mean-square normalization, with later PyTorch's torch.nn.RMSNorm signature
    (PyTorch 1.13 has none): y = x / sqrt(mean(x**2) + eps) * weight, the mean over the
    trailing ``normalized_shape``.

    eps=None (the default, as torch.nn.RMSNorm) uses torch.finfo(input.dtype).eps;
    elementwise_affine=True gives a ``weight`` parameter of normalized_shape, initialised
    to ones; there is no bias."""

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None,
                 dtype=None):
        super().__init__()
        self.normalized_shape = _normalized_tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = torch.nn.Parameter(
                torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)

    def extra_repr(self):
        return ("{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}"
                .format(**self.__dict__))

    def forward(self, input):
        _check_rows_input(input, self.normalized_shape, [("weight", self.weight)], "rms_norm")
        eps = self.eps if self.eps is not None else torch.finfo(input.dtype).eps
        return _RowsNormFunction.apply(input, self.weight, None, self.normalized_shape, eps,
                                       True)


# ---------------------------------------------------------------------------------------
# Batch Renormalization, Ghost BN and frozen BN (normkit's bn_variants.hpp). Each module
# subclasses torch.nn.BatchNorm1d/2d/3d, so parameters, buffers and state_dict are BN's:
# a BatchNorm's state loads into any of them and back.

__all__ += [
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
    "freeze_batch_norm",
]


class _BatchRenormFunction(torch.autograd.Function):
    """Batch renormalization in training; backward with r and d constant."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, rmax,
                dmax, momentum, eps):
        memory_format = _output_format(x)
        y = torch.empty_like(x, memory_format=memory_format)
        source = _laid_out(x, y.stride(), memory_format)
        ctx.save_for_backward(x, weight)
        ctx.memory_format, ctx.strides = memory_format, y.stride()
        ctx.has_bias = bias is not None
        _, ctx.mean, ctx.invstd, ctx.r, ctx.d = _normkit.batch_renorm_forward_training(
            _array(source), _array(weight), _array(bias), _array(running_mean),
            _array(running_var), _array(num_batches_tracked), rmax, dmax, momentum, eps,
            out=_array(y))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        want_dx, want_dweight, want_dbias = ctx.needs_input_grad[:3]
        source = _laid_out(x, ctx.strides, ctx.memory_format)
        dy = _laid_out(dy, ctx.strides, ctx.memory_format)
        dx = torch.empty_like(source) if want_dx else None
        _, dweight, dbias = _normkit.batch_renorm_backward(
            _array(source), _array(dy), _array(weight), ctx.mean, ctx.invstd, ctx.r, ctx.d,
            out=_array(dx), compute_dx=want_dx)
        return (dx,
                torch.from_numpy(dweight) if weight is not None and want_dweight else None,
                torch.from_numpy(dbias) if ctx.has_bias and want_dbias else None,
                None, None, None, None, None, None, None)


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

    def forward(self, input):
        if not self.training:
            return _NormkitBatchNorm.forward(self, input)
        self._check_input_dim(input)
        _NormkitBatchNorm._check_batch_size(input)
        _check_supported(input, [("weight", self.weight), ("bias", self.bias),
                                 ("running_mean", self.running_mean),
                                 ("running_var", self.running_var),
                                 ("num_batches_tracked", self.num_batches_tracked)])
        rmax, dmax = self.limits()
        return _BatchRenormFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var,
            self.num_batches_tracked, rmax, dmax, self.momentum, self.eps)


class BatchRenorm1d(_NormkitBatchRenorm, _NormkitBatchNorm, torch.nn.BatchNorm1d):
    """Batch Renormalization for (N, C) or (N, C, L) input; see _NormkitBatchRenorm."""


class BatchRenorm2d(_NormkitBatchRenorm, _NormkitBatchNorm, torch.nn.BatchNorm2d):
    """Batch Renormalization for (N, C, H, W) input; see _NormkitBatchRenorm."""


class BatchRenorm3d(_NormkitBatchRenorm, _NormkitBatchNorm, torch.nn.BatchNorm3d):
    """Batch Renormalization for (N, C, D, H, W) input; see _NormkitBatchRenorm."""


class _GhostBatchNormFunction(torch.autograd.Function):
    """BatchNorm on each virtual batch of the input, with its own statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                virtual_batch_size, momentum, eps):
        memory_format = _output_format(x)
        y = torch.empty_like(x, memory_format=memory_format)
        source = _laid_out(x, y.stride(), memory_format)
        ctx.save_for_backward(x, weight)
        ctx.memory_format, ctx.strides = memory_format, y.stride()
        ctx.has_bias = bias is not None
        ctx.virtual_batch_size = virtual_batch_size
        _, ctx.mean, ctx.invstd = _normkit.ghost_batch_norm_forward_training(
            _array(source), virtual_batch_size, _array(weight), _array(bias),
            _array(running_mean), _array(running_var), _array(num_batches_tracked), momentum,
            eps, out=_array(y))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        want_dx, want_dweight, want_dbias = ctx.needs_input_grad[:3]
        source = _laid_out(x, ctx.strides, ctx.memory_format)
        dy = _laid_out(dy, ctx.strides, ctx.memory_format)
        dx = torch.empty_like(source) if want_dx else None
        _, dweight, dbias = _normkit.ghost_batch_norm_backward(
            _array(source), _array(dy), _array(weight), ctx.virtual_batch_size, ctx.mean,
            ctx.invstd, out=_array(dx), compute_dx=want_dx)
        return (dx,
                torch.from_numpy(dweight) if weight is not None and want_dweight else None,
                torch.from_numpy(dbias) if ctx.has_bias and want_dbias else None,
                None, None, None, None, None, None)


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

    def forward(self, input):
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return _NormkitBatchNorm.forward(self, input)
        self._check_input_dim(input)
        updating = self.training and self.track_running_stats
        running_mean = self.running_mean if updating else None
        running_var = self.running_var if updating else None
        num_batches_tracked = self.num_batches_tracked if updating else None
        _check_supported(input, [("weight", self.weight), ("bias", self.bias),
                                 ("running_mean", running_mean), ("running_var", running_var),
                                 ("num_batches_tracked", num_batches_tracked)])
        momentum = self.momentum
        if running_mean is None:
            momentum = 0.1  # unused without running statistics
        return _GhostBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, num_batches_tracked,
            self.virtual_batch_size, momentum, self.eps)


class GhostBatchNorm1d(_NormkitGhostBatchNorm, _NormkitBatchNorm, torch.nn.BatchNorm1d):
    """Ghost BatchNorm for (N, C) or (N, C, L) input; see _NormkitGhostBatchNorm."""


class GhostBatchNorm2d(_NormkitGhostBatchNorm, _NormkitBatchNorm, torch.nn.BatchNorm2d):
    """Ghost BatchNorm for (N, C, H, W) input; see _NormkitGhostBatchNorm."""


class GhostBatchNorm3d(_NormkitGhostBatchNorm, _NormkitBatchNorm, torch.nn.BatchNorm3d):
    """Ghost BatchNorm for (N, C, D, H, W) input; see _NormkitGhostBatchNorm."""


class _NormkitFrozenBatchNorm:
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

    def extra_repr(self):
        return super().extra_repr() + ", frozen"

    def forward(self, input):
        self._check_input_dim(input)
        _check_supported(input, [("weight", self.weight), ("bias", self.bias),
                                 ("running_mean", self.running_mean),
                                 ("running_var", self.running_var)])
        return _BatchNormFunction.apply(input, self.weight, self.bias, self.running_mean,
                                        self.running_var, None, False, 0.1, self.eps)


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
        running_mean, running_var, num_batches_tracked, use_batch_stats, momentum = \
            _batch_norm_arguments(self, input, [("residual", residual)])
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
