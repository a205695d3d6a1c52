// The engine's groupnorm and instancenorm layers: against the core functions
// in double (the reference), gradients against central differences, both
// memory formats, running statistics, errors, and small models whose loss falls.
#include <gtest/gtest.h>

#include "nn_test_support.hpp"
#include "normkit/engine/train.hpp"
#include "normkit/group_norm.hpp"

namespace {

using namespace nn_test;
using normkit::ErrorKind;
using normkit::nn::Model;
using normkit::nn::ModelSpec;
using normkit::nn::Parameter;

constexpr MemoryFormat kFormats[] = {MemoryFormat::channels_first, MemoryFormat::channels_last};

void expect_close(const std::vector<float>& actual, const std::vector<double>& expected, double tol,
                  const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i)
    ASSERT_NEAR(actual[i], expected[i], tol * (1 + std::abs(expected[i]))) << what << " at " << i;
}

Parameter* param(Layer& layer, const std::string& name) {
  for (auto* p : layer.parameters())
    if (p->name == name) return p;
  return nullptr;
}

normkit::TensorView<double> canonical_view(std::vector<double>& v, const std::vector<int64_t>& shape) {
  return normkit::TensorView<double>::contiguous(
      v.data(), shape, shape.size() == 2 ? normkit::Layout::NC : normkit::Layout::NCHW);
}

TEST(NnGroupNorm, LayerMatchesTheReferenceAndFiniteDifferences) {
  struct Case {
    std::vector<int64_t> shape;
    std::string line;
    int64_t groups;
  };
  const std::vector<Case> cases = {
      {{5, 12}, "groupnorm groups=3", 3},
      {{3, 8, 3, 5}, "groupnorm groups=2 eps=0.001", 2},
      {{2, 8, 4, 3}, "groupnorm", 8},  // default: min(32, C) = C
      {{2, 64, 2, 2}, "groupnorm", 32},
  };
  for (const auto& c : cases)
    for (const auto format : kFormats) {
      if (c.shape.size() == 2 && format == MemoryFormat::channels_last) continue;
      SCOPED_TRACE(c.line + ", " + name_of(format));
      const int64_t C = c.shape[1];
      std::vector<int64_t> input(c.shape.begin() + 1, c.shape.end());
      auto layer = make_layer(c.line, input, format);
      EXPECT_NE(layer->describe().find("groups " + std::to_string(c.groups)), std::string::npos)
          << layer->describe();
      auto* gamma = param(*layer, "weight");
      auto* beta = param(*layer, "bias");
      ASSERT_TRUE(gamma && beta);
      gamma->value = normal_values(C, 81, 0.5f, 1.0f);
      beta->value = normal_values(C, 82);
      const auto xs = normal_values(product(c.shape), 83, 2.0f, 1.0f);
      const auto dys = normal_values(product(c.shape), 84);
      const Tensor x = make_tensor(c.shape, format, xs);
      const Tensor& y = layer->forward(x, Mode::train);

      const double eps = c.line.find("eps") != std::string::npos ? 1e-3 : 1e-5;
      std::vector<double> xd(xs.begin(), xs.end()), yd(xs.size()), dyd(dys.begin(), dys.end()),
          dxd(xs.size());
      std::vector<double> g(gamma->value.begin(), gamma->value.end()), b(beta->value.begin(), beta->value.end());
      std::vector<double> mean(c.shape[0] * c.groups), invstd(mean.size()), dg(C), db(C);
      normkit::group_norm_forward<double>(canonical_view(xd, c.shape), canonical_view(yd, c.shape),
                                          c.groups, g, b, {mean, invstd}, eps);
      expect_close(canonical(y), yd, 1e-5, "y");
      const Tensor& ye = layer->forward(x, Mode::eval);
      expect_close(canonical(ye), yd, 1e-5, "eval y (the same: per-sample statistics)");

      layer->forward(x, Mode::train);
      zero_grads(*layer);
      const Tensor dy = make_tensor(c.shape, format, dys);
      const Tensor& dx = layer->backward(dy, true);
      normkit::group_norm_backward<double>(canonical_view(xd, c.shape), canonical_view(dyd, c.shape),
                                           canonical_view(dxd, c.shape), c.groups, g, mean, invstd,
                                           dg, db);
      expect_close(canonical(dx), dxd, 1e-4, "dx");
      expect_close(gamma->grad, dg, 1e-5, "dgamma");
      expect_close(beta->grad, db, 1e-5, "dbeta");
      check_layer_gradients(*layer, x, {}, c.line);
    }
}

TEST(NnGroupNorm, WithoutAffineHasNoParameters) {
  auto layer = make_layer("groupnorm groups=2 affine=0", {4, 3, 3}, MemoryFormat::channels_last);
  EXPECT_TRUE(layer->parameters().empty());
  EXPECT_TRUE(layer->buffers().empty());
  const Tensor x = make_tensor({2, 4, 3, 3}, MemoryFormat::channels_last, normal_values(72, 5));
  check_layer_gradients(*layer, x, {}, "groupnorm affine=0");
}

TEST(NnInstanceNorm, TrainingEvalRunningStatisticsAndGradients) {
  const std::vector<int64_t> shape = {3, 4, 3, 5};
  for (const auto format : kFormats)
    for (const bool track : {false, true}) {
      SCOPED_TRACE(std::string(name_of(format)) + (track ? ", running" : ", no running"));
      auto layer = make_layer(std::string("instancenorm momentum=0.2 track_running_stats=") +
                                  (track ? "1" : "0"),
                              {4, 3, 5}, format);
      auto* gamma = param(*layer, "weight");
      ASSERT_TRUE(gamma) << "affine by default";
      gamma->value = normal_values(4, 91, 0.5f, 1.0f);
      param(*layer, "bias")->value = normal_values(4, 92);
      ASSERT_EQ(layer->buffers().size(), track ? 3u : 0u);
      const auto xs = normal_values(product(shape), 93, 2.0f, -1.0f);
      const Tensor x = make_tensor(shape, format, xs);
      const Tensor& y = layer->forward(x, Mode::train);
      std::vector<double> xd(xs.begin(), xs.end()), yd(xs.size()), mean(12), invstd(12), rm(4, 0.0),
          rv(4, 1.0);
      std::vector<double> g(gamma->value.begin(), gamma->value.end()),
          b(param(*layer, "bias")->value.begin(), param(*layer, "bias")->value.end());
      normkit::BatchNormOptions options;
      options.momentum = 0.2;
      normkit::instance_norm_forward_training<double>(
          canonical_view(xd, shape), canonical_view(yd, shape), g, b, {mean, invstd},
          track ? normkit::RunningStats<double>{rm, rv, nullptr} : normkit::RunningStats<double>{},
          options);
      expect_close(canonical(y), yd, 1e-5, "y");
      if (track) {
        expect_close(*layer->buffers()[0].values, rm, 1e-5, "running_mean");
        expect_close(*layer->buffers()[1].values, rv, 1e-5, "running_var");
        EXPECT_EQ(layer->buffers()[2].values->at(0), 0.0f) << "PyTorch does not count batches";
      }
      // Eval: running statistics with them, instance statistics without.
      const Tensor& ye = layer->forward(x, Mode::eval);
      if (track)
        normkit::instance_norm_forward_inference<double>(canonical_view(xd, shape),
                                                         canonical_view(yd, shape), g, b, rm, rv);
      expect_close(canonical(ye), yd, 1e-5, "eval y");
      GradCheckOptions o;
      check_layer_gradients(*layer, x, o, "train");
      o.mode = Mode::eval;
      check_layer_gradients(*layer, x, o, "eval");
    }
}

TEST(NnGroupNorm, BadSpecsAreRejectedWithTheLayersName) {
  EXPECT_TRUE(throws_error([] { make_layer("groupnorm", {48, 4, 4}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument,
                           {"groupnorm", "48 channels", "default 32 groups", "groups=G"}));
  EXPECT_TRUE(throws_error([] { make_layer("groupnorm groups=5", {12}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"groupnorm", "groups=5"}));
  EXPECT_TRUE(throws_error([] { make_layer("groupnorm groups=0", {12}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"groups must be >= 1"}));
  EXPECT_TRUE(throws_error([] { make_layer("groupnorm eps=0", {12}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"groupnorm: eps"}));
  EXPECT_TRUE(throws_error([] { make_layer("groupnorm affine=2", {12}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"affine must be 0 or 1"}));
  EXPECT_TRUE(throws_error([] { make_layer("instancenorm", {12}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"instancenorm", "[C, H, W]", "[12]"}));
  EXPECT_TRUE(throws_error([] { make_layer("instancenorm", {3, 1, 1}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"instancenorm", "more than 1 spatial"}));
  EXPECT_TRUE(throws_error([] { make_layer("instancenorm momentum=3", {3, 2, 2}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"momentum"}));
  EXPECT_TRUE(throws_error([] { make_layer("instancenorm groups=2", {3, 2, 2}, MemoryFormat::channels_first); },
                           ErrorKind::invalid_argument, {"unknown option 'groups'"}));
  // The model without normalization drops these layers too.
  const auto spec = ModelSpec::parse("input 2 4 4; conv 4 3 pad=1 bias=0; groupnorm groups=2; relu;"
                                     "conv 4 3 pad=1 bias=0; instancenorm; flatten; linear 3");
  EXPECT_EQ(spec.without_batch_norm().to_string(),
            "input 2 4 4; conv 4 3 pad=1; relu; conv 4 3 pad=1; flatten; linear 3");
}

TEST(NnGroupNorm, SmallModelsLossFallsAndTheyLearn) {
  const auto train = blobs(200, 1);
  const auto test = blobs(100, 2);
  for (const std::string norm : {"groupnorm groups=2", "instancenorm track_running_stats=1",
                                 "instancenorm"}) {
    const auto spec = ModelSpec::parse("input 2 4 4; conv 8 3 pad=1 bias=0; " + norm +
                                       "; relu; maxpool 2; flatten; linear 16 bias=0; "
                                       "groupnorm groups=4; relu; linear 4");
    for (const auto format : kFormats) {
      SCOPED_TRACE(norm + ", " + name_of(format));
      Model model(spec, format);
      model.initialize({}, 42);
      auto sgd = normkit::nn::make_sgd({0.05f, 0.9f, 1e-4f}, model.parameters());
      std::vector<double> losses;
      for (int64_t epoch = 0; epoch < 5; ++epoch)
        losses.push_back(normkit::train::train_epoch(model, *sgd, train, 16, 42, epoch).loss);
      EXPECT_LT(losses.back(), 0.5 * losses.front()) << losses.front() << " -> " << losses.back();
      // Chance is 0.25. Per-sample statistics remove each blob image's overall level,
      // which the batchnorm model of test_nn_training.cpp may use: measured 0.88 with
      // groupnorm and 0.97 with instancenorm (both formats, same numbers).
      EXPECT_GT(normkit::train::evaluate(model, test, 32).accuracy, 0.8);
    }
  }
}

}  // namespace
