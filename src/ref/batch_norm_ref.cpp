// Reference batch normalization: plain loops over [outer, channels, inner],
// every sum in double, each formula written as the textbook states it.
// Never optimized: this is the oracle the fast kernels are tested against,
// and the implementation behind the double-precision API.
#include <vector>

#include "kernels/batch_norm.hpp"

namespace normkit::kernels::bn::ref {

namespace {
// Calls f(o, i) for every element of one channel.
template <class F>
void for_each_in_channel(const Geometry& g, F&& f) {
  for (int64_t o = 0; o < g.outer; ++o)
    for (int64_t i = 0; i < g.inner; ++i) f(o, i);
}
double value_or(const auto* p, int64_t c, double fallback) {
  return p ? static_cast<double>(p[c]) : fallback;
}
}  // namespace

// mean = Σx / M;  M2 = Σ (x - mean)²  (two passes, so no cancellation).
template <class T>
void moments(const Statistics<T>& p) {
  const Geometry& g = p.x_geom;
  const T* x = p.x;
  const double count = static_cast<double>(g.reduction_size());
  for (int64_t c = 0; c < g.channels; ++c) {
    double sum = 0;
    for_each_in_channel(g, [&](int64_t o, int64_t i) { sum += x[g.offset(o, c, i)]; });
    const double mean = sum / count;
    double m2 = 0;
    for_each_in_channel(g, [&](int64_t o, int64_t i) {
      const double d = x[g.offset(o, c, i)] - mean;
      m2 += d * d;
    });
    p.moments[c] = {count, mean, m2};
  }
}

// y = (x - mean) / sqrt(var + eps) * γ + β.
template <class T>
void apply(const Apply<T>& p) {
  const Geometry& gx = p.x_geom;
  const Geometry& gy = p.y_geom;
  for (int64_t c = 0; c < gx.channels; ++c) {
    const double gamma = value_or(p.gamma, c, 1.0), beta = value_or(p.beta, c, 0.0);
    for_each_in_channel(gx, [&](int64_t o, int64_t i) {
      const double x_hat = (static_cast<double>(p.x[gx.offset(o, c, i)]) - p.mean[c]) * p.invstd[c];
      p.y[gy.offset(o, c, i)] = static_cast<T>(x_hat * gamma + beta);
    });
  }
}

template <class T>
void forward(const Forward<T>& p) {
  moments(Statistics<T>{p.x_geom, p.x, p.moments});
  p.moments_done(0, p.x_geom.channels);
  std::vector<double> mean(p.x_geom.channels), invstd(p.x_geom.channels);
  for (int64_t c = 0; c < p.x_geom.channels; ++c) {
    mean[c] = p.moments[c].mean;
    invstd[c] = invstd_of(p.moments[c].biased_variance(), p.eps);
  }
  apply(Apply<T>{p.x_geom, p.y_geom, p.x, p.y, p.gamma, p.beta, mean.data(), invstd.data()});
}

// x̂ = (x - mean)·invstd;  dβ = Σdy;  dγ = Σdy·x̂;
// training: dx = γ·invstd·(dy - dβ/M - x̂·dγ/M)   (mean and var depend on x)
// frozen:   dx = γ·invstd·dy                     (global statistics are constants)
template <class T>
void backward(const Backward<T>& p) {
  const Geometry& gx = p.x_geom;
  const double count = static_cast<double>(gx.reduction_size());
  for (int64_t c = 0; c < gx.channels; ++c) {
    double sum_dy = 0, sum_dy_xhat = 0;
    for_each_in_channel(gx, [&](int64_t o, int64_t i) {
      const double dy = p.dy[p.dy_geom.offset(o, c, i)];
      const double x_hat = (static_cast<double>(p.x[gx.offset(o, c, i)]) - p.mean[c]) * p.invstd[c];
      sum_dy += dy;
      sum_dy_xhat += dy * x_hat;
    });
    p.sum_dy[c] = sum_dy;
    p.sum_dy_xhat[c] = sum_dy_xhat;
    if (!p.dx) continue;
    const double gamma = value_or(p.gamma, c, 1.0);
    for_each_in_channel(gx, [&](int64_t o, int64_t i) {
      const double dy = p.dy[p.dy_geom.offset(o, c, i)];
      double dx;
      if (p.mode == BackwardMode::training) {
        const double x_hat =
            (static_cast<double>(p.x[gx.offset(o, c, i)]) - p.mean[c]) * p.invstd[c];
        dx = gamma * p.invstd[c] * (dy - sum_dy / count - x_hat * sum_dy_xhat / count);
      } else {
        dx = gamma * p.invstd[c] * dy;
      }
      p.dx[p.dx_geom.offset(o, c, i)] = static_cast<T>(dx);
    });
  }
}

// Training-mode dx from given sums over `count` values per channel:
//   dx = γ·invstd·(dy - Σdy/count - x̂·Σdy·x̂/count).
template <class T>
void backward_apply(const BackwardApply<T>& p) {
  const Geometry& gx = p.x_geom;
  for (int64_t c = 0; c < gx.channels; ++c) {
    const double gamma = value_or(p.gamma, c, 1.0);
    for_each_in_channel(gx, [&](int64_t o, int64_t i) {
      const double dy = p.dy[p.dy_geom.offset(o, c, i)];
      const double x_hat = (static_cast<double>(p.x[gx.offset(o, c, i)]) - p.mean[c]) * p.invstd[c];
      const double dx =
          gamma * p.invstd[c] * (dy - p.sum_dy[c] / p.count - x_hat * p.sum_dy_xhat[c] / p.count);
      p.dx[p.dx_geom.offset(o, c, i)] = static_cast<T>(dx);
    });
  }
}

template void moments(const Statistics<float>&);
template void moments(const Statistics<double>&);
template void apply(const Apply<float>&);
template void apply(const Apply<double>&);
template void forward(const Forward<float>&);
template void forward(const Forward<double>&);
template void backward(const Backward<float>&);
template void backward(const Backward<double>&);
template void backward_apply(const BackwardApply<float>&);
template void backward_apply(const BackwardApply<double>&);

}  // namespace normkit::kernels::bn::ref
