#pragma once
// Shared support of the engine tests (test_nn_*.cpp, test_data.cpp): tensors in
// either memory format built from canonical (logical NCHW) values, single layers
// from a one-line spec, finite-difference gradient checks, error checks and a
// scratch directory.
//
// Gradient checks use the loss L = Σ r·y for a fixed random r (so dL/dy = r),
// central differences in float with double accumulation of L, and divide by the
// perturbation actually stored (float(x + h) - float(x - h)), not by 2h.
// NN_TEST_VERBOSE=1 prints each check's worst error as a share of its allowance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "nn/layers.hpp"
#include "normkit/engine/data.hpp"
#include "normkit/engine/nn.hpp"
#include "normkit/error.hpp"

namespace nn_test {

using normkit::nn::Layer;
using normkit::nn::MemoryFormat;
using normkit::nn::Mode;
using normkit::nn::Tensor;

inline const char* name_of(MemoryFormat f) {
  return f == MemoryFormat::channels_first ? "channels_first" : "channels_last";
}

// Storage index of logical element (n, c, h, w) (or (n, c) for rank 2).
inline int64_t storage_index(const std::vector<int64_t>& shape, MemoryFormat format, int64_t n,
                             int64_t c, int64_t h = 0, int64_t w = 0) {
  if (shape.size() == 2) return n * shape[1] + c;
  const int64_t C = shape[1], H = shape[2], W = shape[3];
  if (format == MemoryFormat::channels_first) return ((n * C + c) * H + h) * W + w;
  return ((n * H + h) * W + w) * C + c;
}

// A tensor holding `canonical` (row-major logical order) in `format`.
inline Tensor make_tensor(const std::vector<int64_t>& shape, MemoryFormat format,
                          const std::vector<float>& canonical) {
  Tensor t;
  t.reshape(shape, shape.size() == 4 ? format : MemoryFormat::channels_first);
  if (shape.size() != 4) {
    t.data = canonical;
    return t;
  }
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          t.data[storage_index(shape, t.format, n, c, h, w)] = canonical[((n * C + c) * H + h) * W + w];
  return t;
}

// The values of `t` in canonical order.
inline std::vector<float> canonical(const Tensor& t) {
  if (t.shape.size() != 4) return t.data;
  std::vector<float> out(t.data.size());
  const int64_t N = t.shape[0], C = t.shape[1], H = t.shape[2], W = t.shape[3];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          out[((n * C + c) * H + h) * W + w] = t.data[storage_index(t.shape, t.format, n, c, h, w)];
  return out;
}

inline std::vector<float> normal_values(size_t count, uint64_t seed, float stddev = 1.0f,
                                        float mean = 0.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> out(count);
  for (auto& v : out) v = dist(rng);
  return out;
}

// Four Gaussian blobs (classes) in 2x4x4 "images": sample i has label i % 4;
// the centers are the same for every seed, the noise differs.
inline normkit::data::Dataset blobs(int64_t count, uint64_t seed) {
  normkit::data::Dataset set;
  set.sample_shape = {2, 4, 4};
  set.num_classes = 4;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  const auto centers = normal_values(4 * 32, 999, 1.0f);
  for (int64_t i = 0; i < count; ++i) {
    const int32_t label = static_cast<int32_t>(i % 4);
    set.labels.push_back(label);
    for (int64_t j = 0; j < 32; ++j) set.features.push_back(centers[label * 32 + j] + noise(rng));
  }
  return set;
}

inline int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (const auto d : shape) n *= d;
  return n;
}

// One layer from a spec line ("conv 4 3 stride=2 pad=1") for an input shape
// without N ({C} or {C, H, W}).
inline std::unique_ptr<Layer> make_layer(const std::string& line, const std::vector<int64_t>& input,
                                         MemoryFormat format, size_t index = 0) {
  std::string text = "input";
  for (const auto d : input) text += " " + std::to_string(d);
  const auto spec = normkit::nn::ModelSpec::parse(text + "; " + line);
  auto layer = normkit::nn::detail::make_layer(spec.layers.at(0), input, format, index);
  layer->output_shape(input);
  return layer;
}

inline void zero_grads(Layer& layer) {
  for (auto* p : layer.parameters()) std::fill(p->grad.begin(), p->grad.end(), 0.0f);
}

// Indices to probe: all of them when few, otherwise `limit` spread by a seeded draw.
inline std::vector<size_t> probe_indices(size_t size, size_t limit, uint64_t seed) {
  std::vector<size_t> out(size);
  for (size_t i = 0; i < size; ++i) out[i] = i;
  if (size <= limit) return out;
  std::mt19937_64 rng(seed);
  std::shuffle(out.begin(), out.end(), rng);
  out.resize(limit);
  return out;
}

// |analytic - numeric| <= tol · (|numeric| + floor · max|numeric|) for every probe,
// so values near zero are held to the scale of the tensor, not to themselves.
struct GradientComparison {
  std::vector<double> analytic, numeric;
  void add(double a, double n) {
    analytic.push_back(a);
    numeric.push_back(n);
  }
  // Worst ratio of error to allowance (<= 1 passes).
  double worst(double tol, double floor, std::string* where = nullptr) const {
    double scale = 0;
    for (const double n : numeric) scale = std::max(scale, std::abs(n));
    double worst = 0;
    for (size_t i = 0; i < numeric.size(); ++i) {
      const double allowed = tol * (std::abs(numeric[i]) + floor * scale + 1e-12);
      const double ratio = std::abs(analytic[i] - numeric[i]) / allowed;
      if (ratio > worst) {
        worst = ratio;
        if (where) {
          std::ostringstream s;
          s << "probe " << i << ": analytic " << analytic[i] << ", numeric " << numeric[i]
            << " (scale " << scale << ")";
          *where = s.str();
        }
      }
    }
    return worst;
  }
};

inline double dot(const std::vector<float>& r, const std::vector<float>& y) {
  double sum = 0;
  for (size_t i = 0; i < r.size(); ++i) sum += static_cast<double>(r[i]) * y[i];
  return sum;
}

struct GradCheckOptions {
  Mode mode = Mode::train;
  double step = 1e-2;
  double tol = 2e-3;     // relative
  double floor = 0.05;   // share of the tensor's largest gradient added to the allowance
  size_t probes = 64;    // per tensor
  bool check_input = true;
  uint64_t seed = 1;
};

// Checks dL/dx and every parameter gradient of `layer` at `x` against central
// differences of L = Σ r·forward(x).
inline void check_layer_gradients(Layer& layer, const Tensor& x, const GradCheckOptions& o,
                                  const std::string& what) {
  SCOPED_TRACE(what);
  const Tensor& y0 = layer.forward(x, o.mode);
  const auto r = normal_values(y0.data.size(), o.seed + 17);
  Tensor dy;
  dy.shape = y0.shape;
  dy.format = y0.format;
  dy.data = r;
  zero_grads(layer);
  std::vector<float> dx;
  if (o.check_input) dx = layer.backward(dy, true).data;
  else layer.backward(dy, false);
  std::vector<std::vector<float>> grads;
  for (auto* p : layer.parameters()) grads.push_back(p->grad);

  auto loss = [&](const Tensor& input) { return dot(r, layer.forward(input, o.mode).data); };
  auto central = [&](float& value, const Tensor& input) {
    const float saved = value;
    value = saved + static_cast<float>(o.step);
    const float up = value;
    const double plus = loss(input);
    value = saved - static_cast<float>(o.step);
    const float down = value;
    const double minus = loss(input);
    value = saved;
    return (plus - minus) / (static_cast<double>(up) - static_cast<double>(down));
  };

  if (o.check_input) {
    ASSERT_EQ(dx.size(), x.data.size()) << "dx has the wrong size";
    Tensor probe = x;
    GradientComparison cmp;
    for (const size_t i : probe_indices(x.data.size(), o.probes, o.seed))
      cmp.add(dx[i], central(probe.data[i], probe));
    std::string where;
    const double worst = cmp.worst(o.tol, o.floor, &where);
    if (std::getenv("NN_TEST_VERBOSE")) std::printf("  %s dx worst %.3f\n", what.c_str(), worst);
    EXPECT_LE(worst, 1.0) << "dx: " << where;
  }
  const auto params = layer.parameters();
  for (size_t k = 0; k < params.size(); ++k) {
    GradientComparison cmp;
    for (const size_t i : probe_indices(params[k]->value.size(), o.probes, o.seed + k + 1))
      cmp.add(grads[k][i], central(params[k]->value[i], x));
    std::string where;
    const double worst = cmp.worst(o.tol, o.floor, &where);
    if (std::getenv("NN_TEST_VERBOSE")) std::printf("  %s %s worst %.3f\n", what.c_str(), params[k]->name.c_str(), worst);
    EXPECT_LE(worst, 1.0) << params[k]->name << ": " << where;
  }
}

// Runs f, expects normkit::Error of `kind` whose message contains every part.
template <class F>
::testing::AssertionResult throws_error(F&& f, normkit::ErrorKind kind,
                                        std::initializer_list<std::string> parts) {
  try {
    f();
  } catch (const normkit::Error& e) {
    const std::string message = e.what();
    if (e.kind() != kind)
      return ::testing::AssertionFailure() << "wrong error kind for: " << message;
    for (const auto& part : parts)
      if (message.find(part) == std::string::npos)
        return ::testing::AssertionFailure() << "message '" << message << "' lacks '" << part << "'";
    return ::testing::AssertionSuccess() << message;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "not a normkit::Error: " << e.what();
  }
  return ::testing::AssertionFailure() << "no exception";
}

// A fresh directory under the system's temporary directory, removed at the end.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag) {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            ("normkit-" + tag + "-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

}  // namespace nn_test
