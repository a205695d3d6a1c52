// What `make demo` runs until the training engine lands: batch normalization on
// a batch whose channels have very different scales, the running statistics
// converging over steps, and the kernels' speed next to a plain copy.
#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "normkit/normkit.hpp"

namespace {

using normkit::Layout;
using normkit::TensorView;

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class F>
double median_seconds(F&& f, int repetitions) {
  std::vector<double> times;
  for (int r = 0; r < repetitions; ++r) {
    const double start = seconds_now();
    f();
    times.push_back(seconds_now() - start);
  }
  std::nth_element(times.begin(), times.begin() + repetitions / 2, times.end());
  return times[repetitions / 2];
}

// Channel c is drawn from N(mean[c], std[c]²).
void fill_channels(std::vector<float>& x, int64_t n, int64_t c_count, int64_t spatial,
                   const std::vector<float>& mean, const std::vector<float>& stddev,
                   std::mt19937& rng) {
  std::normal_distribution<float> unit(0.0f, 1.0f);
  for (int64_t n_i = 0; n_i < n; ++n_i)
    for (int64_t c = 0; c < c_count; ++c)
      for (int64_t s = 0; s < spatial; ++s)
        x[(n_i * c_count + c) * spatial + s] = mean[c] + stddev[c] * unit(rng);
}

void show_statistics() {
  const int64_t N = 16, C = 4, H = 8, W = 8;
  const std::vector<float> mean = {0.0f, 5.0f, -300.0f, 1.0e6f};
  const std::vector<float> stddev = {1.0f, 0.1f, 40.0f, 1.0f};
  std::vector<float> x(N * C * H * W), y(x.size());
  std::mt19937 rng(7);

  std::vector<float> gamma(C, 1.0f), beta(C, 0.0f), save_mean(C), save_invstd(C);
  std::vector<float> running_mean(C, 0.0f), running_var(C, 1.0f);
  int64_t batches = 0;
  const auto xv = TensorView<float>::contiguous(x.data(), {N, C, H, W}, Layout::NCHW);
  const auto yv = TensorView<float>::contiguous(y.data(), {N, C, H, W}, Layout::NCHW);

  std::printf("Batch normalization of a %lldx%lldx%lldx%lld NCHW batch whose channels have very "
              "different scales\n\n",
              static_cast<long long>(N), static_cast<long long>(C), static_cast<long long>(H),
              static_cast<long long>(W));
  std::printf("step | running mean (PyTorch convention, momentum 0.1) per channel\n");
  for (int step = 1; step <= 30; ++step) {
    fill_channels(x, N, C, H * W, mean, stddev, rng);
    normkit::batch_norm_forward_training<float>(xv, yv, gamma, beta, {save_mean, save_invstd},
                                                {running_mean, running_var, &batches});
    if (step == 1 || step == 5 || step == 10 || step == 30) {
      std::printf("%4d |", step);
      for (int64_t c = 0; c < C; ++c) std::printf(" %14.4f", running_mean[c]);
      std::printf("\n");
    }
  }

  std::printf("\nlast batch, per channel:\n");
  std::printf("  %-8s %14s %12s %14s %12s %12s\n", "channel", "true mean", "true std",
              "batch mean", "batch std", "std of y");
  std::vector<normkit::Moments> y_moments(C);
  normkit::batch_norm_moments<float>(yv, y_moments);
  for (int64_t c = 0; c < C; ++c)
    std::printf("  %-8lld %14.4f %12.4f %14.4f %12.4f %12.6f\n", static_cast<long long>(c),
                mean[c], stddev[c], save_mean[c], 1.0 / save_invstd[c],
                std::sqrt(y_moments[c].biased_variance()));
  std::printf("  (y has mean 0 and std 1 in every channel, even the one at 1e6 with std 1;\n"
              "   std of y is just below 1 because eps = 1e-5 is added to the variance)\n\n");
}

void show_speed() {
  const int64_t N = 32, C = 64, H = 56, W = 56;
  const int64_t count = N * C * H * W;
  std::vector<float> x(count), y(count), dy(count), dx(count), copy(count);
  std::mt19937 rng(11);
  std::normal_distribution<float> unit(0.0f, 1.0f);
  for (auto& v : x) v = unit(rng);
  for (auto& v : dy) v = unit(rng);
  std::vector<float> gamma(C, 1.0f), beta(C, 0.0f), save_mean(C), save_invstd(C), dgamma(C),
      dbeta(C), running_mean(C, 0.0f), running_var(C, 1.0f);
  const int threads = normkit::num_threads();

  std::printf("Speed, %lldx%lldx%lldx%lld float32, %d threads, median of 20 (x a copy of the same "
              "tensor)\n",
              static_cast<long long>(N), static_cast<long long>(C), static_cast<long long>(H),
              static_cast<long long>(W), threads);
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    const bool last = layout == Layout::NHWC;
    const std::array<int64_t, 4> sizes = last ? std::array<int64_t, 4>{N, H, W, C}
                                              : std::array<int64_t, 4>{N, C, H, W};
    const auto xv = TensorView<float>::contiguous(x.data(), sizes, layout);
    const auto yv = TensorView<float>::contiguous(y.data(), sizes, layout);
    const auto dyv = TensorView<float>::contiguous(dy.data(), sizes, layout);
    const auto dxv = TensorView<float>::contiguous(dx.data(), sizes, layout);
    const double copy_s = median_seconds(
        [&] {
#pragma omp parallel for num_threads(threads) schedule(static)
          for (int t = 0; t < threads; ++t) {
            const int64_t begin = count * t / threads, end = count * (t + 1) / threads;
            std::memcpy(copy.data() + begin, x.data() + begin, (end - begin) * sizeof(float));
          }
        },
        20);
    const double forward_s = median_seconds(
        [&] {
          normkit::batch_norm_forward_training<float>(xv, yv, gamma, beta, {save_mean, save_invstd},
                                                      {running_mean, running_var});
        },
        20);
    const double backward_s = median_seconds(
        [&] {
          normkit::batch_norm_backward<float>(xv, dyv, dxv, gamma, save_mean, save_invstd, dgamma,
                                              dbeta);
        },
        20);
    const double inference_s = median_seconds(
        [&] {
          normkit::batch_norm_forward_inference<float>(xv, yv, gamma, beta, running_mean,
                                                       running_var);
        },
        20);
    std::printf("  %-5s copy %6.2f ms | forward-training %5.2fx | backward %5.2fx | inference %5.2fx\n",
                std::string(normkit::to_string(layout)).c_str(), copy_s * 1e3, forward_s / copy_s,
                backward_s / copy_s, inference_s / copy_s);
  }
}

}  // namespace

int main() {
  try {
    std::printf("normkit %s\n\n", normkit::version);
    show_statistics();
    show_speed();
    return 0;
  } catch (const normkit::Error& e) {
    std::fprintf(stderr, "bn_demo: %s\n", e.what());
    return 1;
  }
}
