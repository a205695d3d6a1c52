// Reference BN+ReLU and BN+Add+ReLU: plain loops over [outer, channels, inner]
// in double, the oracle for the fast kernels and the double-precision API.
//
//   forward:  p = (x - mean)·invstd·γ + β [+ z],  y = relu(p),  bit = p > 0
//   backward: g = bit ? dy : 0,  dz = g,
//             dβ = Σg,  dγ = Σg·x̂,  x̂ = (x - mean)·invstd,
//             training: dx = γ·invstd·(g - dβ/M - x̂·dγ/M);  frozen: dx = γ·invstd·g
#include <vector>

#include "kernels/batch_norm.hpp"
#include "kernels/batch_norm_fused.hpp"

namespace normkit::kernels::bn_fused::ref {

namespace {
double value_or(const auto* p, int64_t c, double fallback) {
  return p ? static_cast<double>(p[c]) : fallback;
}
void set_bit(uint8_t* mask, int64_t k, bool on) {
  const auto bit = static_cast<uint8_t>(1u << (k % 8));
  if (on)
    mask[k / 8] = static_cast<uint8_t>(mask[k / 8] | bit);
  else
    mask[k / 8] = static_cast<uint8_t>(mask[k / 8] & ~bit);
}
bool get_bit(const uint8_t* mask, int64_t k) { return (mask[k / 8] >> (k % 8)) & 1u; }
}  // namespace

template <class T>
void forward(const Forward<T>& p) {
  const Geometry& g = p.x_geom;
  std::vector<double> mean(g.channels), invstd(g.channels);
  if (p.training) {
    bn::ref::moments(bn::Statistics<T>{g, p.x, p.moments});
    p.moments_done(0, g.channels);
    for (int64_t c = 0; c < g.channels; ++c) {
      mean[c] = p.moments[c].mean;
      invstd[c] = bn::invstd_of(p.moments[c].biased_variance(), p.eps);
    }
  } else {
    for (int64_t c = 0; c < g.channels; ++c) {
      mean[c] = p.mean[c];
      invstd[c] = p.invstd[c];
    }
  }
  for (int64_t c = 0; c < g.channels; ++c) {
    const double gamma = value_or(p.gamma, c, 1.0), beta = value_or(p.beta, c, 0.0);
    for (int64_t o = 0; o < g.outer; ++o)
      for (int64_t i = 0; i < g.inner; ++i) {
        const double x_hat = (static_cast<double>(p.x[g.offset(o, c, i)]) - mean[c]) * invstd[c];
        double pre = x_hat * gamma + beta;
        if (p.z) pre += static_cast<double>(p.z[p.z_geom.offset(o, c, i)]);
        p.y[p.y_geom.offset(o, c, i)] = static_cast<T>(pre < 0 ? 0.0 : pre);
        if (p.mask) set_bit(p.mask, p.order.bit(o, c, i), pre > 0);
      }
  }
}

template <class T>
void backward(const Backward<T>& p) {
  const Geometry& gx = p.x_geom;
  const double count = static_cast<double>(gx.reduction_size());
  auto masked_dy = [&](int64_t o, int64_t c, int64_t i) {
    return get_bit(p.mask, p.order.bit(o, c, i)) ? static_cast<double>(p.dy[p.dy_geom.offset(o, c, i)])
                                                 : 0.0;
  };
  for (int64_t c = 0; c < gx.channels; ++c) {
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t o = 0; o < gx.outer; ++o)
      for (int64_t i = 0; i < gx.inner; ++i) {
        const double g = masked_dy(o, c, i);
        const double x_hat = (static_cast<double>(p.x[gx.offset(o, c, i)]) - p.mean[c]) * p.invstd[c];
        sum_g += g;
        sum_g_xhat += g * x_hat;
      }
    p.sum_dy[c] = sum_g;
    p.sum_dy_xhat[c] = sum_g_xhat;
    const double gamma = value_or(p.gamma, c, 1.0);
    for (int64_t o = 0; o < gx.outer; ++o)
      for (int64_t i = 0; i < gx.inner; ++i) {
        const double g = masked_dy(o, c, i);
        if (p.dz) p.dz[p.dz_geom.offset(o, c, i)] = static_cast<T>(g);
        if (!p.dx) continue;
        double dx;
        if (p.mode == BackwardMode::training) {
          const double x_hat =
              (static_cast<double>(p.x[gx.offset(o, c, i)]) - p.mean[c]) * p.invstd[c];
          dx = gamma * p.invstd[c] * (g - sum_g / count - x_hat * sum_g_xhat / count);
        } else {
          dx = gamma * p.invstd[c] * g;
        }
        p.dx[p.dx_geom.offset(o, c, i)] = static_cast<T>(dx);
      }
  }
}

template void forward(const Forward<float>&);
template void forward(const Forward<double>&);
template void backward(const Backward<float>&);
template void backward(const Backward<double>&);

}  // namespace normkit::kernels::bn_fused::ref
