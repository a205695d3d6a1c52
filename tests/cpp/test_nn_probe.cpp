// The engine pieces the claims lab needs: noisy BN (batchnorm noise=S), the
// probes (probe.hpp) and the parametric MLP (ModelSpec::mlp).
#include <cmath>

#include "nn_test_support.hpp"
#include "normkit/engine/probe.hpp"

using namespace nn_test;
using normkit::nn::Model;
using normkit::nn::ModelSpec;

namespace {

Tensor random_tensor(const std::vector<int64_t>& shape, MemoryFormat format, uint64_t seed) {
  return make_tensor(shape, format, normal_values(static_cast<size_t>(product(shape)), seed, 1.5f));
}

}  // namespace

TEST(NoisyBatchNorm, GradientsMatchFiniteDifferencesWithTheNoiseOfTheStep) {
  for (const auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (const std::vector<int64_t>& shape : {std::vector<int64_t>{16, 5}, std::vector<int64_t>{4, 3, 5, 6}}) {
      std::vector<int64_t> sample(shape.begin() + 1, shape.end());
      auto layer = make_layer("batchnorm noise=1", sample, format, 3);
      layer->set_step(7, 11);
      const Tensor x = random_tensor(shape, format, 5);
      check_layer_gradients(*layer, x, {}, std::string("noisy BN ") + name_of(format) +
                                               " rank " + std::to_string(shape.size()));
    }
}

TEST(NoisyBatchNorm, NoiseMovesWithTheStepIsReproducibleAndStaysOutOfEvaluation) {
  const std::vector<int64_t> shape = {64, 4};
  const Tensor x = random_tensor(shape, MemoryFormat::channels_first, 2);
  auto noisy = make_layer("batchnorm noise=1", {4}, MemoryFormat::channels_first, 2);
  auto plain = make_layer("batchnorm", {4}, MemoryFormat::channels_first, 2);
  auto quiet = make_layer("batchnorm noise=0", {4}, MemoryFormat::channels_first, 2);
  noisy->set_step(1, 5);
  const std::vector<float> a = noisy->forward(x, Mode::train).data;
  noisy->set_step(1, 5);
  EXPECT_EQ(noisy->forward(x, Mode::train).data, a) << "same seed and step: the same noise";
  noisy->set_step(1, 6);
  EXPECT_NE(noisy->forward(x, Mode::train).data, a) << "the noise changes every step";
  const std::vector<float> clean = plain->forward(x, Mode::train).data;
  EXPECT_EQ(quiet->forward(x, Mode::train).data, clean) << "noise=0 is plain BN";
  // The noise is a·y + b with E[a] in [0.5, 1.5] and E[b] in [-1, 1] per channel:
  // the output differs from BN's by far more than rounding.
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, static_cast<double>(std::abs(a[i] - clean[i])));
  EXPECT_GT(diff, 0.1);
  // Evaluation is noise-free: the same as a plain BN with the same running statistics.
  auto noisy_eval = make_layer("batchnorm noise=1", {4}, MemoryFormat::channels_first, 2);
  auto plain_eval = make_layer("batchnorm", {4}, MemoryFormat::channels_first, 2);
  noisy_eval->forward(x, Mode::train);
  plain_eval->forward(x, Mode::train);
  EXPECT_EQ(noisy_eval->forward(x, Mode::eval).data, plain_eval->forward(x, Mode::eval).data);
}

TEST(NoisyBatchNorm, NormNoisyAddsTheNoiseToEveryBatchNorm) {
  const ModelSpec spec = ModelSpec::preset("mlp-paper").with_norm("noisy");
  int noisy = 0;
  for (const auto& layer : spec.layers)
    if (layer.type == "batchnorm") noisy += layer.options.at("noise") == "1";
  EXPECT_EQ(noisy, 3);
  EXPECT_TRUE(throws_error([] { Model(ModelSpec::parse("input 4; batchnorm noise=-1; linear 2")); },
                           normkit::ErrorKind::invalid_argument, {"noise must be in [0, 10]"}));
}

namespace {

struct ProbeSetup {
  Model model;
  Tensor batch;
  std::vector<int32_t> labels;
  explicit ProbeSetup(const std::string& options)
      : model(ModelSpec::mlp(options, {12}, 3)) {
    model.initialize({}, 3);
    batch = make_tensor({40, 12}, MemoryFormat::channels_first, normal_values(480, 9));
    for (int i = 0; i < 40; ++i) labels.push_back(i % 3);
  }
};

std::vector<std::vector<float>> state_of(Model& model) {
  std::vector<std::vector<float>> out;
  for (auto& [name, values] : model.state()) out.push_back(*values);
  return out;
}

}  // namespace

TEST(Probe, LeavesParametersAndBuffersAsTheyWere) {
  ProbeSetup s("depth=3,width=10,act=relu");
  const auto before = state_of(s.model);
  normkit::probe::Options o;
  o.ics = true;
  const auto r = normkit::probe::run(s.model, s.batch, s.labels, o);
  EXPECT_EQ(state_of(s.model), before) << "running statistics and weights are restored";
  for (auto* p : s.model.parameters())
    for (const float g : p->grad) ASSERT_EQ(g, 0.0f) << "gradients are zeroed";
  EXPECT_EQ(r.activations.size(), 3u);
  EXPECT_EQ(r.norms.size(), 3u);
  EXPECT_EQ(r.weights.size(), 4u);
}

TEST(Probe, GradientNormsAndPercentilesMatchAManualPass) {
  ProbeSetup s("depth=2,width=10,act=sigmoid");
  normkit::probe::Options o;
  o.units = 2;
  o.percentiles = {0, 50, 100};
  const auto r = normkit::probe::run(s.model, s.batch, s.labels, o);
  // The same forward and backward by hand (train mode: batch statistics).
  const auto saved = state_of(s.model);
  const Tensor& logits = s.model.forward(s.batch, Mode::train);
  Tensor dlogits;
  const auto loss = normkit::nn::softmax_cross_entropy(logits, s.labels.data(), &dlogits);
  s.model.zero_grad();
  s.model.backward(dlogits);
  EXPECT_NEAR(r.loss, loss.loss, 1e-6);
  size_t k = 0;
  for (const auto& layer : s.model.layers()) {
    if (layer->type() != "linear") continue;
    double sum = 0;
    for (const float g : layer->parameters().front()->grad) sum += static_cast<double>(g) * g;
    EXPECT_NEAR(r.weights.at(k).grad_norm, std::sqrt(sum), 1e-6 * std::sqrt(sum)) << "weight layer " << k;
    ++k;
  }
  // Percentiles 0 and 100 are the min and max of a unit's input (the BN output
  // before the first sigmoid, layer 3): recompute them from that layer.
  const auto& layers = s.model.layers();
  const Tensor* current = &s.batch;
  for (size_t i = 0; i < 3; ++i) current = &layers[i]->forward(*current, Mode::train);
  for (int64_t u = 0; u < 2; ++u) {
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t n = 0; n < 40; ++n) {
      lo = std::min(lo, current->data[n * 10 + u]);
      hi = std::max(hi, current->data[n * 10 + u]);
    }
    EXPECT_FLOAT_EQ(static_cast<float>(r.activations[0].percentiles[u][0]), lo);
    EXPECT_FLOAT_EQ(static_cast<float>(r.activations[0].percentiles[u][2]), hi);
  }
  EXPECT_EQ(r.activations[0].layer, 3u);
  EXPECT_EQ(state_of(s.model).size(), saved.size());
}

TEST(Probe, GradientIcsIsZeroWithoutAnUpdateAndForTheFirstLayer) {
  ProbeSetup s("depth=3,width=10,act=relu");
  normkit::probe::Options o;
  o.ics = true;
  o.ics_lr = 0.0;  // no update of the earlier layers: G' = G
  for (const auto& w : normkit::probe::run(s.model, s.batch, s.labels, o).weights) {
    EXPECT_NEAR(w.ics_distance, 0.0, 1e-6);
    EXPECT_NEAR(w.ics_cosine, 1.0, 1e-6);
  }
  o.ics_lr = 0.5;
  const auto r = normkit::probe::run(s.model, s.batch, s.labels, o);
  EXPECT_NEAR(r.weights.front().ics_distance, 0.0, 1e-6) << "nothing comes before the first layer";
  EXPECT_GT(r.weights.back().ics_distance, 1e-4) << "the last layer sees its inputs move";
}

TEST(MlpSpec, BuildsTheLayersItNames) {
  EXPECT_EQ(ModelSpec::mlp("depth=2,width=8,act=sigmoid,bn=after", {1, 4, 4}, 3).to_string(),
            "input 1 4 4; flatten; linear 8; sigmoid; batchnorm; linear 8; sigmoid; batchnorm; linear 3");
  EXPECT_EQ(ModelSpec::mlp("depth=1,width=5,dropout=0.5,input_bn=1", {6}, 2).to_string(),
            "input 6; flatten; batchnorm; linear 5 bias=0; batchnorm; relu; dropout 0.5; linear 2");
  EXPECT_EQ(ModelSpec::mlp("depth=3,width=100,act=sigmoid", {1, 28, 28}, 10), ModelSpec::preset("mlp-paper"));
  EXPECT_EQ(ModelSpec::mlp("bn=none", {4}, 2).to_string(),
            "input 4; flatten; linear 100; relu; linear 100; relu; linear 100; relu; linear 2");
  for (const char* bad : {"depth=x", "width=0", "act=gelu", "bn=sideways", "dropout=1", "colour=red", "depth"})
    EXPECT_TRUE(throws_error([&] { ModelSpec::mlp(bad, {4}, 2); }, normkit::ErrorKind::invalid_argument, {"mlp:"}))
        << bad;
}
