// The engine's residual blocks ("residual ... [shortcut ...] end"): the spec's
// grammar and round trip, what --norm does inside blocks, gradients against
// central differences (the fused BN+Add+ReLU tail, identity and projection
// shortcuts, the unfused tail, frozen BN, both memory formats), the fused tail
// against the same block computed unfused, and a small residual net that
// trains. PyTorch parity: tests/python/test_nn_torch_parity.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <set>

#include "nn_test_support.hpp"
#include "normkit/engine/train.hpp"

namespace {

using namespace nn_test;
using normkit::ErrorKind;
using normkit::nn::Model;
using normkit::nn::ModelSpec;

constexpr MemoryFormat kFormats[] = {MemoryFormat::channels_first, MemoryFormat::channels_last};

// A block with a 1×1 projection, a nested identity block, and an MLP block.
const char* kSpec =
    "input 3 6 6; conv 4 3 pad=1 bias=0; batchnorm; relu;"
    "residual; conv 8 3 stride=2 pad=1 bias=0; batchnorm; relu; conv 8 3 pad=1 bias=0; batchnorm;"
    "  shortcut; conv 8 1 stride=2 bias=0; batchnorm; end;"
    "residual; conv 8 3 pad=1 bias=0; batchnorm; relu;"
    "  residual; conv 8 3 pad=1 bias=0; batchnorm; end;"
    "end;"
    "flatten; linear 16 bias=0; batchnorm; relu;"
    "residual; linear 16 bias=0; batchnorm; relu; linear 16 bias=0; batchnorm; end;"
    "linear 5";

TEST(NnResidual, SpecParsesAndRoundTrips) {
  const ModelSpec spec = ModelSpec::parse(kSpec);
  ASSERT_EQ(spec.layers.size(), 11u);
  const auto& projection = spec.layers[3];
  EXPECT_EQ(projection.type, "residual");
  EXPECT_EQ(projection.body.size(), 5u);
  ASSERT_EQ(projection.shortcut.size(), 2u);
  EXPECT_EQ(projection.shortcut[0].options.at("stride"), "2");
  EXPECT_EQ(spec.layers[4].body.back().type, "residual");  // nested
  EXPECT_EQ(ModelSpec::parse(spec.to_string()), spec);
  EXPECT_NE(spec.to_string().find("; shortcut; conv 8 1 bias=0 stride=2; batchnorm; end"), std::string::npos)
      << spec.to_string();
  // One layer per line, as spec files are written.
  EXPECT_EQ(ModelSpec::parse("input 4\nresidual\n  linear 4\n  relu\nend\nlinear 2\n"),
            ModelSpec::parse("input 4; residual; linear 4; relu; end; linear 2"));
}

TEST(NnResidual, SpecErrorsNameTheStatement) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"input 4; residual; linear 4; linear 2", {"statement 2", "the block has no 'end'"}},
      {"input 4; linear 4; end; linear 2", {"statement 3", "'end' outside a residual block"}},
      {"input 4; shortcut; linear 2", {"statement 2", "outside a residual block"}},
      {"input 4; residual; end; linear 2", {"statement 3", "has no layers"}},
      {"input 4; residual; shortcut; linear 4; end; linear 2", {"no layers before its shortcut"}},
      {"input 4; residual; linear 4; shortcut; end; linear 2", {"shortcut has no layers"}},
      {"input 4; residual; linear 4; shortcut; linear 4; shortcut; linear 4; end", {"already has its shortcut"}},
      {"input 4; residual 2; linear 4; end; linear 2", {"statement 2", "expected 0 arguments"}},
      {"input 4; residual; linear 4; end x=1; linear 2", {"statement 4", "takes no arguments or options"}},
      {"input 4; residual; input 4; end", {"input inside a residual block"}},
  };
  for (const auto& [text, parts] : cases) {
    SCOPED_TRACE(text);
    try {
      ModelSpec::parse(text);
      ADD_FAILURE() << "parsed";
    } catch (const normkit::Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      for (const auto& part : parts)
        EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what() << " lacks " << part;
    }
  }
  // Shapes are checked when the model is built: the body and the shortcut must agree.
  EXPECT_TRUE(throws_error([] { Model{ModelSpec::parse("input 4; residual; linear 8; end; linear 2")}; },
                           ErrorKind::invalid_argument,
                           {"layer 1", "the body gives [8], the identity shortcut [4]", "shortcut"}));
  EXPECT_TRUE(throws_error(
      [] { Model{ModelSpec::parse("input 2 4 4; residual; conv 2 3 pad=1; shortcut; conv 2 1 stride=2; end; flatten; linear 2")}; },
      ErrorKind::invalid_argument, {"the body gives [2, 4, 4], the shortcut [2, 2, 2]"}));
  EXPECT_TRUE(throws_error([] { Model{ModelSpec::parse("input 4; residual; conv 2 3; end; linear 2")}; },
                           ErrorKind::invalid_argument, {"residual body, layer 1", "conv"}));
}

TEST(NnResidual, NormSwitchesReachInsideBlocks) {
  const ModelSpec spec = ModelSpec::parse(kSpec);
  const std::string none = spec.without_batch_norm().to_string();
  EXPECT_EQ(none.find("batchnorm"), std::string::npos) << none;
  // The layer before a dropped BN gets its bias back, inside blocks too.
  EXPECT_NE(none.find("shortcut; conv 8 1 stride=2; end"), std::string::npos) << none;
  const std::string group = spec.with_norm("group").to_string();
  EXPECT_EQ(group.find("batchnorm"), std::string::npos);
  EXPECT_NE(group.find("conv 8 1 bias=0 stride=2; groupnorm groups=8; end"), std::string::npos) << group;
  EXPECT_NE(group.find("linear 16 bias=0; groupnorm groups=8; end"), std::string::npos) << group;  // flat: 2 a group
  const std::string frozen = spec.with_norm("frozen").to_string();
  EXPECT_NE(frozen.find("conv 8 1 bias=0 stride=2; batchnorm frozen=1; end"), std::string::npos) << frozen;
  for (const std::string& norm : ModelSpec::norm_kinds()) {
    SCOPED_TRACE(norm);
    EXPECT_NO_THROW(Model{spec.with_norm(norm)});
  }
  // Freezing a model's BN reaches the layers in blocks, and the spec records it.
  Model model(spec);
  EXPECT_EQ(model.freeze_batch_norm(), 9);
  EXPECT_EQ(model.spec(), spec.with_norm("frozen"));
}

TEST(NnResidual, StateNamesFollowTheBlockStructure) {
  Model model(ModelSpec::parse(kSpec));
  std::vector<std::string> names;
  for (const auto& [name, values] : model.state()) names.push_back(name);
  for (const std::string expected : {"3.body.0.weight", "3.body.1.running_var", "3.body.4.num_batches_tracked",
                                     "3.shortcut.0.weight", "3.shortcut.1.bias", "4.body.3.body.1.weight",
                                     "9.body.4.running_mean"})
    EXPECT_NE(std::find(names.begin(), names.end(), expected), names.end()) << expected;
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()).size(), names.size());  // unique
}

// Central differences of L = Σ r·block(x) against backward, at every probe where
// neither perturbation moves an element of relu(body + shortcut) across its kink
// (the block is piecewise smooth: across a kink the difference quotient is not a
// derivative). The bodies' own activations are smooth (tanh), so the tail's ReLU
// is the only kink; at most a quarter of the probes may be skipped. The step: the
// float forward carries ~2e-6 of rounding in L, so below ~5e-3 the quotient is
// noise (measured: errors grow as 1/step), and above 1e-2 the curvature of BN on
// six samples and of tanh, and the kinks crossed, take over.
void check_block_gradients(Layer& block, const Tensor& x, const std::string& what) {
  SCOPED_TRACE(what);
  constexpr double kStep = 6e-3, kTol = 2e-3, kFloor = 0.05;
  const Tensor& y0 = block.forward(x, Mode::train);
  const auto r = normal_values(y0.data.size(), 17);
  std::vector<bool> active(y0.data.size());
  for (size_t i = 0; i < active.size(); ++i) active[i] = y0.data[i] > 0;
  Tensor dy = y0;
  dy.data = r;
  zero_grads(block);
  const std::vector<float> dx = block.backward(dy, true).data;
  std::vector<std::vector<float>> grads;
  for (auto* p : block.parameters()) grads.push_back(p->grad);

  int probes = 0, skipped = 0;
  // dL/dvalue by central differences, or nothing when a kink was crossed.
  auto central = [&](float& value, const Tensor& input) -> std::optional<double> {
    const float saved = value;
    double loss[2];
    float at[2];
    bool crossed = false;
    for (int side = 0; side < 2; ++side) {
      value = saved + static_cast<float>(side == 0 ? kStep : -kStep);
      at[side] = value;
      const Tensor& y = block.forward(input, Mode::train);
      loss[side] = dot(r, y.data);
      for (size_t i = 0; i < y.data.size(); ++i) crossed = crossed || (y.data[i] > 0) != active[i];
    }
    value = saved;
    ++probes;
    if (crossed) {
      ++skipped;
      return std::nullopt;
    }
    return (loss[0] - loss[1]) / (static_cast<double>(at[0]) - static_cast<double>(at[1]));
  };
  auto compare = [&](const std::vector<float>& analytic, std::vector<float>& values, const Tensor& input,
                     const std::string& name, uint64_t seed) {
    GradientComparison cmp;
    for (const size_t i : probe_indices(values.size(), 48, seed))
      if (const auto numeric = central(values[i], input)) cmp.add(analytic[i], *numeric);
    std::string where;
    EXPECT_LE(cmp.worst(kTol, kFloor, &where), 1.0) << name << ": " << where;
  };
  Tensor probe = x;
  compare(dx, probe.data, probe, "dx", 1);
  const auto params = block.parameters();
  for (size_t k = 0; k < params.size(); ++k) compare(grads[k], params[k]->value, x, params[k]->name, k + 2);
  EXPECT_LE(skipped * 4, probes) << skipped << " of " << probes << " probes crossed a kink";
}

// β = 0.3 on the body's last layer keeps most of the sum positive, with enough
// elements below zero for the mask to matter.
TEST(NnResidual, GradientsMatchCentralDifferences) {
  struct Case {
    std::string block;
    std::vector<int64_t> input;
  };
  const std::vector<Case> cases = {
      {"residual; conv 3 3 pad=1 bias=0; batchnorm; end", {3, 4, 4}},  // fused, identity
      {"residual; conv 4 3 stride=2 pad=1 bias=0; batchnorm; tanh; conv 4 3 pad=1 bias=0; batchnorm;"
       " shortcut; conv 4 1 stride=2 bias=0; batchnorm; end",
       {2, 5, 5}},                                                   // fused, projection
      {"residual; conv 3 3 pad=1; tanh; conv 3 3 pad=1; end", {3, 4, 4}},  // unfused: no BN
      {"residual; conv 3 3 pad=1 bias=0; layernorm; end", {3, 4, 4}},      // unfused: LN
      {"residual; batchnorm frozen=1; end", {3, 4, 4}},                    // fused, frozen
      {"residual; linear 6 bias=0; batchnorm; tanh; linear 6 bias=0; batchnorm; end", {6}},  // flat
      {"residual; conv 3 3 pad=1 bias=0; batchnorm; residual; conv 3 1 bias=0; batchnorm; end; end",
       {3, 4, 4}},                                                   // nested
  };
  for (const auto& c : cases)
    for (const MemoryFormat format : kFormats) {
      if (c.input.size() == 1 && format == MemoryFormat::channels_last) continue;
      auto layer = make_layer(c.block, c.input, format);
      std::mt19937_64 rng(3);
      layer->initialize({}, rng);
      for (auto& b : layer->buffers())  // away from the defaults: frozen BN uses them
        if (b.name.ends_with("running_mean")) *b.values = normal_values(b.values->size(), 5, 0.3f);
        else if (b.name.ends_with("running_var")) *b.values = normal_values(b.values->size(), 6, 0.2f, 1.0f);
      for (auto* p : layer->parameters())
        if (p->name.ends_with("bias")) std::fill(p->value.begin(), p->value.end(), 0.3f);
      std::vector<int64_t> shape = {6};
      shape.insert(shape.end(), c.input.begin(), c.input.end());
      const Tensor x = make_tensor(shape, format, normal_values(product(shape), 9));
      check_block_gradients(*layer, x, c.block + ", " + name_of(format));
    }
}

// The fused tail (BN+Add+ReLU in one pass) equals the same block computed from
// the plain layers: BN forward, the sum, ReLU; and the same gradients.
TEST(NnResidual, FusedTailEqualsTheUnfusedSequence) {
  for (const MemoryFormat format : kFormats) {
    SCOPED_TRACE(name_of(format));
    const std::vector<int64_t> input = {4, 5, 5};
    auto block = make_layer("residual; conv 4 3 pad=1 bias=0; batchnorm; end", input, format);
    auto conv = make_layer("conv 4 3 pad=1 bias=0", input, format);
    auto bn = make_layer("batchnorm", input, format);
    auto relu = make_layer("relu", input, format);
    std::mt19937_64 rng(4);
    block->initialize({}, rng);
    conv->parameters()[0]->value = block->parameters()[0]->value;
    const auto gamma = normal_values(4, 7, 0.3f, 1.0f), beta = normal_values(4, 8, 0.5f);
    block->parameters()[1]->value = bn->parameters()[0]->value = gamma;
    block->parameters()[2]->value = bn->parameters()[1]->value = beta;
    const Tensor x = make_tensor({7, 4, 5, 5}, format, normal_values(7 * 100, 10));
    for (const Mode mode : {Mode::train, Mode::eval}) {
      const Tensor& fused = block->forward(x, mode);
      const Tensor& h = bn->forward(conv->forward(x, mode), mode);
      Tensor sum = h;
      for (size_t i = 0; i < sum.data.size(); ++i) sum.data[i] += x.data[i];
      const Tensor& plain = relu->forward(sum, mode);
      ASSERT_EQ(fused.data.size(), plain.data.size());
      for (size_t i = 0; i < plain.data.size(); ++i)
        ASSERT_NEAR(fused.data[i], plain.data[i], 2e-6 * (1 + std::abs(plain.data[i]))) << i;
      if (mode == Mode::eval) break;
      Tensor dy = fused;
      dy.data = normal_values(dy.data.size(), 11);
      zero_grads(*block);
      zero_grads(*conv);
      zero_grads(*bn);
      const std::vector<float> dx_fused = block->backward(dy, true).data;
      const Tensor& dsum = relu->backward(dy, true);
      const std::vector<float> dz = dsum.data;  // the shortcut's share
      const Tensor& dh = bn->backward(dsum, true);
      std::vector<float> dx_plain = conv->backward(dh, true).data;
      for (size_t i = 0; i < dx_plain.size(); ++i) dx_plain[i] += dz[i];
      for (size_t i = 0; i < dx_plain.size(); ++i)
        ASSERT_NEAR(dx_fused[i], dx_plain[i], 1e-5 * (1 + std::abs(dx_plain[i]))) << i;
      for (size_t k = 0; k < 2; ++k)
        for (size_t c = 0; c < 4; ++c)
          EXPECT_NEAR(block->parameters()[1 + k]->grad[c], bn->parameters()[k]->grad[c], 1e-4);
      // The running statistics were updated as plain BN updates them (to float rounding:
      // the fused kernels sum in another order).
      for (size_t b = 0; b < 2; ++b)
        for (size_t c = 0; c < 4; ++c)
          EXPECT_NEAR((*block->buffers()[b].values)[c], (*bn->buffers()[b].values)[c],
                      4e-7 * (1 + std::abs((*bn->buffers()[b].values)[c])));
    }
  }
}

TEST(NnResidual, ASmallResidualNetTrains) {
  const auto train_set = blobs(256, 1);
  const auto test_set = blobs(128, 2);
  const ModelSpec spec = ModelSpec::parse(
      "input 2 4 4; conv 8 3 pad=1 bias=0; batchnorm; relu;"
      "residual; conv 8 3 pad=1 bias=0; batchnorm; relu; conv 8 3 pad=1 bias=0; batchnorm; end;"
      "residual; conv 16 3 stride=2 pad=1 bias=0; batchnorm; shortcut; conv 16 1 stride=2 bias=0; batchnorm; end;"
      "flatten; linear 4");
  for (const MemoryFormat format : kFormats) {
    SCOPED_TRACE(name_of(format));
    Model model(spec, format);
    model.initialize({}, 1);
    auto sgd = normkit::nn::make_sgd({0.05f, 0.9f, 0.0f, false}, model.parameters());
    const double before = normkit::train::evaluate(model, test_set).loss;
    for (int64_t epoch = 0; epoch < 3; ++epoch) normkit::train::train_epoch(model, *sgd, train_set, 32, 1, epoch);
    const auto after = normkit::train::evaluate(model, test_set);
    EXPECT_LT(after.loss, 0.5 * before);
    EXPECT_GT(after.accuracy, 0.9);
  }
}

}  // namespace
