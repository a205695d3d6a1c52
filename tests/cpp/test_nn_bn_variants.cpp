// The engine's batch-norm variants: "batchrenorm", "ghostbatchnorm" and frozen
// batch norm (the spec option frozen=1 and Model::freeze_batch_norm). Layers
// against the kernels of bn_variants.hpp (double reference API), gradients
// against central differences, and small models whose loss falls.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "nn_test_support.hpp"
#include "normkit/bn_variants.hpp"
#include "normkit/engine/train.hpp"

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
std::vector<float>* buffer(Layer& layer, const std::string& name) {
  for (auto& b : layer.buffers())
    if (b.name == name) return b.values;
  return nullptr;
}

void expect_close(const std::vector<float>& actual, const std::vector<double>& expected, double tol,
                  const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t i = 0; i < actual.size(); ++i)
    ASSERT_NEAR(actual[i], expected[i], tol * (1 + std::abs(expected[i]))) << what << " at " << i;
}

struct Shape {
  std::vector<int64_t> shape;
  MemoryFormat format;
  std::string name() const {
    return std::string(shape.size() == 2 ? "[N, C], " : "[N, C, H, W], ") + name_of(format);
  }
  std::vector<int64_t> input() const { return {shape.begin() + 1, shape.end()}; }
  normkit::Layout layout() const { return shape.size() == 2 ? normkit::Layout::NC : normkit::Layout::NCHW; }
};
const std::vector<Shape> kShapes = {{{12, 5}, MemoryFormat::channels_first},
                                    {{5, 4, 3, 5}, MemoryFormat::channels_first},
                                    {{5, 4, 3, 5}, MemoryFormat::channels_last}};

// The oracle's canonical double tensors.
struct DoubleCopy {
  std::vector<int64_t> shape;
  normkit::Layout layout;
  normkit::TensorView<double> view(std::vector<double>& v) const {
    return normkit::TensorView<double>::contiguous(v.data(), shape, layout);
  }
};

// ---------------------------------------------------------------- batchrenorm

// Three training steps of a layer with warmup=2 (limits (1, 0), (2, 2.5), (3, 5))
// against the renorm kernels in double with the same schedule, then eval.
TEST(NnBatchRenorm, LayerFollowsTheKernelsAndItsScheduleThenInfersLikeBatchNorm) {
  for (const auto& s : kShapes) {
    SCOPED_TRACE(s.name());
    const int64_t C = s.shape[1];
    auto layer = make_layer("batchrenorm rmax=3 dmax=5 warmup=2 eps=0.001 momentum=0.3", s.input(), s.format);
    Parameter* gamma = param(*layer, "weight");
    Parameter* beta = param(*layer, "bias");
    gamma->value = normal_values(C, 31, 0.5f, 1.0f);
    beta->value = normal_values(C, 32);
    const DoubleCopy dc{s.shape, s.layout()};
    std::vector<double> g(gamma->value.begin(), gamma->value.end()), b(beta->value.begin(), beta->value.end());
    std::vector<double> rm(C, 0.0), rv(C, 1.0);
    int64_t tracked = 0;
    const auto schedule = normkit::BatchRenormSchedule::linear(2, 3, 5);
    for (int step = 0; step < 3; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      // Batches far from the running statistics, so that r and d are clipped early on.
      const auto xs = normal_values(product(s.shape), 40 + step, 3.0f, 2.0f);
      const auto dys = normal_values(product(s.shape), 50 + step);
      const Tensor x = make_tensor(s.shape, s.format, xs);
      zero_grads(*layer);
      const Tensor& y = layer->forward(x, Mode::train);
      std::vector<double> xd(xs.begin(), xs.end()), yd(xs.size()), dyd(dys.begin(), dys.end()), dxd(xs.size());
      std::vector<double> mean(C), invstd(C), r(C), d(C), dg(C), db(C);
      normkit::batch_renorm_forward_training<double>(dc.view(xd), dc.view(yd), g, b, {mean, invstd, r, d},
                                                     {rm, rv, &tracked}, schedule.at(step), {1e-3, 0.3});
      expect_close(canonical(y), yd, 1e-5, "y");
      expect_close(*buffer(*layer, "running_mean"), rm, 1e-5, "running_mean");
      expect_close(*buffer(*layer, "running_var"), rv, 1e-5, "running_var");
      EXPECT_EQ(buffer(*layer, "num_batches_tracked")->at(0), static_cast<float>(step + 1));
      const Tensor dy = make_tensor(s.shape, s.format, dys);
      const Tensor& dx = layer->backward(dy, true);
      normkit::batch_renorm_backward<double>(dc.view(xd), dc.view(dyd), dc.view(dxd), g, mean, invstd, r, d, dg, db);
      expect_close(canonical(dx), dxd, 1e-4, "dx");
      expect_close(gamma->grad, dg, 1e-4, "dgamma");
      expect_close(beta->grad, db, 1e-4, "dbeta");
      if (step == 0) {
        for (int64_t c = 0; c < C; ++c) ASSERT_TRUE(r[c] == 1.0 && d[c] == 0.0) << "warm-up starts as BN";
      }
    }
    // Eval: BN inference with the running statistics; nothing counted.
    const auto xs = normal_values(product(s.shape), 60, 3.0f, 2.0f);
    std::vector<double> xd(xs.begin(), xs.end()), yd(xs.size());
    const Tensor& ye = layer->forward(make_tensor(s.shape, s.format, xs), Mode::eval);
    normkit::batch_norm_forward_inference<double>(dc.view(xd), dc.view(yd), g, b, rm, rv, 1e-3);
    expect_close(canonical(ye), yd, 1e-5, "eval y");
    EXPECT_EQ(buffer(*layer, "num_batches_tracked")->at(0), 3.0f);
  }
}

// momentum=0 keeps the running statistics fixed, so the forward is a function of
// x, γ and β alone; with running statistics far from the batch's, every r and d
// is clipped and locally constant, and the finite differences of the forward are
// the stop-gradient backward. With rmax=1, dmax=0 the layer is BN.
TEST(NnBatchRenorm, GradientsMatchFiniteDifferences) {
  for (const auto& s : kShapes) {
    const int64_t C = s.shape[1];
    for (const char* line : {"batchrenorm rmax=1.5 dmax=0.5 warmup=0 momentum=0",
                             "batchrenorm rmax=1 dmax=0 warmup=0"}) {
      const std::string what = s.name() + ", " + line;
      SCOPED_TRACE(what);
      auto layer = make_layer(line, s.input(), s.format);
      param(*layer, "weight")->value = normal_values(C, 71, 0.5f, 1.0f);
      param(*layer, "bias")->value = normal_values(C, 72);
      auto& rm = *buffer(*layer, "running_mean");
      auto& rv = *buffer(*layer, "running_var");
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = c % 2 ? 20.0f : -20.0f;       // |μ_B − μ|/σ >> dmax
        rv[c] = c % 3 ? 100.0f : 0.01f;       // σ_B/σ far outside [1/1.5, 1.5]
      }
      const Tensor x = make_tensor(s.shape, s.format, normal_values(product(s.shape), 73, 1.0f, 0.5f));
      GradCheckOptions o;
      o.step = 1e-2;
      check_layer_gradients(*layer, x, o, what);
    }
  }
}

// ---------------------------------------------------------------- ghostbatchnorm

TEST(NnGhostBatchNorm, LayerIsBatchNormPerVirtualBatchAndGradientsMatchFiniteDifferences) {
  for (const auto& s : kShapes) {
    SCOPED_TRACE(s.name());
    const int64_t C = s.shape[1];
    // Virtual batches of 4 rows (three of them) or of 2, 2, 1 images (15 values per channel
    // each): two rows alone would normalize to ±1 whatever x is.
    const int64_t size = s.shape.size() == 2 ? 4 : 2;
    auto layer = make_layer("ghostbatchnorm size=" + std::to_string(size) + " eps=0.001 momentum=0.2",
                            s.input(), s.format);
    Parameter* gamma = param(*layer, "weight");
    Parameter* beta = param(*layer, "bias");
    gamma->value = normal_values(C, 81, 0.5f, 1.0f);
    beta->value = normal_values(C, 82);
    const auto xs = normal_values(product(s.shape), 83, 2.0f, 1.0f);
    const auto dys = normal_values(product(s.shape), 84);
    const Tensor x = make_tensor(s.shape, s.format, xs);
    zero_grads(*layer);
    const Tensor& y = layer->forward(x, Mode::train);
    const Tensor& dx = layer->backward(make_tensor(s.shape, s.format, dys), true);

    const DoubleCopy dc{s.shape, s.layout()};
    std::vector<double> g(gamma->value.begin(), gamma->value.end()), b(beta->value.begin(), beta->value.end());
    std::vector<double> xd(xs.begin(), xs.end()), yd(xs.size()), dyd(dys.begin(), dys.end()), dxd(xs.size());
    const int64_t ghosts = normkit::ghost_batch_count(s.shape[0], size);
    std::vector<double> mean(ghosts * C), invstd(ghosts * C), rm(C, 0.0), rv(C, 1.0), dg(C), db(C);
    int64_t tracked = 0;
    normkit::ghost_batch_norm_forward_training<double>(dc.view(xd), dc.view(yd), g, b, size, {mean, invstd},
                                                       {rm, rv, &tracked}, {1e-3, 0.2});
    normkit::ghost_batch_norm_backward<double>(dc.view(xd), dc.view(dyd), dc.view(dxd), g, size, mean, invstd, dg, db);
    expect_close(canonical(y), yd, 1e-5, "y");
    expect_close(canonical(dx), dxd, 1e-4, "dx");
    expect_close(gamma->grad, dg, 1e-4, "dgamma");
    expect_close(beta->grad, db, 1e-4, "dbeta");
    expect_close(*buffer(*layer, "running_mean"), rm, 1e-5, "running_mean");
    expect_close(*buffer(*layer, "running_var"), rv, 1e-5, "running_var");
    EXPECT_EQ(buffer(*layer, "num_batches_tracked")->at(0), static_cast<float>(ghosts));

    check_layer_gradients(*layer, x, {}, s.name());
  }
}

// ---------------------------------------------------------------- frozen

std::vector<std::vector<float>> buffers_of(Layer& layer) {
  std::vector<std::vector<float>> out;
  for (auto& b : layer.buffers()) out.push_back(*b.values);
  return out;
}
bool same_bits(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() || std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)))
      return false;
  return true;
}

// frozen=1 (each type): train mode is eval mode's forward, running statistics and
// counter stay bit for bit, γ and β still get gradients (the frozen backward, by
// finite differences of the train-mode forward).
TEST(NnFrozenBatchNorm, UsesAndKeepsRunningStatisticsAndStillTrainsGammaBeta) {
  for (const char* line : {"batchnorm frozen=1", "batchrenorm frozen=1 warmup=0", "ghostbatchnorm frozen=1 size=4"})
    for (const auto& s : kShapes) {
      const std::string what = std::string(line) + ", " + s.name();
      SCOPED_TRACE(what);
      const int64_t C = s.shape[1];
      auto layer = make_layer(line, s.input(), s.format);
      EXPECT_NE(layer->describe().find("frozen"), std::string::npos) << layer->describe();
      auto& rm = *buffer(*layer, "running_mean");
      auto& rv = *buffer(*layer, "running_var");
      rm = normal_values(C, 91);
      rv = normal_values(C, 92, 0.2f, 1.5f);
      param(*layer, "weight")->value = normal_values(C, 93, 0.5f, 1.0f);
      const auto before = buffers_of(*layer);
      const Tensor x = make_tensor(s.shape, s.format, normal_values(product(s.shape), 94, 2.0f, 1.0f));
      const std::vector<float> y_eval = layer->forward(x, Mode::eval).data;
      const std::vector<float> y_train = layer->forward(x, Mode::train).data;
      EXPECT_EQ(y_train, y_eval);
      check_layer_gradients(*layer, x, {}, what);
      EXPECT_TRUE(same_bits(buffers_of(*layer), before)) << "running statistics changed";
    }
}

// A spec for the model tests: every BN type, images then features.
const char* kVariantsSpec =
    "input 2 4 4; conv 4 3 pad=1 bias=0; batchrenorm warmup=20; relu; maxpool 2; flatten;"
    "linear 16 bias=0; ghostbatchnorm size=8; relu; linear 12 bias=0; batchnorm; sigmoid; linear 4";

TEST(NnBnVariants, ModelsWithRenormAndGhostBatchNormTrain) {
  const auto train = blobs(192, 1);
  const auto test = blobs(100, 2);
  for (const auto format : kFormats) {
    SCOPED_TRACE(name_of(format));
    Model model(ModelSpec::parse(kVariantsSpec), format);
    model.initialize({}, 42);
    auto sgd = normkit::nn::make_sgd({0.05f, 0.9f, 1e-4f}, model.parameters());
    std::vector<double> losses;
    for (int64_t epoch = 0; epoch < 5; ++epoch)
      losses.push_back(normkit::train::train_epoch(model, *sgd, train, 16, 42, epoch).loss);
    EXPECT_LT(losses.back(), 0.5 * losses.front()) << losses.front() << " -> " << losses.back();
    EXPECT_GT(normkit::train::evaluate(model, test, 32).accuracy, 0.9);
    // 12 steps an epoch: the renorm layer's schedule has counted them all.
    EXPECT_EQ(model.layers()[1]->buffers()[2].values->at(0), 60.0f);
    EXPECT_EQ(model.layers()[6]->buffers()[2].values->at(0), 120.0f);  // two virtual batches a step
  }
}

// Model::freeze_batch_norm: every BN layer keeps its running statistics bit for bit
// through training steps while γ, β and the other parameters learn and the loss falls.
TEST(NnBnVariants, FreezeBatchNormKeepsRunningStatisticsWhileTheModelTrains) {
  const auto train = blobs(192, 1);
  Model model(ModelSpec::parse(kVariantsSpec), MemoryFormat::channels_first);
  model.initialize({}, 7);
  auto sgd = normkit::nn::make_sgd({0.05f, 0.9f, 0.0f}, model.parameters());
  normkit::train::train_epoch(model, *sgd, train, 16, 7, 0);  // running statistics that are not the initial ones
  EXPECT_EQ(model.freeze_batch_norm(), 3);
  const std::string spec_text = model.spec().to_string();
  EXPECT_EQ(ModelSpec::parse(spec_text).layers[1].options.at("frozen"), "1");
  std::vector<std::vector<std::vector<float>>> running;
  std::vector<std::vector<float>> gammas;
  for (const size_t i : {1u, 6u, 9u}) {
    running.push_back(buffers_of(*model.layers()[i]));
    gammas.push_back(model.layers()[i]->parameters()[0]->value);
  }
  std::vector<double> losses;
  for (int64_t epoch = 1; epoch < 5; ++epoch)
    losses.push_back(normkit::train::train_epoch(model, *sgd, train, 16, 7, epoch).loss);
  EXPECT_LT(losses.back(), losses.front());
  size_t k = 0;
  for (const size_t i : {1u, 6u, 9u}) {
    SCOPED_TRACE(model.layers()[i]->describe());
    EXPECT_TRUE(same_bits(buffers_of(*model.layers()[i]), running[k])) << "running statistics changed";
    EXPECT_NE(model.layers()[i]->parameters()[0]->value, gammas[k]) << "gamma did not train";
    ++k;
  }
  // A model built from the recorded spec is frozen from the start.
  Model again(ModelSpec::parse(spec_text), MemoryFormat::channels_first);
  EXPECT_NE(again.layers()[6]->describe().find("frozen"), std::string::npos);
}

// Ghost BN and frozen layers inside a whole model: every parameter's gradient
// against central differences of the loss (the statistics of each virtual batch
// depend on that batch only, so the loss is a function of the parameters).
TEST(NnBnVariants, ModelGradientsMatchFiniteDifferences) {
  for (const bool frozen : {false, true}) {
    SCOPED_TRACE(frozen ? "frozen" : "training");
    Model model(ModelSpec::parse("input 6; linear 5 bias=0; ghostbatchnorm size=3 momentum=0; tanh; "
                                 "linear 4 bias=0; batchnorm momentum=0; tanh; linear 3"),
                MemoryFormat::channels_first);
    model.initialize({}, 3);
    if (frozen) model.freeze_batch_norm();
    const Tensor x = make_tensor({8, 6}, MemoryFormat::channels_first, normal_values(48, 4));
    const std::vector<int32_t> labels = {0, 1, 2, 0, 1, 2, 0, 1};
    auto loss = [&] {
      return normkit::nn::softmax_cross_entropy(model.forward(x, Mode::train), labels.data(), nullptr).loss;
    };
    model.zero_grad();
    Tensor dlogits;
    normkit::nn::softmax_cross_entropy(model.forward(x, Mode::train), labels.data(), &dlogits);
    model.backward(dlogits);
    for (auto* p : model.parameters()) {
      GradientComparison cmp;
      const auto grad = p->grad;
      for (size_t i = 0; i < p->value.size(); ++i) {
        const float saved = p->value[i];
        p->value[i] = saved + 1e-2f;
        const float up = p->value[i];
        const double plus = loss();
        p->value[i] = saved - 1e-2f;
        const float down = p->value[i];
        const double minus = loss();
        p->value[i] = saved;
        cmp.add(grad[i], (plus - minus) / (double{up} - double{down}));
      }
      std::string where;
      EXPECT_LE(cmp.worst(5e-3, 0.05, &where), 1.0) << p->name << ": " << where;
    }
  }
}

TEST(NnBnVariants, SpecOptionsAreCheckedWithTheirNames) {
  const std::vector<int64_t> in = {3};
  const auto f = MemoryFormat::channels_first;
  EXPECT_EQ(make_layer("ghostbatchnorm", in, f)->describe(), "ghostbatchnorm(3, size 32, eps 1e-05, momentum 0.1)");
  EXPECT_NE(make_layer("batchrenorm", in, f)->describe().find("rmax 3, dmax 5, warmup 500"), std::string::npos);
  EXPECT_TRUE(throws_error([&] { make_layer("ghostbatchnorm size=0", in, f); }, ErrorKind::invalid_argument, {"size", "0"}));
  EXPECT_TRUE(throws_error([&] { make_layer("batchrenorm rmax=0.5", in, f); }, ErrorKind::invalid_argument, {"rmax", "0.5"}));
  EXPECT_TRUE(throws_error([&] { make_layer("batchrenorm dmax=-1", in, f); }, ErrorKind::invalid_argument, {"dmax", "-1"}));
  EXPECT_TRUE(throws_error([&] { make_layer("batchrenorm warmup=-3", in, f); }, ErrorKind::invalid_argument, {"warmup"}));
  EXPECT_TRUE(throws_error([&] { make_layer("batchnorm frozen=2", in, f); }, ErrorKind::invalid_argument, {"frozen must be 0 or 1"}));
  EXPECT_TRUE(throws_error([&] { make_layer("ghostbatchnorm rmax=2", in, f); }, ErrorKind::invalid_argument, {"unknown option 'rmax'"}));
  EXPECT_TRUE(throws_error([&] { make_layer("batchrenorm size=4", in, f); }, ErrorKind::invalid_argument, {"unknown option 'size'"}));
  // A batch whose last virtual batch has one value per channel.
  auto layer = make_layer("ghostbatchnorm size=4", in, f);
  EXPECT_TRUE(throws_error([&] { layer->forward(make_tensor({5, 3}, f, normal_values(15, 1)), Mode::train); },
                           ErrorKind::invalid_argument, {"more than 1 value per channel", "virtual_batch_size 4"}));
  EXPECT_EQ(*buffer(*layer, "num_batches_tracked"), std::vector<float>{0.0f});
  // The BN-free twin drops the variants too.
  const auto spec = ModelSpec::parse(kVariantsSpec).without_batch_norm();
  for (const auto& l : spec.layers)
    EXPECT_TRUE(l.type != "batchrenorm" && l.type != "ghostbatchnorm" && l.type != "batchnorm") << l.type;
}

}  // namespace
