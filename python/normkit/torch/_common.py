"""What every normkit.torch module shares: the extension library with normkit's ops
(torch.ops.normkit), torch's input checks as TorchScript functions, and the ONNX export
of the ops through torch's own symbolic functions.

The modules' forward methods pick arguments from the module's state and call one
function of their family, which checks the input and calls the op. Those functions are
``torch.fx.wrap``-ed by their module (so that ``torch.fx.symbolic_trace`` records one
call instead of tracing into Python control flow on the input's shape) and are
TorchScript (so that ``torch.jit.script`` compiles them); the ops run normkit's kernels
and their gradients in C++.
"""
import glob
import os
from typing import List

import torch

_LIBRARY = glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "libnormkit_torch*.so"))
if len(_LIBRARY) != 1:
    raise ImportError(f"normkit.torch: expected one libnormkit_torch*.so next to the normkit "
                      f"package, found {_LIBRARY or 'none'}")
torch.ops.load_library(_LIBRARY[0])


def _tracing() -> bool:
    # Under torch.jit.trace sizes are traced values: a Python check on them would warn and
    # be frozen into the trace. The ops check the same conditions (with their own words).
    return torch.jit.is_tracing()


def _check_rank(input: torch.Tensor, low: int, high: int) -> None:
    # torch.nn's _check_input_dim: the same type and message.
    if input.dim() < low or input.dim() > high:
        expected = f"{low}D" if low == high else f"{low}D or {high}D"
        raise ValueError(f"expected {expected} input (got {input.dim()}D input)")


def _check_values_per_channel(size: List[int]) -> None:
    # Same condition, type and message as torch.nn.functional.batch_norm and group_norm in
    # training, checked before anything changes: size is the input's size (batch norm) or
    # the (N·C/G, G, *spatial) view group_norm normalizes.
    if _tracing():
        return
    values_per_channel = size[0]
    for extent in size[2:]:
        values_per_channel *= extent
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}")


# ---------------------------------------------------------------------------------------
# ONNX export: each op exports as torch exports the module it replaces, by calling torch's
# own symbolic function for the export's opset (BatchNormalization; LayerNormalization
# at opset 17, its decomposition before; GroupNorm and InstanceNorm as torch does).

def _torch_symbolic(name):
    """torch's ONNX symbolic function for `name` ("aten::batch_norm") at the opset
    being exported."""
    from torch.onnx._globals import GLOBALS
    from torch.onnx._internal import registration
    return registration.registry.get_function_group(name).get(GLOBALS.export_onnx_opset_version)


def _onnx_float(g_value, default):
    """A float argument of an op as a Python number (None: `default`; for momentum, the
    cumulative average, which moves no statistics in an exported graph: 0)."""
    from torch.onnx import symbolic_helper
    if symbolic_helper._is_none(g_value):
        return default
    return symbolic_helper._maybe_get_const(g_value, "f")


def _register_onnx(op, symbolic, opset=9):
    """Exports normkit::`op` with `symbolic` from `opset` on."""
    torch.onnx.register_custom_op_symbolic(f"normkit::{op}", symbolic, opset)
