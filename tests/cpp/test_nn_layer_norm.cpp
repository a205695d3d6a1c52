// The engine's layernorm layer: against the core kernels (double reference) in
// both memory formats, its gradients against finite differences, the spec
// option, and a small model with layernorm in place of batchnorm that trains.
#include <gtest/gtest.h>

#include <cmath>

#include "nn_test_support.hpp"
#include "normkit/engine/train.hpp"
#include "normkit/layer_norm.hpp"

namespace {

using namespace nn_test;
using normkit::ErrorKind;
using normkit::nn::Model;
using normkit::nn::ModelSpec;
using normkit::nn::Parameter;

constexpr MemoryFormat kFormats[] = {MemoryFormat::channels_first, MemoryFormat::channels_last};

Parameter* param(Layer& layer, const std::string& name) {
  for (auto* p : layer.parameters())
    if (p->name == name) return p;
  return nullptr;
}

void expect_close(const std::vector<float>& actual, const std::vector<double>& expected, double tol,
                  const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i)
    ASSERT_NEAR(actual[i], expected[i], tol * (1 + std::abs(expected[i]))) << what << " at " << i;
}

TEST(NnLayerNorm, MatchesTheKernelsOverEachSampleInBothFormats) {
  for (const auto& shape : {std::vector<int64_t>{6, 5}, std::vector<int64_t>{3, 4, 3, 5}})
    for (const auto format : kFormats) {
      if (shape.size() == 2 && format == MemoryFormat::channels_last) continue;
      const std::string what = std::string("shape rank ") + std::to_string(shape.size()) + ", " + name_of(format);
      SCOPED_TRACE(what);
      const int64_t N = shape[0], F = product(shape) / N;
      std::vector<int64_t> input(shape.begin() + 1, shape.end());
      auto layer = make_layer("layernorm eps=0.001", input, format);
      auto* gamma = param(*layer, "weight");
      auto* beta = param(*layer, "bias");
      ASSERT_TRUE(gamma && beta);
      ASSERT_EQ(gamma->value.size(), static_cast<size_t>(F)) << "one weight per feature";
      EXPECT_TRUE(layer->buffers().empty());
      gamma->value = normal_values(F, 81, 0.5f, 1.0f);
      beta->value = normal_values(F, 82);
      const auto xs = normal_values(product(shape), 83, 2.0f, 3.0f);
      const auto dys = normal_values(product(shape), 84);
      const Tensor x = make_tensor(shape, format, xs);
      const Tensor& y = layer->forward(x, Mode::train);

      // The oracle: N rows of F values in canonical (C, H, W) order, in double,
      // as torch.nn.LayerNorm(normalized_shape=[C, H, W]).
      std::vector<double> xd(xs.begin(), xs.end()), yd(xs.size()), dyd(dys.begin(), dys.end()),
          dxd(xs.size()), g(gamma->value.begin(), gamma->value.end()),
          b(beta->value.begin(), beta->value.end()), mean(N), invstd(N), dg(F), db(F);
      auto rows = [&](std::vector<double>& v) { return normkit::RowsView<double>::contiguous(v.data(), N, F); };
      normkit::layer_norm_forward<double>(rows(xd), rows(yd), g, b, {mean, invstd}, 1e-3);
      expect_close(canonical(y), yd, 1e-5, "y");
      const Tensor& ye = layer->forward(x, Mode::eval);
      expect_close(canonical(ye), yd, 1e-5, "eval y (the same: per-sample statistics)");

      layer->forward(x, Mode::train);
      zero_grads(*layer);
      const Tensor dy = make_tensor(shape, format, dys);
      const Tensor& dx = layer->backward(dy, true);
      normkit::layer_norm_backward<double>(rows(xd), rows(dyd), rows(dxd), g, mean, invstd, dg, db);
      expect_close(canonical(dx), dxd, 1e-4, "dx");
      expect_close(gamma->grad, dg, 1e-5, "dgamma");
      expect_close(beta->grad, db, 1e-5, "dbeta");

      // Gradients accumulate across backward calls, as every layer's do.
      layer->backward(dy, false);
      std::vector<double> twice(dg.size());
      for (size_t i = 0; i < dg.size(); ++i) twice[i] = 2 * dg[i];
      expect_close(gamma->grad, twice, 1e-5, "dgamma after two backward calls");

      GradCheckOptions o;
      o.step = 1e-2;
      check_layer_gradients(*layer, x, o, what);
    }
}

TEST(NnLayerNorm, SpecOptionsAndErrors) {
  auto layer = make_layer("layernorm", {3, 2, 2}, MemoryFormat::channels_first);
  EXPECT_EQ(layer->type(), "layernorm");
  EXPECT_EQ(layer->describe(), "layernorm([3, 2, 2], eps 1e-05)");
  EXPECT_TRUE(throws_error([] { make_layer("layernorm eps=0", {3}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"eps"}));
  EXPECT_TRUE(throws_error([] { make_layer("layernorm momentum=0.1", {3}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"momentum"}));
  EXPECT_TRUE(throws_error([&] { layer->output_shape({3, 2, 3}); }, ErrorKind::invalid_argument,
                           {"layernorm", "[3, 2, 3]"}));
  const auto spec = ModelSpec::parse("input 4; linear 8; layernorm eps=0.01; relu; linear 3");
  EXPECT_EQ(ModelSpec::parse(spec.to_string()), spec);
}

TEST(NnLayerNorm, AModelWithLayerNormTrainsTheSameInBothFormats) {
  const auto train = blobs(200, 1);
  const auto test = blobs(100, 2);
  const auto spec = ModelSpec::parse(
      "input 2 4 4; conv 4 3 pad=1; layernorm; relu; maxpool 2; flatten;"
      "linear 16; layernorm; sigmoid; linear 4");
  std::vector<double> first_losses;
  for (const auto format : kFormats) {
    SCOPED_TRACE(name_of(format));
    Model model(spec, format);
    model.initialize({}, 42);
    auto sgd = normkit::nn::make_sgd({0.05f, 0.9f, 1e-4f}, model.parameters());
    std::vector<double> losses;
    for (int64_t epoch = 0; epoch < 5; ++epoch)
      losses.push_back(normkit::train::train_epoch(model, *sgd, train, 16, 42, epoch).loss);
    EXPECT_LT(losses.back(), 0.5 * losses.front()) << losses.front() << " -> " << losses.back();
    EXPECT_GT(normkit::train::evaluate(model, test, 32).accuracy, 0.9);
    // The formats differ only in the order of the sums (conv, layernorm rows).
    if (first_losses.empty()) {
      first_losses = losses;
    } else {
      for (size_t e = 0; e < losses.size(); ++e)
        EXPECT_NEAR(losses[e], first_losses[e], 1e-3 * first_losses[e]) << "epoch " << e;
    }
  }
}

}  // namespace
