#pragma once
// The argument checks of the public functions (src/ops/), one of each. Each
// throws normkit::Error naming the argument and the problem, and changes
// nothing: an op calls all of them before it writes anything.
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <type_traits>
#include <utility>

#include "core/check.hpp"
#include "core/sample_geometry.hpp"
#include "core/simd_clones.hpp"
#include "normkit/batch_norm.hpp"
#include "normkit/moments.hpp"
#include "normkit/tensor.hpp"

namespace normkit::detail {

inline constexpr const char* kPerChannel = "one per channel";

inline void check_eps(double eps) {
  if (!(eps > 0) || !std::isfinite(eps)) fail_invalid("eps must be positive and finite, got ", eps);
}

// `values` holds exactly `expected` elements (`what` says which: "one per
// channel", "one per sample and group", ...); empty means absent, allowed
// unless `required`.
template <class T>
void check_count(std::span<T> values, int64_t expected, const char* name, const char* what,
                 bool required) {
  if (values.empty() && !required) return;
  if (static_cast<int64_t>(values.size()) != expected)
    fail_invalid(name, " should contain ", expected, " elements (", what, ") not ", values.size());
}

// An optional span as the kernels take it: nullptr when absent.
template <class T>
T* or_null(std::span<T> values) {
  return values.empty() ? nullptr : values.data();
}

// Batch norm's options and running statistics (also instance norm's and the
// variants'). `required`: the op cannot run without running statistics.
template <class T>
void check_running(const RunningStats<T>& running, int64_t channels,
                   const BatchNormOptions& options, bool required = false) {
  check_eps(options.eps);
  // Without running statistics momentum is unused and, as in PyTorch, not checked.
  const bool updates_running = required || !running.mean.empty() || !running.var.empty();
  if (updates_running && options.momentum && !(*options.momentum >= 0.0 && *options.momentum <= 1.0))
    fail_invalid("momentum must be in [0, 1], got ", *options.momentum);
  if (options.momentum_convention != MomentumConvention::weight_on_new &&
      options.momentum_convention != MomentumConvention::weight_on_old)
    fail_invalid("momentum_convention: unknown value");
  if (options.running_variance != RunningVariance::unbiased &&
      options.running_variance != RunningVariance::biased)
    fail_invalid("running_variance: unknown value");
  if (required && (running.mean.empty() || running.var.empty()))
    fail_invalid("running_mean and running_var are required (r and d are defined by them)");
  if (running.mean.empty() != running.var.empty())
    fail_invalid("running_mean and running_var must be given together (got ",
                 running.mean.size(), " and ", running.var.size(), " elements)");
  check_count(running.mean, channels, "running_mean", kPerChannel, false);
  check_count(running.var, channels, "running_var", kPerChannel, false);
  if (!running.mean.empty() && !options.momentum && !running.num_batches_tracked)
    fail_invalid("momentum = None (cumulative moving average) needs num_batches_tracked");
}

// A view's geometry as a family walks it: [outer, C, inner] (Geometry) or
// [N, C, S] (SampleGeometry, group and instance norm).
template <class G, class T>
G geometry_as(const TensorView<T>& view, const char* name) {
  if constexpr (std::is_same_v<G, SampleGeometry>)
    return sample_geometry_of(view, name);
  else
    return geometry_of(view, name);
}

// x: with data, a geometry, not empty.
template <class G = Geometry, class T>
G checked_input(ConstTensorView<T> x, const char* name) {
  if (!x.data && x.numel() > 0) fail_invalid(name, ": data pointer is null");
  const G g = geometry_as<G>(x, name);
  if (x.numel() == 0) fail_invalid(name, ": empty tensor ", x.shape_string());
  return g;
}

// A view walked together with x (y, z, dy, dx, dz): x's layout and shape, with data.
template <class G = Geometry, class T, class U>
G checked_like(const TensorView<U>& view, ConstTensorView<T> x, const char* name) {
  bool same = view.layout == x.layout;
  for (int axis = 0; same && axis < x.rank(); ++axis) same = view.shape[axis] == x.shape[axis];
  if (!same)
    fail_invalid(name, ": shape ", view.shape_string(), " does not match x's ", x.shape_string());
  if (!view.data) fail_invalid(name, ": data pointer is null");
  return geometry_as<G>(view, name);
}

// y may be its input itself (in place) only with the input's strides.
template <class G>
void check_in_place(const void* y, const G& gy, const void* input, const G& ginput,
                    const char* input_name) {
  if (y == input && !(gy == ginput))
    fail_invalid("y: in-place output must have the same strides as ", input_name);
}

// dx may be x or dy itself only with the strides of both.
template <class G>
void check_in_place_dx(const void* dx, const G& gdx, const void* x, const G& gx, const void* dy,
                       const G& gdy) {
  if (dx && (dx == x || dx == dy) && !(gdx == gx && (dx != dy || gdx == gdy)))
    fail_invalid("dx: in-place output must have the same strides as its input");
}

template <class T>
void check_training_size(const Geometry& g, ConstTensorView<T> x) {
  if (g.reduction_size() <= 1)
    fail_invalid("expected more than 1 value per channel when training, got input size ",
                 x.shape_string());
}

// After the statistics pass: NaN or ∞ in x shows in its channel's moments.
// A branch-free SIMD pass first (thousands of channels, every call), and the
// channel to blame only when there is one.
namespace {
[[maybe_unused]] NORMKIT_SIMD_CLONES bool all_finite(const Moments* moments, size_t n) {
  constexpr double kMax = std::numeric_limits<double>::max();
  uint64_t bad = 0;  // (a bool here, and GCC does not vectorize the loop)
  for (size_t c = 0; c < n; ++c)
    bad |= static_cast<uint64_t>(!(std::abs(moments[c].mean) <= kMax)) |
           static_cast<uint64_t>(!(std::abs(moments[c].m2) <= kMax));
  return bad == 0;
}
[[maybe_unused]] void check_finite(std::span<const Moments> moments) {
  if (all_finite(moments.data(), moments.size())) return;
  for (size_t c = 0; c < moments.size(); ++c)
    if (!std::isfinite(moments[c].mean) || !std::isfinite(moments[c].m2))
      fail_runtime("x: channel ", c,
                   " contains NaN or infinite values; running statistics left unchanged");
}
}  // namespace

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
