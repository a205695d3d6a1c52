// Reference group normalization: plain loops over [N, C, S], every sum in
// double, each formula as the textbook states it. The oracle for the fast
// kernels and the implementation behind the double-precision API.
#include <cmath>
#include <vector>

#include "kernels/group_norm.hpp"

namespace normkit::kernels::gn::ref {

namespace {
double value_or(const auto* p, int64_t c, double fallback) {
  return p ? static_cast<double>(p[c]) : fallback;
}
// Calls f(c, s) for every element of group g (channels g·Cg .. (g+1)·Cg - 1).
template <class F>
void for_each_in_group(const SampleGeometry& g, int64_t groups, int64_t group, F&& f) {
  const int64_t per_group = g.c / groups;
  for (int64_t c = group * per_group; c < (group + 1) * per_group; ++c)
    for (int64_t s = 0; s < g.s; ++s) f(c, s);
}
}  // namespace

// Per (n, g), over M = C/G · S values: mean = Σx / M; M2 = Σ(x - mean)² (two passes).
template <class T>
void moments(const Statistics<T>& p) {
  const SampleGeometry& g = p.x_geom;
  const T* x = p.x;
  const int64_t groups = p.groups;
  const double count = static_cast<double>(g.c / groups * g.s);
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t group = 0; group < groups; ++group) {
      double sum = 0;
      for_each_in_group(g, groups, group, [&](int64_t c, int64_t s) { sum += x[g.offset(n, c, s)]; });
      const double mean = sum / count;
      double m2 = 0;
      for_each_in_group(g, groups, group, [&](int64_t c, int64_t s) {
        const double d = x[g.offset(n, c, s)] - mean;
        m2 += d * d;
      });
      p.moments[n * groups + group] = {count, mean, m2};
    }
}

// y = (x - mean) / sqrt(var + eps) · γ[c] + β[c], var biased.
template <class T>
void forward(const Forward<T>& p) {
  const SampleGeometry& gx = p.x_geom;
  moments(Statistics<T>{gx, p.x, p.groups, p.moments});
  for (int64_t n = 0; n < gx.n; ++n)
    for (int64_t group = 0; group < p.groups; ++group) {
      const Moments& m = p.moments[n * p.groups + group];
      const double invstd = 1.0 / std::sqrt(m.biased_variance() + p.eps);
      for_each_in_group(gx, p.groups, group, [&](int64_t c, int64_t s) {
        const double x_hat = (static_cast<double>(p.x[gx.offset(n, c, s)]) - m.mean) * invstd;
        p.y[p.y_geom.offset(n, c, s)] =
            static_cast<T>(x_hat * value_or(p.gamma, c, 1.0) + value_or(p.beta, c, 0.0));
      });
    }
}

// x̂ = (x - mean)·invstd, per (n, g) over its M values:
//   dβ[c] = Σ_n Σ_s dy;  dγ[c] = Σ_n Σ_s dy·x̂
//   dx = invstd·(γ[c]·dy - Σ(γ·dy)/M - x̂·Σ(γ·dy·x̂)/M)
//   (the gradient through x̂ of a normalization over M values, with γ·dy in
//   the place of dy).
template <class T>
void backward(const Backward<T>& p) {
  const SampleGeometry& gx = p.x_geom;
  const double count = static_cast<double>(gx.c / p.groups * gx.s);
  for (int64_t c = 0; c < gx.c; ++c) p.dgamma[c] = p.dbeta[c] = 0;
  for (int64_t n = 0; n < gx.n; ++n)
    for (int64_t group = 0; group < p.groups; ++group) {
      const double mean = p.mean[n * p.groups + group], invstd = p.invstd[n * p.groups + group];
      auto x_hat = [&](int64_t c, int64_t s) {
        return (static_cast<double>(p.x[gx.offset(n, c, s)]) - mean) * invstd;
      };
      auto dy = [&](int64_t c, int64_t s) {
        return static_cast<double>(p.dy[p.dy_geom.offset(n, c, s)]);
      };
      double sum_gdy = 0, sum_gdy_xhat = 0;
      for_each_in_group(gx, p.groups, group, [&](int64_t c, int64_t s) {
        const double gamma = value_or(p.gamma, c, 1.0);
        p.dbeta[c] += dy(c, s);
        p.dgamma[c] += dy(c, s) * x_hat(c, s);
        sum_gdy += gamma * dy(c, s);
        sum_gdy_xhat += gamma * dy(c, s) * x_hat(c, s);
      });
      if (!p.dx) continue;
      for_each_in_group(gx, p.groups, group, [&](int64_t c, int64_t s) {
        const double gamma = value_or(p.gamma, c, 1.0);
        p.dx[p.dx_geom.offset(n, c, s)] = static_cast<T>(
            invstd * (gamma * dy(c, s) - sum_gdy / count - x_hat(c, s) * sum_gdy_xhat / count));
      });
    }
}

template void moments(const Statistics<float>&);
template void moments(const Statistics<double>&);
template void forward(const Forward<float>&);
template void forward(const Forward<double>&);
template void backward(const Backward<float>&);
template void backward(const Backward<double>&);

}  // namespace normkit::kernels::gn::ref
