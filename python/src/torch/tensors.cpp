// The tensor-to-view adapter's functions (tensors.hpp).
#include "tensors.hpp"

namespace normkit::torch_ops {

namespace {

// torch's name of a dtype, as Python prints it ("torch.float32").
std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    default: return std::string("torch.") + c10::toString(type);
  }
}

bool supported_dtype(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kBFloat16;
}

}  // namespace

void check_input(const char* op, const Tensor& x, int64_t min_rank) {
  TORCH_CHECK(x.layout() == at::kStrided && x.device().is_cpu(), "normkit.torch: ", op,
              " runs on dense CPU tensors, got ", x.layout(), " on ", x.device());
  TORCH_CHECK(supported_dtype(x.scalar_type()), "normkit.torch: ", op,
              " supports float32 and float64 input (and bfloat16, computed in float32), got ",
              dtype_name(x.scalar_type()));
  TORCH_CHECK(x.dim() >= min_rank, "normkit.torch: ", op, " expects an input of at least ",
              min_rank, " dimensions, got shape ", x.sizes());
}

void check_parameter(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device().is_cpu(), "normkit.torch: ", op, ": ", name, " is on ", t.device(),
              ", input on cpu");
  const bool mixed = x.scalar_type() == at::kBFloat16 && t.scalar_type() == at::kFloat;
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || mixed, "normkit.torch: ", op, ": ", name,
              " has dtype ", dtype_name(t.scalar_type()), ", expected ",
              dtype_name(x.scalar_type()), " (the input's)");
}

void check_counter(const Tensor& t) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.numel() == 1,
              "normkit.torch: num_batches_tracked must be one int64 value on the CPU, got ",
              dtype_name(t.scalar_type()), " of shape ", t.sizes(), " on ", t.device());
}

void check_like_x(const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided, "normkit.torch: ", name,
              " must be a dense CPU tensor");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "normkit.torch: ", name, " has dtype ",
              dtype_name(t.scalar_type()), ", the input ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "normkit.torch: ", name, " has shape ", t.sizes(),
                    ", the input ", x.sizes(), " (no broadcasting)");
}

at::MemoryFormat output_format(const Tensor& x) {
  // PyTorch's batch_norm returns channels_last output for channels_last input and
  // contiguous output otherwise, however x's other strides are permuted; code after a
  // normalization may rely on that (e.g. .view() on the output).
  if (!x.is_contiguous()) {
    if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
      return at::MemoryFormat::ChannelsLast;
    if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
      return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

Tensor laid_out(const Tensor& t, at::IntArrayRef strides, at::MemoryFormat format) {
  bool same = true;
  for (int64_t axis = 0; axis < t.dim() && same; ++axis)
    same = t.size(axis) <= 1 || t.stride(axis) == strides[axis];
  return same ? t : t.contiguous(format);
}

at::ScalarType compute_type(const Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? at::kFloat : x.scalar_type();
}

Tensor computed(const Tensor& t, at::ScalarType type) {
  if (!t.defined() || t.scalar_type() == type) return t;
  return t.to(type);
}

Layout layout_of_rank(int64_t rank) {
  switch (rank) {
    case 2: return Layout::NC;
    case 3: return Layout::NCL;
    case 4: return Layout::NCHW;
    case 5: return Layout::NCDHW;
    default:
      TORCH_CHECK(false, "normkit.torch: expected 2 to 5 dimensions, got ", rank);
  }
}

Tensor channel_values(const Tensor& t, at::ScalarType type) {
  if (!t.defined()) return t;
  return computed(t, type).contiguous();
}

InPlace::InPlace(const Tensor& t, at::ScalarType type) : buffer(t) {
  if (!t.defined()) return;
  work = t.scalar_type() == type && t.is_contiguous() ? t : t.to(type).contiguous();
}

void InPlace::finish() const {
  if (work.defined() && !work.is_same(buffer)) buffer.copy_(work);
}

Running::Running(const OptionalTensor& mean_buffer, const OptionalTensor& var_buffer,
                 const OptionalTensor& counter, at::ScalarType type)
    : mean(value_or_undefined(mean_buffer), type),
      var(value_or_undefined(var_buffer), type),
      num_batches_tracked(value_or_undefined(counter)) {}

void Running::finish() const {
  mean.finish();
  var.finish();
}

void Running::count_empty_batch() const {
  if (num_batches_tracked.defined()) num_batches_tracked.add_(1);
}

BatchNormOptions torch_options(c10::optional<double> momentum, double eps) {
  BatchNormOptions options;
  options.eps = eps;
  options.momentum = momentum ? std::optional<double>(*momentum) : std::nullopt;
  return options;
}

std::vector<int64_t> all_but_channels(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t axis = 2; axis < x.dim(); ++axis) dims.push_back(axis);
  return dims;
}

Tensor per_channel(const Tensor& values, const Tensor& x) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[1] = x.size(1);
  return values.reshape(shape);
}

}  // namespace normkit::torch_ops
