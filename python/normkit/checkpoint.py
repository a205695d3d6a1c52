"""Reading the engine's checkpoints (``.nkc``, written by ``normkit train``) in Python.

    ckpt = normkit.load_checkpoint("runs/bn/checkpoint.nkc")
    ckpt.state["1.running_mean"]            # NumPy arrays, shaped as PyTorch shapes them
    model = ckpt.torch_model()              # the same network from torch.nn modules, eval mode
    logits = model(torch.from_numpy(ckpt.standardize(x)))   # x: raw inputs, (N, C, H, W) or (N, F)

The file layout is documented in include/normkit/engine/checkpoint.hpp; this module
reads it directly (no C++ needed) and checks it as the engine does: magic, version,
every length against the bytes left, the CRC-32. A bad file is a RuntimeError naming it.

Layers map to torch.nn as the engine defines them: linear → Linear, conv → Conv2d,
maxpool/avgpool → MaxPool2d/AvgPool2d, relu/sigmoid/tanh/dropout/flatten → their modules,
batchnorm, batchrenorm and ghostbatchnorm → BatchNorm1d/2d (the three infer alike; frozen
BN is BatchNorm in eval mode), layernorm → LayerNorm over all of a sample's features,
groupnorm → GroupNorm, instancenorm → InstanceNorm2d, and a residual block → Residual
(relu(body(x) + shortcut(x))). State names are the engine's ("3.weight",
"5.body.1.running_var"), which are also the torch model's state_dict keys.
"""
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"\x89NKCKPT\n"
VERSIONS = (1, 2)  # 2 appends the position within an epoch, which is not needed here

__all__ = ["Checkpoint", "load_checkpoint", "parse_spec", "torch_module"]


class _Reader:
    def __init__(self, data, source):
        self.data, self.at, self.source = data, 0, source

    def take(self, size, what):
        if size > len(self.data) - self.at:
            raise RuntimeError(f"checkpoint '{self.source}': corrupted: {what} needs {size} bytes, "
                               f"only {len(self.data) - self.at} remain")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def unpack(self, fmt, what):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def bytes(self, what):
        return self.take(self.unpack("Q", what), what)

    def string(self, what):
        return self.bytes(what).decode("utf-8")

    def floats(self, what):
        count = self.unpack("Q", what)
        return np.frombuffer(self.take(4 * count, what), dtype="<f4").astype(np.float32)


@dataclass
class Layer:
    """One statement of a model spec: type, positional args, key=value options and, for a
    residual block, its body and shortcut."""
    type: str
    args: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    body: list = field(default_factory=list)
    shortcut: list = field(default_factory=list)


def parse_spec(text):
    """(input_shape, layers) of a model spec's text (ModelSpec::parse's grammar, which the
    engine has already checked for checkpoints; see docs/model-spec.md)."""
    input_shape, top = None, []
    stack = [(top, None)]  # (the list statements go to, the open block)
    for statement in text.replace("\n", ";").split(";"):
        words = statement.split("#")[0].split()
        if not words:
            continue
        kind = words[0].lower()
        layer = Layer(kind, [w for w in words[1:] if "=" not in w],
                      dict(w.split("=", 1) for w in words[1:] if "=" in w))
        if kind == "input":
            input_shape = [int(float(a)) for a in layer.args]
        elif kind == "shortcut":
            stack[-1] = (stack[-1][1].shortcut, stack[-1][1])
        elif kind == "end":
            stack.pop()
        else:
            stack[-1][0].append(layer)
            if kind == "residual":
                stack.append((layer.body, layer))
    if input_shape is None or len(stack) != 1:
        raise ValueError(f"not a complete model spec: {text!r}")
    return input_shape, top


def _option(layer, key, default):
    return float(layer.options.get(key, default))


def torch_module(layers, input_shape):
    """torch.nn modules for `layers` on samples of `input_shape` (without N): a Sequential
    whose state_dict keys are the engine's state names. Returns (module, output shape)."""
    import torch

    class Residual(torch.nn.Module):
        """relu(body(x) + shortcut(x)); an empty shortcut is the identity."""

        def __init__(self, body, shortcut):
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x):
            return torch.relu(self.body(x) + self.shortcut(x))

    nn = torch.nn
    shape = list(input_shape)
    modules = []
    for layer in layers:
        kind, args = layer.type, layer.args
        if kind == "linear":
            modules.append(nn.Linear(shape[0], int(args[0]), bias=_option(layer, "bias", 1) != 0))
            shape = [int(args[0])]
        elif kind == "conv":
            out, k = int(args[0]), int(args[1])
            stride, pad = int(_option(layer, "stride", 1)), int(_option(layer, "pad", 0))
            modules.append(nn.Conv2d(shape[0], out, k, stride=stride, padding=pad,
                                     bias=_option(layer, "bias", 1) != 0))
            shape = [out, (shape[1] + 2 * pad - k) // stride + 1, (shape[2] + 2 * pad - k) // stride + 1]
        elif kind in ("maxpool", "avgpool"):
            k = int(args[0])
            stride = int(_option(layer, "stride", k))
            modules.append((nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d)(k, stride=stride))
            shape = [shape[0], (shape[1] - k) // stride + 1, (shape[2] - k) // stride + 1]
        elif kind in ("relu", "sigmoid", "tanh"):
            modules.append({"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[kind]())
        elif kind == "dropout":
            modules.append(nn.Dropout(float(args[0])))
        elif kind == "flatten":
            modules.append(nn.Flatten())
            shape = [int(np.prod(shape))]
        elif kind in ("batchnorm", "batchrenorm", "ghostbatchnorm"):
            module = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
            modules.append(module(shape[0], eps=_option(layer, "eps", 1e-5),
                                  momentum=_option(layer, "momentum", 0.1)))
        elif kind == "layernorm":
            modules.append(nn.LayerNorm(shape, eps=_option(layer, "eps", 1e-5)))
        elif kind == "groupnorm":
            channels = shape[0]
            default = min(32, channels) if channels % min(32, channels) == 0 else None
            groups = int(_option(layer, "groups", default))
            modules.append(nn.GroupNorm(groups, channels, eps=_option(layer, "eps", 1e-5),
                                        affine=_option(layer, "affine", 1) != 0))
        elif kind == "instancenorm":
            modules.append(nn.InstanceNorm2d(
                shape[0], eps=_option(layer, "eps", 1e-5), momentum=_option(layer, "momentum", 0.1),
                affine=_option(layer, "affine", 1) != 0,
                track_running_stats=_option(layer, "track_running_stats", 0) != 0))
        elif kind == "residual":
            body, body_shape = torch_module(layer.body, shape)
            shortcut, _ = torch_module(layer.shortcut, shape)
            modules.append(Residual(body, shortcut))
            shape = body_shape
        else:
            raise ValueError(f"no torch module for the engine's layer type '{kind}'")
    return nn.Sequential(*modules), shape


@dataclass
class Checkpoint:
    """A checkpoint's contents. `state` maps the engine's names to float32 NumPy arrays in
    the shapes PyTorch gives the same parameters and buffers (Linear weights (out, in), Conv2d
    OIHW, per-channel vectors, num_batches_tracked a scalar)."""
    path: str
    spec: str
    input_shape: list
    layers: list
    memory_format: str                  # "nchw" or "nhwc": how the engine stored activations
    state: dict
    standardizer: object                # a normkit.Standardizer, or None when not fitted
    optimizer: dict                     # name, options, steps (its state arrays are not kept)
    epochs_done: int
    seed: int
    batch_size: int
    application: dict                   # the CLI's run description (options, history, ...)

    @property
    def class_names(self):
        """The names of the classes when the data named them (else None)."""
        return self.application.get("classes") or None

    def standardize(self, x):
        """x (N, *input_shape) as the run's inputs: standardized per feature as in training."""
        x = np.asarray(x, dtype=np.float32)
        if self.standardizer is None:
            return x
        flat = x.reshape(x.shape[0], -1)
        return self.standardizer.transform(flat).reshape(x.shape)

    def torch_model(self):
        """The network from torch.nn modules, holding the checkpoint's state, in eval mode."""
        model, _ = torch_module(self.layers, self.input_shape)
        model.load_state_dict(self.state_dict())
        return model.eval()

    def state_dict(self):
        """The state as torch tensors under the engine's names, for the model torch_model()
        builds (strict: every name and shape is checked)."""
        import torch
        model, _ = torch_module(self.layers, self.input_shape)
        expected = model.state_dict()
        if set(expected) != set(self.state):
            missing, extra = set(expected) - set(self.state), set(self.state) - set(expected)
            raise RuntimeError(f"checkpoint '{self.path}': its state does not match the spec's model "
                               f"(missing {sorted(missing)}, unexpected {sorted(extra)})")
        out = {}
        for name, reference in expected.items():
            values = self.state[name]
            if values.size != reference.numel():
                raise RuntimeError(f"checkpoint '{self.path}': '{name}' has {values.size} values, "
                                   f"the model's has {reference.numel()}")
            out[name] = torch.from_numpy(values.reshape(tuple(reference.shape)).copy()).to(reference.dtype)
        return out


def _standardizer(data, source):
    if not data:
        return None
    from . import Standardizer
    s = Standardizer.__new__(Standardizer)
    try:
        s.__setstate__((True, data))
    except RuntimeError as e:
        raise RuntimeError(f"checkpoint '{source}': {e}") from None
    return s


def _shaped(state, layers, input_shape, prefix=""):
    """Reshapes the flat arrays of `state` (in place) to PyTorch's shapes, by walking the spec."""
    shape = list(input_shape)
    for index, layer in enumerate(layers):
        name = f"{prefix}{index}."
        kind, args = layer.type, layer.args
        if kind == "linear":
            state[name + "weight"] = state[name + "weight"].reshape(int(args[0]), shape[0])
            shape = [int(args[0])]
        elif kind == "conv":
            out, k = int(args[0]), int(args[1])
            state[name + "weight"] = state[name + "weight"].reshape(out, shape[0], k, k)
            stride, pad = int(_option(layer, "stride", 1)), int(_option(layer, "pad", 0))
            shape = [out, (shape[1] + 2 * pad - k) // stride + 1, (shape[2] + 2 * pad - k) // stride + 1]
        elif kind in ("maxpool", "avgpool"):
            k = int(args[0])
            stride = int(_option(layer, "stride", k))
            shape = [shape[0], (shape[1] - k) // stride + 1, (shape[2] - k) // stride + 1]
        elif kind == "flatten":
            shape = [int(np.prod(shape))]
        elif kind == "layernorm":
            for part in ("weight", "bias"):
                state[name + part] = state[name + part].reshape(shape)
        elif kind == "residual":
            body_shape = _shaped(state, layer.body, shape, name + "body.")
            _shaped(state, layer.shortcut, shape, name + "shortcut.")
            shape = body_shape
        if name + "num_batches_tracked" in state:
            state[name + "num_batches_tracked"] = state[name + "num_batches_tracked"].reshape(())
    return shape


def load_checkpoint(path):
    """Reads a `.nkc` file written by the engine (`normkit train`, `normkit fold`)."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RuntimeError(f"checkpoint '{source}': cannot read it ({e.strerror})") from None
    if not data:
        raise RuntimeError(f"checkpoint '{source}': empty file (0 bytes)")
    if data[:len(MAGIC)] != MAGIC[:len(data)]:
        raise RuntimeError(f"checkpoint '{source}': not a normkit checkpoint (wrong magic number)")
    header = len(MAGIC) + 12
    if len(data) < header + 4:
        raise RuntimeError(f"checkpoint '{source}': truncated: {len(data)} bytes, shorter than a header")
    version, size = struct.unpack_from("<IQ", data, len(MAGIC))
    if version not in VERSIONS:
        raise RuntimeError(f"checkpoint '{source}': unsupported checkpoint version {version}")
    if size != len(data) - header - 4:
        raise RuntimeError(f"checkpoint '{source}': truncated or corrupted: the header announces "
                           f"{size} bytes of content, the file holds {len(data) - header - 4}")
    (stored,) = struct.unpack_from("<I", data, header + size)
    if zlib.crc32(data[:header + size]) != stored:
        raise RuntimeError(f"checkpoint '{source}': checksum mismatch: the file is corrupted")

    r = _Reader(data[header:header + size], source)
    spec = r.string("model spec")
    input_shape, layers = parse_spec(spec)
    memory_format = "nhwc" if r.unpack("I", "memory format") == 1 else "nchw"
    standardizer = _standardizer(r.bytes("standardizer"), source)
    state = {}
    for _ in range(r.unpack("Q", "state array count")):
        name = r.string("state array name")
        state[name] = r.floats("state array")
    optimizer = {"name": r.string("optimizer name"), "options": {}}
    for _ in range(r.unpack("Q", "optimizer option count")):
        key = r.string("optimizer option")
        optimizer["options"][key] = r.unpack("d", "optimizer option")
    optimizer["steps"] = r.unpack("q", "optimizer steps")
    for _ in range(r.unpack("Q", "optimizer arrays")):
        r.floats("optimizer array")
    epochs, seed, batch = r.unpack("q", "epochs"), r.unpack("Q", "seed"), r.unpack("q", "batch size")
    application = r.string("application")
    _shaped(state, layers, input_shape)
    return Checkpoint(path=source, spec=spec, input_shape=input_shape, layers=layers,
                      memory_format=memory_format, state=state, standardizer=standardizer,
                      optimizer=optimizer, epochs_done=epochs, seed=seed, batch_size=batch,
                      application=json.loads(application) if application else {})
