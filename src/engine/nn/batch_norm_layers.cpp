// The engine's batch-norm layers: "batchnorm" (batch_norm.hpp), Batch
// Renormalization ("batchrenorm") and Ghost BN ("ghostbatchnorm", both
// bn_variants.hpp). All hold BN's state (weight, bias; running_mean,
// running_var, num_batches_tracked), infer as BN does, can be frozen
// (frozen=1), and differ only in their training forward and backward.
// "batchnorm" can also synchronize its statistics across data-parallel ranks
// (Model::synchronize_batch_norm).
//
// noise=S (any of them): "noisy BN" after Santurkar et al. 2018, §3.1: in
// training, each output y becomes a·y + b with a ~ N(μa, σa²), b ~ N(μb, σb²)
// drawn per element, and (μa, σa, μb, σb) drawn per channel at every step from
// U(1 − S/2, 1 + S/2), U(0, S/2), U(−S, S), U(0, S/2): a distribution that
// moves all the time. Evaluation is noise-free. The draws are hashes of (seed,
// step, layer, index), as dropout's, so a resumed run draws the same noise.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "nn/layers.hpp"
#include "nn/onednn.hpp"
#include "normkit/batch_norm_fused.hpp"
#include "normkit/bn_variants.hpp"
#include "normkit/engine/distributed.hpp"
#include "support.hpp"

namespace normkit::nn::detail {

using engine::fail_invalid;
using engine::splitmix64;
using engine::unit_uniform;

namespace {

// What BN and its variants share: parameters, buffers, inference, and the frozen
// mode (running statistics used in training too and never updated; γ and β learn).
class BatchNormFamily : public Layer {
 public:
  BatchNormFamily(int64_t channels, double eps, double momentum, bool frozen)
      : c_(channels), frozen_(frozen) {
    options_.eps = eps;
    options_.momentum = momentum;
    gamma_ = {"weight", std::vector<float>(c_, 1.0f), std::vector<float>(c_)};
    beta_ = {"bias", std::vector<float>(c_, 0.0f), std::vector<float>(c_)};
    running_mean_.assign(c_, 0.0f);
    running_var_.assign(c_, 1.0f);
    batches_.assign(1, 0.0f);
  }
  std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const override {
    if (input.empty() || input[0] != c_)
      fail_invalid(describe(), ": expected ", c_, " channels, got input ", shape_text(input));
    return input;
  }
  const Tensor& forward(const Tensor& x, Mode mode) override {
    input_ = &x;
    y_.reshape(x.shape, x.format);
    if (mode == Mode::train && !frozen_) {
      train_forward(x);
    } else {
      batch_norm_forward_inference<float>(x.view(), y_.view(), gamma_.value, beta_.value,
                                          running_mean_, running_var_, options_.eps);
      if (mode == Mode::train) keep_frozen_statistics();
    }
    trained_ = mode == Mode::train;
    if (trained_ && noise_ > 0) add_noise();
    return y_;
  }
  const Tensor& backward(const Tensor& given_dy, bool need_input_grad) override {
    if (!input_)
      fail_invalid(describe(), ": backward needs a forward of its own first (its last one took "
                   "x piece by piece: backward_relu)");
    const TensorView<float> dx = start_backward(given_dy, need_input_grad);
    const Tensor& dy = noise_ > 0 ? noise_scaled(given_dy) : given_dy;
    if (frozen_)
      batch_norm_backward<float>(input_->view(), dy.view(), dx, gamma_.value, frozen_mean_,
                                 frozen_invstd_, dgamma_, dbeta_, BackwardMode::frozen);
    else
      train_backward(dy, dx);
    accumulate_gradients();
    return dx_;
  }
  std::vector<Parameter*> parameters() override { return {&gamma_, &beta_}; }
  std::vector<Buffer> buffers() override {
    return {{"running_mean", &running_mean_}, {"running_var", &running_var_},
            {"num_batches_tracked", &batches_}};
  }
  void initialize(const InitOptions&, std::mt19937_64&) override {
    std::fill(gamma_.value.begin(), gamma_.value.end(), 1.0f);
    std::fill(beta_.value.begin(), beta_.value.end(), 0.0f);
    std::fill(running_mean_.begin(), running_mean_.end(), 0.0f);
    std::fill(running_var_.begin(), running_var_.end(), 1.0f);
    batches_[0] = 0.0f;
  }
  bool set_frozen(bool frozen) override {
    frozen_ = frozen;
    return true;
  }
  void set_step(uint64_t seed, uint64_t step) override { key_ = splitmix64(seed ^ splitmix64(step + salt_)); }
  bool noisy() const { return noise_ > 0; }
  void set_noise(double strength, uint64_t salt) {
    noise_ = strength;
    salt_ = salt;
  }

 protected:
  virtual void train_forward(const Tensor& x) = 0;
  virtual void train_backward(const Tensor& dy, TensorView<float> dx) = 0;
  std::string common_options() const {
    std::ostringstream s;
    s << "eps " << options_.eps << ", momentum " << *options_.momentum << (frozen_ ? ", frozen" : "");
    if (noise_ > 0) s << ", noise " << noise_;
    return s.str();
  }
  // Sizes dx_ (empty unless need_input_grad: then the returned view has no data,
  // so the kernels compute only dγ, dβ) and the parameter gradients.
  TensorView<float> start_backward(const Tensor& dy, bool need_input_grad) {
    if (!trained_) fail_invalid(describe(), ": backward needs a forward in train mode first");
    dgamma_.resize(c_);
    dbeta_.resize(c_);
    if (!need_input_grad) {
      dx_.reshape({}, dy.format);
      return {};
    }
    dx_.reshape(dy.shape, dy.format);
    return dx_.view();
  }
  // Frozen in training: backward needs the statistics forward normalized with.
  void keep_frozen_statistics() {
    frozen_mean_ = running_mean_;
    frozen_invstd_.resize(c_);
    batch_norm_invstd<float>(running_var_, options_.eps, frozen_invstd_);
  }
  void accumulate_gradients() {
    for (int64_t c = 0; c < c_; ++c) {
      gamma_.grad[c] += dgamma_[c];
      beta_.grad[c] += dbeta_[c];
    }
  }
  // num_batches_tracked as the int64 the kernels count with (floats hold steps exactly to 2^24).
  int64_t tracked() const { return static_cast<int64_t>(batches_[0]); }

  int64_t c_;
  bool frozen_;
  bool trained_ = false;
  BatchNormOptions options_;
  Parameter gamma_, beta_;
  std::vector<float> running_mean_, running_var_, batches_;
  std::vector<float> frozen_mean_, frozen_invstd_, dgamma_, dbeta_;
  const Tensor* input_ = nullptr;
  Tensor y_, dx_;

 private:
  // A standard normal from two hashes (Box-Muller).
  static double normal(uint64_t h) {
    const double u1 = 1.0 - unit_uniform(splitmix64(h)), u2 = unit_uniform(splitmix64(h ^ 0x5bd1e995ull));
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  void add_noise() {
    const double s = noise_;
    std::vector<double> mu_a(c_), sd_a(c_), mu_b(c_), sd_b(c_);
    for (int64_t c = 0; c < c_; ++c) {
      const uint64_t h = splitmix64(key_ ^ splitmix64(static_cast<uint64_t>(c) * 4 + 0x100000000ull));
      mu_a[c] = 1.0 + s * (unit_uniform(splitmix64(h + 1)) - 0.5);
      sd_a[c] = 0.5 * s * unit_uniform(splitmix64(h + 2));
      mu_b[c] = s * (2.0 * unit_uniform(splitmix64(h + 3)) - 1.0);
      sd_b[c] = 0.5 * s * unit_uniform(splitmix64(h + 4));
    }
    const int64_t total = y_.numel();
    const int64_t positions = total / (y_.shape[0] * c_);
    const bool last = y_.shape.size() == 2 || y_.format == MemoryFormat::channels_last;
    noise_scale_.resize(static_cast<size_t>(total));
    for (int64_t i = 0; i < total; ++i) {
      const int64_t c = last ? i % c_ : (i / positions) % c_;
      const uint64_t h = splitmix64(key_ + 2 * static_cast<uint64_t>(i));
      const double a = mu_a[c] + sd_a[c] * normal(h), b = mu_b[c] + sd_b[c] * normal(h + 1);
      noise_scale_[i] = static_cast<float>(a);
      y_.data[i] = static_cast<float>(a * y_.data[i] + b);
    }
  }
  // dL/dy of the noise-free output: a ⊙ dL/dy'.
  const Tensor& noise_scaled(const Tensor& dy) {
    noisy_dy_.reshape(dy.shape, dy.format);
    for (size_t i = 0; i < dy.data.size(); ++i) noisy_dy_.data[i] = dy.data[i] * noise_scale_[i];
    return noisy_dy_;
  }
  double noise_ = 0;
  uint64_t salt_ = 0, key_ = 0;
  std::vector<float> noise_scale_;
  Tensor noisy_dy_;
};

class BatchNormLayer final : public BatchNormFamily, public AddReluTail, public ReluTail {
 public:
  BatchNormLayer(int64_t channels, double eps, double momentum, bool frozen)
      : BatchNormFamily(channels, eps, momentum, frozen) {
    mean_.resize(c_);
    invstd_.resize(c_);
  }
  std::string type() const override { return "batchnorm"; }
  std::string describe() const override {
    return "batchnorm(" + std::to_string(c_) + ", " + common_options() + ")";
  }
  int set_batch_sync(dist::Communicator* group) override {
    group_ = group;
    return 1;
  }

  // The tail of a residual block: y = relu(BN(x) + z), BN as forward() does it
  // (unsynchronized: synchronized, the block adds and applies the ReLU itself).
  bool fuses_add_relu() const override { return !noisy() && !group_; }
  const Tensor& forward_add_relu(const Tensor& x, const Tensor& z, Mode mode) override {
    return forward_fused(x, &z, mode);
  }
  const Tensor& backward_add_relu(const Tensor& dy, bool need_input_grad, Tensor& dz) override {
    dz.reshape(dy.shape, dy.format);
    return backward_fused(dy, need_input_grad, &dz);
  }
  // Followed by a relu layer, in training (Model::forward): y = relu(BN(x)).
  bool fuses_relu() const override { return !noisy() && !group_; }
  const Tensor& forward_relu(const Tensor& x) override { return forward_fused(x, nullptr, Mode::train); }
  bool ran_with_relu() const override { return with_relu_; }
  // Followed by relu and a 2×2 max pooling, in training, not frozen;
  // synchronized too (the ranks' moments and sums are merged between the halves).
  bool fuses_relu_max_pool() const override { return !noisy() && !frozen_; }
  const Tensor& forward_relu_max_pool(const Tensor& x) override;
  bool ran_with_max_pool() const override { return with_max_pool_; }
  const Tensor& forward(const Tensor& x, Mode mode) override {
    with_relu_ = with_max_pool_ = false;
    source_ = nullptr;
    return BatchNormFamily::forward(x, mode);
  }
  const Tensor& forward_relu_max_pool_of(RecomputedOutput& source,
                                         const std::vector<int64_t>& shape,
                                         MemoryFormat format) override;
  const Tensor& backward_relu(const Tensor& dy, bool need_input_grad) override {
    if (with_max_pool_) return backward_relu_max_pool(dy, need_input_grad);
    return backward_fused(dy, need_input_grad, nullptr);
  }
  void begin_backward_relu(const Tensor& dy) override {
    if (!with_max_pool_)
      fail_invalid(describe(), ": dx in chunks needs a forward with the relu and max pooling");
    begin_backward_relu_max_pool(dy, true);
  }
  void input_grad_of(int64_t first, int64_t count, float* dx) const override {
    const int64_t sample_size = pool_.sample_size();
    if (!source_) {
      pool_.dx_of_samples(input_->data.data() + first * sample_size, *pooled_grad_,
                          dx_coefficients(), first, count, dx);
      return;
    }
    // Piece by piece, each x made just before its dx.
    float* x = piece_buffer();
    for (int64_t at = first; at < first + count; at += kRecomputedSamples) {
      const int64_t samples = std::min(kRecomputedSamples, first + count - at);
      source_->output_of(at, samples, x);
      pool_.dx_of_samples(x, *pooled_grad_, dx_coefficients(), at, samples,
                          dx + (at - first) * sample_size);
    }
  }

 private:
  // y = relu(BN(x) + z), or relu(BN(x)) without z, BN as forward() does it.
  const Tensor& forward_fused(const Tensor& x, const Tensor* z, Mode mode) {
    with_relu_ = z == nullptr;
    with_max_pool_ = false;
    source_ = nullptr;
    input_ = &x;
    y_.reshape(x.shape, x.format);
    mask_.resize(static_cast<size_t>(relu_mask_bytes(x.numel())));
    if (mode == Mode::train && !frozen_) {
      int64_t count = tracked();
      const SavedStats<float> saved = {mean_, invstd_};
      const RunningStats<float> running = {running_mean_, running_var_, &count};
      if (z)
        batch_norm_add_relu_forward_training<float>(x.view(), z->view(), y_.view(), mask_, gamma_.value,
                                                    beta_.value, saved, running, options_);
      else
        batch_norm_relu_forward_training<float>(x.view(), y_.view(), mask_, gamma_.value, beta_.value,
                                                saved, running, options_);
      batches_[0] = static_cast<float>(count);
    } else {
      if (z)
        batch_norm_add_relu_forward_inference<float>(x.view(), z->view(), y_.view(), mask_, gamma_.value,
                                                     beta_.value, running_mean_, running_var_, options_.eps);
      else
        batch_norm_relu_forward_inference<float>(x.view(), y_.view(), mask_, gamma_.value, beta_.value,
                                                 running_mean_, running_var_, options_.eps);
      if (mode == Mode::train) keep_frozen_statistics();
    }
    trained_ = mode == Mode::train;
    return y_;
  }
  // Backward of forward_fused; dz (sized by the caller) gets dL/dz when given.
  const Tensor& backward_fused(const Tensor& dy, bool need_input_grad, Tensor* dz) {
    const TensorView<float> dx = start_backward(dy, need_input_grad);
    const std::span<const float> mean = frozen_ ? frozen_mean_ : mean_;
    const std::span<const float> invstd = frozen_ ? frozen_invstd_ : invstd_;
    const BackwardMode backward_mode = frozen_ ? BackwardMode::frozen : BackwardMode::training;
    if (dz)
      batch_norm_add_relu_backward<float>(input_->view(), dy.view(), mask_, dx, dz->view(), gamma_.value,
                                          mean, invstd, dgamma_, dbeta_, backward_mode);
    else
      batch_norm_relu_backward<float>(input_->view(), dy.view(), mask_, dx, gamma_.value, mean, invstd,
                                      dgamma_, dbeta_, backward_mode);
    accumulate_gradients();
    return dx_;
  }
  void train_forward(const Tensor& x) override {
    int64_t count = tracked();
    if (group_) {
      // Synchronized: this shard's moments, merged with every rank's in rank order.
      moments_.resize(c_);
      batch_norm_moments<float>(x.view(), moments_);
      dist::merge_moments(*group_, moments_);
      batch_norm_forward_from_moments<float>(x.view(), y_.view(), gamma_.value, beta_.value,
                                             moments_, {mean_, invstd_},
                                             {running_mean_, running_var_, &count}, options_);
    } else {
      batch_norm_forward_training<float>(x.view(), y_.view(), gamma_.value, beta_.value,
                                         {mean_, invstd_}, {running_mean_, running_var_, &count},
                                         options_);
    }
    batches_[0] = static_cast<float>(count);
  }
  void train_backward(const Tensor& dy, TensorView<float> dx) override {
    if (!group_) {
      batch_norm_backward<float>(input_->view(), dy.view(), dx, gamma_.value, mean_, invstd_,
                                 dgamma_, dbeta_, BackwardMode::training);
      return;
    }
    // Synchronized: dx needs the global batch's Σdy and Σdy·x̂. dγ and dβ are
    // this shard's parts; the trainer's gradient sum adds the ranks' parts.
    sums_.resize(2 * c_);
    const std::span<double> sum_dy(sums_.data(), c_), sum_dy_xhat(sums_.data() + c_, c_);
    batch_norm_backward_reduce<float>(input_->view(), dy.view(), mean_, invstd_, sum_dy, sum_dy_xhat);
    for (int64_t c = 0; c < c_; ++c) {
      dgamma_[c] = static_cast<float>(sum_dy_xhat[c]);
      dbeta_[c] = static_cast<float>(sum_dy[c]);
    }
    if (!dx.data) return;
    dist::all_reduce_sum(*group_, sums_);
    batch_norm_backward_apply<float>(input_->view(), dy.view(), dx, gamma_.value, mean_, invstd_,
                                     sum_dy, sum_dy_xhat, moments_[0].count);
  }

  const Tensor& backward_relu_max_pool(const Tensor& dy, bool need_input_grad);
  void finish_relu_max_pool_statistics();
  // The calling thread's room for a piece of x (forward_relu_max_pool_of's source).
  float* piece_buffer() const {
    std::vector<float>& room = pieces_.at(static_cast<size_t>(omp_get_thread_num()));
    room.resize(static_cast<size_t>(kRecomputedSamples * pool_.sample_size()));
    return room.data();
  }
  void begin_backward_relu_max_pool(const Tensor& dy, bool need_input_grad);
  // The dx coefficients begin_backward_relu_max_pool left in coefficients_.
  ReluMaxPool2x2::DxCoefficients dx_coefficients() const {
    const float* mean_hi = coefficients_.data();
    return {mean_hi, mean_hi + c_, mean_hi + 2 * c_, mean_hi + 3 * c_};
  }

  std::vector<float> mean_, invstd_;  // the batch's, saved for backward
  std::vector<uint8_t> mask_;         // forward_(add_)relu's ReLU mask, one bit per element
  bool with_relu_ = false;            // the last forward was forward_relu
  bool with_max_pool_ = false;        // the last forward was forward_relu_max_pool
  ReluMaxPool2x2 pool_;
  const Tensor* pooled_grad_ = nullptr;  // begin_backward_relu_max_pool's dy
  std::vector<float> coefficients_;   // per channel: mean_hi, scale, shift; backward mean_hi, a, b, k
  std::vector<double> statistics_;    // per channel: the saved mean, in double
  dist::Communicator* group_ = nullptr;
  std::vector<Moments> moments_;  // synchronized or with max pooling: the (global) batch's
  std::vector<double> sums_;      // synchronized: Σdy, Σdy·x̂ (with max pooling: Σg, Σg·(x - mean))
  // forward_relu_max_pool_of's: x's maker (x's shape and format are pool_'s
  // input's); each piece's moments; each thread's room for a piece of x.
  RecomputedOutput* source_ = nullptr;
  std::vector<Moments> piece_moments_;
  mutable std::vector<std::vector<float>> pieces_;
};

// BN's part of batchnorm, relu, maxpool 2 in one pass: the batch statistics as
// batch_norm_forward_training makes them (the moments, then the saved and
// running statistics from them), and the coefficients its kernels apply
// (cpu/coefficients.hpp: mean_hi = float(mean), scale = γ·invstd, shift =
// β - (mean - mean_hi)·scale, from the double statistics); ReluMaxPool2x2 does
// the rest.
const Tensor& BatchNormLayer::forward_relu_max_pool(const Tensor& x) {
  if (!fuses_relu_max_pool())
    fail_invalid(describe(), ": cannot run with the relu and max pooling after it now");
  input_ = &x;
  source_ = nullptr;
  with_relu_ = with_max_pool_ = true;
  moments_.resize(c_);
  batch_norm_moments<float>(x.view(), moments_);
  finish_relu_max_pool_statistics();
  const float* mean_hi = coefficients_.data();
  pool_.forward(x, mean_hi, mean_hi + c_, mean_hi + 2 * c_, y_);
  trained_ = true;
  return y_;
}

// The same, x made piece by piece by `source` twice: for the moments, then for
// the pooling. The moments are each piece's (kRecomputedSamples samples)
// merged in piece order: the same on any number of threads, and the whole
// batch's to rounding (not bit for bit: batch_norm_moments merges other parts).
const Tensor& BatchNormLayer::forward_relu_max_pool_of(RecomputedOutput& source,
                                                       const std::vector<int64_t>& shape,
                                                       MemoryFormat format) {
  if (!fuses_relu_max_pool())
    fail_invalid(describe(), ": cannot run with the relu and max pooling after it now");
  output_shape({shape.begin() + 1, shape.end()});  // checks the channels
  input_ = nullptr;
  source_ = &source;
  with_relu_ = with_max_pool_ = true;
  pieces_.resize(std::max<size_t>(pieces_.size(), static_cast<size_t>(num_threads())));
  pool_.begin_forward(shape, format, y_);  // checks the extents
  const int64_t n = shape[0], pieces = (n + kRecomputedSamples - 1) / kRecomputedSamples;
  const auto samples_of = [&](int64_t piece) {
    return std::min(kRecomputedSamples, n - piece * kRecomputedSamples);
  };
  piece_moments_.resize(static_cast<size_t>(pieces * c_));
  for_each_chunk(pieces, [&](int64_t piece, int) {
    const int64_t samples = samples_of(piece);
    float* x = piece_buffer();
    source.output_of(piece * kRecomputedSamples, samples, x);
    std::vector<int64_t> piece_shape = shape;
    piece_shape[0] = samples;
    batch_norm_moments<float>(image_view(x, piece_shape, format),
                              std::span(piece_moments_).subspan(piece * c_, c_));
  });
  moments_.assign(c_, Moments{});
  for (int64_t piece = 0; piece < pieces; ++piece)
    for (int64_t c = 0; c < c_; ++c) moments_[c].merge(piece_moments_[piece * c_ + c]);
  finish_relu_max_pool_statistics();
  const float* mean_hi = coefficients_.data();
  for_each_chunk(pieces, [&](int64_t piece, int) {
    float* x = piece_buffer();
    source.output_of(piece * kRecomputedSamples, samples_of(piece), x);
    pool_.forward_of_samples(x, piece * kRecomputedSamples, samples_of(piece), mean_hi,
                             mean_hi + c_, mean_hi + 2 * c_, y_);
  });
  trained_ = true;
  return y_;
}

// From this shard's moments_: the ranks' merged, the saved and running
// statistics, and the coefficients in coefficients_.
void BatchNormLayer::finish_relu_max_pool_statistics() {
  if (group_) dist::merge_moments(*group_, moments_);  // in rank order, as train_forward
  int64_t count = tracked();
  batch_norm_statistics_from_moments<float>(moments_, {mean_, invstd_},
                                            {running_mean_, running_var_, &count}, options_);
  batches_[0] = static_cast<float>(count);
  coefficients_.resize(3 * c_);
  float *mean_hi = coefficients_.data(), *scale = mean_hi + c_, *shift = scale + c_;
  for (int64_t c = 0; c < c_; ++c) {
    const double mean = moments_[c].mean;
    const double invstd = 1.0 / std::sqrt(moments_[c].biased_variance() + options_.eps);
    const double sc = static_cast<double>(gamma_.value[c]) * invstd;
    mean_hi[c] = static_cast<float>(mean);
    scale[c] = static_cast<float>(sc);
    shift[c] = static_cast<float>(static_cast<double>(beta_.value[c]) -
                                  (mean - static_cast<double>(mean_hi[c])) * sc);
  }
}

// Backward of forward_relu_max_pool: Σg, Σg·(x - mean) over the windows'
// maxima, then dγ, dβ and dx's coefficients as batch_norm_backward folds them
// (cpu/coefficients.hpp: a = γ·invstd, b = -a·invstd·dγ/M, k = -a·dβ/M -
// b·(mean - mean_hi), M values per channel), from the saved statistics.
const Tensor& BatchNormLayer::backward_relu_max_pool(const Tensor& dy, bool need_input_grad) {
  begin_backward_relu_max_pool(dy, need_input_grad);
  if (!need_input_grad) return dx_;
  if (!source_) {
    pool_.dx(*input_, dy, dx_coefficients(), dx_);
    return dx_;
  }
  dx_.reshape(pool_.input_shape(), pool_.input_format());
  const int64_t n = dx_.shape[0], pieces = (n + kRecomputedSamples - 1) / kRecomputedSamples;
  for_each_chunk(pieces, [&](int64_t piece, int) {
    const int64_t first = piece * kRecomputedSamples;
    input_grad_of(first, std::min(kRecomputedSamples, n - first),
                  dx_.data.data() + first * pool_.sample_size());
  });
  return dx_;
}

// Its first part: the sums, dγ and dβ (added to the gradients), and with
// need_input_grad dx's coefficients (mean_hi, a, b, k in coefficients_); dx_
// is left empty (ReluMaxPool2x2::dx sizes it).
void BatchNormLayer::begin_backward_relu_max_pool(const Tensor& dy, bool need_input_grad) {
  start_backward(dy, false);
  pieces_.resize(std::max<size_t>(pieces_.size(), static_cast<size_t>(num_threads())));
  pooled_grad_ = &dy;
  sums_.resize(2 * c_);
  statistics_.resize(c_);
  double *mean = statistics_.data(), *sum_g = sums_.data(), *sum_gx = sum_g + c_;
  for (int64_t c = 0; c < c_; ++c) mean[c] = mean_[c];
  pool_.sums(dy, mean, sum_g, sum_gx);
  // dγ and dβ are this shard's parts (the trainer's gradient sum adds the
  // ranks'); dx needs the whole batch's sums, over the whole batch's count.
  for (int64_t c = 0; c < c_; ++c) {
    dbeta_[c] = static_cast<float>(sum_g[c]);
    dgamma_[c] = static_cast<float>(sum_gx[c] * static_cast<double>(invstd_[c]));
  }
  accumulate_gradients();
  if (!need_input_grad) return;
  if (group_) dist::all_reduce_sum(*group_, sums_);
  const double count = moments_[0].count;
  coefficients_.resize(4 * c_);
  float *mean_hi = coefficients_.data(), *a = mean_hi + c_, *b = a + c_, *k = b + c_;
  for (int64_t c = 0; c < c_; ++c) {
    const double invstd = invstd_[c], sum_gxhat = sum_gx[c] * invstd;
    const double ac = static_cast<double>(gamma_.value[c]) * invstd;
    const double bc = -ac * invstd * sum_gxhat / count;
    mean_hi[c] = static_cast<float>(mean[c]);
    a[c] = static_cast<float>(ac);
    b[c] = static_cast<float>(bc);
    k[c] = static_cast<float>(-ac * sum_g[c] / count - bc * (mean[c] - static_cast<double>(mean_hi[c])));
  }
}

// r and d follow BatchRenormSchedule::linear(warmup, rmax, dmax) over the
// layer's own training steps (num_batches_tracked, so a resumed run continues
// the schedule where it was).
class BatchRenormLayer final : public BatchNormFamily {
 public:
  BatchRenormLayer(int64_t channels, double eps, double momentum, bool frozen,
                   BatchRenormSchedule schedule)
      : BatchNormFamily(channels, eps, momentum, frozen), schedule_(schedule) {
    schedule_.at(0);  // checks the limits now, not at the first step
    mean_.resize(c_);
    invstd_.resize(c_);
    r_.resize(c_);
    d_.resize(c_);
  }
  std::string type() const override { return "batchrenorm"; }
  std::string describe() const override {
    std::ostringstream s;
    s << "batchrenorm(" << c_ << ", rmax " << schedule_.rmax << ", dmax " << schedule_.dmax
      << ", warmup " << schedule_.rmax_ramp_steps << ", " << common_options() << ")";
    return s.str();
  }

 private:
  void train_forward(const Tensor& x) override {
    int64_t count = tracked();
    batch_renorm_forward_training<float>(x.view(), y_.view(), gamma_.value, beta_.value,
                                         {mean_, invstd_, r_, d_},
                                         {running_mean_, running_var_, &count},
                                         schedule_.at(count), options_);
    batches_[0] = static_cast<float>(count);
  }
  void train_backward(const Tensor& dy, TensorView<float> dx) override {
    batch_renorm_backward<float>(input_->view(), dy.view(), dx, gamma_.value, mean_, invstd_, r_,
                                 d_, dgamma_, dbeta_);
  }

  BatchRenormSchedule schedule_;
  std::vector<float> mean_, invstd_, r_, d_;
};

class GhostBatchNormLayer final : public BatchNormFamily {
 public:
  GhostBatchNormLayer(int64_t channels, double eps, double momentum, bool frozen, int64_t size)
      : BatchNormFamily(channels, eps, momentum, frozen), size_(size) {}
  std::string type() const override { return "ghostbatchnorm"; }
  std::string describe() const override {
    std::ostringstream s;
    s << "ghostbatchnorm(" << c_ << ", size " << size_ << ", " << common_options() << ")";
    return s.str();
  }

 private:
  void train_forward(const Tensor& x) override {
    const int64_t ghosts = ghost_batch_count(x.shape[0], size_);
    mean_.resize(ghosts * c_);
    invstd_.resize(ghosts * c_);
    int64_t count = tracked();
    ghost_batch_norm_forward_training<float>(x.view(), y_.view(), gamma_.value, beta_.value, size_,
                                             {mean_, invstd_},
                                             {running_mean_, running_var_, &count}, options_);
    batches_[0] = static_cast<float>(count);
  }
  void train_backward(const Tensor& dy, TensorView<float> dx) override {
    ghost_batch_norm_backward<float>(input_->view(), dy.view(), dx, gamma_.value, size_, mean_,
                                     invstd_, dgamma_, dbeta_);
  }

  int64_t size_;
  std::vector<float> mean_, invstd_;
};

}  // namespace

namespace {
std::unique_ptr<Layer> make_family_layer(const ModelSpec::LayerSpec& spec,
                                         const std::vector<int64_t>& input) {
  const std::string& t = spec.type;
  if (input.size() != 1 && input.size() != 3)
    fail_invalid(t, ": needs a [C] or [C, H, W] input, got ", shape_text(input));
  const double eps = option_or(spec, "eps", 1e-5), momentum = option_or(spec, "momentum", 0.1);
  if (!(eps > 0)) fail_invalid(t, ": eps must be positive, got ", eps);
  if (!(momentum >= 0 && momentum <= 1))
    fail_invalid(t, ": momentum must be in [0, 1], got ", momentum);
  const bool frozen = option_or(spec, "frozen", 0) != 0;
  if (t == "batchnorm") return std::make_unique<BatchNormLayer>(input[0], eps, momentum, frozen);
  if (t == "batchrenorm") {
    const double rmax = option_or(spec, "rmax", 3.0), dmax = option_or(spec, "dmax", 5.0);
    const int64_t warmup = int_option_or(spec, "warmup", kDefaultRenormWarmup);
    if (!(rmax >= 1)) fail_invalid(t, ": rmax must be >= 1, got ", rmax);
    if (!(dmax >= 0)) fail_invalid(t, ": dmax must be >= 0, got ", dmax);
    if (!(warmup >= 0)) fail_invalid(t, ": warmup must be >= 0 steps, got ", warmup);
    return std::make_unique<BatchRenormLayer>(
        input[0], eps, momentum, frozen,
        BatchRenormSchedule::linear(warmup, rmax, dmax));
  }
  if (t == "ghostbatchnorm") {
    const int64_t size = int_option_or(spec, "size", kDefaultGhostBatchSize);
    if (size < 1) fail_invalid(t, ": size (the virtual batch size) must be >= 1, got ", size);
    return std::make_unique<GhostBatchNormLayer>(input[0], eps, momentum, frozen, size);
  }
  fail_invalid("not a batch-norm layer: '", t, "'");
}
}  // namespace

std::unique_ptr<Layer> make_batch_norm_layer(const ModelSpec::LayerSpec& spec,
                                             const std::vector<int64_t>& input, size_t index) {
  auto layer = make_family_layer(spec, input);
  const double noise = option_or(spec, "noise", 0.0);
  if (!(noise >= 0 && noise <= 10))
    fail_invalid(spec.type, ": noise must be in [0, 10], got ", noise);
  static_cast<BatchNormFamily&>(*layer).set_noise(noise, 0x9e3779b1ull * (index + 1));
  return layer;
}

}  // namespace normkit::nn::detail
