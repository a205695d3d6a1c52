#pragma once
// Argument checks shared by the public normalization functions (batch_norm.cpp,
// batch_norm_fused.cpp, group_norm.cpp, layer_norm.cpp). Each throws
// normkit::Error naming the problem and changes nothing.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <span>
#include <string>
#include <utility>

#include "core/check.hpp"
#include "normkit/batch_norm.hpp"
#include "normkit/tensor.hpp"

namespace normkit::detail {

// NORMKIT_VERBOSE set (and not "0"): say on stderr which implementation runs.
inline bool verbose() {
  static const bool on = [] {
    const char* value = std::getenv("NORMKIT_VERBOSE");
    return value && *value && std::string(value) != "0";
  }();
  return on;
}

inline void check_eps(double eps) {
  if (!(eps > 0) || !std::isfinite(eps)) fail_invalid("eps must be positive and finite, got ", eps);
}

template <class T>
void check_per_channel(std::span<T> values, int64_t channels, const char* name, bool required) {
  if (values.empty() && !required) return;
  if (static_cast<int64_t>(values.size()) != channels)
    fail_invalid(name, " should contain ", channels, " elements (one per channel) not ",
                 values.size());
}

// Batch norm's options and running statistics (also instance norm's).
template <class T>
void check_running(const RunningStats<T>& running, int64_t channels,
                   const BatchNormOptions& options) {
  check_eps(options.eps);
  if (options.momentum && !(*options.momentum >= 0.0 && *options.momentum <= 1.0))
    fail_invalid("momentum must be in [0, 1], got ", *options.momentum);
  if (options.momentum_convention != MomentumConvention::weight_on_new &&
      options.momentum_convention != MomentumConvention::weight_on_old)
    fail_invalid("momentum_convention: unknown value");
  if (options.running_variance != RunningVariance::unbiased &&
      options.running_variance != RunningVariance::biased)
    fail_invalid("running_variance: unknown value");
  if (running.mean.empty() != running.var.empty())
    fail_invalid("running_mean and running_var must be given together (got ",
                 running.mean.size(), " and ", running.var.size(), " elements)");
  check_per_channel(running.mean, channels, "running_mean", false);
  check_per_channel(running.var, channels, "running_var", false);
  if (!running.mean.empty() && !options.momentum && !running.num_batches_tracked)
    fail_invalid("momentum = None (cumulative moving average) needs num_batches_tracked");
}

// x as [outer, channels, inner]: non-empty, with data.
template <class T>
Geometry checked_input(ConstTensorView<T> x, const char* name) {
  if (!x.data && x.numel() > 0) fail_invalid(name, ": data pointer is null");
  const Geometry g = geometry_of(x, name);
  if (x.numel() == 0) fail_invalid(name, ": empty tensor ", x.shape_string());
  return g;
}

// Geometries of views that one kernel call walks together must have the same
// extents: when folding makes them differ (one view folds to rows form, another
// cannot), every view is taken unfolded, whose extents come from the shape.
template <class T>
void unify(ConstTensorView<T> x, Geometry& gx,
           std::initializer_list<std::pair<Geometry*, ConstTensorView<T>>> others) {
  bool same = true;
  for (const auto& [g, view] : others) same = same && g->same_extent(gx);
  if (same) return;
  gx = geometry_of(x, "x", Folding::none);
  for (const auto& [g, view] : others) *g = geometry_of(view, "output", Folding::none);
}

}  // namespace normkit::detail
