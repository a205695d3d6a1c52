// Input standardization on the batch-normalization kernels: a feature is a
// channel of a [rows, features] table, fitting is batch_norm_moments with
// Chan's merge across calls, transforming is batch_norm_forward_apply.
#include <cmath>
#include <cstring>
#include <istream>
#include <ostream>

#include "core/check.hpp"
#include "normkit/batch_norm.hpp"
#include "normkit/standardizer.hpp"

namespace normkit::data {

namespace {
constexpr char kMagic[8] = {'N', 'K', 'S', 'T', 'D', '0', '0', '1'};

TensorView<float> table_view(std::span<float> x, int64_t features) {
  return TensorView<float>::contiguous(x.data(), {static_cast<int64_t>(x.size()) / features, features},
                                       Layout::NC);
}
}  // namespace

// Whole rows of finite values: a NaN standardized would reach training as data
// (docs/nan-and-inf.md), so it is refused here, before anything is written.
void Standardizer::check_rows(std::span<const float> x) const {
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

void Standardizer::partial_fit(std::span<const float> x, int64_t features) {
  if (features < 1) detail::fail_invalid("standardizer: features must be >= 1, got ", features);
  if (fitted() && features != this->features())
    detail::fail_invalid("standardizer: fitted on ", this->features(), " features, got ", features);
  if (x.empty() || x.size() % static_cast<size_t>(features) != 0)
    detail::fail_invalid("standardizer: ", x.size(), " values are not whole rows of ", features,
                         " features");
  std::vector<Moments> batch(features);
  const auto view = TensorView<const float>::contiguous(
      x.data(), {static_cast<int64_t>(x.size()) / features, features}, Layout::NC);
  batch_norm_moments<float>(view, batch);
  for (int64_t f = 0; f < features; ++f)
    if (!std::isfinite(batch[f].mean) || !std::isfinite(batch[f].m2))
      detail::fail_runtime("standardizer: feature ", f, " contains NaN or infinite values");
  if (!fitted()) {
    moments_ = std::move(batch);
    return;
  }
  for (int64_t f = 0; f < features; ++f) moments_[f].merge(batch[f]);
}

std::vector<float> Standardizer::mean() const {
  std::vector<float> out;
  for (const auto& m : moments_) out.push_back(static_cast<float>(m.mean));
  return out;
}

std::vector<float> Standardizer::scale() const {
  std::vector<float> out;
  for (const auto& m : moments_) {
    const double sd = std::sqrt(m.biased_variance());
    out.push_back(sd > 0 ? static_cast<float>(sd) : 1.0f);
  }
  return out;
}

std::vector<float> Standardizer::variance() const {
  std::vector<float> out;
  for (const auto& m : moments_) out.push_back(static_cast<float>(m.biased_variance()));
  return out;
}

// Every feature of a row is counted together, so any feature's count is the row count.
int64_t Standardizer::samples_seen() const noexcept {
  return moments_.empty() ? 0 : static_cast<int64_t>(moments_.front().count);
}

void Standardizer::transform(std::span<float> x) const {
  check_rows(x);
  const auto m = mean(), s = scale();
  std::vector<float> inv(s.size());
  for (size_t f = 0; f < s.size(); ++f) inv[f] = 1.0f / s[f];
  const auto view = table_view(x, features());
  batch_norm_forward_apply<float>(view, view, {}, {}, m, inv);
}

void Standardizer::inverse_transform(std::span<float> x) const {
  check_rows(x);
  // x·scale + mean, as the apply kernel with zero mean, unit invstd, γ = scale, β = mean.
  const std::vector<float> zero(moments_.size(), 0.0f), one(moments_.size(), 1.0f);
  const auto view = table_view(x, features());
  batch_norm_forward_apply<float>(view, view, scale(), mean(), zero, one);
}

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
    if (!(m.count > 0) || !std::isfinite(m.mean) || !std::isfinite(m.m2) || m.m2 < 0)
      detail::fail_runtime("standardizer: feature ", f, " has invalid statistics");
  }
  Standardizer s;
  s.moments_ = std::move(moments);
  return s;
}

}  // namespace normkit::data
