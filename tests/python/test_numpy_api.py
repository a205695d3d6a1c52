"""The functional NumPy API against the float64 formulas in _support: every layout, both
dtypes, strided arrays without copies, out=, running statistics and their conventions,
mergeable moments, thread-count independence."""
import threading

import numpy as np
import pytest

import normkit
from _support import (assert_exact, backward_reference, channel_shape, forward_reference,
                      reduced_axes, running_reference)

# (layout, shape in that layout's axis order, channel axis)
LAYOUTS = [
    ("NC", (64, 8), 1),
    ("NC", (5, 33), 1),
    ("NCL", (8, 6, 10), 1),
    ("NLC", (8, 10, 6), 2),
    ("NCHW", (4, 5, 6, 7), 1),
    ("NCHW", (4, 1, 6, 7), 1),
    ("NHWC", (4, 6, 7, 5), 3),
    ("NHWC", (3, 5, 7, 17), 3),
    ("NCHW", (8, 16, 28, 28), 1),
    ("NCDHW", (2, 4, 3, 5, 6), 1),
    ("NDHWC", (2, 3, 5, 6, 4), 4),
]
DTYPES = [np.float32, np.float64]
DEFAULT_LAYOUT = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}


def layout_id(case):
    layout, shape, _ = case
    return f"{layout}-{'x'.join(map(str, shape))}"


def make_input(shape, channel_axis, dtype, rng, loc=None, spread=None):
    """Channels with different means and spreads (or the given ones)."""
    channels = shape[channel_axis]
    per_channel = channel_shape(len(shape), channel_axis, channels)
    loc = rng.uniform(-3, 3, channels) if loc is None else np.full(channels, loc)
    spread = rng.uniform(0.5, 2, channels) if spread is None else np.full(channels, spread)
    x = rng.standard_normal(shape) * spread.reshape(per_channel) + loc.reshape(per_channel)
    return x.astype(dtype)


def parameters(channels, dtype, rng):
    return (rng.uniform(0.5, 1.5, channels).astype(dtype),
            rng.uniform(-1, 1, channels).astype(dtype))


def check_forward(x, y, save_mean, save_invstd, weight, bias, eps, channel_axis, dtype):
    y_exact, mean, invstd, _, scale = forward_reference(x, weight, bias, eps, channel_axis)
    assert_exact(y, y_exact, scale, dtype, "y")
    axes = reduced_axes(x.ndim, channel_axis)
    assert_exact(save_mean, mean, np.abs(x.astype(np.float64)).max(axis=axes), dtype, "save_mean")
    assert_exact(save_invstd, invstd, invstd, dtype, "save_invstd")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", LAYOUTS, ids=layout_id)
def test_forward_training(case, dtype, rng):
    layout, shape, channel_axis = case
    channels = shape[channel_axis]
    x = make_input(shape, channel_axis, dtype, rng)
    weight, bias = parameters(channels, dtype, rng)
    running_mean = rng.uniform(-1, 1, channels).astype(dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(dtype)
    old_mean, old_var = running_mean.copy(), running_var.copy()
    batches = np.array(7, dtype=np.int64)

    y, save_mean, save_invstd = normkit.batch_norm_forward_training(
        x, weight, bias, running_mean, running_var, batches, 0.1, 1e-5, layout=layout)

    check_forward(x, y, save_mean, save_invstd, weight, bias, 1e-5, channel_axis, dtype)
    _, mean, _, unbiased, _ = forward_reference(x, None, None, 1e-5, channel_axis)
    expected_mean, expected_var = running_reference(old_mean, old_var, mean, unbiased, 0.1)
    assert_exact(running_mean, expected_mean, 0.9 * np.abs(old_mean) + 0.1 * np.abs(mean), dtype)
    assert_exact(running_var, expected_var, expected_var, dtype)
    assert int(batches) == 8
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("loc, spread", [(1e4, 1.0), (1e6, 1.0), (-3e5, 0.01)])
@pytest.mark.parametrize("case", [LAYOUTS[4], LAYOUTS[6], LAYOUTS[1]], ids=layout_id)
def test_forward_training_large_means(case, loc, spread, rng):
    # Channels whose mean dwarfs their spread: float32 has few digits left for x - mean.
    # PyTorch 1.13's float32 output is off by 6e-4 (mean 1e4) to 0.3 (mean -3e5, spread
    # 0.01) of its scale here; normkit's must stay exact to float rounding.
    layout, shape, channel_axis = case
    x = make_input(shape, channel_axis, np.float32, rng, loc=loc, spread=spread)
    y, save_mean, save_invstd = normkit.batch_norm_forward_training(x, layout=layout)
    check_forward(x, y, save_mean, save_invstd, None, None, 1e-5, channel_axis, np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", LAYOUTS, ids=layout_id)
def test_forward_inference(case, dtype, rng):
    layout, shape, channel_axis = case
    channels = shape[channel_axis]
    x = make_input(shape, channel_axis, dtype, rng)
    weight, bias = parameters(channels, dtype, rng)
    running_mean = rng.uniform(-1, 1, channels).astype(dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(dtype)

    y = normkit.batch_norm_forward_inference(x, weight, bias, running_mean, running_var, 1e-3,
                                             layout=layout)

    per_channel = channel_shape(x.ndim, channel_axis, channels)
    invstd = 1 / np.sqrt(running_var.astype(np.float64) + 1e-3)
    scaled = ((x.astype(np.float64) - running_mean.reshape(per_channel))
              * (invstd * weight).reshape(per_channel))
    expected = scaled + bias.reshape(per_channel)
    assert_exact(y, expected, np.abs(scaled).max() + np.abs(bias).max(), dtype, "y")


@pytest.mark.parametrize("mode", ["training", "frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", LAYOUTS, ids=layout_id)
def test_backward(case, dtype, mode, rng):
    layout, shape, channel_axis = case
    channels = shape[channel_axis]
    x = make_input(shape, channel_axis, dtype, rng)
    dy = rng.standard_normal(shape).astype(dtype)
    weight, _ = parameters(channels, dtype, rng)
    if mode == "training":
        _, mean, invstd = normkit.batch_norm_forward_training(x, layout=layout)
    else:
        mean = rng.uniform(-1, 1, channels).astype(dtype)
        invstd = normkit.batch_norm_invstd(rng.uniform(0.5, 2, channels).astype(dtype), 1e-5)

    dx, dweight, dbias = normkit.batch_norm_backward(x, dy, weight, mean, invstd, mode=mode,
                                                     layout=layout)

    # The formula with the statistics the kernel was given, as PyTorch's backward uses them.
    dx_exact, dgamma, dbeta, scales = backward_reference(x, dy, weight, mean, invstd, mode,
                                                         channel_axis)
    assert_exact(dx, dx_exact, scales["dx"], dtype, "dx")
    assert_exact(dweight, dgamma, scales["dgamma"], dtype, "dweight")
    assert_exact(dbias, dbeta, scales["dbeta"], dtype, "dbias")

    # Only dγ and dβ: the same values, and no dx.
    none, dweight2, dbias2 = normkit.batch_norm_backward(x, dy, weight, mean, invstd, mode=mode,
                                                         layout=layout, compute_dx=False)
    assert none is None
    np.testing.assert_array_equal(dweight2, dweight)
    np.testing.assert_array_equal(dbias2, dbias)


def test_default_layout_is_channels_first_by_rank(rng):
    for ndim, layout in DEFAULT_LAYOUT.items():
        x = make_input((3, 4, 5, 6, 7)[:ndim], 1, np.float32, rng)
        implicit = normkit.batch_norm_forward_training(x)
        explicit = normkit.batch_norm_forward_training(x, layout=layout.lower())
        for a, b in zip(implicit, explicit):
            np.testing.assert_array_equal(a, b)


def test_no_weight_no_bias_is_identity_affine(rng):
    x = make_input((6, 4, 5), 1, np.float32, rng)
    plain, _, _ = normkit.batch_norm_forward_training(x)
    ones = np.ones(4, np.float32)
    affine, _, _ = normkit.batch_norm_forward_training(x, ones, np.zeros(4, np.float32))
    np.testing.assert_array_equal(plain, affine)
    dx, _, _ = normkit.batch_norm_backward(x, x, None, *normkit.batch_norm_forward_training(x)[1:])
    dx_ones, _, _ = normkit.batch_norm_backward(x, x, ones, *normkit.batch_norm_forward_training(x)[1:])
    np.testing.assert_array_equal(dx, dx_ones)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_cumulative_moving_average(dtype, rng):
    # momentum=None: the running mean is the plain average of the batch means.
    running_mean, running_var = np.zeros(3, dtype), np.ones(3, dtype)
    batches = np.zeros(1, np.int64)
    means, variances = [], []
    for _ in range(4):
        x = make_input((10, 3), 1, dtype, rng)
        normkit.batch_norm_forward_training(x, None, None, running_mean, running_var, batches,
                                            momentum=None)
        _, mean, _, unbiased, _ = forward_reference(x, None, None, 1e-5)
        means.append(mean)
        variances.append(unbiased)
    assert batches[0] == 4
    assert_exact(running_mean, np.mean(means, axis=0), np.abs(means).max(axis=0), dtype)
    assert_exact(running_var, np.mean(variances, axis=0), np.max(variances, axis=0), dtype)


def test_keras_conventions(rng):
    options = normkit.keras_options()
    assert options == {"eps": 1e-3, "momentum": 0.99, "momentum_convention": "weight_on_old",
                       "running_variance": "biased"}
    assert normkit.pytorch_options() == {"eps": 1e-5, "momentum": 0.1,
                                         "momentum_convention": "weight_on_new",
                                         "running_variance": "unbiased"}
    x = make_input((16, 5), 1, np.float64, rng)
    moving_mean, moving_var = rng.uniform(-1, 1, 5), rng.uniform(0.5, 2, 5)
    old_mean, old_var = moving_mean.copy(), moving_var.copy()
    y, _, _ = normkit.batch_norm_forward_training(x, None, None, moving_mean, moving_var, **options)
    y_exact, mean, _, _, scale = forward_reference(x, None, None, 1e-3)
    biased = x.var(axis=0)
    assert_exact(y, y_exact, scale, np.float64)
    # Keras: moving = momentum·moving + (1 - momentum)·batch, with the biased variance.
    assert_exact(moving_mean, 0.99 * old_mean + 0.01 * mean, np.abs(old_mean) + np.abs(mean), np.float64)
    assert_exact(moving_var, 0.99 * old_var + 0.01 * biased, old_var + biased, np.float64)


# ----------------------------------------------------------------------------------------
# Strides: arrays are used where they are.

def test_channels_last_memory_seen_as_nchw(rng):
    # NHWC memory with NCHW axis order (what a PyTorch channels_last tensor is).
    nhwc = make_input((4, 6, 7, 5), 3, np.float32, rng)
    x = nhwc.transpose(0, 3, 1, 2)
    assert not x.flags.c_contiguous
    y, save_mean, save_invstd = normkit.batch_norm_forward_training(x)
    check_forward(x, y, save_mean, save_invstd, None, None, 1e-5, 1, np.float32)
    assert y.strides == x.strides, "the output keeps the input's memory order"


@pytest.mark.parametrize("view", ["batch_slice", "channel_slice", "nhwc_batch_slice",
                                  "rows_in_c_order_out"])
def test_strided_views(view, rng):
    base = make_input((8, 6, 5, 4), 1, np.float32, rng)
    out = None
    if view == "batch_slice":
        x = base[::2]
    elif view == "channel_slice":
        x = base[:, ::2]
    elif view == "nhwc_batch_slice":
        x = np.ascontiguousarray(base.transpose(0, 2, 3, 1))[::2].transpose(0, 3, 1, 2)
    else:
        x = np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        out = np.empty(x.shape, np.float32)
    y, save_mean, save_invstd = normkit.batch_norm_forward_training(x, out=out)
    check_forward(x, y, save_mean, save_invstd, None, None, 1e-5, 1, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dweight, dbias = normkit.batch_norm_backward(x, dy, None, save_mean, save_invstd, out=out)
    dx_exact, dgamma, dbeta, scales = backward_reference(x, dy, None, save_mean, save_invstd,
                                                         "training")
    assert_exact(dx, dx_exact, scales["dx"], np.float32, "dx")
    assert_exact(dweight, dgamma, scales["dgamma"], np.float32, "dweight")


def test_in_place(rng):
    x = make_input((4, 6, 7, 5), 3, np.float32, rng).transpose(0, 3, 1, 2)
    original = x.copy()
    y, save_mean, save_invstd = normkit.batch_norm_forward_training(x, out=x)
    assert y is x
    check_forward(original, x, save_mean, save_invstd, None, None, 1e-5, 1, np.float32)


def test_gradient_with_zero_strides(rng):
    # np.broadcast_to gives a read-only array with zero strides, like the gradient of a sum.
    x = make_input((4, 3, 5), 1, np.float64, rng)
    dy = np.broadcast_to(np.float64(2.0), x.shape)
    _, mean, invstd = normkit.batch_norm_forward_training(x)
    dx, dweight, dbias = normkit.batch_norm_backward(x, dy, None, mean, invstd)
    dx_exact, dgamma, dbeta, scales = backward_reference(x, dy, None, mean, invstd, "training")
    assert_exact(dx, dx_exact, scales["dx"], np.float64, "dx")
    assert_exact(dbias, dbeta, scales["dbeta"], np.float64, "dbias")


def test_misaligned_input_is_copied(rng):
    # Strides that are not whole elements cannot be a TensorView: the one case of a copy.
    x = make_input((6, 3, 4), 1, np.float32, rng)
    raw = np.zeros(x.nbytes + 1, np.uint8)
    misaligned = raw[1:].view(np.float32).reshape(x.shape)
    misaligned[...] = x
    assert not misaligned.flags.aligned
    y, save_mean, save_invstd = normkit.batch_norm_forward_training(misaligned)
    check_forward(x, y, save_mean, save_invstd, None, None, 1e-5, 1, np.float32)


def test_lists_are_converted(rng):
    x = make_input((5, 3), 1, np.float64, rng)
    y, _, _ = normkit.batch_norm_forward_training(x.tolist(), [1.0, 2.0, 3.0], [0, 0, 0])
    expected, _, _ = normkit.batch_norm_forward_training(x, np.array([1.0, 2.0, 3.0]))
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, expected)


def test_out_arrays_are_filled_and_returned(rng):
    x = make_input((4, 3, 5), 1, np.float32, rng)
    out = np.full(x.shape, np.nan, np.float32)
    y, save_mean, save_invstd = normkit.batch_norm_forward_training(x, out=out)
    assert y is out
    check_forward(x, out, save_mean, save_invstd, None, None, 1e-5, 1, np.float32)
    out2 = np.empty_like(x)
    assert normkit.batch_norm_forward_inference(x, None, None, save_mean, save_invstd, out=out2) is out2
    dx_out = np.empty_like(x)
    dx, _, _ = normkit.batch_norm_backward(x, x, None, save_mean, save_invstd, out=dx_out)
    assert dx is dx_out


# ----------------------------------------------------------------------------------------
# Mergeable statistics: the pieces of a data-parallel batch norm.

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_moments_merge_update_apply(dtype, rng):
    x = make_input((12, 5, 6, 6), 1, dtype, rng)
    whole = normkit.batch_norm_moments(x)
    assert whole.dtype == normkit.moments_dtype
    _, mean, _, _, _ = forward_reference(x, None, None, 1e-5)
    centered = x.astype(np.float64) - mean.reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(whole["count"], np.full(5, 12 * 36.0))
    # The moments are doubles, but of float32 data they are accumulated in float32 lanes
    # (within cache-sized pieces): float32 rounding of their terms.
    assert_exact(whole["mean"].astype(dtype), mean, np.abs(x).max(axis=(0, 2, 3)), dtype, "mean")
    assert_exact(whole["m2"].astype(dtype), (centered ** 2).sum(axis=(0, 2, 3)),
                 (centered ** 2).sum(axis=(0, 2, 3)), dtype, "m2")

    # Two "processes" with 5 and 7 samples.
    merged = normkit.merge_moments(normkit.batch_norm_moments(x[:5]),
                                   normkit.batch_norm_moments(x[5:]))
    np.testing.assert_array_equal(merged["count"], whole["count"])
    assert_exact(merged["mean"].astype(dtype), whole["mean"], np.abs(x).max(axis=(0, 2, 3)), dtype)
    assert_exact(merged["m2"].astype(dtype), whole["m2"], whole["m2"], dtype)

    # Running statistics and outputs from merged moments equal forward-training's.
    running = [np.zeros(5, dtype), np.ones(5, dtype)]
    running_ref = [np.zeros(5, dtype), np.ones(5, dtype)]
    batches, batches_ref = np.zeros((), np.int64), np.zeros((), np.int64)
    normkit.batch_norm_update_running(merged, running[0], running[1], batches)
    y_ref, save_mean, save_invstd = normkit.batch_norm_forward_training(
        x, None, None, running_ref[0], running_ref[1], batches_ref)
    assert int(batches) == int(batches_ref) == 1
    for a, b in zip(running, running_ref):
        assert_exact(a, b.astype(np.float64), np.abs(b), dtype)
    invstd = normkit.batch_norm_invstd((merged["m2"] / merged["count"]).astype(dtype), 1e-5)
    y = normkit.batch_norm_forward_apply(x, None, None, merged["mean"].astype(dtype), invstd)
    _, _, _, _, scale = forward_reference(x, None, None, 1e-5)
    assert_exact(y, y_ref.astype(np.float64), scale, dtype)


# ----------------------------------------------------------------------------------------
# Threads.

def test_results_do_not_depend_on_the_thread_count(rng):
    x = make_input((16, 8, 20, 20), 1, np.float32, rng)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        normkit.set_num_threads(threads)
        assert normkit.num_threads() == threads
        run = []
        for data in (x, x_nhwc):
            y, mean, invstd = normkit.batch_norm_forward_training(data)
            run += [y, mean, invstd, *normkit.batch_norm_backward(data, dy, None, mean, invstd)]
        results.append(run)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_concurrent_calls_from_python_threads(rng):
    # The GIL is released around the kernels; calls from several threads must not interfere.
    inputs = [make_input((8, 4, 16, 16), 1, np.float32, rng) for _ in range(6)]
    expected = [normkit.batch_norm_forward_training(x)[0] for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = normkit.batch_norm_forward_training(inputs[i])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for a, b in zip(results, expected):
        np.testing.assert_array_equal(a, b)


def test_version():
    major, minor, patch = normkit.__version__.split(".")
    assert all(part.isdigit() for part in (major, minor, patch))
