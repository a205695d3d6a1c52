// SGD and Adam with PyTorch's update rules, so the same hyper-parameters mean
// the same thing in both. Weight decay is L2 added to the gradient, as torch.optim.
#include <algorithm>
#include <cmath>

#include "normkit/engine/nn.hpp"
#include "support.hpp"

namespace normkit::nn {

namespace {

std::vector<std::vector<float>> zeros_like(const std::vector<Parameter*>& parameters) {
  std::vector<std::vector<float>> out;
  for (const auto* p : parameters) out.emplace_back(p->value.size(), 0.0f);
  return out;
}

void check_same(const std::vector<Parameter*>& parameters, const std::vector<std::vector<float>>& state) {
  if (parameters.size() != state.size())
    engine::fail_invalid("optimizer: built for ", state.size(), " parameters, stepped with ",
                                  parameters.size());
  for (size_t i = 0; i < state.size(); ++i)
    if (parameters[i]->value.size() != state[i].size() || parameters[i]->grad.size() != state[i].size())
      engine::fail_invalid("optimizer: parameter ", i, " (", parameters[i]->name, ") has ",
                                    parameters[i]->value.size(), " values and ",
                                    parameters[i]->grad.size(), " gradients, the optimizer ",
                                    state[i].size());
}

// The update loops: plain functions over unaliased pointers, compiled for
// AVX-512/AVX2/baseline (support.hpp), so they vectorize at the machine's
// width. This file is built without FMA contraction: every clone rounds each
// product and sum as the baseline (no FMA) one does, so a run's bits do not
// depend on which clone the machine runs.

// One case of the SGD update per instantiation: without branches in the loop
// the compiler vectorizes it (the same operations, so the same results).
// kZero: the gradient is set to zero once read (Optimizer::step_and_zero_grad).
template <bool kMomentum, bool kFirstStep, bool kNesterov, bool kZero>
[[gnu::always_inline]] inline void sgd_loop(float* __restrict w, float* __restrict grad,
                                            float* __restrict buf, size_t n, float lr, float mu,
                                            float wd) {
  for (size_t j = 0; j < n; ++j) {
    float g = grad[j] + wd * w[j];
    if constexpr (kZero) grad[j] = 0.0f;
    if constexpr (kMomentum) {
      const float b = kFirstStep ? g : mu * buf[j] + g;
      buf[j] = b;
      g = kNesterov ? g + mu * b : b;
    }
    w[j] -= lr * g;
  }
}
enum class SgdCase { plain, first_step, first_step_nesterov, momentum, nesterov };
template <bool kZero>
[[gnu::always_inline]] inline void sgd_case(SgdCase which, float* __restrict w,
                                            float* __restrict grad, float* __restrict buf,
                                            size_t n, float lr, float mu, float wd) {
  switch (which) {
    case SgdCase::plain: return sgd_loop<false, false, false, kZero>(w, grad, buf, n, lr, mu, wd);
    case SgdCase::first_step:
      return sgd_loop<true, true, false, kZero>(w, grad, buf, n, lr, mu, wd);
    case SgdCase::first_step_nesterov:
      return sgd_loop<true, true, true, kZero>(w, grad, buf, n, lr, mu, wd);
    case SgdCase::momentum: return sgd_loop<true, false, false, kZero>(w, grad, buf, n, lr, mu, wd);
    case SgdCase::nesterov: return sgd_loop<true, false, true, kZero>(w, grad, buf, n, lr, mu, wd);
  }
}
NORMKIT_ENGINE_SIMD_CLONES
void sgd_update(SgdCase which, bool zero_grad, float* __restrict w, float* __restrict grad,
                float* __restrict buf, size_t n, float lr, float mu, float wd) {
  if (zero_grad) return sgd_case<true>(which, w, grad, buf, n, lr, mu, wd);
  sgd_case<false>(which, w, grad, buf, n, lr, mu, wd);
}

template <bool kZero>
[[gnu::always_inline]] inline void adam_loop(float* __restrict w, float* __restrict grad,
                                             float* __restrict m, float* __restrict v, size_t n,
                                             float b1, float b2, float wd, float step_size,
                                             float correction2_sqrt, float eps) {
  for (size_t j = 0; j < n; ++j) {
    const float g = grad[j] + wd * w[j];
    if constexpr (kZero) grad[j] = 0.0f;
    m[j] = b1 * m[j] + (1 - b1) * g;
    v[j] = b2 * v[j] + (1 - b2) * g * g;
    w[j] -= step_size * m[j] / (std::sqrt(v[j]) / correction2_sqrt + eps);
  }
}
NORMKIT_ENGINE_SIMD_CLONES
void adam_update(bool zero_grad, float* __restrict w, float* __restrict grad, float* __restrict m,
                 float* __restrict v, size_t n, float b1, float b2, float wd, float step_size,
                 float correction2_sqrt, float eps) {
  if (zero_grad)
    return adam_loop<true>(w, grad, m, v, n, b1, b2, wd, step_size, correction2_sqrt, eps);
  adam_loop<false>(w, grad, m, v, n, b1, b2, wd, step_size, correction2_sqrt, eps);
}

// update(begin, count) over [0, n) in blocks, spread over the threads when n is
// large: the updates are elementwise, so the blocks change no bits. Only
// large parameters: waking the other core costs more than a small one's
// update (mlp-paper's 78,400 weights take about 20 us on one thread; cnn-small's
// 401,408 about 0.4 ms).
template <class Update>
void update_in_blocks(size_t n, Update&& update) {
  constexpr size_t kBlock = size_t{1} << 16, kSpreadFrom = size_t{1} << 18;
  if (n < kSpreadFrom) return update(size_t{0}, n);
  const auto blocks = static_cast<int64_t>((n + kBlock - 1) / kBlock);
  engine::parallel_for(num_threads(), blocks, [&](int64_t b) {
    const size_t begin = static_cast<size_t>(b) * kBlock;
    update(begin, std::min(kBlock, n - begin));
  });
}

// g = grad + wd·w
//   momentum: buf = μ·buf + g (buf = g at the first step); g = g + μ·buf (Nesterov) or buf
//   w -= lr·g
class Sgd final : public Optimizer {
 public:
  Sgd(const SgdOptions& o, const std::vector<Parameter*>& parameters)
      : options_(o), velocity_(zeros_like(parameters)) {
    learning_rate = o.lr;
    if (!(o.lr > 0) || !(o.momentum >= 0) || !(o.weight_decay >= 0))
      engine::fail_invalid("sgd: lr must be > 0, momentum and weight decay >= 0");
    if (o.nesterov && o.momentum == 0)
      engine::fail_invalid("sgd: Nesterov momentum requires momentum > 0");
  }
  void update(const std::vector<Parameter*>& parameters, bool zero_grad) override {
    check_same(parameters, velocity_);
    const float mu = options_.momentum, wd = options_.weight_decay, lr = learning_rate;
    const SgdCase which = mu == 0         ? SgdCase::plain
                          : steps_ == 0   ? (options_.nesterov ? SgdCase::first_step_nesterov
                                                               : SgdCase::first_step)
                          : options_.nesterov ? SgdCase::nesterov
                                              : SgdCase::momentum;
    for (size_t i = 0; i < parameters.size(); ++i) {
      float *w = parameters[i]->value.data(), *grad = parameters[i]->grad.data();
      float* buf = velocity_[i].data();
      update_in_blocks(velocity_[i].size(), [&](size_t at, size_t count) {
        sgd_update(which, zero_grad, w + at, grad + at, buf + at, count, lr, mu, wd);
      });
    }
    ++steps_;
  }
  std::string name() const override { return "sgd"; }
  std::map<std::string, double> options() const override {
    return {{"lr", learning_rate},
            {"momentum", options_.momentum},
            {"weight_decay", options_.weight_decay},
            {"nesterov", options_.nesterov ? 1.0 : 0.0}};
  }
  std::vector<std::vector<float>*> state() override {
    std::vector<std::vector<float>*> out;
    for (auto& v : velocity_) out.push_back(&v);
    return out;
  }
  int64_t& steps() override { return steps_; }

 private:
  SgdOptions options_;
  std::vector<std::vector<float>> velocity_;
  int64_t steps_ = 0;
};

// m = β1·m + (1 - β1)·g;  v = β2·v + (1 - β2)·g²
// w -= lr · (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + eps)
class Adam final : public Optimizer {
 public:
  Adam(const AdamOptions& o, const std::vector<Parameter*>& parameters)
      : options_(o), m_(zeros_like(parameters)), v_(zeros_like(parameters)) {
    learning_rate = o.lr;
    if (!(o.lr > 0) || !(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1) ||
        !(o.eps > 0) || !(o.weight_decay >= 0))
      engine::fail_invalid("adam: need lr > 0, betas in [0, 1), eps > 0, weight decay >= 0");
  }
  void update(const std::vector<Parameter*>& parameters, bool zero_grad) override {
    check_same(parameters, m_);
    ++steps_;
    const double t = static_cast<double>(steps_);
    const float correction1 = static_cast<float>(1.0 - std::pow(options_.beta1, t));
    const float correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(options_.beta2, t)));
    const float b1 = options_.beta1, b2 = options_.beta2, wd = options_.weight_decay;
    const float step_size = learning_rate / correction1;
    for (size_t i = 0; i < parameters.size(); ++i) {
      float *w = parameters[i]->value.data(), *grad = parameters[i]->grad.data();
      float *m = m_[i].data(), *v = v_[i].data();
      update_in_blocks(m_[i].size(), [&](size_t at, size_t count) {
        adam_update(zero_grad, w + at, grad + at, m + at, v + at, count, b1, b2, wd, step_size,
                    correction2_sqrt, options_.eps);
      });
    }
  }
  std::string name() const override { return "adam"; }
  std::map<std::string, double> options() const override {
    return {{"lr", learning_rate},  {"beta1", options_.beta1},
            {"beta2", options_.beta2}, {"eps", options_.eps},
            {"weight_decay", options_.weight_decay}};
  }
  std::vector<std::vector<float>*> state() override {
    std::vector<std::vector<float>*> out;
    for (auto& v : m_) out.push_back(&v);
    for (auto& v : v_) out.push_back(&v);
    return out;
  }
  int64_t& steps() override { return steps_; }

 private:
  AdamOptions options_;
  std::vector<std::vector<float>> m_, v_;
  int64_t steps_ = 0;
};

}  // namespace

std::unique_ptr<Optimizer> make_sgd(const SgdOptions& options, const std::vector<Parameter*>& parameters) {
  return std::make_unique<Sgd>(options, parameters);
}
std::unique_ptr<Optimizer> make_adam(const AdamOptions& options, const std::vector<Parameter*>& parameters) {
  return std::make_unique<Adam>(options, parameters);
}

}  // namespace normkit::nn
