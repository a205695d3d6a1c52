"""LayerNorm (torch.nn's module) and RMSNorm (later torch's signature) over the trailing
dimensions, with normkit's forward and gradients."""
import torch

from .. import _normkit
from ._common import _array, _check_supported

__all__ = ["LayerNorm", "RMSNorm"]


def _normalized_tuple(normalized_shape):
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def _check_rows_input(input, normalized_shape, tensors, op):
    _check_supported(op, input, tensors)
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != normalized_shape:
        # torch.nn.functional.layer_norm's message and type.
        raise RuntimeError(
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(str(n) for n in normalized_shape)}], but got input of size"
            f"{input.size()}")


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


