// Batch normalization through an installed normkit (normkit::normkit):
// forward-training on a small NCHW tensor whose statistics are known exactly,
// checked against the formulas; then the engine (engine.cpp). Exits non-zero
// when anything is off.
#include <cmath>
#include <cstdio>
#include <vector>

#include <normkit/normkit.hpp>

namespace {

bool near(double got, double want, double tolerance) { return std::fabs(got - want) <= tolerance; }

}  // namespace

bool engine_ok();  // engine.cpp

int main() {
  using normkit::Layout;
  using normkit::TensorView;
  // x: N = 2, C = 2, H = 1, W = 2. Channel 0 holds {1, 3, 5, 7} (mean 4, biased
  // variance 5, unbiased 20/3); channel 1 holds {-2, -2, 2, 2} (mean 0, variance 4).
  std::vector<float> x = {1, 3, -2, -2, 5, 7, 2, 2}, y(8);
  const std::vector<float> gamma = {2, 1}, beta = {0.5f, -1};
  std::vector<float> mean(2), invstd(2), running_mean = {0, 0}, running_var = {1, 1};
  int64_t batches = 0;
  try {
    const auto xv = TensorView<const float>::contiguous(x.data(), {2, 2, 1, 2}, Layout::NCHW);
    const auto yv = TensorView<float>::contiguous(y.data(), {2, 2, 1, 2}, Layout::NCHW);
    normkit::batch_norm_forward_training<float>(xv, yv, gamma, beta, {mean, invstd},
                                                {running_mean, running_var, &batches});
  } catch (const normkit::Error& e) {
    std::fprintf(stderr, "normkit_consumer: %s\n", e.what());
    return 1;
  }
  const double eps = 1e-5;
  const double means[2] = {4, 0}, vars[2] = {5, 4}, unbiased[2] = {20.0 / 3, 16.0 / 3};
  bool ok = batches == 1;
  for (int c = 0; c < 2; ++c) {
    const double inv = 1 / std::sqrt(vars[c] + eps);
    ok = ok && mean[c] == static_cast<float>(means[c]) && near(invstd[c], inv, 1e-6);
    ok = ok && near(running_mean[c], 0.1 * means[c], 1e-6) &&
         near(running_var[c], 0.9 + 0.1 * unbiased[c], 1e-6);
    for (int n = 0; n < 2; ++n)
      for (int w = 0; w < 2; ++w) {
        const int i = (n * 2 + c) * 2 + w;
        ok = ok && near(y[i], (x[i] - means[c]) * inv * gamma[c] + beta[c], 1e-5);
      }
  }
  std::printf("normkit %s consumer: kernels %s\n", normkit::version, ok ? "ok" : "WRONG RESULT");
  try {
    ok = engine_ok() && ok;
  } catch (const normkit::Error& e) {
    std::fprintf(stderr, "normkit_consumer: engine: %s\n", e.what());
    return 1;
  }
  return ok ? 0 : 1;
}
