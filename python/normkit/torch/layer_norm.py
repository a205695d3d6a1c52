"""LayerNorm (torch.nn's module) and RMSNorm (later torch's signature) over the trailing
dimensions, with normkit's forward and gradients (the ops normkit::layer_norm and
normkit::rms_norm). torch.nn.functional.layer_norm's shape check and message are the
ops' own."""
import torch

from ._common import _onnx_float, _register_onnx, _torch_symbolic

__all__ = ["LayerNorm", "RMSNorm"]


def _normalized_tuple(normalized_shape):
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by normkit: same constructor (normalized_shape, eps=1e-5,
    elementwise_affine=True), parameters ``weight`` and ``bias``, state_dict and repr.

    Output is contiguous. eps must be positive (PyTorch accepts 0)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.normkit.layer_norm(input, list(self.normalized_shape), self.weight,
                                            self.bias, self.eps)


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

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # eps=None: the op takes the machine epsilon of the input's dtype.
        return torch.ops.normkit.rms_norm(input, list(self.normalized_shape), self.weight,
                                          self.eps)


def _layer_norm_onnx(g, input, normalized_shape, weight, bias, eps):
    from torch.onnx import _type_utils, symbolic_helper
    from torch.onnx._globals import GLOBALS
    if GLOBALS.export_onnx_opset_version >= 17 and symbolic_helper._is_none(weight):
        # LayerNormalization needs a scale; torch's own symbolic would pass none.
        shape = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
        dtype = _type_utils.JitScalarType.from_name(input.type().scalarType()).dtype()
        weight = g.op("Constant", value_t=torch.ones(shape, dtype=dtype))
    return _torch_symbolic("aten::layer_norm")(g, input, normalized_shape, weight, bias, eps,
                                               False)


def _rms_norm_onnx(g, input, normalized_shape, weight, eps):
    # No ONNX operator before opset 23: y = x / sqrt(mean(x², trailing axes) + eps) · weight.
    from torch.onnx import _type_utils, symbolic_helper, symbolic_opset9 as opset9
    shape = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    dtype = _type_utils.JitScalarType.from_name(input.type().scalarType())
    epsilon = _onnx_float(eps, None)
    if epsilon is None:
        epsilon = torch.finfo(dtype.dtype()).eps
    axes = list(range(-len(shape), 0))
    square = g.op("Mul", input, input)
    mean = g.op("ReduceMean", square, axes_i=axes)
    rms = g.op("Sqrt", opset9.add(g, mean, g.op("Constant", value_t=torch.tensor(
        epsilon, dtype=dtype.dtype()))))
    y = g.op("Div", input, rms)
    if not symbolic_helper._is_none(weight):
        y = g.op("Mul", y, weight)
    return y


_register_onnx("layer_norm", _layer_norm_onnx)
_register_onnx("rms_norm", _rms_norm_onnx)
