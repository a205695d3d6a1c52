"""What every normkit.torch module shares: the supported-tensor check, NumPy views of
tensor memory, and the memory format of outputs."""
import torch

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


def _check_values_per_channel(size):
    # Same condition, type and message as torch.nn.functional.batch_norm and group_norm in
    # training, checked before anything changes: size is the input's size (batch norm) or
    # the (N·C/G, G, *spatial) view group_norm normalizes.
    values_per_channel = size[0]
    for extent in size[2:]:
        values_per_channel *= extent
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}")


def _check_supported(op, input, tensors):
    """Raises RuntimeError unless `input` is a dense CPU float32/float64 tensor and every
    (name, tensor) pair is None or a CPU tensor of the input's dtype (int64 for
    num_batches_tracked). op names the operation in the message."""
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
        expected = torch.int64 if name == "num_batches_tracked" else input.dtype
        if tensor.dtype != expected:
            raise RuntimeError(
                f"normkit.torch: {name} has dtype {tensor.dtype}, expected {expected} "
                f"(the input's)")
