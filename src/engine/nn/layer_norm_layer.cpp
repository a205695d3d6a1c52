// The engine's layer normalization: each sample normalized over all of its
// features (C for [N, C]; C, H, W for [N, C, H, W]), with one weight and one
// bias per feature, as torch.nn.LayerNorm(normalized_shape=[C, H, W]). A
// sample's features are contiguous in either memory format, so a batch is
// N rows of C·H·W values for the row kernels; only their order within the row
// differs. The parameters keep the logical [C, H, W] order (the order of the
// state and of checkpoints, whatever the format), and channels-last rows
// (H, W, C order) get a permuted copy of them.
//
// "rmsnorm" is the same layer with RMS normalization (Zhang & Sennrich 2019):
// y = x / sqrt(mean(x²) + eps) · γ over a sample's features, no centering and
// no β (as torch.nn.RMSNorm([C, H, W])).
#include <memory>
#include <sstream>

#include "nn/layers.hpp"
#include "normkit/layer_norm.hpp"
#include "support.hpp"

namespace normkit::nn::detail {

using engine::fail_invalid;

namespace {

class LayerNormLayer final : public Layer {
 public:
  LayerNormLayer(std::vector<int64_t> sample_shape, double eps, MemoryFormat format, bool rms)
      : sample_(std::move(sample_shape)), eps_(eps), rms_(rms) {
    features_ = 1;
    for (const int64_t d : sample_) features_ *= d;
    gamma_ = {"weight", std::vector<float>(features_, 1.0f), std::vector<float>(features_)};
    beta_ = {"bias", std::vector<float>(features_, 0.0f), std::vector<float>(features_)};
    // Memory position of each logical feature (c, h, w) in a channels-last row.
    if (sample_.size() == 3 && format == MemoryFormat::channels_last) {
      const int64_t C = sample_[0], H = sample_[1], W = sample_[2];
      to_memory_.resize(features_);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) to_memory_[(c * H + h) * W + w] = (h * W + w) * C + c;
    }
  }
  std::string type() const override { return rms_ ? "rmsnorm" : "layernorm"; }
  std::string describe() const override {
    std::ostringstream s;
    s << type() << "(" << shape_text(sample_) << ", eps " << eps_ << ")";
    return s.str();
  }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    if (input != sample_)
      fail_invalid(describe(), ": expected input ", shape_text(sample_), ", got ", shape_text(input));
    return input;
  }
  // Train and eval are the same: the statistics are each sample's own.
  const Tensor& forward(const Tensor& x, Mode) override {
    check_batch(x);
    input_ = &x;
    const int64_t rows = x.shape[0];
    y_.reshape(x.shape, x.format);
    mean_.resize(rows);
    invstd_.resize(rows);
    const bool permuted = permuted_for(x);
    if (permuted) {
      permute(gamma_.value, gamma_memory_);
      permute(beta_.value, beta_memory_);
    }
    const auto xv = ConstRowsView<float>::contiguous(x.data.data(), rows, features_);
    const auto yv = RowsView<float>::contiguous(y_.data.data(), rows, features_);
    if (rms_)  // invstd_ holds 1 / rms
      rms_norm_forward<float>(xv, yv, permuted ? gamma_memory_ : gamma_.value, eps_, invstd_);
    else
      layer_norm_forward<float>(xv, yv, permuted ? gamma_memory_ : gamma_.value,
                                permuted ? beta_memory_ : beta_.value, {mean_, invstd_}, eps_);
    return y_;
  }
  const Tensor& backward(const Tensor& dy, bool need_input_grad) override {
    const int64_t rows = dy.shape.at(0);
    RowsView<float> dx{};
    if (need_input_grad) {
      dx_.reshape(dy.shape, dy.format);
      dx = RowsView<float>::contiguous(dx_.data.data(), rows, features_);
    } else {
      dx_.reshape({}, dy.format);
    }
    const bool permuted = permuted_for(dy);
    dgamma_.resize(features_);
    dbeta_.resize(features_);
    const auto xv = ConstRowsView<float>::contiguous(input_->data.data(), rows, features_);
    const auto dyv = ConstRowsView<float>::contiguous(dy.data.data(), rows, features_);
    if (rms_)
      rms_norm_backward<float>(xv, dyv, dx, permuted ? gamma_memory_ : gamma_.value, invstd_, dgamma_);
    else
      layer_norm_backward<float>(xv, dyv, dx, permuted ? gamma_memory_ : gamma_.value, mean_, invstd_,
                                 dgamma_, dbeta_);
    // Parameters accumulate gradients, in logical order.
    for (int64_t i = 0; i < features_; ++i) {
      const int64_t m = permuted ? to_memory_[i] : i;
      gamma_.grad[i] += dgamma_[m];
      if (!rms_) beta_.grad[i] += dbeta_[m];
    }
    return dx_;
  }
  std::vector<Parameter*> parameters() override {
    if (rms_) return {&gamma_};
    return {&gamma_, &beta_};
  }
  void initialize(const InitOptions&, std::mt19937_64&) override {
    std::fill(gamma_.value.begin(), gamma_.value.end(), 1.0f);
    std::fill(beta_.value.begin(), beta_.value.end(), 0.0f);
  }

 private:
  void check_batch(const Tensor& x) const {
    if (x.shape.size() != sample_.size() + 1 ||
        !std::equal(sample_.begin(), sample_.end(), x.shape.begin() + 1) || x.shape[0] < 1)
      fail_invalid(describe(), ": expected a batch of ", shape_text(sample_), ", got ",
                   shape_text(x.shape));
  }
  bool permuted_for(const Tensor& t) const {
    return !to_memory_.empty() && t.format == MemoryFormat::channels_last;
  }
  void permute(const std::vector<float>& logical, std::vector<float>& memory) const {
    memory.resize(features_);
    for (int64_t i = 0; i < features_; ++i) memory[to_memory_[i]] = logical[i];
  }

  std::vector<int64_t> sample_;
  int64_t features_ = 0;
  double eps_;
  bool rms_;
  Parameter gamma_, beta_;  // rms: no β
  std::vector<int64_t> to_memory_;  // empty: rows are in logical order
  std::vector<float> gamma_memory_, beta_memory_, mean_, invstd_, dgamma_, dbeta_;
  const Tensor* input_ = nullptr;
  Tensor y_, dx_;
};

}  // namespace

std::unique_ptr<Layer> make_layer_norm(const std::vector<int64_t>& input, double eps,
                                       MemoryFormat format, bool rms) {
  const char* type = rms ? "rmsnorm" : "layernorm";
  if (input.size() != 1 && input.size() != 3)
    fail_invalid(type, ": needs a [C] or [C, H, W] input, got ", shape_text(input));
  if (!(eps > 0)) fail_invalid(type, ": eps must be positive, got ", eps);
  return std::make_unique<LayerNormLayer>(input, eps, format, rms);
}

}  // namespace normkit::nn::detail
