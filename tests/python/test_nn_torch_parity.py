"""The training engine against PyTorch 1.13: the same small models, the same weights and
batch, forward in train mode, cross-entropy, backward and SGD steps (momentum, weight
decay), then eval mode. Compared: logits, loss, every parameter gradient, the parameters
and BN running statistics after the steps, and the eval-mode logits after them, in both
memory formats.

The engine runs in the C++ helper `nn_parity_helper` (tests/cpp/nn_parity_helper.cpp;
ctest passes its path in NORMKIT_NN_PARITY_HELPER). Both directions use records
"NAME COUNT\\n" followed by COUNT little-endian float32 values ("spec": COUNT bytes of text).

Tolerance. Unlike the BN kernels (exact to float rounding), a network's outputs carry
the rounding of every layer before them, and PyTorch computes its convolutions and matrix
products with other algorithms (oneDNN/MKL-DNN, other summation orders) than normkit's
im2col + sgemm: differences of a few 1e-6 relative to a tensor's largest value are
rounding, not disagreement. So each tensor is held to |ours - torch| <= RTOL · max|torch|
with RTOL = 1e-4 (gradients after two BN layers amplify rounding the most); a wrong
formula (a missing term, a transposed weight, a wrong momentum or variance convention)
shows up at 1e-2 or more (a learning rate off by 0.1% already fails). The largest
differences measured are about 2e-5 (a conv bias gradient after BN and average pooling).
NN_PARITY_VERBOSE=1 (with pytest -s) prints each comparison's error relative to its scale.
"""
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normkit.checkpoint import parse_spec, torch_module

RTOL = 1e-4

MODELS = {
    # The small model: conv-BN-relu-maxpool-flatten-linear-BN-relu-linear.
    "small-cnn": "input 3 10 10; conv 8 3 pad=1 bias=0; batchnorm; relu; maxpool 2; flatten; "
                 "linear 16 bias=0; batchnorm; relu; linear 5",
    # Strides, padding 0, biases, average pooling, tanh and BN after the activation.
    "strided-cnn": "input 2 9 9; conv 6 3 stride=2 bias=1; tanh; batchnorm momentum=0.2; "
                   "avgpool 2 stride=1; conv 4 2 pad=1; relu; flatten; linear 7; sigmoid; "
                   "batchnorm eps=0.001; linear 3",
    # The presets, as ModelSpec::preset spells them.
    "mlp-paper": "input 1 28 28; flatten; linear 100 bias=0; batchnorm; sigmoid; "
                 "linear 100 bias=0; batchnorm; sigmoid; linear 100 bias=0; batchnorm; sigmoid; "
                 "linear 10",
    "cnn-small": "input 1 28 28; conv 32 3 pad=1 bias=0; batchnorm; relu; maxpool 2; "
                 "conv 64 3 pad=1 bias=0; batchnorm; relu; maxpool 2; flatten; "
                 "linear 128 bias=0; batchnorm; relu; linear 10",
    # Residual blocks: the fused BN+Add+ReLU tail with an identity and a projection
    # shortcut (a strided 1x1 conv and its BN), as a ResNet's basic blocks.
    "resnet-tiny": "input 3 8 8; conv 8 3 pad=1 bias=0; batchnorm; relu; "
                   "residual; conv 8 3 pad=1 bias=0; batchnorm; relu; conv 8 3 pad=1 bias=0; "
                   "batchnorm; end; "
                   "residual; conv 16 3 stride=2 pad=1 bias=0; batchnorm; relu; "
                   "conv 16 3 pad=1 bias=0; batchnorm; shortcut; conv 16 1 stride=2 bias=0; "
                   "batchnorm; end; avgpool 4; flatten; linear 5",
    # A block without BN (the sum and the ReLU unfused) on flat features.
    "residual-mlp": "input 6; linear 12; relu; residual; linear 12; tanh; linear 12; end; linear 3",
}

SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05, "nesterov": False}
STEPS = 2  # the second step uses the momentum buffer of the first


def helper_path():
    path = os.environ.get("NORMKIT_NN_PARITY_HELPER")
    if not path or not os.path.isfile(path):
        pytest.fail("NORMKIT_NN_PARITY_HELPER must name the built nn_parity_helper "
                    f"(tests/cpp/nn_parity_helper.cpp); got {path!r}. Run through ctest, or set it "
                    "to <build>/tests/cpp/nn_parity_helper.")
    return path


# ---------------------------------------------------------------------------------------
# The same model in PyTorch, layer for layer, so state names ("3.weight", "5.body.1.bias")
# coincide: normkit.checkpoint builds it from the spec, as normkit.load_checkpoint does.

def torch_model(text):
    input_shape, layers = parse_spec(text)
    model, _ = torch_module(layers, input_shape)
    return model, input_shape


def randomize(model, rng):
    """Weights at the scale of He initialization; γ, β and running statistics away from
    their defaults, so each of them is seen to be used and updated."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                field = name.rsplit(".", 1)[1]
                values = {"weight": lambda n: rng.uniform(0.5, 1.5, n),
                          "bias": lambda n: rng.normal(0, 0.2, n),
                          "running_mean": lambda n: rng.normal(0, 0.3, n),
                          "running_var": lambda n: rng.uniform(0.5, 2.0, n),
                          "num_batches_tracked": lambda n: np.full(n, 3)}[field](tensor.numel())
            else:
                fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
                scale = np.sqrt(2.0 / fan_in) if tensor.dim() > 1 else 0.1
                values = rng.normal(0, scale, tensor.numel())
            tensor.copy_(torch.from_numpy(np.asarray(values).reshape(tensor.shape)).to(tensor.dtype))


# ---------------------------------------------------------------------------------------
# Records.

def write_records(path, spec, arrays):
    with open(path, "wb") as f:
        data = spec.encode()
        f.write(f"spec {len(data)}\n".encode() + data)
        for name, values in arrays.items():
            values = np.ascontiguousarray(np.asarray(values, dtype="<f4").ravel())
            f.write(f"{name} {values.size}\n".encode() + values.tobytes())


def read_records(path):
    out = {}
    with open(path, "rb") as f:
        while True:
            header = f.readline()
            if not header:
                return out
            name, count = header.decode().split()
            out[name] = np.frombuffer(f.read(4 * int(count)), dtype="<f4").copy()


def run_normkit(tmp_path, spec, fmt, state, x, labels, sgd):
    arrays = {"format": [1.0 if fmt == "channels_last" else 0.0],
              "sgd": [sgd["lr"], sgd["momentum"], sgd["weight_decay"], float(sgd["nesterov"])],
              "steps": [STEPS], "x_shape": list(x.shape), "x": x, "labels": labels}
    arrays.update({"state." + name: value for name, value in state.items()})
    write_records(tmp_path / "in.bin", spec, arrays)
    result = subprocess.run([helper_path(), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return read_records(tmp_path / "out.bin")


def run_torch(model, fmt, x, labels, sgd):
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.from_numpy(x)
    if x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    labels = torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    out = {}
    for step in range(STEPS):
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        out[f"step{step}.logits"] = logits.detach().numpy().copy()
        out[f"step{step}.loss"] = np.array([loss.item()], np.float32)
        for name, p in model.named_parameters():
            out[f"step{step}.grad.{name}"] = p.grad.detach().numpy().copy()
        optimizer.step()
    for name, tensor in model.state_dict().items():
        out[f"final.{name}"] = tensor.detach().numpy().astype(np.float32)
    model.eval()
    with torch.no_grad():
        out["eval.logits"] = model(x).numpy().copy()
    return out


def assert_close(ours, ref, what):
    ours = np.asarray(ours, np.float64).ravel()
    ref = np.asarray(ref, np.float64).ravel()
    assert ours.shape == ref.shape, f"{what}: {ours.shape} values, PyTorch has {ref.shape}"
    scale = np.abs(ref).max()
    error = np.abs(ours - ref)
    worst = int(np.argmax(error))
    if os.environ.get("NN_PARITY_VERBOSE"):
        print(f"{what}: {error[worst] / max(scale, 1e-30):.2e}")
    assert error[worst] <= RTOL * scale, (
        f"{what}: error {error[worst]:.3g} at {worst} (ours {ours[worst]!r}, PyTorch "
        f"{ref[worst]!r}) > {RTOL} x max|PyTorch| = {RTOL * scale:.3g}")


def check_model(name, fmt, sgd, tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)  # PyTorch's own results then do not depend on the machine
    spec = MODELS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    model, input_shape = torch_model(spec)
    randomize(model, rng)
    batch = 16 if name in ("mlp-paper", "cnn-small") else 8
    x = rng.normal(0, 1, [batch] + input_shape).astype(np.float32)
    labels = rng.integers(0, model[-1].out_features, batch).astype(np.float32)
    state = {name_: t.detach().numpy().astype(np.float32) for name_, t in model.state_dict().items()}

    ours = run_normkit(tmp_path, spec, fmt, state, x, labels, sgd)
    ref = run_torch(model, fmt, x, labels, sgd)

    assert set(ours) == set(ref), (
        f"different outputs: only ours {sorted(set(ours) - set(ref))}, "
        f"only PyTorch {sorted(set(ref) - set(ours))}")
    for key in sorted(ref):
        assert_close(ours[key], ref[key], f"{name} ({fmt}) {key}")
    # The steps did something: the comparison above is not of unchanged values.
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert ours["final." + key][0] == value.ravel()[0] + STEPS
        else:
            assert not np.array_equal(ours["final." + key], value.ravel()), key


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward_and_sgd_steps_match_torch(name, fmt, tmp_path):
    check_model(name, fmt, SGD, tmp_path)


@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_nesterov_steps_match_torch(fmt, tmp_path):
    check_model("small-cnn", fmt, SGD | {"nesterov": True, "lr": 0.05}, tmp_path)
