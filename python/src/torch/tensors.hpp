#pragma once
// The tensor-to-view adapter every op family of the PyTorch extension shares
// (libnormkit_torch, loaded by normkit.torch): the argument checks torch's users
// expect, views of tensor memory for normkit's kernels, the memory format of
// outputs, and float32 computation for bfloat16 tensors.
//
// Tensors reach the kernels as they are: a view takes the tensor's own strides,
// so contiguous and channels_last tensors are not copied. x, y, dy and dx of one
// call are given one set of strides (the output's memory format, PyTorch's rule:
// channels_last output for channels_last input, contiguous otherwise), so the
// kernels stream all of them the same way; a tensor in any other layout is
// copied to it first.
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"

namespace normkit::torch_ops {

using at::Tensor;
using OptionalTensor = c10::optional<Tensor>;

// The tensor or an undefined one (absent optional arguments).
inline Tensor value_or_undefined(const OptionalTensor& t) { return t ? *t : Tensor(); }

// Runs `call` and raises normkit::Error as torch's errors: ValueError for a bad
// argument, RuntimeError for what the data caused (NaN, infinity).
template <class Call>
decltype(auto) translating_errors(Call&& call) {
  try {
    return call();
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::invalid_argument) TORCH_CHECK_VALUE(false, e.what());
    TORCH_CHECK(false, e.what());
  }
}

// x: a dense CPU tensor of float32, float64 or bfloat16 (computed in float32) with at
// least `min_rank` dimensions. op names the operation in messages.
void check_input(const char* op, const Tensor& x, int64_t min_rank = 2);
// A per-channel (or per-column) tensor: undefined, or on the CPU with x's dtype
// (float32 also for bfloat16 x, as torch's mixed-precision batch norm takes).
void check_parameter(const char* op, const char* name, const Tensor& t, const Tensor& x);
// num_batches_tracked: undefined or one int64 value on the CPU.
void check_counter(const Tensor& t);
// A second input of x's shape (dy, a residual).
void check_like_x(const char* name, const Tensor& t, const Tensor& x);

// The memory format of x's output: channels_last (3d) for channels_last input of 4 (5)
// dimensions, contiguous otherwise.
at::MemoryFormat output_format(const Tensor& x);
// `t` itself when it has these strides (size-1 axes not compared), else a copy in `format`.
Tensor laid_out(const Tensor& t, at::IntArrayRef strides, at::MemoryFormat format);

// Computations run in float for bfloat16 data; per-channel tensors and saved
// statistics are float32 then.
at::ScalarType compute_type(const Tensor& x);
// `t` in the compute type (a copy for bfloat16 data; undefined stays undefined).
Tensor computed(const Tensor& t, at::ScalarType type);

// How the tensors of one call on x reach the kernels: in the memory format of x's
// output and in the compute type.
struct Laid {
  at::MemoryFormat format;
  at::ScalarType type;   // the compute type
  at::ScalarType dtype;  // x's
  explicit Laid(const Tensor& x)
      : format(output_format(x)), type(compute_type(x)), dtype(x.scalar_type()) {}
  // An input of x's shape (x, dy, a residual) as the kernels read it.
  Tensor operator()(const Tensor& t) const { return computed(t.contiguous(format), type); }
  // A kernel's output of x's shape in x's dtype.
  Tensor result(const Tensor& t) const { return t.scalar_type() == dtype ? t : t.to(dtype); }
};

// The layout of a rank-2..5 tensor in logical (channels-first) axis order; the
// strides say where channels really are.
Layout layout_of_rank(int64_t rank);

template <class T>
TensorView<T> view_of(const Tensor& t) {
  std::array<int64_t, kMaxRank> sizes{}, strides{};
  const auto rank = static_cast<size_t>(t.dim());
  for (size_t axis = 0; axis < rank; ++axis) {
    sizes[axis] = t.size(static_cast<int64_t>(axis));
    strides[axis] = t.stride(static_cast<int64_t>(axis));
  }
  using Element = std::remove_const_t<T>;
  return TensorView<T>::strided(static_cast<T*>(t.data_ptr<Element>()),
                                std::span<const int64_t>(sizes.data(), rank),
                                std::span<const int64_t>(strides.data(), rank),
                                layout_of_rank(t.dim()));
}

template <class T>
ConstTensorView<T> input_view(const Tensor& t) {
  return view_of<const T>(t);
}

// A contiguous tensor's values (empty for an undefined tensor: "absent").
template <class T>
std::span<const T> values_of(const Tensor& t) {
  if (!t.defined()) return {};
  return {t.data_ptr<T>(), static_cast<size_t>(t.numel())};
}
template <class T>
std::span<T> mutable_values_of(const Tensor& t) {
  if (!t.defined()) return {};
  return {t.data_ptr<T>(), static_cast<size_t>(t.numel())};
}

// Calls f(T{}) with T = float or double, the compute type of x.
template <class F>
decltype(auto) by_dtype(at::ScalarType type, F&& f) {
  if (type == at::kDouble) return f(double{});
  return f(float{});
}

// Per-channel values in the compute type, contiguous (C values, a copy only when needed).
Tensor channel_values(const Tensor& t, at::ScalarType type);

// Running statistics updated in place: the kernels write `work` (the buffer itself
// when it is a contiguous tensor of the compute type, else a copy), and finish()
// copies a copy back into the buffer.
struct InPlace {
  Tensor buffer, work;
  InPlace() = default;
  InPlace(const Tensor& t, at::ScalarType type);
  void finish() const;
};

// running_mean, running_var and num_batches_tracked of one call.
struct Running {
  InPlace mean, var;
  Tensor num_batches_tracked;
  Running(const OptionalTensor& mean, const OptionalTensor& var, const OptionalTensor& counter,
          at::ScalarType type);
  template <class T>
  RunningStats<T> stats() const {
    return {mutable_values_of<T>(mean.work), mutable_values_of<T>(var.work),
            num_batches_tracked.defined() ? num_batches_tracked.data_ptr<int64_t>() : nullptr};
  }
  void finish() const;
  // An empty batch still counts (PyTorch's behaviour).
  void count_empty_batch() const;
};

// PyTorch's conventions with `momentum` (nullopt: cumulative moving average).
BatchNormOptions torch_options(c10::optional<double> momentum, double eps);

// The statistics dimensions of an (N, C, *) tensor: every axis but C.
std::vector<int64_t> all_but_channels(const Tensor& x);
// A per-channel tensor shaped to broadcast against x: (1, C, 1, ...).
Tensor per_channel(const Tensor& values, const Tensor& x);

}  // namespace normkit::torch_ops
