// Folding a model's batchnorm layers (normkit/engine/nn_fold.hpp): the folded model's
// eval-mode logits equal the original's to float rounding (mlp and cnn specs,
// both memory formats), which layers fold and which stay, the folded spec and
// its checkpoint, and errors that leave the model alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "nn_test_support.hpp"
#include "normkit/engine/checkpoint.hpp"
#include "normkit/engine/nn_fold.hpp"

namespace {

using namespace nn_test;
using normkit::ErrorKind;
using normkit::nn::Model;
using normkit::nn::ModelSpec;
namespace io = normkit::io;

constexpr MemoryFormat kFormats[] = {MemoryFormat::channels_first, MemoryFormat::channels_last};

// A model whose batchnorm layers hold statistics and affine parameters as a
// trained one would: running statistics from a few train-mode batches (so they
// describe the activations they will normalize), γ of both signs and sizes,
// β, and biases away from zero.
void make_trained_like(Model& model, uint64_t seed) {
  model.initialize({}, seed);
  std::vector<int64_t> shape = {16};
  shape.insert(shape.end(), model.spec().input_shape.begin(), model.spec().input_shape.end());
  for (uint64_t step = 0; step < 6; ++step) {
    const auto values = normal_values(static_cast<size_t>(product(shape)), seed * 100 + step, 1.5f, 0.3f);
    model.forward(make_tensor(shape, model.format(), values), Mode::train);
  }
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> magnitude(0.3f, 2.5f), offset(-1.0f, 1.0f);
  for (const auto& layer : model.layers()) {
    if (layer->type().find("batch") != std::string::npos) {  // batchnorm and its variants
      auto params = layer->parameters();
      for (float& g : params[0]->value) g = (offset(rng) < -0.7f ? -1.0f : 1.0f) * magnitude(rng);
      for (float& b : params[1]->value) b = offset(rng);
    } else {
      for (auto* p : layer->parameters())
        if (p->name == "bias")
          for (float& b : p->value) b = 0.5f * offset(rng);
    }
  }
}

Tensor some_input(const Model& model, int64_t n, uint64_t seed) {
  std::vector<int64_t> shape = {n};
  shape.insert(shape.end(), model.spec().input_shape.begin(), model.spec().input_shape.end());
  return make_tensor(shape, model.format(), normal_values(static_cast<size_t>(product(shape)), seed, 1.5f, 0.3f));
}

std::vector<std::vector<float>> state_copy(Model& model) {
  std::vector<std::vector<float>> out;
  for (const auto& [name, values] : model.state()) out.push_back(*values);
  return out;
}

// Logits of the two models on the same batch: the largest difference must be
// float rounding of the logits' scale, and every row must predict the same class.
void expect_same_predictions(Model& original, Model& folded, const Tensor& x) {
  const std::vector<float> a = original.forward(x, Mode::eval).data;
  const std::vector<float> b = folded.forward(x, Mode::eval).data;
  ASSERT_EQ(a.size(), b.size());
  const int64_t classes = static_cast<int64_t>(a.size()) / x.shape[0];
  double scale = 1, worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    scale = std::max(scale, double{std::abs(a[i])});
    worst = std::max(worst, double{std::abs(a[i] - b[i])});
  }
  if (std::getenv("NN_TEST_VERBOSE"))
    std::printf("  largest logit difference %.3g = %.3g of the scale %.3g\n", worst, worst / scale, scale);
  // Each layer adds a few float roundings relative to the size of its values;
  // 1e-5 of the logits' scale is ~100 float epsilons over the whole network.
  EXPECT_LE(worst, 1e-5 * scale) << "largest logit difference " << worst << " at scale " << scale;
  for (int64_t n = 0; n < x.shape[0]; ++n) {
    const auto row_a = a.begin() + n * classes, row_b = b.begin() + n * classes;
    EXPECT_EQ(std::max_element(row_a, row_a + classes) - row_a,
              std::max_element(row_b, row_b + classes) - row_b)
        << "sample " << n;
  }
}

struct FoldCase {
  const char* name;
  const char* spec;
  const char* folded_spec;
  int64_t removed_parameters;  // 2C per folded BN, less C for each bias the layer gains
};

const FoldCase kCases[] = {
    {"mlp",
     "input 20; linear 32 bias=0; batchnorm; sigmoid; linear 24; batchnorm eps=0.001; relu;"
     "linear 16 bias=0; batchnorm momentum=0.3; tanh; linear 5",
     "input 20; linear 32 bias=1; sigmoid; linear 24 bias=1; relu; linear 16 bias=1; tanh; linear 5",
     (64 - 32) + 48 + (32 - 16)},
    {"cnn",
     "input 3 10 10; conv 8 3 pad=1 bias=0; batchnorm; relu; maxpool 2;"
     "conv 12 3 stride=2 pad=1; batchnorm eps=0.01; relu; flatten; linear 16 bias=0; batchnorm;"
     "relu; linear 6",
     "input 3 10 10; conv 8 3 pad=1 bias=1; relu; maxpool 2; conv 12 3 stride=2 pad=1 bias=1;"
     "relu; flatten; linear 16 bias=1; relu; linear 6",
     (16 - 8) + 24 + (32 - 16)},
    {"cnn-small", nullptr, nullptr, (64 - 32) + (128 - 64) + (256 - 128)},
    // The BN variants infer as BN does: batch renorm, ghost BN, frozen BN.
    {"variants",
     "input 20; linear 32 bias=0; batchrenorm; sigmoid; linear 24 bias=0; ghostbatchnorm size=4; relu;"
     "linear 16 bias=0; batchnorm frozen=1; tanh; linear 5",
     "input 20; linear 32 bias=1; sigmoid; linear 24 bias=1; relu; linear 16 bias=1; tanh; linear 5",
     (64 - 32) + (48 - 24) + (32 - 16)},
};

TEST(NnFold, FoldedModelPredictsWhatTheOriginalDoes) {
  for (const auto& c : kCases)
    for (const auto format : kFormats) {
      SCOPED_TRACE(std::string(c.name) + " " + name_of(format));
      const ModelSpec spec = c.spec ? ModelSpec::parse(c.spec) : ModelSpec::preset(c.name);
      Model model(spec, format);
      make_trained_like(model, 5);
      const auto before = state_copy(model);
      const auto result = normkit::nn::fold_batch_norms(model);
      EXPECT_EQ(state_copy(model), before) << "folding changed the original model";

      const ModelSpec& folded = result.model->spec();
      if (c.folded_spec) {
        EXPECT_EQ(folded, ModelSpec::parse(c.folded_spec)) << folded.to_string();
      }
      for (const auto& layer : folded.layers) EXPECT_EQ(layer.type.find("batch"), std::string::npos);
      EXPECT_EQ(ModelSpec::parse(folded.to_string()), folded);
      EXPECT_EQ(result.model->format(), format);
      EXPECT_EQ(result.folded.size(), 3u);
      EXPECT_TRUE(result.kept.empty());
      for (const auto& f : result.folded) {
        EXPECT_NE(spec.layers[f.batchnorm].type.find("batch"), std::string::npos);
        EXPECT_EQ(f.into + 1, f.batchnorm);
        EXPECT_EQ(folded.layers[f.folded_index].type, spec.layers[f.into].type);
      }
      EXPECT_EQ(model.parameter_count() - result.model->parameter_count(), c.removed_parameters);
      expect_same_predictions(model, *result.model, some_input(model, 24, 9));
    }
}

TEST(NnFold, OnlyBatchNormsRightAfterLinearOrConvFold) {
  // 0 after the input: kept; 2 into 1, then 3 into the same layer; 5 after relu:
  // kept; 8 into linear 7, which has its own bias.
  const ModelSpec spec = ModelSpec::parse(
      "input 6; batchnorm; linear 8 bias=0; batchnorm; batchnorm eps=0.1; relu; batchnorm;"
      "dropout 0.25; linear 4; batchnorm; linear 3");
  for (const auto format : kFormats) {
    Model model(spec, format);
    make_trained_like(model, 3);
    const auto result = normkit::nn::fold_batch_norms(model);
    EXPECT_EQ(result.model->spec(),
              ModelSpec::parse("input 6; batchnorm; linear 8 bias=1; relu; batchnorm; dropout 0.25;"
                               "linear 4 bias=1; linear 3"));
    ASSERT_EQ(result.folded.size(), 3u);
    const size_t folded[][3] = {{2, 1, 1}, {3, 1, 1}, {8, 7, 5}};
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(result.folded[i].batchnorm, folded[i][0]);
      EXPECT_EQ(result.folded[i].into, folded[i][1]);
      EXPECT_EQ(result.folded[i].folded_index, folded[i][2]);
    }
    ASSERT_EQ(result.kept.size(), 2u);
    EXPECT_EQ(result.kept[0].batchnorm, 0u);
    EXPECT_EQ(result.kept[0].folded_index, 0u);
    EXPECT_EQ(result.kept[0].after, "input");
    EXPECT_EQ(result.kept[1].batchnorm, 5u);
    EXPECT_EQ(result.kept[1].folded_index, 3u);
    EXPECT_EQ(result.kept[1].after, "relu");
    expect_same_predictions(model, *result.model, some_input(model, 20, 4));
  }

  // Nothing to fold: BN after an activation and after flatten. The folded model
  // is the same model and computes the same bits.
  const ModelSpec unfoldable = ModelSpec::parse(
      "input 2 6 6; conv 4 3; relu; batchnorm; maxpool 2; flatten; batchnorm; linear 3");
  for (const auto format : kFormats) {
    Model model(unfoldable, format);
    make_trained_like(model, 8);
    const auto result = normkit::nn::fold_batch_norms(model);
    EXPECT_EQ(result.model->spec(), unfoldable);
    EXPECT_TRUE(result.folded.empty());
    ASSERT_EQ(result.kept.size(), 2u);
    EXPECT_EQ(result.kept[0].after, "relu");
    EXPECT_EQ(result.kept[1].after, "flatten");
    const Tensor x = some_input(model, 5, 2);
    EXPECT_EQ(model.forward(x, Mode::eval).data, result.model->forward(x, Mode::eval).data);
  }
}

TEST(NnFold, CheckpointOfTheFoldedModelLoadsAndPredictsTheSame) {
  for (const auto format : kFormats) {
    Model model(ModelSpec::preset("cnn-small"), format);
    make_trained_like(model, 12);
    auto optimizer = normkit::nn::make_sgd({0.05f, 0.9f, 0.0f, false}, model.parameters());
    normkit::data::Standardizer standardizer;
    standardizer.fit(normal_values(3 * 784, 4, 2.0f, 0.5f), 784);
    const io::Checkpoint original =
        io::make_checkpoint(model, optimizer.get(), standardizer, {3, 77, 64, "{\"name\": \"x\"}", {}});

    const io::FoldedCheckpoint folded = io::fold_checkpoint(original);
    const io::Checkpoint& c = folded.checkpoint;
    EXPECT_EQ(folded.folded.size(), 3u);
    EXPECT_TRUE(c.optimizer.name.empty() && c.optimizer.arrays.empty());
    EXPECT_EQ(c.format, format);
    EXPECT_EQ(c.progress.epochs_done, 3);
    EXPECT_EQ(c.progress.seed, 77u);
    EXPECT_EQ(c.progress.batch_size, 64);
    EXPECT_EQ(c.progress.application, "{\"name\": \"x\"}");
    ASSERT_EQ(c.standardizer.features(), 784);
    EXPECT_EQ(c.standardizer.mean(), standardizer.mean());
    EXPECT_EQ(c.standardizer.scale(), standardizer.scale());

    // Through the file format and back, with the checks every load makes.
    const io::Checkpoint loaded = io::from_bytes(io::to_bytes(c), "folded.nkc");
    auto reloaded = io::build_model(loaded);
    const auto direct = normkit::nn::fold_batch_norms(model);
    EXPECT_EQ(loaded.spec, direct.model->spec());
    const Tensor x = some_input(model, 6, 31);
    EXPECT_EQ(reloaded->forward(x, Mode::eval).data, direct.model->forward(x, Mode::eval).data);
    expect_same_predictions(model, *reloaded, x);
  }
}

TEST(NnFold, StatisticsThatCannotBeFoldedAreAnErrorAndChangeNothing) {
  Model model(ModelSpec::parse("input 4; linear 5 bias=0; batchnorm; relu; linear 3"));
  make_trained_like(model, 2);
  for (const auto& [name, values] : model.state())
    if (name == "1.running_var") (*values)[2] = -1.0f;  // var + eps < 0
  const auto before = state_copy(model);
  EXPECT_TRUE(throws_error([&] { normkit::nn::fold_batch_norms(model); }, ErrorKind::runtime,
                           {"batchnorm 1 into layer 0", "channel 2", "running_var + eps"}));
  EXPECT_EQ(state_copy(model), before);
}

}  // namespace
