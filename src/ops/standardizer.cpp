// Input standardization on the batch-normalization kernels: a feature is a
// channel of a [rows, features] table, fitting is batch_norm_moments with
// Chan's merge across calls, transforming is batch_norm_forward_apply.
#include <cmath>
#include <limits>
#include <cstring>
#include <istream>
#include <ostream>

#include "core/check.hpp"
#include "normkit/batch_norm.hpp"
#include "normkit/standardizer.hpp"

namespace normkit::data {

namespace {
constexpr char kMagic[8] = {'N', 'K', 'S', 'T', 'D', '0', '0', '1'};
}  // namespace

// Whole rows of finite values: a NaN standardized would reach training as data
// (docs/nan-and-inf.md), so it is refused here, before anything is written.
template <class T>
void Standardizer::check_rows(std::span<const T> x) const {
  if (!fitted()) detail::fail_invalid("standardizer: not fitted");
  if (x.empty() || x.size() % moments_.size() != 0)
    detail::fail_invalid("standardizer: ", x.size(), " values are not whole rows of ",
                         moments_.size(), " features");
  for (size_t i = 0; i < x.size(); ++i)
    if (!std::isfinite(x[i]))
      detail::fail_runtime("standardizer: NaN or infinity at row ", i / moments_.size(), ", feature ",
                           i % moments_.size());
}

void Standardizer::fit(std::span<const float> x, int64_t features) {
  Standardizer fresh;
  fresh.partial_fit(x, features);
  *this = std::move(fresh);
}
void Standardizer::fit(std::span<const double> x, int64_t features) {
  Standardizer fresh;
  fresh.partial_fit(x, features);
  *this = std::move(fresh);
}
void Standardizer::partial_fit(std::span<const float> x, int64_t features) { fit_rows(x, features); }
void Standardizer::partial_fit(std::span<const double> x, int64_t features) { fit_rows(x, features); }

template <class T>
void Standardizer::fit_rows(std::span<const T> x, int64_t features) {
  if (features < 1) detail::fail_invalid("standardizer: features must be >= 1, got ", features);
  if (fitted() && features != this->features())
    detail::fail_invalid("standardizer: fitted on ", this->features(), " features, got ", features);
  if (x.empty() || x.size() % static_cast<size_t>(features) != 0)
    detail::fail_invalid("standardizer: ", x.size(), " values are not whole rows of ", features,
                         " features");
  std::vector<Moments> batch(features);
  const auto view = TensorView<const T>::contiguous(
      x.data(), {static_cast<int64_t>(x.size()) / features, features}, Layout::NC);
  batch_norm_moments<T>(view, batch);
  for (int64_t f = 0; f < features; ++f)
    if (!std::isfinite(batch[f].mean) || !std::isfinite(batch[f].m2))
      detail::fail_runtime("standardizer: feature ", f, " contains NaN or infinite values");
  if (!fitted()) {
    moments_ = std::move(batch);
    return;
  }
  for (int64_t f = 0; f < features; ++f) moments_[f].merge(batch[f]);
}

template <class T>
std::vector<T> Standardizer::mean() const {
  std::vector<T> out;
  for (const auto& m : moments_) out.push_back(static_cast<T>(m.mean));
  return out;
}

template <class T>
std::vector<T> Standardizer::scale() const {
  std::vector<T> out;
  for (const auto& m : moments_) {
    // Zero in T, not only in double: a deviation of 3e-159 is 0 as a float, and
    // would divide by 0 there.
    const auto sd = static_cast<T>(std::sqrt(m.biased_variance()));
    out.push_back(sd > 0 ? sd : T{1});
  }
  return out;
}

template <class T>
std::vector<T> Standardizer::variance() const {
  std::vector<T> out;
  for (const auto& m : moments_) out.push_back(static_cast<T>(m.biased_variance()));
  return out;
}

template std::vector<float> Standardizer::mean<float>() const;
template std::vector<double> Standardizer::mean<double>() const;
template std::vector<float> Standardizer::scale<float>() const;
template std::vector<double> Standardizer::scale<double>() const;
template std::vector<float> Standardizer::variance<float>() const;
template std::vector<double> Standardizer::variance<double>() const;

// Every feature of a row is counted together, so any feature's count is the row count.
int64_t Standardizer::samples_seen() const noexcept {
  return moments_.empty() ? 0 : static_cast<int64_t>(moments_.front().count);
}

// transform: the apply kernel with the statistics (1/scale as invstd);
// inverse: x·scale + mean, the kernel with zero mean, unit invstd, γ = scale, β = mean.
template <class T>
void Standardizer::apply(std::span<T> x, bool inverse) const {
  check_rows(std::span<const T>(x));
  const auto view = TensorView<T>::contiguous(
      x.data(), {static_cast<int64_t>(x.size()) / features(), features()}, Layout::NC);
  const std::vector<T> m = mean<T>(), s = scale<T>();
  if (inverse) {
    const std::vector<T> zero(s.size(), T{0}), one(s.size(), T{1});
    batch_norm_forward_apply<T>(view, view, s, m, zero, one);
    return;
  }
  std::vector<T> inv(s.size());
  for (size_t f = 0; f < s.size(); ++f) inv[f] = T{1} / s[f];
  batch_norm_forward_apply<T>(view, view, {}, {}, m, inv);
}

void Standardizer::transform(std::span<float> x) const { apply(x, false); }
void Standardizer::transform(std::span<double> x) const { apply(x, false); }
void Standardizer::inverse_transform(std::span<float> x) const { apply(x, true); }
void Standardizer::inverse_transform(std::span<double> x) const { apply(x, true); }

void Standardizer::save(std::ostream& out) const {
  const uint64_t n = moments_.size();
  out.write(kMagic, sizeof kMagic);
  out.write(reinterpret_cast<const char*>(&n), sizeof n);
  for (const auto& m : moments_) {
    const double values[3] = {m.count, m.mean, m.m2};
    out.write(reinterpret_cast<const char*>(values), sizeof values);
  }
}

Standardizer Standardizer::load(std::istream& in) {
  char magic[sizeof kMagic];
  uint64_t n = 0;
  if (!in.read(magic, sizeof magic) || std::memcmp(magic, kMagic, sizeof kMagic) != 0)
    detail::fail_runtime("standardizer: not a saved standardizer (bad magic)");
  if (!in.read(reinterpret_cast<char*>(&n), sizeof n) || n == 0 || n > (uint64_t{1} << 26))
    detail::fail_runtime("standardizer: bad feature count");
  // Grows as values arrive: a corrupt count cannot make it allocate up front.
  std::vector<Moments> moments;
  for (uint64_t f = 0; f < n; ++f) {
    double values[3];
    if (!in.read(reinterpret_cast<char*>(values), sizeof values))
      detail::fail_runtime("standardizer: truncated");
    moments.push_back({values[0], values[1], values[2]});
  }
  return from_moments(std::move(moments));
}

Standardizer Standardizer::from_moments(std::vector<Moments> moments) {
  for (size_t f = 0; f < moments.size(); ++f) {
    const auto& m = moments[f];
    // A count is a number of rows: a whole number from 1 to 2^53 (a tiny one,
    // 1e-231, made the variance m2/count overflow).
    const bool count_ok = m.count >= 1 && m.count <= 9007199254740992.0 && m.count == std::floor(m.count);
    if (!count_ok || !std::isfinite(m.mean) || !std::isfinite(m.m2) || m.m2 < 0 ||
        !std::isfinite(m.biased_variance()))
      detail::fail_runtime("standardizer: feature ", f, " has invalid statistics");
    // float data is standardized with float statistics: they must be finite there too.
    constexpr double kFloatMax = std::numeric_limits<float>::max();
    if (std::abs(m.mean) > kFloatMax || std::sqrt(m.biased_variance()) > kFloatMax)
      detail::fail_runtime("standardizer: feature ", f, " has statistics beyond float's range");
  }
  Standardizer s;
  s.moments_ = std::move(moments);
  return s;
}

}  // namespace normkit::data
