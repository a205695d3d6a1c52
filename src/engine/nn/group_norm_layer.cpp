// GroupNorm and InstanceNorm layers on the core kernels (group_norm.hpp).
// Parameters "weight" and "bias" (when affine); InstanceNorm with
// track_running_stats has the buffers running_mean, running_var and
// num_batches_tracked (PyTorch's names; PyTorch never advances the counter of
// an InstanceNorm, and neither does this layer).
#include "nn/group_norm_layer.hpp"

#include <algorithm>
#include <sstream>
#include <string>

#include "nn/layers.hpp"
#include "normkit/group_norm.hpp"
#include "support.hpp"

namespace normkit::nn::detail {

using engine::fail_invalid;

namespace {

// γ, β and their gradients; absent when not affine (empty spans: γ = 1, β = 0).
class Affine {
 public:
  Affine(int64_t channels, bool affine) : affine_(affine) {
    if (!affine) return;
    gamma_ = {"weight", std::vector<float>(channels, 1.0f), std::vector<float>(channels)};
    beta_ = {"bias", std::vector<float>(channels, 0.0f), std::vector<float>(channels)};
    dgamma_.resize(channels);
    dbeta_.resize(channels);
  }
  std::span<const float> gamma() const { return gamma_.value; }
  std::span<const float> beta() const { return beta_.value; }
  std::span<float> dgamma() { return dgamma_; }
  std::span<float> dbeta() { return dbeta_; }
  // The kernels write dγ, dβ; parameters accumulate gradients.
  void accumulate() {
    for (size_t c = 0; c < dgamma_.size(); ++c) {
      gamma_.grad[c] += dgamma_[c];
      beta_.grad[c] += dbeta_[c];
    }
  }
  std::vector<Parameter*> parameters() {
    if (!affine_) return {};
    return {&gamma_, &beta_};
  }
  void reset() {
    std::fill(gamma_.value.begin(), gamma_.value.end(), 1.0f);
    std::fill(beta_.value.begin(), beta_.value.end(), 0.0f);
  }
  bool on() const { return affine_; }

 private:
  bool affine_;
  Parameter gamma_, beta_;
  std::vector<float> dgamma_, dbeta_;
};

TensorView<float> gradient_view(Tensor& dx, const Tensor& dy, bool need_input_grad) {
  if (!need_input_grad) {
    dx.reshape({}, dy.format);
    return {};
  }
  dx.reshape(dy.shape, dy.format);
  return dx.view();
}

class GroupNorm final : public Layer {
 public:
  GroupNorm(int64_t channels, int64_t groups, double eps, bool affine)
      : c_(channels), groups_(groups), eps_(eps), affine_(channels, affine) {}
  std::string type() const override { return "groupnorm"; }
  std::string describe() const override {
    std::ostringstream s;
    s << "groupnorm(" << c_ << ", groups " << groups_ << ", eps " << eps_
      << (affine_.on() ? ", affine" : "") << ")";
    return s.str();
  }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    if (input.empty() || input[0] != c_)
      fail_invalid(describe(), ": expected ", c_, " channels, got input ", shape_text(input));
    return input;
  }
  // The same in training and evaluation: the statistics are each sample's own.
  const Tensor& forward(const Tensor& x, Mode) override {
    input_ = &x;
    y_.reshape(x.shape, x.format);
    const auto stats = static_cast<size_t>(x.shape.at(0) * groups_);
    mean_.resize(stats);
    invstd_.resize(stats);
    group_norm_forward<float>(x.view(), y_.view(), groups_, affine_.gamma(), affine_.beta(),
                              {mean_, invstd_}, eps_);
    return y_;
  }
  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    const TensorView<float> dx = gradient_view(dx_, dy, need_input_grad);
    group_norm_backward<float>(input_->view(), dy.view(), dx, groups_, affine_.gamma(), mean_,
                               invstd_, affine_.dgamma(), affine_.dbeta());
    affine_.accumulate();
    return dx_;
  }
  std::vector<Parameter*> parameters() override { return affine_.parameters(); }
  void initialize(const InitOptions&, std::mt19937_64&) override { affine_.reset(); }

 private:
  int64_t c_, groups_;
  double eps_;
  Affine affine_;
  std::vector<float> mean_, invstd_;
  const Tensor* input_ = nullptr;
  Tensor y_, dx_;
};

class InstanceNorm final : public Layer {
 public:
  InstanceNorm(int64_t channels, double eps, double momentum, bool affine, bool track)
      : c_(channels), affine_(channels, affine), track_(track) {
    options_.eps = eps;
    options_.momentum = momentum;
    if (track) {
      running_mean_.assign(c_, 0.0f);
      running_var_.assign(c_, 1.0f);
      batches_.assign(1, 0.0f);
    }
  }
  std::string type() const override { return "instancenorm"; }
  std::string describe() const override {
    std::ostringstream s;
    s << "instancenorm(" << c_ << ", eps " << options_.eps;
    if (track_) s << ", momentum " << *options_.momentum << ", running statistics";
    s << (affine_.on() ? ", affine" : "") << ")";
    return s.str();
  }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    if (input.size() != 3 || input[0] != c_)
      fail_invalid(describe(), ": expected a [", c_, ", H, W] input, got ", shape_text(input));
    return input;
  }
  // Training, and evaluation without running statistics: each instance's own
  // statistics. Evaluation with running statistics: those, per channel.
  const Tensor& forward(const Tensor& x, Mode mode) override {
    input_ = &x;
    y_.reshape(x.shape, x.format);
    used_running_ = mode == Mode::eval && track_;
    if (used_running_) {
      invstd_.resize(c_);
      batch_norm_invstd<float>(running_var_, options_.eps, invstd_);
      instance_norm_forward_inference<float>(x.view(), y_.view(), affine_.gamma(),
                                             affine_.beta(), running_mean_, running_var_,
                                             options_.eps);
      return y_;
    }
    const auto stats = static_cast<size_t>(x.shape.at(0) * c_);
    mean_.resize(stats);
    invstd_.resize(stats);
    RunningStats<float> running;
    if (track_ && mode == Mode::train) running = {running_mean_, running_var_, nullptr};
    instance_norm_forward_training<float>(x.view(), y_.view(), affine_.gamma(), affine_.beta(),
                                          {mean_, invstd_}, running, options_);
    return y_;
  }
  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    const TensorView<float> dx = gradient_view(dx_, dy, need_input_grad);
    if (used_running_)
      batch_norm_backward<float>(input_->view(), dy.view(), dx, affine_.gamma(), running_mean_,
                                 invstd_, affine_.dgamma(), affine_.dbeta(),
                                 BackwardMode::frozen);
    else
      instance_norm_backward<float>(input_->view(), dy.view(), dx, affine_.gamma(), mean_,
                                    invstd_, affine_.dgamma(), affine_.dbeta());
    affine_.accumulate();
    return dx_;
  }
  std::vector<Parameter*> parameters() override { return affine_.parameters(); }
  std::vector<Buffer> buffers() override {
    if (!track_) return {};
    return {{"running_mean", &running_mean_}, {"running_var", &running_var_},
            {"num_batches_tracked", &batches_}};
  }
  void initialize(const InitOptions&, std::mt19937_64&) override {
    affine_.reset();
    std::fill(running_mean_.begin(), running_mean_.end(), 0.0f);
    std::fill(running_var_.begin(), running_var_.end(), 1.0f);
    std::fill(batches_.begin(), batches_.end(), 0.0f);
  }

 private:
  int64_t c_;
  BatchNormOptions options_;
  Affine affine_;
  bool track_;
  bool used_running_ = false;
  std::vector<float> running_mean_, running_var_, batches_;
  std::vector<float> mean_, invstd_;
  const Tensor* input_ = nullptr;
  Tensor y_, dx_;
};

}  // namespace

std::unique_ptr<Layer> make_group_norm_layer(const ModelSpec::LayerSpec& spec,
                                             const std::vector<int64_t>& input) {
  if (input.size() != 1 && input.size() != 3)
    fail_invalid("groupnorm: needs a [C] or [C, H, W] input, got ", shape_text(input));
  const int64_t channels = input[0];
  const bool given = spec.options.count("groups") > 0;
  const int64_t groups = int_option_or(spec, "groups", std::min<int64_t>(32, channels));
  if (groups < 1) fail_invalid("groupnorm: groups must be >= 1, got ", groups);
  if (channels % groups != 0) {
    if (given)
      fail_invalid("groupnorm: ", channels, " channels are not divisible by groups=", groups);
    fail_invalid("groupnorm: ", channels, " channels are not divisible by the default ", groups,
                 " groups; give groups=G with G dividing ", channels);
  }
  const double eps = option_or(spec, "eps", 1e-5);
  if (!(eps > 0)) fail_invalid("groupnorm: eps must be positive, got ", eps);
  return std::make_unique<GroupNorm>(channels, groups, eps, option_or(spec, "affine", 1) != 0);
}

std::unique_ptr<Layer> make_instance_norm_layer(const ModelSpec::LayerSpec& spec,
                                                const std::vector<int64_t>& input) {
  if (input.size() != 3)
    fail_invalid("instancenorm: needs a [C, H, W] input (statistics per instance need a spatial "
                 "extent), got ", shape_text(input));
  if (input[1] * input[2] < 2)
    fail_invalid("instancenorm: needs more than 1 spatial position, got ", shape_text(input));
  const double eps = option_or(spec, "eps", 1e-5), momentum = option_or(spec, "momentum", 0.1);
  if (!(eps > 0)) fail_invalid("instancenorm: eps must be positive, got ", eps);
  if (!(momentum >= 0 && momentum <= 1))
    fail_invalid("instancenorm: momentum must be in [0, 1], got ", momentum);
  return std::make_unique<InstanceNorm>(input[0], eps, momentum,
                                        option_or(spec, "affine", 1) != 0,
                                        option_or(spec, "track_running_stats", 0) != 0);
}

}  // namespace normkit::nn::detail
