// The engine as a whole: Model backward against finite differences of the
// loss, optimizers against PyTorch's update formulas (evaluated here in double),
// the model spec, and the training loop (a tiny model whose loss falls,
// deterministic epoch order, NaN detection).
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <set>
#include <thread>

#include "nn/layers.hpp"
#include "nn_test_support.hpp"
#include "normkit/engine/checkpoint.hpp"
#include "normkit/engine/train.hpp"
#include "normkit/threading.hpp"

namespace {

using namespace nn_test;
using normkit::ErrorKind;
using normkit::nn::Model;
using normkit::nn::ModelSpec;
using normkit::nn::Parameter;

constexpr MemoryFormat kFormats[] = {MemoryFormat::channels_first, MemoryFormat::channels_last};

// Mean cross-entropy of the model on (x, labels) in train mode.
double model_loss(Model& model, const Tensor& x, const std::vector<int32_t>& labels) {
  return normkit::nn::softmax_cross_entropy(model.forward(x, Mode::train), labels.data(), nullptr).loss;
}

void compute_gradients(Model& model, const Tensor& x, const std::vector<int32_t>& labels) {
  Tensor dlogits;
  normkit::nn::softmax_cross_entropy(model.forward(x, Mode::train), labels.data(), &dlogits);
  model.zero_grad();
  model.backward(dlogits);
}

std::vector<int32_t> some_labels(int64_t n, int32_t classes) {
  std::vector<int32_t> labels(n);
  for (int64_t i = 0; i < n; ++i) labels[i] = static_cast<int32_t>((i * 7 + 3) % classes);
  return labels;
}

// ---------------------------------------------------------------- Model backward

// A smooth model (tanh, sigmoid, average pooling, BN in both placements):
// every parameter of every layer against central differences of the loss.
TEST(NnModel, BackwardMatchesFiniteDifferencesOfTheLossForEveryParameter) {
  const auto spec = ModelSpec::parse(
      "input 2 6 6; conv 3 3 pad=1 bias=0; batchnorm; tanh; avgpool 2; flatten;"
      "linear 8; sigmoid; batchnorm; linear 4");
  const int64_t N = 6;
  const auto xs = normal_values(N * 72, 91);
  const auto labels = some_labels(N, 4);
  for (const auto format : kFormats) {
    SCOPED_TRACE(name_of(format));
    Model model(spec, format);
    model.initialize({normkit::nn::Init::xavier}, 5);
    const Tensor x = make_tensor({N, 2, 6, 6}, format, xs);
    compute_gradients(model, x, labels);
    const auto state = model.state();
    size_t k = 0;
    for (auto* p : model.parameters()) {
      GradientComparison cmp;
      for (size_t i = 0; i < p->value.size(); ++i) {
        const float saved = p->value[i];
        p->value[i] = saved + 1e-2f;
        const double up = p->value[i], plus = model_loss(model, x, labels);
        p->value[i] = saved - 1e-2f;
        const double down = p->value[i], minus = model_loss(model, x, labels);
        p->value[i] = saved;
        cmp.add(p->grad[i], (plus - minus) / (up - down));
      }
      std::string where;
      EXPECT_LE(cmp.worst(5e-3, 0.05, &where), 1.0) << "parameter " << k << " (" << p->name << "): " << where;
      ++k;
    }
  }
}

// A ReLU/max-pool model like cnn-small: for each parameter tensor, the
// derivative along a random direction. A step may carry some ReLU or max-pool
// input across its kink, which bends the difference quotient by O(step), so the
// check takes the best of a larger and a smaller step (the larger one has less
// float noise, the smaller one crosses fewer kinks).
// With one input channel, the first conv's output is recomputed piece by piece
// (RecomputedOutput), never whole; 6 samples: pieces of 4 and 2.
TEST(NnModel, BackwardMatchesDirectionalDerivativesOnAReluMaxPoolModel) {
  const std::string rest =
      " 8 8; conv 4 3 pad=1 bias=0; batchnorm; relu; maxpool 2;"
      "conv 6 3 stride=2 pad=1; relu; flatten; linear 10 bias=0; batchnorm; relu; linear 3";
  for (const auto& [channels, N] : {std::pair<int64_t, int64_t>{2, 8}, {1, 6}})
  for (const auto format : kFormats) {
    SCOPED_TRACE(std::string(name_of(format)) + ", " + std::to_string(channels) + " channels");
    const auto spec = ModelSpec::parse("input " + std::to_string(channels) + rest);
    const auto xs = normal_values(N * channels * 64, 92);
    const auto labels = some_labels(N, 3);
    Model model(spec, format);
    model.initialize({}, 6);
    const Tensor x = make_tensor({N, channels, 8, 8}, format, xs);
    compute_gradients(model, x, labels);
    const auto params = model.parameters();
    for (size_t k = 0; k < params.size(); ++k) {
      const auto dir = normal_values(params[k]->value.size(), 100 + k);
      const auto saved = params[k]->value;
      const double analytic = dot(dir, params[k]->grad);
      auto at = [&](float t) {
        for (size_t i = 0; i < saved.size(); ++i) params[k]->value[i] = saved[i] + t * dir[i];
        return model_loss(model, x, labels);
      };
      double best = INFINITY, numeric = 0;
      for (const float h : {1e-3f, 1e-4f}) {
        const double estimate = (at(h) - at(-h)) / (2.0 * h);
        if (std::abs(estimate - analytic) < best) best = std::abs(estimate - analytic), numeric = estimate;
      }
      params[k]->value = saved;
      EXPECT_LE(best, 1e-2 * std::abs(analytic) + 2e-3)
          << "parameter " << k << " (" << params[k]->name << "): analytic " << analytic << ", numeric " << numeric;
    }
  }
}

TEST(NnModel, BothFormatsComputeTheSameModel) {
  const auto spec = ModelSpec::preset("cnn-small");
  const int64_t N = 4;
  const auto xs = normal_values(N * 784, 93);
  const auto labels = some_labels(N, 10);
  std::vector<std::vector<float>> logits, grads;
  for (const auto format : kFormats) {
    Model model(spec, format);
    model.initialize({}, 7);
    const Tensor x = make_tensor({N, 1, 28, 28}, format, xs);
    logits.push_back(model.forward(x, Mode::train).data);
    compute_gradients(model, x, labels);
    std::vector<float> all;
    for (auto* p : model.parameters()) all.insert(all.end(), p->grad.begin(), p->grad.end());
    grads.push_back(all);
  }
  ASSERT_EQ(logits[0].size(), logits[1].size());
  for (size_t i = 0; i < logits[0].size(); ++i) EXPECT_NEAR(logits[0][i], logits[1][i], 1e-4) << i;
  double scale = 0;
  for (const float g : grads[0]) scale = std::max(scale, double{std::abs(g)});
  for (size_t i = 0; i < grads[0].size(); ++i) ASSERT_NEAR(grads[0][i], grads[1][i], 1e-4 * scale) << i;
}

// Both models' training-mode logits for x, which must be equal bit for bit.
::testing::AssertionResult same_logits(Model& a, Model& b, const Tensor& x) {
  const std::vector<float> la = a.forward(x, Mode::train).data;
  const std::vector<float>& lb = b.forward(x, Mode::train).data;
  if (la.size() != lb.size()) return ::testing::AssertionFailure() << "logit counts differ";
  for (size_t i = 0; i < la.size(); ++i)
    if (la[i] != lb[i]) return ::testing::AssertionFailure() << "logit " << i << ": " << la[i] << " vs " << lb[i];
  return ::testing::AssertionSuccess();
}
// `to` starts where `from` does after initialize({}, seed): the same
// parameters, layer for layer (the models differ in parameter-free layers only).
void initialize_alike(Model& from, Model& to, uint64_t seed) {
  from.initialize({}, seed);
  const auto a = from.parameters(), b = to.parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t k = 0; k < a.size(); ++k) b[k]->value = a[k]->value;
}
// Two models' parameter gradients, which must be equal bit for bit.
::testing::AssertionResult same_gradients(const std::vector<Parameter*>& a,
                                          const std::vector<Parameter*>& b, const char* what = "") {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "parameter counts differ";
  for (size_t k = 0; k < a.size(); ++k)
    for (size_t i = 0; i < a[k]->grad.size(); ++i)
      if (a[k]->grad[i] != b[k]->grad[i])
        return ::testing::AssertionFailure() << what << a[k]->name << " " << i << ": "
                                             << a[k]->grad[i] << " vs " << b[k]->grad[i];
  return ::testing::AssertionSuccess();
}
// What a probe (probe.cpp) does after a step's forward: the layers one by one on
// another batch, then Model::backward, which must follow the layers' own forward.
void probe_then_backward(Model& model, const Tensor& batch, const std::vector<int32_t>& labels) {
  const Tensor* current = &batch;
  for (const auto& layer : model.layers()) current = &layer->forward(*current, Mode::train);
  Tensor dlogits;
  normkit::nn::softmax_cross_entropy(*current, labels.data(), &dlogits);
  model.zero_grad();
  model.backward(dlogits);
}

// In training, "batchnorm; relu" runs as one fused pass (Model::forward); the same
// model with an identity between them ("dropout 0": a copy forward, dy·1 backward)
// runs BN and ReLU as separate layers. Both compute the same logits, gradients and
// running statistics bit for bit (the fused kernels take BN's statistics and
// gradient sums), for batch statistics and for frozen BN, over a few SGD steps.
// (Average pooling: a max pooling after the relu joins the pass in channels-last,
// FusedBatchNormReluMaxPoolMatchesTheSeparateLayers.)
TEST(NnModel, FusedBatchNormReluEqualsTheSeparateLayers) {
  const std::string head = "input 3 6 6; conv 8 3 pad=1 bias=0; batchnorm; ";
  const std::string middle = "relu; avgpool 2; flatten; linear 16 bias=0; batchnorm; ";
  const std::string tail = "relu; linear 5";
  const auto fused_spec = ModelSpec::parse(head + middle + tail);
  const auto plain_spec = ModelSpec::parse(head + "dropout 0; " + middle + "dropout 0; " + tail);
  const int64_t N = 12;
  const auto labels = some_labels(N, 5);
  for (const auto format : kFormats) {
    SCOPED_TRACE(name_of(format));
    Model fused(fused_spec, format), plain(plain_spec, format);
    initialize_alike(fused, plain, 5);
    const auto fused_parameters = fused.parameters(), plain_parameters = plain.parameters();
    auto fused_sgd = normkit::nn::make_sgd({0.1f, 0.9f}, fused_parameters);
    auto plain_sgd = normkit::nn::make_sgd({0.1f, 0.9f}, plain_parameters);
    for (int step = 0; step < 4; ++step) {
      SCOPED_TRACE(step);
      if (step == 2) {  // frozen: running statistics in training, γ and β still learn
        fused.freeze_batch_norm();
        plain.freeze_batch_norm();
      }
      const Tensor x = make_tensor({N, 3, 6, 6}, format, normal_values(N * 108, 40 + step, 2.0f, 0.5f));
      ASSERT_TRUE(same_logits(fused, plain, x));
      compute_gradients(fused, x, labels);
      compute_gradients(plain, x, labels);
      ASSERT_TRUE(same_gradients(fused_parameters, plain_parameters));
      if (step == 1) {
        // A probe (probe.cpp) runs the layers one by one on another batch after a
        // step's forward, then Model::backward: that backward follows the layers'
        // own, unfused forward.
        const int64_t M = 5;
        const Tensor probe = make_tensor({M, 3, 6, 6}, format, normal_values(M * 108, 60));
        for (Model* model : {&fused, &plain}) probe_then_backward(*model, probe, some_labels(M, 5));
        ASSERT_TRUE(same_gradients(fused_parameters, plain_parameters, "probe "));
        compute_gradients(fused, x, labels);
        compute_gradients(plain, x, labels);
      }
      fused_sgd->step(fused_parameters);
      plain_sgd->step(plain_parameters);
      const auto fused_state = fused.state(), plain_state = plain.state();
      ASSERT_EQ(fused_state.size(), plain_state.size());
      for (size_t k = 0; k < plain_state.size(); ++k)
        for (size_t i = 0; i < plain_state[k].second->size(); ++i)
          ASSERT_EQ((*fused_state[k].second)[i], (*plain_state[k].second)[i])
              << plain_state[k].first << " " << i;
    }
  }
}

// In training, "batchnorm; relu; maxpool 2" runs as one pass
// (ReluTail::forward_relu_max_pool); with an identity before the pooling
// ("dropout 0") the same model runs BN+ReLU, then the pooling. Same logits and
// running statistics bit for bit (the same statistics and coefficients), and
// the same gradients to rounding (the gradient sums are added in another
// order); the same bits on 1 and 2 threads; both formats; odd extents (a row
// and a column in no window); rows of 4 and 17 windows (channels-first dx
// takes 8 windows at a time: a part, whole blocks and a last block of one);
// frozen BN and a probe's layer-by-layer forward fall back to the separate
// layers.
TEST(NnModel, FusedBatchNormReluMaxPoolMatchesTheSeparateLayers) {
  const int64_t N = 6;
  const auto labels = some_labels(N, 5);
  const int saved_threads = normkit::num_threads();
  for (const auto& [format, image] : {std::pair{kFormats[0], "3 7 9"}, {kFormats[1], "3 7 9"},
                                      {kFormats[0], "3 5 35"}, {kFormats[1], "3 5 35"}}) {
    SCOPED_TRACE(std::string(name_of(format)) + " " + image);
    const std::string input =
        std::string("input ") + image + "; conv 8 3 pad=1 bias=0; batchnorm; relu; ";
    const auto fused_spec = ModelSpec::parse(input + "maxpool 2; flatten; linear 5");
    const auto plain_spec = ModelSpec::parse(input + "dropout 0; maxpool 2; flatten; linear 5");
    const int64_t h = fused_spec.input_shape[1], w = fused_spec.input_shape[2];
    std::vector<std::vector<float>> gradients_by_threads;
    for (const int threads : {1, 2}) {
      SCOPED_TRACE(threads);
      normkit::set_num_threads(threads);
      Model fused(fused_spec, format), plain(plain_spec, format);
      initialize_alike(fused, plain, 5);
      const auto fused_parameters = fused.parameters(), plain_parameters = plain.parameters();
      auto& tail = dynamic_cast<normkit::nn::detail::ReluTail&>(*fused.layers()[1]);
      std::vector<float> all_gradients;
      for (int step = 0; step < 4; ++step) {
        SCOPED_TRACE(step);
        if (step == 3) {
          fused.freeze_batch_norm();
          plain.freeze_batch_norm();
        }
        const Tensor x =
            make_tensor({N, 3, h, w}, format, normal_values(N * 3 * h * w, 70 + step, 2.0f, 0.5f));
        ASSERT_TRUE(same_logits(fused, plain, x));
        EXPECT_EQ(tail.ran_with_max_pool(), step < 3);  // frozen BN: the separate layers
        compute_gradients(fused, x, labels);
        compute_gradients(plain, x, labels);
        for (size_t k = 0; k < plain_parameters.size(); ++k) {
          double scale = 0;
          for (const float g : plain_parameters[k]->grad) scale = std::max(scale, double{std::abs(g)});
          for (size_t i = 0; i < plain_parameters[k]->grad.size(); ++i)
            ASSERT_NEAR(fused_parameters[k]->grad[i], plain_parameters[k]->grad[i], 1e-5 * scale)
                << plain_parameters[k]->name << " " << i;
          all_gradients.insert(all_gradients.end(), fused_parameters[k]->grad.begin(),
                               fused_parameters[k]->grad.end());
        }
        if (step == 1) {
          const Tensor probe = make_tensor({N, 3, h, w}, format, normal_values(N * 3 * h * w, 80));
          for (Model* model : {&fused, &plain}) probe_then_backward(*model, probe, labels);
          EXPECT_FALSE(tail.ran_with_max_pool());
          ASSERT_TRUE(same_gradients(fused_parameters, plain_parameters, "probe "));
        }
        const auto fused_state = fused.state(), plain_state = plain.state();
        for (size_t k = 0; k < plain_state.size(); ++k)
          for (size_t i = 0; i < plain_state[k].second->size(); ++i)
            ASSERT_EQ((*fused_state[k].second)[i], (*plain_state[k].second)[i])
                << plain_state[k].first << " " << i;
      }
      gradients_by_threads.push_back(all_gradients);
    }
    EXPECT_EQ(gradients_by_threads[0], gradients_by_threads[1]);
  }
  normkit::set_num_threads(saved_threads);
}

// After the one-pass forward, a conv before the BN takes the BN's dL/dx chunk
// by chunk (TakesGradientInChunks: each made as the conv uses it). The same
// gradients bit for bit as the BN's whole dx given to the conv, the layers'
// backwards called one by one: a conv that takes its dx and one that does not
// (the first layer), 40 samples (two full chunks of 16 and a short one), both
// formats, 1 and 2 threads.
// With one channel into the second conv (9 multiply-adds an output), its
// output is recomputed piece by piece for the BN (RecomputedOutput), forward
// and backward: so are the dx chunks and the whole dx.
TEST(NnModel, AConvTakesTheBatchNormsGradientInChunksWithTheSameBits) {
  const int64_t N = 40;
  const auto labels = some_labels(N, 5);
  const int saved_threads = normkit::num_threads();
  for (const int64_t middle : {4, 1})
  for (const auto format : kFormats) {
    for (const int threads : {1, 2}) {
      SCOPED_TRACE(std::string(name_of(format)) + ", threads " + std::to_string(threads) +
                   ", middle " + std::to_string(middle));
      normkit::set_num_threads(threads);
      const auto spec = ModelSpec::parse("input 3 7 9; conv " + std::to_string(middle) +
                                         " 3 pad=1; conv 8 3 pad=1 bias=0; batchnorm; relu; "
                                         "maxpool 2; flatten; linear 5");
      Model model(spec, format);
      model.initialize({}, 3);
      auto* second = dynamic_cast<normkit::nn::detail::RecomputedOutput*>(model.layers()[1].get());
      ASSERT_TRUE(second);
      EXPECT_EQ(second->recomputes_output(), middle == 1);
      const auto parameters = model.parameters();
      const Tensor x = make_tensor({N, 3, 7, 9}, format, normal_values(N * 3 * 63, 90, 1.0f, 0.5f));
      const auto gradients = [&](bool by_hand) {
        Tensor dlogits;
        normkit::nn::softmax_cross_entropy(model.forward(x, Mode::train), labels.data(), &dlogits);
        model.zero_grad();
        const auto& layers = model.layers();
        if (!by_hand) {
          model.backward(dlogits);
        } else {
          const Tensor* g = &layers[6]->backward(dlogits, true);
          g = &layers[5]->backward(*g, true);
          auto& tail = dynamic_cast<normkit::nn::detail::ReluTail&>(*layers[2]);
          EXPECT_TRUE(tail.ran_with_max_pool());
          g = &tail.backward_relu(*g, true);
          g = &layers[1]->backward(*g, true);
          layers[0]->backward(*g, false);
        }
        std::vector<float> all;
        for (const auto* p : parameters) all.insert(all.end(), p->grad.begin(), p->grad.end());
        return all;
      };
      // In chunks first: its backward is then the first to want the second
      // conv's dx, which makes that conv plan its primitives anew.
      const std::vector<float> in_chunks = gradients(false), whole = gradients(true);
      ASSERT_EQ(in_chunks.size(), whole.size());
      for (size_t i = 0; i < whole.size(); ++i) ASSERT_EQ(in_chunks[i], whole[i]) << i;
      EXPECT_GT(*std::max_element(whole.begin(), whole.end()), 0.0f);
    }
  }
  normkit::set_num_threads(saved_threads);
}

// A conv whose output is recomputed piece by piece (RecomputedOutput), then
// "batchnorm; relu; maxpool 2": the conv's output is never whole, and the BN's
// moments are each piece's merged in piece order. So the logits, running
// statistics and gradients are the separate layers' ("dropout 0" before the
// pooling) to rounding, not bit for bit; and the same bits on 1 and 2 threads.
// Both formats, odd extents, 6 samples (pieces of 4 and 2). The conv first (one
// input channel), and in the middle (1x1 on 4 channels), where its backward
// also makes dx, from the BN's chunks of dy, and plans its primitives anew.
TEST(NnModel, ARecomputedConvBeforeTheOnePassBlockMatchesTheSeparateLayers) {
  const int64_t N = 6;
  const auto labels = some_labels(N, 5);
  const int saved_threads = normkit::num_threads();
  struct Case {
    std::string head;    // up to the pooling
    int64_t channels;    // of x
    size_t recomputing;  // the conv's layer
  };
  const Case cases[] = {
      {"input 1 7 9; conv 8 3 pad=1 bias=0; batchnorm; relu; ", 1, 0},
      {"input 2 7 9; conv 4 3 pad=1 bias=0; batchnorm; relu; conv 8 1 bias=0; batchnorm; relu; ",
       2, 3}};
  const auto near = [](const std::vector<float>& got, const std::vector<float>& want,
                       const std::string& what) {
    double scale = 0;
    for (const float v : want) scale = std::max(scale, double{std::abs(v)});
    for (size_t i = 0; i < want.size(); ++i)
      if (std::abs(got[i] - want[i]) > 1e-5 * scale)
        return ::testing::AssertionFailure()
               << what << " " << i << ": " << got[i] << " vs " << want[i];
    return ::testing::AssertionSuccess();
  };
  for (const Case& c : cases) {
    const auto fused_spec = ModelSpec::parse(c.head + "maxpool 2; flatten; linear 5");
    const auto plain_spec = ModelSpec::parse(c.head + "dropout 0; maxpool 2; flatten; linear 5");
    for (const auto format : kFormats) {
      SCOPED_TRACE(c.head + name_of(format));
      std::vector<std::vector<float>> results_by_threads;
      for (const int threads : {1, 2}) {
        SCOPED_TRACE(threads);
        normkit::set_num_threads(threads);
        Model fused(fused_spec, format), plain(plain_spec, format);
        initialize_alike(fused, plain, 5);
        const auto recomputed = [&](Model& model) {
          return dynamic_cast<normkit::nn::detail::RecomputedOutput&>(
                     *model.layers()[c.recomputing])
              .output_recomputed();
        };
        std::vector<float> results;
        for (int step = 0; step < 3; ++step) {
          SCOPED_TRACE(step);
          const int64_t size = N * c.channels * 63;
          const Tensor x = make_tensor({N, c.channels, 7, 9}, format,
                                       normal_values(size, 70 + step, 2.0f, 0.5f));
          const std::vector<float> logits = fused.forward(x, Mode::train).data;
          ASSERT_TRUE(near(logits, plain.forward(x, Mode::train).data, "logit"));
          ASSERT_TRUE(recomputed(fused));
          ASSERT_FALSE(recomputed(plain));
          results.insert(results.end(), logits.begin(), logits.end());
          compute_gradients(fused, x, labels);
          compute_gradients(plain, x, labels);
          const auto fused_parameters = fused.parameters(), plain_parameters = plain.parameters();
          for (size_t k = 0; k < plain_parameters.size(); ++k) {
            ASSERT_TRUE(near(fused_parameters[k]->grad, plain_parameters[k]->grad,
                             plain_parameters[k]->name + " " + std::to_string(k)));
            results.insert(results.end(), fused_parameters[k]->grad.begin(),
                           fused_parameters[k]->grad.end());
          }
          const auto fused_state = fused.state(), plain_state = plain.state();
          for (size_t k = 0; k < plain_state.size(); ++k) {
            ASSERT_TRUE(near(*fused_state[k].second, *plain_state[k].second, plain_state[k].first));
            results.insert(results.end(), fused_state[k].second->begin(),
                           fused_state[k].second->end());
          }
        }
        results_by_threads.push_back(results);
      }
      EXPECT_EQ(results_by_threads[0], results_by_threads[1]);
    }
  }
  normkit::set_num_threads(saved_threads);
}

// The recomputing conv's backward makes its output again, one buffer per
// thread: threads added between the forward and the backward get theirs. The
// same bits as forward and backward on 2 threads (for_each_chunk's results do
// not depend on the thread count).
TEST(NnModel, ARecomputedConvTakesMoreThreadsInItsBackward) {
  const int64_t N = 10;
  const auto labels = some_labels(N, 5);
  const int saved_threads = normkit::num_threads();
  const auto spec = ModelSpec::parse(
      "input 2 6 6; conv 4 3 pad=1 bias=0; batchnorm; relu; conv 8 1 bias=0; batchnorm; relu; "
      "maxpool 2; flatten; linear 5");
  const Tensor x = make_tensor({N, 2, 6, 6}, MemoryFormat::channels_first,
                               normal_values(N * 72, 12, 1.0f, 0.5f));
  const auto gradients = [&](int forward_threads) {
    Model model(spec, MemoryFormat::channels_first);
    model.initialize({}, 3);
    Tensor dlogits;
    normkit::set_num_threads(forward_threads);
    normkit::nn::softmax_cross_entropy(model.forward(x, Mode::train), labels.data(), &dlogits);
    normkit::set_num_threads(2);
    model.zero_grad();
    model.backward(dlogits);
    std::vector<float> all;
    for (const auto* p : model.parameters()) all.insert(all.end(), p->grad.begin(), p->grad.end());
    return all;
  };
  const std::vector<float> both = gradients(2), more = gradients(1);
  normkit::set_num_threads(saved_threads);
  EXPECT_EQ(more, both);
}

// Without a batchnorm before it, "relu; maxpool K" runs as one pass in training
// (MaxPoolAfterRelu): the pooling of x, then the ReLU of each maximum, and no
// gradient for a window whose maximum is <= 0. With an identity between them
// ("dropout 0") the layers run apart. Logits and gradients bit for bit, both
// formats, disjoint 2×2 windows (odd extents) and overlapping 3×3 ones with
// stride 2, windows whose maximum is exactly 0.
TEST(NnModel, FusedReluMaxPoolEqualsTheSeparateLayers) {
  const int64_t N = 5;
  const auto labels = some_labels(N, 4);
  for (const std::string pool : {"maxpool 2", "maxpool 3 stride=2"}) {
    const std::string head = "input 2 7 9; conv 6 3 pad=1; relu; ", tail = pool + "; flatten; linear 4";
    for (const auto format : kFormats) {
      SCOPED_TRACE(pool + ", " + name_of(format));
      Model fused(ModelSpec::parse(head + tail), format), plain(ModelSpec::parse(head + "dropout 0; " + tail), format);
      initialize_alike(fused, plain, 9);
      const auto fused_parameters = fused.parameters(), plain_parameters = plain.parameters();
      // The first sample all zeros: its convolution (bias 0) is exactly 0, so
      // windows whose maximum is 0, which must pass no gradient (ReLU'(0) = 0).
      auto values = normal_values(N * 126, 33);
      std::fill(values.begin(), values.begin() + 126, 0.0f);
      const Tensor x = make_tensor({N, 2, 7, 9}, format, values);
      ASSERT_TRUE(same_logits(fused, plain, x));
      EXPECT_TRUE(dynamic_cast<normkit::nn::detail::MaxPoolAfterRelu&>(*fused.layers()[2]).ran_after_relu());
      compute_gradients(fused, x, labels);
      compute_gradients(plain, x, labels);
      ASSERT_TRUE(same_gradients(fused_parameters, plain_parameters));
    }
  }
}

TEST(NnModel, ParametersStateAndSummary) {
  Model model(ModelSpec::preset("mlp-paper"));
  // 784·100 + 3·(100+100) BN + 100·100·2 + 100·10 + 10
  EXPECT_EQ(model.parameter_count(), 784 * 100 + 2 * 100 * 100 + 100 * 10 + 10 + 3 * 200);
  std::vector<std::string> names;
  for (const auto& [name, values] : model.state()) names.push_back(name);
  EXPECT_EQ(names.front(), "1.weight");
  EXPECT_NE(std::find(names.begin(), names.end(), "2.running_mean"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "2.num_batches_tracked"), names.end());
  EXPECT_EQ(names.back(), "10.bias");
  // γ and β are parameters (trained), running statistics are not.
  size_t values = 0;
  for (auto* p : model.parameters()) values += p->value.size();
  EXPECT_EQ(static_cast<int64_t>(values), model.parameter_count());
  EXPECT_NE(model.summary().find("parameters: 100010"), std::string::npos) << model.summary();
}

TEST(NnModel, RejectsInputsThatDoNotMatchTheSpec) {
  Model model(ModelSpec::preset("mlp-paper"));
  Tensor x = make_tensor({2, 784}, MemoryFormat::channels_first, std::vector<float>(2 * 784));
  EXPECT_TRUE(throws_error([&] { model.forward(x, Mode::train); }, ErrorKind::invalid_argument,
                           {"input shape"}));
  // A multi-channel input in the other memory format would be misread.
  Model cnn(ModelSpec::parse("input 3 4 4; conv 2 3; flatten; linear 2"), MemoryFormat::channels_last);
  Tensor image = make_tensor({2, 3, 4, 4}, MemoryFormat::channels_first, std::vector<float>(96));
  EXPECT_TRUE(throws_error([&] { cnn.forward(image, Mode::train); }, ErrorKind::invalid_argument,
                           {"input is channels-first, the model channels-last"}));
  image.data.resize(95);
  image.format = MemoryFormat::channels_last;
  EXPECT_TRUE(throws_error([&] { cnn.forward(image, Mode::train); }, ErrorKind::invalid_argument,
                           {"95 values"}));
  EXPECT_TRUE(throws_error([] { Model m(ModelSpec::parse("input 784; linear 1")); },
                           ErrorKind::invalid_argument, {"classes >= 2"}));
  EXPECT_TRUE(throws_error([] { Model m(ModelSpec::parse("input 1 28 28; linear 10")); },
                           ErrorKind::invalid_argument, {"layer 1", "flatten"}));
  EXPECT_TRUE(throws_error([] { Model m(ModelSpec::parse("input 1 4 4; conv 2 3; flatten; linear 0")); },
                           ErrorKind::invalid_argument, {"layer 3", "output size"}));
}

TEST(NnModel, InitializersHaveTheirScales) {
  Model model(ModelSpec::parse("input 400; linear 300; linear 10"));
  auto variance = [](const std::vector<float>& w) {
    double s = 0, s2 = 0;
    for (const float v : w) s += v, s2 += double{v} * v;
    const double n = static_cast<double>(w.size()), m = s / n;
    return s2 / n - m * m;
  };
  auto* w = model.parameters()[0];
  model.initialize({normkit::nn::Init::he}, 1);
  EXPECT_NEAR(variance(w->value), 2.0 / 400, 0.05 * 2.0 / 400);
  model.initialize({normkit::nn::Init::xavier}, 1);
  EXPECT_NEAR(variance(w->value), 2.0 / 700, 0.05 * 2.0 / 700);  // U(±a): a²/3, a² = 6/(in+out)
  model.initialize({normkit::nn::Init::normal, 0.1f}, 1);
  EXPECT_NEAR(variance(w->value), 0.01, 0.05 * 0.01);
  for (const float b : model.parameters()[1]->value) EXPECT_EQ(b, 0.0f);
  // The same seed gives the same weights.
  const auto first = w->value;
  model.initialize({normkit::nn::Init::normal, 0.1f}, 1);
  EXPECT_EQ(w->value, first);
}

// ---------------------------------------------------------------- optimizers

struct Fixture {
  std::vector<Parameter> storage;
  std::vector<Parameter*> params;
  explicit Fixture(uint64_t seed) {
    storage.push_back({"weight", normal_values(7, seed), std::vector<float>(7)});
    storage.push_back({"bias", normal_values(3, seed + 1), std::vector<float>(3)});
    for (auto& p : storage) params.push_back(&p);
  }
  void set_grads(int step) {
    for (size_t k = 0; k < storage.size(); ++k)
      storage[k].grad = normal_values(storage[k].value.size(), 1000 + step * 10 + k);
  }
};

// torch.optim.SGD (1.13), dampening 0:
//   d_p = grad + wd·p;  buf = d_p (first step) else μ·buf + d_p
//   d_p = d_p + μ·buf (nesterov) else buf;  p -= lr·d_p
TEST(NnOptimizer, SgdMatchesPyTorchsFormulas) {
  struct Case {
    float lr, momentum, wd;
    bool nesterov;
  };
  for (const Case c : {Case{0.1f, 0.0f, 0.0f, false}, Case{0.05f, 0.9f, 0.0f, false},
                       Case{0.05f, 0.9f, 1e-2f, false}, Case{0.02f, 0.8f, 5e-3f, true}}) {
    SCOPED_TRACE(testing::Message() << "lr " << c.lr << " momentum " << c.momentum << " wd " << c.wd
                                    << " nesterov " << c.nesterov);
    Fixture f(3);
    auto sgd = normkit::nn::make_sgd({c.lr, c.momentum, c.wd, c.nesterov}, f.params);
    std::vector<std::vector<double>> p, buf;
    for (auto& s : f.storage) {
      p.emplace_back(s.value.begin(), s.value.end());
      buf.emplace_back(s.value.size(), 0.0);
    }
    for (int step = 0; step < 4; ++step) {
      f.set_grads(step);
      sgd->step(f.params);
      for (size_t k = 0; k < p.size(); ++k)
        for (size_t i = 0; i < p[k].size(); ++i) {
          double d = f.storage[k].grad[i] + double{c.wd} * p[k][i];
          if (c.momentum != 0) {
            buf[k][i] = step == 0 ? d : c.momentum * buf[k][i] + d;
            d = c.nesterov ? d + c.momentum * buf[k][i] : buf[k][i];
          }
          p[k][i] -= double{c.lr} * d;
          EXPECT_NEAR(f.storage[k].value[i], p[k][i], 1e-6 * (1 + std::abs(p[k][i]))) << "step " << step;
        }
    }
    EXPECT_EQ(sgd->steps(), 4);
    EXPECT_EQ(sgd->state().size(), 2u);
  }
}

// torch.optim.Adam (1.13), amsgrad off:
//   g = grad + wd·p;  m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²
//   p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)
TEST(NnOptimizer, AdamMatchesPyTorchsFormulas) {
  for (const float wd : {0.0f, 0.01f}) {
    SCOPED_TRACE(testing::Message() << "weight decay " << wd);
    Fixture f(4);
    const normkit::nn::AdamOptions o{1e-2f, 0.9f, 0.99f, 1e-8f, wd};
    auto adam = normkit::nn::make_adam(o, f.params);
    std::vector<std::vector<double>> p, m, v;
    for (auto& s : f.storage) {
      p.emplace_back(s.value.begin(), s.value.end());
      m.emplace_back(s.value.size(), 0.0);
      v.emplace_back(s.value.size(), 0.0);
    }
    for (int step = 1; step <= 5; ++step) {
      f.set_grads(step);
      adam->step(f.params);
      for (size_t k = 0; k < p.size(); ++k)
        for (size_t i = 0; i < p[k].size(); ++i) {
          const double g = f.storage[k].grad[i] + double{wd} * p[k][i];
          m[k][i] = o.beta1 * m[k][i] + (1 - double{o.beta1}) * g;
          v[k][i] = o.beta2 * v[k][i] + (1 - double{o.beta2}) * g * g;
          const double c1 = 1 - std::pow(double{o.beta1}, step), c2 = 1 - std::pow(double{o.beta2}, step);
          p[k][i] -= o.lr / c1 * m[k][i] / (std::sqrt(v[k][i]) / std::sqrt(c2) + o.eps);
          EXPECT_NEAR(f.storage[k].value[i], p[k][i], 2e-6 * (1 + std::abs(p[k][i]))) << "step " << step;
        }
    }
    EXPECT_EQ(adam->steps(), 5);
    EXPECT_EQ(adam->state().size(), 4u);
  }
}

// step_and_zero_grad is step() then zero_grad: the same parameters and state
// to the bit, every gradient zero after it; every SGD case and Adam.
TEST(NnOptimizer, StepAndZeroGradIsStepThenZeroGrad) {
  const std::vector<std::pair<std::string, std::function<std::unique_ptr<normkit::nn::Optimizer>(
                                               const std::vector<Parameter*>&)>>>
      makers = {
          {"sgd", [](const auto& p) { return normkit::nn::make_sgd({0.1f}, p); }},
          {"sgd momentum wd",
           [](const auto& p) { return normkit::nn::make_sgd({0.05f, 0.9f, 1e-2f}, p); }},
          {"sgd nesterov",
           [](const auto& p) { return normkit::nn::make_sgd({0.02f, 0.8f, 0.0f, true}, p); }},
          {"adam wd",
           [](const auto& p) { return normkit::nn::make_adam({1e-2f, 0.9f, 0.99f, 1e-8f, 0.01f}, p); }}};
  for (const auto& [name, make] : makers) {
    SCOPED_TRACE(name);
    Fixture a(6), b(6);
    auto separate = make(a.params), fused = make(b.params);
    for (int step = 0; step < 3; ++step) {
      a.set_grads(step);
      b.set_grads(step);
      separate->step(a.params);
      for (auto* p : a.params) std::fill(p->grad.begin(), p->grad.end(), 0.0f);
      fused->step_and_zero_grad(b.params);
      for (size_t k = 0; k < a.storage.size(); ++k) {
        EXPECT_EQ(b.storage[k].value, a.storage[k].value) << "step " << step;
        EXPECT_EQ(b.storage[k].grad, a.storage[k].grad) << "step " << step;
      }
      for (size_t k = 0; k < separate->state().size(); ++k)
        EXPECT_EQ(*fused->state()[k], *separate->state()[k]) << "state " << k << ", step " << step;
    }
    EXPECT_EQ(fused->steps(), 3);
  }
}

// A large parameter's update runs in blocks over the threads: the same bits
// as the same values held as small parameters (each updated whole on the
// calling thread), for SGD with Nesterov momentum and weight decay and for
// Adam, on 1 and 2 threads; a last block shorter than the others.
TEST(NnOptimizer, ALargeParameterUpdatedInBlocksHasTheBitsOfSmallOnes) {
  constexpr size_t kLarge = (size_t{1} << 18) + 3 * (size_t{1} << 16) + 77, kSmall = 4099;
  const std::vector<float> values = normal_values(kLarge, 31);
  const int saved_threads = normkit::num_threads();
  for (const bool adam : {false, true}) {
    for (const int threads : {1, 2}) {
      SCOPED_TRACE(std::string(adam ? "adam" : "sgd") + ", threads " + std::to_string(threads));
      normkit::set_num_threads(threads);
      std::vector<Parameter> large = {{"weight", values, std::vector<float>(kLarge)}}, small;
      for (size_t at = 0; at < kLarge; at += kSmall) {
        const auto begin = values.begin() + static_cast<std::ptrdiff_t>(at);
        const auto end = values.begin() + static_cast<std::ptrdiff_t>(std::min(kLarge, at + kSmall));
        small.push_back({"piece", {begin, end}, {}});
        small.back().grad.resize(small.back().value.size());
      }
      std::vector<Parameter*> large_params = {&large[0]}, small_params;
      for (auto& p : small) small_params.push_back(&p);
      const auto make = [&](const std::vector<Parameter*>& p) {
        return adam ? normkit::nn::make_adam({1e-2f, 0.9f, 0.99f, 1e-8f, 0.01f}, p)
                    : normkit::nn::make_sgd({0.02f, 0.8f, 5e-3f, true}, p);
      };
      auto large_optimizer = make(large_params), small_optimizer = make(small_params);
      for (int step = 0; step < 3; ++step) {
        large[0].grad = normal_values(kLarge, 40 + step);
        for (size_t k = 0, at = 0; k < small.size(); at += small[k].grad.size(), ++k)
          std::copy_n(large[0].grad.begin() + static_cast<std::ptrdiff_t>(at), small[k].grad.size(),
                      small[k].grad.begin());
        large_optimizer->step_and_zero_grad(large_params);
        small_optimizer->step_and_zero_grad(small_params);
      }
      std::vector<float> pieces, piece_state;
      for (const auto& p : small) pieces.insert(pieces.end(), p.value.begin(), p.value.end());
      ASSERT_EQ(pieces, large[0].value);
      const auto large_state = large_optimizer->state(), small_state = small_optimizer->state();
      const size_t arrays = large_state.size();  // sgd: the momentum; adam: m and v
      for (size_t a = 0; a < arrays; ++a) {
        piece_state.clear();
        for (size_t k = 0; k < small.size(); ++k) {
          const auto* s = small_state[a * small.size() + k];
          piece_state.insert(piece_state.end(), s->begin(), s->end());
        }
        ASSERT_EQ(piece_state, *large_state[a]) << "state " << a;
      }
      EXPECT_TRUE(std::all_of(large[0].grad.begin(), large[0].grad.end(),
                              [](float g) { return g == 0.0f; }));
    }
  }
  normkit::set_num_threads(saved_threads);
}

TEST(NnOptimizer, LearningRateCanChangeBetweenStepsAndBadOptionsAreRejected) {
  Fixture f(5);
  auto sgd = normkit::nn::make_sgd({0.1f}, f.params);
  f.set_grads(0);
  const float before = f.storage[0].value[0];
  sgd->learning_rate = 0.5f;
  sgd->step(f.params);
  EXPECT_NEAR(f.storage[0].value[0], before - 0.5f * f.storage[0].grad[0], 1e-6);
  EXPECT_TRUE(throws_error([&] { normkit::nn::make_sgd({0.1f, 0.0f, 0.0f, true}, f.params); },
                           ErrorKind::invalid_argument, {"Nesterov"}));
  EXPECT_TRUE(throws_error([&] { normkit::nn::make_sgd({-1.0f}, f.params); }, ErrorKind::invalid_argument,
                           {"lr"}));
  EXPECT_TRUE(throws_error([&] { normkit::nn::make_adam({1e-3f, 1.0f}, f.params); },
                           ErrorKind::invalid_argument, {"betas"}));
  std::vector<Parameter*> fewer = {f.params[0]};
  EXPECT_TRUE(throws_error([&] { sgd->step(fewer); }, ErrorKind::invalid_argument, {"2 parameters"}));
  f.storage[1].grad.resize(2);
  EXPECT_TRUE(throws_error([&] { sgd->step(f.params); }, ErrorKind::invalid_argument,
                           {"parameter 1 (bias)", "2 gradients"}));
}

// ---------------------------------------------------------------- model spec

TEST(NnSpec, ParseToStringRoundTrip) {
  for (const std::string& text :
       {std::string("input 1 28 28; conv 32 3 pad=1 bias=0; batchnorm; relu; maxpool 2;"
                    " flatten; linear 128 bias=0; batchnorm eps=0.001 momentum=0.01; relu; dropout 0.5; linear 10"),
        std::string("# a comment line\ninput 20\nlinear 16   # trailing comment\n\nTANH\nlinear 3\n"),
        std::string("input 3 9 9; conv 4 3 stride=2 pad=1; avgpool 2 stride=1; sigmoid; flatten; linear 2")}) {
    SCOPED_TRACE(text);
    const auto spec = ModelSpec::parse(text);
    EXPECT_EQ(ModelSpec::parse(spec.to_string()), spec) << spec.to_string();
    EXPECT_EQ(ModelSpec::parse(spec.to_string()).to_string(), spec.to_string());
    Model model(spec);  // and it builds
  }
  const auto spec = ModelSpec::parse("input 20\nlinear 16 # c\ntanh;linear 3");
  EXPECT_EQ(spec.to_string(), "input 20; linear 16; tanh; linear 3");
  EXPECT_EQ(spec.layers[1].type, "tanh");
}

TEST(NnSpec, JsonDescribesTheSameModelAsText) {
  const auto text = ModelSpec::parse(
      "input 1 4 4; conv 2 3 pad=1 bias=0; batchnorm momentum=0.2; relu; maxpool 2; flatten; linear 10");
  const auto json = ModelSpec::parse(
      R"( {"input": [1, 4, 4], "layers": ["conv 2 3 pad=1 bias=0",
           {"type": "batchnorm", "options": {"momentum": 0.2}}, "relu",
           {"type": "maxpool", "args": [2]}, {"type": "flatten"}, {"type": "linear", "args": ["10"]}]})");
  EXPECT_EQ(json, text);
  for (const auto& [bad, words] : std::vector<std::pair<std::string, std::string>>{
           {"{\"input\": [4], \"layers\": [\"linear 2\"", "not valid JSON"},
           {"{\"input\": [4]}", "expected {\"input\": [...], \"layers\": [...]}"},
           {"{\"input\": [4], \"layers\": [{\"args\": [2]}]}", "expected {\"input\""},
           {"{\"input\": [4], \"layers\": [\"linear 2\", \"softmax\"]}", "unknown layer type"}})
    EXPECT_TRUE(throws_error([&b = bad] { ModelSpec::parse(b); }, ErrorKind::invalid_argument, {words})) << bad;
}

TEST(NnSpec, PresetsAreThePapersModels) {
  const auto mlp = ModelSpec::preset("mlp-paper");
  EXPECT_EQ(mlp.input_shape, (std::vector<int64_t>{1, 28, 28}));
  EXPECT_EQ(mlp.to_string(),
            "input 1 28 28; flatten; linear 100 bias=0; batchnorm; sigmoid; linear 100 bias=0; "
            "batchnorm; sigmoid; linear 100 bias=0; batchnorm; sigmoid; linear 10");
  const auto cnn = ModelSpec::preset("cnn-small");
  EXPECT_EQ(cnn.to_string(),
            "input 1 28 28; conv 32 3 bias=0 pad=1; batchnorm; relu; maxpool 2; "
            "conv 64 3 bias=0 pad=1; batchnorm; relu; maxpool 2; flatten; linear 128 bias=0; "
            "batchnorm; relu; linear 10");
  Model m(cnn);
  EXPECT_EQ(m.parameter_count(), 32 * 9 + 64 + 64 * 32 * 9 + 128 + 3136 * 128 + 256 + 1280 + 10);
  EXPECT_TRUE(throws_error([] { ModelSpec::preset("resnet"); }, ErrorKind::invalid_argument,
                           {"'resnet'", "mlp-paper", "cnn-small"}));
}

TEST(NnSpec, WithoutBatchNormDropsBnAndRestoresTheBias) {
  for (const char* name : {"mlp-paper", "cnn-small"}) {
    SCOPED_TRACE(name);
    const auto with = ModelSpec::preset(name);
    const auto without = with.without_batch_norm();
    size_t bn = 0;
    for (const auto& l : with.layers) bn += l.type == "batchnorm";
    EXPECT_EQ(without.layers.size(), with.layers.size() - bn);
    for (const auto& l : without.layers) {
      EXPECT_NE(l.type, "batchnorm");
      EXPECT_EQ(l.options.count("bias"), 0u) << l.type;  // every weight layer has its bias
    }
    Model model(without);
    for (const auto& layer : model.layers()) {
      if (layer->type() == "linear" || layer->type() == "conv") {
        EXPECT_EQ(layer->parameters().size(), 2u) << layer->describe();
      }
    }
    EXPECT_EQ(without.without_batch_norm(), without);
  }
  // A layer that does not feed a BN keeps what it was given; BN after the
  // activation leaves the layer before the activation alone.
  const auto spec = ModelSpec::parse("input 4; linear 8 bias=0; relu; batchnorm; linear 3 bias=0");
  EXPECT_EQ(spec.without_batch_norm().to_string(), "input 4; linear 8 bias=0; relu; linear 3 bias=0");
}

TEST(NnSpec, WithNormReplacesEachBatchNormLayer) {
  const auto cnn = ModelSpec::preset("cnn-small");
  EXPECT_EQ(cnn.with_norm("batch"), cnn);
  EXPECT_EQ(cnn.with_norm("none"), cnn.without_batch_norm());
  const std::vector<std::pair<std::string, std::string>> replaced = {
      {"renorm", "batchrenorm"}, {"ghost", "ghostbatchnorm"}, {"layer", "layernorm"},
      {"group", "groupnorm"},    {"frozen", "batchnorm"}};
  for (const auto& [norm, type] : replaced) {
    SCOPED_TRACE(norm);
    const auto spec = cnn.with_norm(norm);
    ASSERT_EQ(spec.layers.size(), cnn.layers.size());
    for (size_t i = 0; i < cnn.layers.size(); ++i) {
      if (cnn.layers[i].type == "batchnorm") {
        EXPECT_EQ(spec.layers[i].type, type);
        EXPECT_EQ(spec.layers[i].options.count("frozen"), norm == "frozen" ? 1u : 0u);
        if (norm == "group") {
          EXPECT_EQ(spec.layers[i].options.at("groups"), "32");  // 32, 64, 128 channels
        }
      } else {
        EXPECT_EQ(spec.layers[i], cnn.layers[i]);  // weight layers keep bias=0
      }
    }
    EXPECT_EQ(ModelSpec::parse(spec.to_string()), spec);  // the parser accepts what it writes
  }
  // Instance norm replaces the BNs after convolutions; the one on flat
  // features (one value per sample and channel) goes, and its linear layer
  // gets the bias back.
  const auto instance = cnn.with_norm("instance");
  EXPECT_EQ(instance.to_string(),
            "input 1 28 28; conv 32 3 bias=0 pad=1; instancenorm; relu; maxpool 2; "
            "conv 64 3 bias=0 pad=1; instancenorm; relu; maxpool 2; flatten; linear 128; relu; "
            "linear 10");
  // Options carry over where the new layer has them.
  const auto bn = ModelSpec::parse("input 4; linear 8 bias=0; batchnorm eps=0.001 momentum=0.2; linear 3");
  EXPECT_EQ(bn.with_norm("layer").to_string(), "input 4; linear 8 bias=0; layernorm eps=0.001; linear 3");
  EXPECT_EQ(bn.with_norm("ghost").to_string(),
            "input 4; linear 8 bias=0; ghostbatchnorm eps=0.001 momentum=0.2; linear 3");
  // Groups divide the channels: 100 features make 25 groups of 4.
  const auto mlp_group = ModelSpec::preset("mlp-paper").with_norm("group");
  for (const auto& layer : mlp_group.layers)
    if (layer.type == "groupnorm") {
      EXPECT_EQ(layer.options.at("groups"), "25");
    }
  EXPECT_NO_THROW(Model{mlp_group});
  EXPECT_NO_THROW(Model{ModelSpec::preset("cnn-small").with_norm("instance")});
  for (const std::string& norm : ModelSpec::norm_kinds()) {
    SCOPED_TRACE(norm);
    EXPECT_NO_THROW(Model{ModelSpec::preset("mlp-paper").with_norm(norm)});
    EXPECT_NO_THROW(Model{ModelSpec::preset("cnn-small").with_norm(norm)});
  }
  EXPECT_TRUE(throws_error([&] { bn.with_norm("weight"); }, ErrorKind::invalid_argument,
                           {"'weight'", "layer", "group"}));
}

TEST(NnSpec, ParseErrorsNameTheStatementAndTheProblem) {
  struct Case {
    std::string text;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"input 4; lineer 3",
       {"statement 2", "'lineer'", "unknown layer type",
        "input, linear, conv, maxpool, avgpool, relu, sigmoid, tanh, dropout, flatten, batchnorm, "
        "batchrenorm, ghostbatchnorm, layernorm, rmsnorm, groupnorm, instancenorm"}},
      {"linear 3", {"missing 'input"}},
      {"input 4", {"no layers"}},
      {"input 4; input 4; linear 2", {"statement 2", "input given twice"}},
      {"input 4 4; linear 2", {"statement 1", "C, or C H W"}},
      {"input 0; linear 2", {"bad input size 0"}},
      {"input 4; linear", {"statement 2", "'linear'", "expected 1 arguments, got 0"}},
      {"input 4; linear 3 4", {"expected 1 arguments, got 2"}},
      {"input 4; linear three", {"'three' is not a number"}},
      {"input 4; linear 3 bias=yes", {"'yes' is not a number"}},
      {"input 4; linear 3 stride=2", {"unknown option 'stride' (linear takes bias=)"}},
      {"input 4; relu x=1", {"unknown option 'x' (relu takes no options)"}},
      {"input 4\nrelu\nconv 3", {"statement 3", "'conv'", "expected 2 arguments"}},
      {"input 4; relu 3; linear 2", {"statement 2", "expected 0 arguments, got 1"}},
      {"input 4; linear 10.5", {"statement 2", "'10.5' is not a whole number"}},
      {"input 1 8 8; conv 4 3 pad=0.5", {"'0.5' is not a whole number"}},
      {"input 4; linear 3 bias=2", {"bias must be 0 or 1, got 2"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    try {
      ModelSpec::parse(c.text);
      ADD_FAILURE() << "parsed";
    } catch (const normkit::Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      for (const auto& part : c.parts)
        EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what() << " lacks " << part;
    }
  }
}

// ---------------------------------------------------------------- training

TEST(NnTraining, ATinyModelsLossFallsAndRunsRepeat) {
  const auto train = blobs(200, 1);
  const auto test = blobs(100, 2);
  const auto spec = ModelSpec::parse(
      "input 2 4 4; conv 4 3 pad=1 bias=0; batchnorm; relu; maxpool 2; flatten;"
      "linear 16 bias=0; batchnorm; sigmoid; dropout 0.1; linear 4");
  for (const auto format : kFormats) {
    SCOPED_TRACE(name_of(format));
    std::vector<double> losses;
    std::vector<float> final_weights;
    for (int run = 0; run < 2; ++run) {
      Model model(spec, format);
      model.initialize({}, 42);
      auto sgd = normkit::nn::make_sgd({0.05f, 0.9f, 1e-4f}, model.parameters());
      std::vector<double> run_losses;
      for (int64_t epoch = 0; epoch < 5; ++epoch)
        run_losses.push_back(normkit::train::train_epoch(model, *sgd, train, 16, 42, epoch).loss);
      if (run == 0) {
        losses = run_losses;
        EXPECT_LT(losses.back(), 0.5 * losses.front()) << losses.front() << " -> " << losses.back();
        const auto eval = normkit::train::evaluate(model, test, 32);
        EXPECT_GT(eval.accuracy, 0.9);
        EXPECT_EQ(eval.classes, 4);
        int64_t total = 0, diagonal = 0;
        for (int32_t i = 0; i < 4; ++i)
          for (int32_t j = 0; j < 4; ++j) {
            total += eval.confusion[i * 4 + j];
            diagonal += i == j ? eval.confusion[i * 4 + j] : 0;
          }
        EXPECT_EQ(total, 100);
        EXPECT_NEAR(eval.accuracy, static_cast<double>(diagonal) / 100.0, 1e-12);
        final_weights = model.parameters()[0]->value;
      } else {
        // Same seed, same data: the same numbers.
        EXPECT_EQ(run_losses, losses);
        EXPECT_EQ(model.parameters()[0]->value, final_weights);
      }
    }
  }
}

// Evaluation runs in eval mode, where a sample's logits do not depend on the
// others in its batch: the batch (kEvaluationBatch by default, chosen for
// memory) changes no prediction, and the loss only in its last bits (its
// summation order, and oneDNN may choose other kernels for other batches).
TEST(NnTraining, EvaluationDoesNotDependOnItsBatch) {
  const auto train = blobs(200, 1);
  const auto test = blobs(300, 2);
  const auto spec = ModelSpec::parse(
      "input 2 4 4; conv 4 3 pad=1 bias=0; batchnorm; relu; maxpool 2; flatten;"
      "linear 16 bias=0; batchnorm; relu; linear 4");
  for (const auto format : kFormats) {
    SCOPED_TRACE(name_of(format));
    Model model(spec, format);
    model.initialize({}, 7);
    auto sgd = normkit::nn::make_sgd({0.05f, 0.9f, 0.0f}, model.parameters());
    for (int64_t epoch = 0; epoch < 2; ++epoch)
      normkit::train::train_epoch(model, *sgd, train, 16, 7, epoch);
    const auto whole = normkit::train::evaluate(model, test, 300);
    for (const int64_t batch : {int64_t{1}, int64_t{7}, normkit::train::kEvaluationBatch}) {
      SCOPED_TRACE(batch);
      const auto e = normkit::train::evaluate(model, test, batch);
      EXPECT_EQ(e.confusion, whole.confusion);
      EXPECT_EQ(e.accuracy, whole.accuracy);
      EXPECT_NEAR(e.loss, whole.loss, 1e-6 * std::abs(whole.loss));
    }
    EXPECT_EQ(normkit::train::evaluate(model, test).confusion, whole.confusion);
  }
}

// Results are bitwise identical across thread counts (docs/design.md). The sizes are
// large enough for the matrix products to be split between threads (the 256 -> 1024
// product at batch 128 runs as two chunks at once); 2 threads run three times, since
// a race between the chunks (one scratchpad shared by two oneDNN primitives) shows
// only in some runs.
TEST(NnTraining, ResultsDoNotDependOnTheThreadCount) {
  normkit::data::Dataset set;
  set.sample_shape = {4, 8, 8};
  set.num_classes = 10;
  set.features = normal_values(256 * 256, 11);
  for (int64_t i = 0; i < 256; ++i) set.labels.push_back(static_cast<int32_t>(i % 10));
  const auto spec = ModelSpec::parse(
      "input 4 8 8; conv 16 3 pad=1 bias=0; batchnorm; relu; maxpool 2; flatten;"
      "linear 1024 bias=0; batchnorm; relu; linear 256; tanh; linear 10");
  const int saved = normkit::num_threads();
  for (const auto format : kFormats) {
    SCOPED_TRACE(name_of(format));
    std::vector<std::vector<float>> results;
    for (const int threads : {1, 2, 2, 2}) {
      normkit::set_num_threads(threads);
      Model model(spec, format);
      model.initialize({}, 3);
      auto sgd = normkit::nn::make_sgd({0.05f, 0.9f}, model.parameters());
      const auto r = normkit::train::train_epoch(model, *sgd, set, 128, 3, 0);
      std::vector<float> all = {static_cast<float>(r.loss)};
      for (auto* p : model.parameters()) all.insert(all.end(), p->value.begin(), p->value.end());
      results.push_back(all);
    }
    for (size_t run = 1; run < results.size(); ++run)
      EXPECT_TRUE(results[0] == results[run]) << "1 and 2 threads give different results (run " << run << ")";
  }
  normkit::set_num_threads(saved);
}

TEST(NnTraining, ProgressReportsEveryStepAndALoneLastSampleIsDropped) {
  const auto train = blobs(33, 3);  // 33 = 2·16 + 1
  Model model(ModelSpec::parse("input 2 4 4; flatten; linear 8 bias=0; batchnorm; relu; linear 4"));
  model.initialize({}, 1);
  auto sgd = normkit::nn::make_sgd({0.01f}, model.parameters());
  std::vector<int64_t> steps;
  const auto result = normkit::train::train_epoch(model, *sgd, train, 16, 1, 0,
                                                  [&](const normkit::train::StepProgress& p) {
                                                    steps.push_back(p.step);
                                                    EXPECT_EQ(p.steps, 2);
                                                  });
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(result.samples, 32);
}

// A stop requested after any step of an epoch, the run saved and rebuilt from
// the checkpoint (as a resumed process sees it), then the epoch continued: the
// epoch's metrics and the model's state equal an uninterrupted run's, bit for bit.
TEST(NnTraining, AnEpochStoppedAfterAnyStepContinuesExactly) {
  namespace train = normkit::train;
  namespace io = normkit::io;
  const auto data = blobs(70, 5);  // 5 steps of 16 samples, the last of 6
  const auto spec = ModelSpec::parse(
      "input 2 4 4; conv 3 3 pad=1 bias=0; batchnorm; relu; flatten; dropout 0.2; linear 4");
  auto fresh = [&] {
    auto model = std::make_unique<Model>(spec, MemoryFormat::channels_last);
    model->initialize({}, 8);
    return model;
  };
  auto reference = fresh();
  auto reference_sgd = normkit::nn::make_sgd({0.05f, 0.9f}, reference->parameters());
  train::train_epoch(*reference, *reference_sgd, data, 16, 8, 0);
  const auto expected = train::train_epoch(*reference, *reference_sgd, data, 16, 8, 1);
  ASSERT_FALSE(expected.interrupted);

  for (int64_t stop_after = 0; stop_after <= 5; ++stop_after) {
    SCOPED_TRACE("stop after step " + std::to_string(stop_after));
    auto model = fresh();
    auto sgd = normkit::nn::make_sgd({0.05f, 0.9f}, model->parameters());
    train::train_epoch(*model, *sgd, data, 16, 8, 0);
    train::clear_stop();
    if (stop_after == 0) train::request_stop(SIGINT);
    const auto first = train::train_epoch(*model, *sgd, data, 16, 8, 1, [&](const train::StepProgress& p) {
      if (p.step == stop_after) train::request_stop(SIGTERM);
    });
    const int signal = train::stop_signal();
    train::clear_stop();
    if (stop_after == 5) {  // asked during the last step: the epoch is complete
      EXPECT_EQ(signal, SIGTERM);
      EXPECT_FALSE(first.interrupted);
      EXPECT_EQ(first.loss, expected.loss);
      continue;
    }
    ASSERT_TRUE(first.interrupted);
    EXPECT_EQ(first.position.step, stop_after);
    EXPECT_EQ(first.position.samples, 16 * stop_after);

    io::TrainingProgress progress;
    progress.epochs_done = 1;
    progress.position = first.position;
    const auto checkpoint = io::from_bytes(
        io::to_bytes(io::make_checkpoint(*model, sgd.get(), {}, progress)), "stopped.nkc");
    EXPECT_EQ(checkpoint.progress.position, first.position);
    auto resumed = io::build_model(checkpoint);
    auto resumed_sgd = io::build_optimizer(checkpoint, *resumed);
    const auto rest = train::train_epoch(*resumed, *resumed_sgd, data, 16, 8, 1, {},
                                         checkpoint.progress.position);
    EXPECT_FALSE(rest.interrupted);
    EXPECT_EQ(rest.loss, expected.loss);
    EXPECT_EQ(rest.accuracy, expected.accuracy);
    EXPECT_EQ(rest.samples, expected.samples);
    const auto want = reference->state(), got = resumed->state();
    ASSERT_EQ(want.size(), got.size());
    for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(*got[i].second, *want[i].second) << want[i].first;
  }
}

TEST(NnTraining, ContinuingAtAnImpossiblePositionIsAnError) {
  const auto data = blobs(64, 5);
  Model model(ModelSpec::parse("input 2 4 4; flatten; linear 8 bias=0; batchnorm; relu; linear 4"));
  model.initialize({}, 1);
  auto sgd = normkit::nn::make_sgd({0.01f}, model.parameters());
  for (const normkit::train::EpochPosition position :
       {normkit::train::EpochPosition{4, 0, 0, 64, 0}, {-1, 0, 0, 0, 0}, {1, 0, 17, 16, 0}})
    EXPECT_TRUE(throws_error(
        [&] { normkit::train::train_epoch(model, *sgd, data, 16, 1, 0, {}, position); },
        ErrorKind::invalid_argument, {"cannot continue at step"}));
}

namespace stop_test {
// The signal the stop thread recorded, waited for up to 10 s (it takes them asynchronously).
int recorded_stop() {
  for (int i = 0; i < 100000 && normkit::train::stop_signal() == 0; ++i) ::usleep(100);
  return normkit::train::stop_signal();
}

// The first SIGINT or SIGTERM sent to the process is recorded, the second ends it;
// after clear_stop the next is a first one again.
[[noreturn]] void first_recorded_second_ends(int first, int second) {
  normkit::train::install_stop_handlers();
  ::kill(::getpid(), first);
  if (recorded_stop() != first) std::_Exit(3);
  normkit::train::clear_stop();
  ::kill(::getpid(), second);
  if (recorded_stop() != second) std::_Exit(4);
  ::kill(::getpid(), first);
  ::sleep(10);
  std::_Exit(5);  // survived the second signal
}

// A child of fork() has no stop thread: it starts with nothing recorded and the
// signals unblocked.
[[noreturn]] void fork_child_starts_clean() {
  normkit::train::install_stop_handlers();
  ::kill(::getpid(), SIGINT);
  if (recorded_stop() != SIGINT) std::_Exit(3);
  const pid_t child = ::fork();
  if (child == 0) {
    sigset_t blocked;
    ::pthread_sigmask(SIG_BLOCK, nullptr, &blocked);
    std::_Exit(normkit::train::stop_signal() == 0 && !sigismember(&blocked, SIGINT) &&
                       !sigismember(&blocked, SIGTERM)
                   ? 0
                   : 9);
  }
  int status = 0;
  if (child < 0 || ::waitpid(child, &status, 0) != child) std::_Exit(10);
  std::_Exit(WIFEXITED(status) ? WEXITSTATUS(status) : 11);
}

// SIGINT sent to the process again and again (cleared once recorded) while a
// model with large linear layers (oneDNN sgemm on 2 threads) takes training
// steps: every gradient must come out as without signals. oneDNN 2.x's sgemm
// points the stack pointer into the heap while it runs (oneDNN issue #4845): a
// handler run on a thread inside it overwrites the heap, and glibc aborts or a
// product is wrong (every run of this test did one or the other when the
// signals were handled on the computing threads).
[[noreturn]] void steps_under_stop_signals() {
  normkit::train::install_stop_handlers();
  normkit::set_num_threads(2);
  Model model(ModelSpec::parse("input 1024; linear 1024; relu; linear 1024; relu; linear 10"));
  model.initialize({}, 5);
  std::vector<float> values(64 * 1024), ones(64 * 10, 1.0f);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)));
  const Tensor x = make_tensor({64, 1024}, normkit::nn::MemoryFormat::channels_first, values);
  const Tensor dlogits = make_tensor({64, 10}, normkit::nn::MemoryFormat::channels_first, ones);
  auto gradients = [&] {
    model.zero_grad();
    model.forward(x, normkit::nn::Mode::train);
    model.backward(dlogits);
    std::vector<std::vector<float>> grads;
    for (const Parameter* p : model.parameters()) grads.push_back(p->grad);
    return grads;
  };
  const auto expected = gradients();
  std::atomic<bool> done{false};
  std::atomic<int> sent{0};
  std::thread sender([&] {  // one signal at a time: a second before clear_stop would end the process
    while (!done.load()) {
      ::kill(::getpid(), SIGINT);
      ++sent;
      if (recorded_stop() != SIGINT) std::_Exit(8);
      normkit::train::clear_stop();
      ::usleep(200);
    }
  });
  // At least 150 steps and 100 signals (a minute at most).
  int wrong = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; (step < 150 || sent.load() < 100) &&
                     std::chrono::steady_clock::now() - start < std::chrono::minutes(1);
       ++step)
    if (gradients() != expected) ++wrong;
  done.store(true);
  sender.join();
  std::_Exit(wrong != 0 ? 6 : sent.load() < 100 ? 7 : 0);
}
}  // namespace stop_test

// In processes of their own (gtest's threadsafe death tests start the test
// binary anew): the stop thread and the blocked signals stay there.
TEST(NnTraining, StopSignalsRecordTheFirstAndYieldToTheSecond) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(stop_test::first_recorded_second_ends(SIGINT, SIGTERM), ::testing::KilledBySignal(SIGINT), "");
  EXPECT_EXIT(stop_test::first_recorded_second_ends(SIGTERM, SIGINT), ::testing::KilledBySignal(SIGTERM), "");
  EXPECT_EXIT(stop_test::fork_child_starts_clean(), ::testing::ExitedWithCode(0), "");
}

TEST(NnTraining, StopSignalsNeverReachAThreadThatComputes) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(stop_test::steps_under_stop_signals(), ::testing::ExitedWithCode(0), "");
}

TEST(NnTraining, NonFiniteLossStopsWithEpochAndStep) {
  auto train = blobs(64, 4);
  train.features[40 * 32 + 5] = NAN;
  Model model(ModelSpec::parse("input 2 4 4; flatten; linear 8; sigmoid; linear 4"));
  model.initialize({}, 1);
  auto sgd = normkit::nn::make_sgd({0.01f}, model.parameters());
  const auto order = normkit::train::epoch_order(64, 9, 2);
  const auto at = std::find(order.begin(), order.end(), 40) - order.begin();
  const std::string step = "step " + std::to_string(at / 16 + 1) + " of 4";
  EXPECT_TRUE(throws_error([&] { normkit::train::train_epoch(model, *sgd, train, 16, 9, 2); },
                           ErrorKind::runtime, {"epoch 3", step}));
}

TEST(NnTraining, EpochOrderIsADeterministicPermutation) {
  for (const int64_t count : {0, 1, 2, 17, 1000}) {
    const auto a = normkit::train::epoch_order(count, 123, 4);
    ASSERT_EQ(static_cast<int64_t>(a.size()), count);
    std::vector<int64_t> sorted = a;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t i = 0; i < count; ++i) ASSERT_EQ(sorted[i], i);
    EXPECT_EQ(normkit::train::epoch_order(count, 123, 4), a);
  }
  const auto base = normkit::train::epoch_order(1000, 123, 4);
  EXPECT_NE(normkit::train::epoch_order(1000, 123, 5), base);
  EXPECT_NE(normkit::train::epoch_order(1000, 124, 4), base);
  EXPECT_NE(normkit::train::epoch_order(1000, 123ull | (1ull << 40), 4), base);  // high seed bits count
  // A fixed value, so a change of the shuffle (which would break resumed runs
  // against older checkpoints) is noticed.
  const auto small = normkit::train::epoch_order(8, 1, 0);
  std::set<int64_t> distinct(small.begin(), small.end());
  EXPECT_EQ(distinct.size(), 8u);
}

TEST(NnTraining, MakeBatchTransposesMultiChannelImagesForChannelsLast) {
  normkit::data::Dataset set;
  set.sample_shape = {2, 1, 3};
  set.num_classes = 2;
  set.features = {0, 1, 2, 10, 11, 12, /* sample 1 */ 20, 21, 22, 30, 31, 32};
  set.labels = {1, 0};
  Tensor batch;
  std::vector<int32_t> labels;
  normkit::train::make_batch(set, {1, 0}, 0, 2, MemoryFormat::channels_last, batch, labels);
  EXPECT_EQ(batch.format, MemoryFormat::channels_last);
  EXPECT_EQ(batch.data, (std::vector<float>{20, 30, 21, 31, 22, 32, 0, 10, 1, 11, 2, 12}));
  EXPECT_EQ(labels, (std::vector<int32_t>{0, 1}));
  normkit::train::make_batch(set, {1, 0}, 1, 1, MemoryFormat::channels_first, batch, labels);
  EXPECT_EQ(batch.data, (std::vector<float>{0, 1, 2, 10, 11, 12}));
}

}  // namespace
