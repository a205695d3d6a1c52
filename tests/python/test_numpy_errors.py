"""Errors of the functional NumPy API: the exception type, a message that names the
argument, and no state changed — running statistics, the batch counter and out= arrays
are exactly as they were after any error."""
import numpy as np
import pytest

import normkit


class State:
    """A forward-training call's arguments, with copies to check that nothing changed."""

    def __init__(self, rng, dtype=np.float32):
        self.x = rng.standard_normal((8, 3, 4, 4)).astype(dtype)
        self.running_mean = rng.uniform(-1, 1, 3).astype(dtype)
        self.running_var = rng.uniform(0.5, 2, 3).astype(dtype)
        self.batches = np.array(5, np.int64)
        self.out = np.full(self.x.shape, 7, dtype)
        self.before = [a.copy() for a in self.arrays()]

    def arrays(self):
        return [self.running_mean, self.running_var, self.batches, self.out]

    def call(self, **overrides):
        arguments = dict(x=self.x, weight=None, bias=None, running_mean=self.running_mean,
                         running_var=self.running_var, num_batches_tracked=self.batches,
                         out=self.out)
        arguments.update(overrides)
        return normkit.batch_norm_forward_training(**arguments)

    def assert_unchanged(self, out_too=True):
        for now, before in list(zip(self.arrays(), self.before))[:None if out_too else -1]:
            np.testing.assert_array_equal(now, before)


@pytest.fixture
def state(rng):
    return State(rng)


def read_only(array):
    array.flags.writeable = False
    return array


# (arguments changed, exception, message pattern)
FORWARD_TRAINING_ERRORS = {
    "unknown_layout": (dict(layout="NHCW"), ValueError, r"layout: unsupported layout 'NHCW'"),
    "layout_of_other_rank": (dict(layout="NLC"), ValueError, r"layout NLC needs 3 dimensions"),
    "one_dimension": (dict(x=np.ones(6, np.float32), out=None), ValueError,
                      r"x: expected 2 to 5 dimensions"),
    "weight_size": (dict(weight=np.ones(4, np.float32)), ValueError,
                    r"weight \(gamma\) should contain 3 elements \(one per channel\) not 4"),
    "bias_size": (dict(bias=np.ones(2, np.float32)), ValueError, r"bias \(beta\) should contain 3"),
    "weight_2d": (dict(weight=np.ones((3, 1), np.float32)), ValueError, r"weight: expected a 1-D"),
    "running_mean_size": (dict(running_mean=np.zeros(4, np.float32)), ValueError,
                          r"running_mean should contain 3 elements"),
    "running_var_alone": (dict(running_mean=None), ValueError,
                          r"running_mean and running_var must be given together"),
    "eps_zero": (dict(eps=0.0), ValueError, r"eps must be positive and finite, got 0"),
    "eps_negative": (dict(eps=-1e-5), ValueError, r"eps must be positive"),
    "eps_nan": (dict(eps=float("nan")), ValueError, r"eps must be positive"),
    "eps_inf": (dict(eps=float("inf")), ValueError, r"eps must be positive"),
    "momentum_negative": (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\], got -0.1"),
    "momentum_above_one": (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    "momentum_nan": (dict(momentum=float("nan")), ValueError, r"momentum must be in \[0, 1\]"),
    "cumulative_without_counter": (dict(momentum=None, num_batches_tracked=None), ValueError,
                                   r"needs num_batches_tracked"),
    "momentum_convention": (dict(momentum_convention="keras"), ValueError,
                            r"momentum_convention: expected 'weight_on_new'"),
    "running_variance": (dict(running_variance="sample"), ValueError,
                         r"running_variance: expected 'unbiased'"),
    "empty_batch": (dict(x=np.ones((0, 3, 4, 4), np.float32), out=None), ValueError,
                    r"x: empty tensor \[0, 3, 4, 4\]"),
    "one_value_per_channel": (dict(x=np.ones((1, 3, 1, 1), np.float32), out=None), ValueError,
                              r"expected more than 1 value per channel when training, got input "
                              r"size \[1, 3, 1, 1\]"),
    "nan_in_batch": (dict(x=np.full((8, 3, 4, 4), np.nan, np.float32)), RuntimeError,
                     r"x: channel 0 contains NaN or infinite values; running statistics left "
                     r"unchanged"),
    "infinity_in_batch": (dict(x=np.full((8, 3, 4, 4), np.inf, np.float32)), RuntimeError,
                          r"contains NaN or infinite values"),
    "negative_strides": (dict(x=np.ones((8, 3, 4, 4), np.float32)[:, ::-1]), ValueError,
                         r"x: negative strides are not supported"),
    "strides_that_do_not_collapse": (dict(x=np.ones((8, 3, 4, 6), np.float32)[..., :4]),
                                     ValueError, r"x: the strides of .* pass a contiguous tensor"),
    "integer_x": (dict(x=np.ones((8, 3, 4, 4), np.int64)), TypeError,
                  r"x: expected float32 or float64 data, got int64"),
    "float16_x": (dict(x=np.ones((8, 3, 4, 4), np.float16)), TypeError,
                  r"x: expected float32 or float64 data, got float16"),
    "running_mean_dtype": (dict(running_mean=np.zeros(3, np.float64)), TypeError,
                           r"running_mean: dtype float64 does not match x's float32"),
    "running_mean_list": (dict(running_mean=[0.0, 0.0, 0.0]), TypeError,
                          r"running_mean: expected a numpy.ndarray \(it is updated in place\)"),
    "running_var_read_only": (dict(running_var=read_only(np.ones(3, np.float32))), ValueError,
                              r"running_var: array is read-only"),
    "running_var_strided": (dict(running_var=np.ones(6, np.float32)[::2]), ValueError,
                            r"running_var: array must be contiguous"),
    "counter_dtype": (dict(num_batches_tracked=np.zeros((), np.int32)), TypeError,
                      r"num_batches_tracked: expected dtype int64, got int32"),
    "counter_size": (dict(num_batches_tracked=np.zeros(2, np.int64)), ValueError,
                     r"num_batches_tracked: expected one value"),
    "out_dtype": (dict(out=np.empty((8, 3, 4, 4), np.float64)), TypeError,
                  r"out: dtype float64 does not match x's float32"),
    "out_shape": (dict(out=np.empty((8, 3, 4, 5), np.float32)), ValueError,
                  r"out: shape \(8, 3, 4, 5\) does not match x's shape \(8, 3, 4, 4\)"),
    "out_read_only": (dict(out=np.broadcast_to(np.float32(0), (8, 3, 4, 4))), ValueError,
                      r"out: array is read-only"),
    "out_not_an_array": (dict(out=[0.0]), TypeError, r"out: expected a numpy.ndarray, got list"),
    # A writable view whose elements share memory: every output would land in one place.
    "out_overlaps_itself": (dict(out=np.lib.stride_tricks.as_strided(
        np.zeros(48, np.float32), (8, 3, 4, 4), (0, 64, 16, 4), writeable=True)), ValueError,
        r"out: array overlaps itself \(strides \(0, 64, 16, 4\)"),
    "out_strides_smaller_than_rows": (dict(out=np.lib.stride_tricks.as_strided(
        np.zeros(400, np.float32), (8, 3, 4, 4), (48, 16, 8, 4), writeable=True)), ValueError,
        r"out: array overlaps itself"),
    # The same array as both running statistics, or one inside another argument.
    "running_stats_one_array": ("running_var=running_mean", ValueError,
                                r"running_mean: shares memory with running_var"),
    "running_mean_inside_x": ("running_mean=x[0, 0, 0, :3]", ValueError,
                              r"running_mean: shares memory with x"),
    "running_var_inside_out": ("running_var=out[0, 0, 0, :3]", ValueError,
                               r"running_var: shares memory with out"),
    "running_var_is_weight": ("weight=running_var", ValueError,
                              r"running_var: shares memory with weight"),
}


def aliasing(state, spec):
    """The overrides of 'argument=expression': the expression over the state's arrays."""
    name, expression = spec.split("=")
    base, _, index = expression.partition("[")
    array = getattr(state, base)
    return {name: eval("array[" + index) if index else array}  # noqa: S307 (test data)


@pytest.mark.parametrize("name", list(FORWARD_TRAINING_ERRORS))
def test_forward_training_errors_change_nothing(name, state):
    overrides, exception, pattern = FORWARD_TRAINING_ERRORS[name]
    if isinstance(overrides, str):
        overrides = aliasing(state, overrides)
    with pytest.raises(exception, match=pattern):
        state.call(**overrides)
    # NaN or infinity shows in the batch statistics, which the kernel computes in the same
    # call that writes y: out= then holds that call's values. Everything else is unchanged.
    state.assert_unchanged(out_too=exception is not RuntimeError)


def test_exception_types_are_distinct(state):
    # Invalid arguments and bad data are told apart by type, not only by message.
    with pytest.raises(ValueError) as invalid:
        state.call(eps=0.0)
    assert not isinstance(invalid.value, RuntimeError)
    with pytest.raises(RuntimeError) as runtime:
        state.call(x=np.full((8, 3, 4, 4), np.nan, np.float32))
    assert not isinstance(runtime.value, ValueError)


def test_out_overlapping_x_is_refused(state):
    buffer = np.zeros((9, 3, 4, 4), np.float32)
    buffer[:8] = state.x
    with pytest.raises(ValueError, match=r"out: overlaps x"):
        state.call(x=buffer[:8], out=buffer[1:])
    state.before[-1] = buffer[1:].copy()  # out is now the buffer slice: still untouched
    state.out = buffer[1:]
    state.assert_unchanged()


def test_in_place_with_other_strides_is_refused(rng):
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    before = x.copy()
    with pytest.raises(ValueError):
        normkit.batch_norm_forward_training(x, out=x.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(x, before)


def test_forward_inference_errors(rng):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"running_mean is required"):
        normkit.batch_norm_forward_inference(x, running_var=var)
    with pytest.raises(ValueError, match=r"eps must be positive"):
        normkit.batch_norm_forward_inference(x, None, None, mean, var, eps=0.0)
    with pytest.raises(ValueError, match=r"running_var should contain 3 elements"):
        normkit.batch_norm_forward_inference(x, None, None, mean, np.ones(2, np.float32))
    with pytest.raises(ValueError, match=r"running_var\[1\] \+ eps must be positive"):
        normkit.batch_norm_forward_inference(x, None, None, mean, np.array([1, -1, 1], np.float32))
    # One value per channel is fine with running statistics.
    normkit.batch_norm_forward_inference(x[:1], None, None, mean, var)


def test_backward_errors(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    _, mean, invstd = normkit.batch_norm_forward_training(x)
    dy = np.ones_like(x)
    with pytest.raises(ValueError, match=r"mode: expected 'training' or 'frozen', got 'eval'"):
        normkit.batch_norm_backward(x, dy, None, mean, invstd, mode="eval")
    with pytest.raises(ValueError, match=r"dy: shape \(4, 3, 4\) does not match x's shape"):
        normkit.batch_norm_backward(x, dy[..., :4], None, mean, invstd)
    with pytest.raises(TypeError, match=r"dy: dtype float64 does not match x's float32"):
        normkit.batch_norm_backward(x, dy.astype(np.float64), None, mean, invstd)
    with pytest.raises(ValueError, match=r"invstd is required"):
        normkit.batch_norm_backward(x, dy, None, mean, None)
    with pytest.raises(ValueError, match=r"mean should contain 3 elements"):
        normkit.batch_norm_backward(x, dy, None, mean[:2], invstd)
    with pytest.raises(ValueError, match=r"out: given, but compute_dx is False"):
        normkit.batch_norm_backward(x, dy, None, mean, invstd, out=np.empty_like(x),
                                    compute_dx=False)
    one = x[:1, :, :1]
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        normkit.batch_norm_backward(one, one, None, mean, invstd)
    # Frozen statistics do not need a batch.
    normkit.batch_norm_backward(one, one, None, mean, invstd, mode="frozen")


def test_other_function_errors(rng):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"set_num_threads: n must be >= 1, got 0"):
        normkit.set_num_threads(0)
    with pytest.raises(ValueError, match=r"var\[0\] \+ eps must be positive"):
        normkit.batch_norm_invstd(np.array([-1.0, 1.0]), 1e-5)
    with pytest.raises(ValueError, match=r"mean is required"):
        normkit.batch_norm_forward_apply(x, None, None, None, np.ones(3, np.float32))
    moments = normkit.batch_norm_moments(x)
    with pytest.raises(ValueError, match=r"merge_moments: a has 3 channels, b has 2"):
        normkit.merge_moments(moments, moments[:2])
    with pytest.raises(TypeError, match=r"moments: expected an array of normkit.moments_dtype"):
        normkit.batch_norm_update_running(np.zeros(3))


def test_update_running_errors_change_nothing(rng):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    batches = np.zeros((), np.int64)
    one_sample = normkit.batch_norm_moments(x[:1])
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        normkit.batch_norm_update_running(one_sample, running_mean, running_var, batches)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        normkit.batch_norm_update_running(normkit.batch_norm_moments(x), running_mean,
                                          running_var, batches, momentum=2.0)
    np.testing.assert_array_equal(running_mean, np.zeros(3))
    np.testing.assert_array_equal(running_var, np.ones(3))
    assert int(batches) == 0


def test_relu_mask_bytes_refuses_negative_sizes_and_never_overflows():
    assert [normkit.relu_mask_bytes(n) for n in (0, 1, 8, 9)] == [0, 1, 1, 2]
    assert normkit.relu_mask_bytes(2**63 - 1) == 2**60
    with pytest.raises(ValueError, match=r"relu_mask_bytes: numel must be >= 0, got -5"):
        normkit.relu_mask_bytes(-5)
    with pytest.raises(TypeError):
        normkit.relu_mask_bytes(2**63)


def test_every_function_with_running_statistics_refuses_aliases(rng):
    x = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    stats = np.zeros(4, np.float32)
    calls = {
        "batch_norm_forward_training": lambda: normkit.batch_norm_forward_training(
            x, running_mean=stats, running_var=stats),
        "batch_norm_relu_forward_training": lambda: normkit.batch_norm_relu_forward_training(
            x, running_mean=stats, running_var=stats),
        "batch_renorm_forward_training": lambda: normkit.batch_renorm_forward_training(
            x, running_mean=stats, running_var=stats),
        "ghost_batch_norm_forward_training": lambda: normkit.ghost_batch_norm_forward_training(
            x, 4, running_mean=stats, running_var=stats),
        "instance_norm_forward_training": lambda: normkit.instance_norm_forward_training(
            x, running_mean=stats, running_var=stats),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"running_mean: shares memory with running_var"):
            call()
        np.testing.assert_array_equal(stats, 0, err_msg=name)
