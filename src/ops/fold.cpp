// Folding BN into the layer before it (formula in include/normkit/fold.hpp).
// Folding is done once per model, offline, so this is the plain double loop:
// there is no fast path to hold it against, and nothing to gain from one.
#include "normkit/fold.hpp"

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "core/check.hpp"

namespace normkit {

using detail::fail_invalid;

namespace {

template <class T>
void check_finite(std::span<const T> values, const char* name) {
  for (size_t i = 0; i < values.size(); ++i)
    if (!std::isfinite(values[i]))
      fail_invalid(name, ": value ", i, " is ", values[i], " (NaN or infinite)");
}

template <class T>
void check_optional_channels(std::span<const T> values, size_t channels, const char* name) {
  if (!values.empty() && values.size() != channels)
    fail_invalid(name, " should contain ", channels, " elements (one per output channel) not ",
                 values.size());
}

// Whether two spans share any byte; std::less gives pointers of different
// arrays a total order, which the built-in < does not promise.
template <class A, class B>
bool overlap(std::span<A> a, std::span<B> b) {
  if (a.empty() || b.empty()) return false;
  const auto* a_begin = reinterpret_cast<const char*>(a.data());
  const auto* a_end = reinterpret_cast<const char*>(a.data() + a.size());
  const auto* b_begin = reinterpret_cast<const char*>(b.data());
  const auto* b_end = reinterpret_cast<const char*>(b.data() + b.size());
  const std::less<const char*> less;
  return less(a_begin, b_end) && less(b_begin, a_end);
}

template <class A, class B>
bool same_span(std::span<A> a, std::span<B> b) {
  return static_cast<const void*>(a.data()) == static_cast<const void*>(b.data()) &&
         a.size() == b.size();
}

// An output may be its own input (in place), and must not touch anything else.
template <class T>
void check_no_overlap(std::span<T> out, const char* out_name, std::span<const T> own_input,
                      std::initializer_list<std::pair<std::span<const T>, const char*>> others) {
  if (overlap(out, own_input) && !same_span(out, own_input))
    fail_invalid(out_name, ": overlaps its input without being the same array (only exact "
                 "in-place use is supported)");
  for (const auto& [other, name] : others)
    if (overlap(out, other)) fail_invalid(out_name, ": overlaps ", name);
}

template <class T>
bool fits(double value) {
  return std::isfinite(value) && std::abs(value) <= static_cast<double>(std::numeric_limits<T>::max());
}

}  // namespace

template <class T>
void fold_batch_norm(std::span<const T> weight, std::span<const T> bias,
                     std::span<const T> gamma, std::span<const T> beta,
                     std::span<const T> running_mean, std::span<const T> running_var, double eps,
                     std::span<T> folded_weight, std::span<T> folded_bias) {
  // ---- sizes
  const size_t channels = running_mean.size();
  if (channels == 0) fail_invalid("running_mean: empty (one value per output channel is needed)");
  if (running_var.size() != channels)
    fail_invalid("running_var should contain ", channels, " elements (one per output channel) not ",
                 running_var.size());
  check_optional_channels(gamma, channels, "gamma");
  check_optional_channels(beta, channels, "beta");
  check_optional_channels(bias, channels, "bias");
  if (weight.empty() || weight.size() % channels != 0)
    fail_invalid("weight: ", weight.size(), " values are not ", channels,
                 " output channels (the size of running_mean) of equal size");
  if (folded_weight.size() != weight.size())
    fail_invalid("folded_weight should contain ", weight.size(), " elements (as weight) not ",
                 folded_weight.size());
  if (folded_bias.size() != channels)
    fail_invalid("folded_bias should contain ", channels, " elements (one per output channel) not ",
                 folded_bias.size());
  if (!(eps > 0) || !std::isfinite(eps)) fail_invalid("eps must be positive and finite, got ", eps);
  check_no_overlap<T>(folded_weight, "folded_weight", weight,
                      {{bias, "bias"}, {gamma, "gamma"}, {beta, "beta"},
                       {running_mean, "running_mean"}, {running_var, "running_var"},
                       {std::span<const T>(folded_bias), "folded_bias"}});
  check_no_overlap<T>(folded_bias, "folded_bias", bias,
                      {{weight, "weight"}, {gamma, "gamma"}, {beta, "beta"},
                       {running_mean, "running_mean"}, {running_var, "running_var"}});

  // ---- values
  check_finite(weight, "weight");
  check_finite(bias, "bias");
  check_finite(gamma, "gamma");
  check_finite(beta, "beta");
  check_finite(running_mean, "running_mean");
  check_finite(running_var, "running_var");
  const size_t rest = weight.size() / channels;
  std::vector<double> scale(channels), shift(channels);
  for (size_t c = 0; c < channels; ++c) {
    const double var_eps = static_cast<double>(running_var[c]) + eps;
    if (!(var_eps > 0))
      fail_invalid("running_var: channel ", c, ": running_var + eps = ", var_eps,
                   " is not positive");
    const double g = gamma.empty() ? 1.0 : static_cast<double>(gamma[c]);
    const double b = bias.empty() ? 0.0 : static_cast<double>(bias[c]);
    const double be = beta.empty() ? 0.0 : static_cast<double>(beta[c]);
    scale[c] = g / std::sqrt(var_eps);
    shift[c] = (b - static_cast<double>(running_mean[c])) * scale[c] + be;
    if (!fits<T>(scale[c]) || !fits<T>(shift[c]))
      fail_invalid("channel ", c, ": the folded scale ", scale[c], " or bias ", shift[c],
                   " is not representable (gamma ", g, ", running_var ", running_var[c], ")");
    for (size_t i = 0; i < rest; ++i)
      if (!fits<T>(static_cast<double>(weight[c * rest + i]) * scale[c]))
        fail_invalid("channel ", c, ": folded weight ", i, " overflows (weight ",
                     weight[c * rest + i], " times scale ", scale[c], ")");
  }

  // ---- write: each output value depends only on the input value at the same
  // index (and per-channel constants), so exact in-place use is safe.
  for (size_t c = 0; c < channels; ++c) {
    for (size_t i = 0; i < rest; ++i)
      folded_weight[c * rest + i] = static_cast<T>(static_cast<double>(weight[c * rest + i]) * scale[c]);
    folded_bias[c] = static_cast<T>(shift[c]);
  }
}

template void fold_batch_norm<float>(std::span<const float>, std::span<const float>,
                                     std::span<const float>, std::span<const float>,
                                     std::span<const float>, std::span<const float>, double,
                                     std::span<float>, std::span<float>);
template void fold_batch_norm<double>(std::span<const double>, std::span<const double>,
                                      std::span<const double>, std::span<const double>,
                                      std::span<const double>, std::span<const double>, double,
                                      std::span<double>, std::span<double>);

}  // namespace normkit
