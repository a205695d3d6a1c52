#pragma once
// Mergeable statistics: (count, mean, M2), M2 = Σ (x - mean)².
//
// Partials from SIMD lanes, blocks, threads and (later) processes combine with
// Chan, Golub and LeVeque's pairwise update. Merging in a fixed order makes the
// result independent of how the work was split among threads. Never
// E[x²] - E[x]² in float: it loses every digit of the variance when the mean is
// large compared with the spread.
#include <cstdint>

namespace normkit {

struct Moments {
  double count = 0;
  double mean = 0;
  double m2 = 0;

  // Chan et al.: delta = mean_b - mean_a, n = n_a + n_b,
  //   mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta² * n_a * n_b / n.
  void merge(const Moments& other) noexcept {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    const double n = count + other.count;
    const double delta = other.mean - mean;
    const double weight = other.count / n;
    mean += delta * weight;
    m2 += other.m2 + delta * delta * count * weight;
    count = n;
  }

  double biased_variance() const noexcept { return count > 0 ? m2 / count : 0.0; }
  double unbiased_variance() const noexcept { return count > 1 ? m2 / (count - 1) : 0.0; }
};

}  // namespace normkit
