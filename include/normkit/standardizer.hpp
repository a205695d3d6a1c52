#pragma once
// The input standardizer x' = (x - μ) / σ: per-feature statistics as mergeable
// Moments (moments.hpp), fitted on training data only and kept with the model.
// It lives in the kernel library (the engine's checkpoints and the Python
// module both use it); the data loaders are the engine's (engine/data.hpp).
#include <cstdint>
#include <iosfwd>
#include <span>
#include <vector>

#include "normkit/moments.hpp"

namespace normkit::data {

// Per-feature standardization, fitted on training data only and kept with the
// model: x' = (x - mean) / std, with the biased (population) std as
// scikit-learn's StandardScaler and Keras' Normalization use. A feature with
// zero variance gets scale 1, so it maps to 0 instead of NaN.
class Standardizer {
 public:
  // Statistics over rows × features, merged with what was seen before
  // (fit = reset + partial_fit). Non-finite values are an error. float data
  // runs the fast BN statistics kernels, double data the exact reference.
  void fit(std::span<const float> x, int64_t features);
  void partial_fit(std::span<const float> x, int64_t features);
  void fit(std::span<const double> x, int64_t features);
  void partial_fit(std::span<const double> x, int64_t features);

  // In place, in the data's precision: float data with the statistics rounded
  // to float (mean(), scale()), double data with them in double.
  void transform(std::span<float> x) const;
  void inverse_transform(std::span<float> x) const;
  void transform(std::span<double> x) const;
  void inverse_transform(std::span<double> x) const;

  bool fitted() const noexcept { return !moments_.empty(); }
  int64_t features() const noexcept { return static_cast<int64_t>(moments_.size()); }
  // The statistics in T (float: what transform of float data uses).
  template <class T = float>
  std::vector<T> mean() const;
  template <class T = float>
  std::vector<T> scale() const;  // std, or 1 for zero-variance features
  // The biased (population) variance, 0 for zero-variance features; and the
  // rows fitted since the last fit (0 when unfitted).
  template <class T = float>
  std::vector<T> variance() const;
  int64_t samples_seen() const noexcept;

  void save(std::ostream& out) const;
  static Standardizer load(std::istream& in);  // throws normkit::Error on a bad stream
  static Standardizer from_moments(std::vector<Moments> moments);
  const std::vector<Moments>& moments() const noexcept { return moments_; }

 private:
  template <class T>
  void fit_rows(std::span<const T> x, int64_t features);
  template <class T>
  void apply(std::span<T> x, bool inverse) const;
  template <class T>
  void check_rows(std::span<const T> x) const;
  std::vector<Moments> moments_;
};

}  // namespace normkit::data
