// Every rejected call throws normkit::Error of the right kind with a message
// naming the problem, and leaves all state as it was: running statistics,
// num_batches_tracked, saved statistics, outputs and gradients.
#include <functional>
#include <limits>
#include <optional>

#include "test_support.hpp"

namespace {

using namespace normkit_test;
using normkit::BackwardMode;
using normkit::BatchNormOptions;
using normkit::ErrorKind;
using normkit::Moments;
using normkit::TensorView;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// x: [2, 3, 2, 2] NCHW (M = 8 per channel) and everything a call can change.
template <class T>
class Rejected : public ::testing::Test {
 protected:
  const Logical g{2, 3, {2, 2}};
  std::vector<T> x, dy, y, dx, gamma{T(1), T(2), T(3)}, beta{T(0), T(1), T(2)};
  std::vector<T> save_mean, save_invstd, running_mean{T(0.5), T(0.25), T(-1)},
      running_var{T(1), T(2), T(4)}, dgamma, dbeta;
  int64_t batches = 5;
  std::vector<std::vector<T>> before;
  int64_t batches_before = 0;

  void SetUp() override {
    Rng rng(11);
    x = convert<T>(uniform_floats(24, -2, 2, rng));
    dy = convert<T>(uniform_floats(24, -1, 1, rng));
    y.assign(24, sentinel<T>());
    dx.assign(24, sentinel<T>());
    save_mean.assign(3, sentinel<T>());
    save_invstd.assign(3, sentinel<T>());
    dgamma.assign(3, sentinel<T>());
    dbeta.assign(3, sentinel<T>());
    before = {x, dy, y, dx, gamma, beta, save_mean, save_invstd, running_mean, running_var,
              dgamma, dbeta};
    batches_before = batches;
  }

  TensorView<const T> xv(std::initializer_list<int64_t> sizes = {2, 3, 2, 2},
                         Layout layout = Layout::NCHW) {
    return TensorView<const T>::contiguous(x.data(), sizes, layout);
  }
  TensorView<T> yv(std::initializer_list<int64_t> sizes = {2, 3, 2, 2}, Layout layout = Layout::NCHW) {
    return TensorView<T>::contiguous(y.data(), sizes, layout);
  }
  TensorView<const T> dyv() { return TensorView<const T>::contiguous(dy.data(), {2, 3, 2, 2}, Layout::NCHW); }
  TensorView<T> dxv() { return TensorView<T>::contiguous(dx.data(), {2, 3, 2, 2}, Layout::NCHW); }

  void forward(std::span<const T> gm, std::span<const T> bt, normkit::SavedStats<T> saved,
               normkit::RunningStats<T> running, const BatchNormOptions& options = {}) {
    normkit::batch_norm_forward_training<T>(xv(), yv(), gm, bt, saved, running, options);
  }
  void forward_with(const BatchNormOptions& options) {
    forward(gamma, beta, {save_mean, save_invstd}, {running_mean, running_var, &batches}, options);
  }
  void backward(std::span<const T> gm, std::span<const T> mean, std::span<const T> invstd,
                std::span<T> dg, std::span<T> db, BackwardMode mode = BackwardMode::training) {
    normkit::batch_norm_backward<T>(xv(), dyv(), dxv(), gm, mean, invstd, dg, db, mode);
  }

  ::testing::AssertionResult unchanged() {
    const std::vector<std::vector<T>> now = {x, dy, y, dx, gamma, beta, save_mean, save_invstd,
                                             running_mean, running_var, dgamma, dbeta};
    const char* names[] = {"x", "dy", "y", "dx", "gamma", "beta", "save_mean", "save_invstd",
                           "running_mean", "running_var", "dgamma", "dbeta"};
    for (size_t i = 0; i < now.size(); ++i) {
      auto same = bitwise_equal(names[i], now[i], before[i]);
      if (!same) return same << " (changed by a rejected call)";
    }
    if (batches != batches_before)
      return ::testing::AssertionFailure()
             << "num_batches_tracked changed from " << batches_before << " to " << batches;
    return ::testing::AssertionSuccess();
  }

  template <class F>
  void expect_rejected(F&& f, ErrorKind kind, std::initializer_list<std::string_view> parts) {
    EXPECT_TRUE(throws_error(f, kind, parts));
    EXPECT_TRUE(unchanged());
  }
};

using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Rejected, Types);

constexpr auto kInvalid = ErrorKind::invalid_argument;
constexpr auto kRuntime = ErrorKind::runtime;
constexpr std::string_view kOneValue = "expected more than 1 value per channel when training";

TYPED_TEST(Rejected, OneValuePerChannelWhenTraining) {
  using T = TypeParam;
  // [1, 3] NC and [1, 3, 1, 1] NCHW: one value per channel.
  for (const auto& sizes : {std::vector<int64_t>{1, 3}, std::vector<int64_t>{1, 3, 1, 1}}) {
    const Layout layout = sizes.size() == 2 ? Layout::NC : Layout::NCHW;
    auto x1 = TensorView<const T>::contiguous(this->x.data(), sizes, layout);
    auto y1 = TensorView<T>::contiguous(this->y.data(), sizes, layout);
    this->expect_rejected(
        [&] {
          normkit::batch_norm_forward_training<T>(x1, y1, this->gamma, this->beta,
                                                  {this->save_mean, this->save_invstd},
                                                  {this->running_mean, this->running_var, &this->batches});
        },
        kInvalid, {kOneValue, x1.shape_string()});
    auto dy1 = TensorView<const T>::contiguous(this->dy.data(), sizes, layout);
    auto dx1 = TensorView<T>::contiguous(this->dx.data(), sizes, layout);
    this->expect_rejected(
        [&] {
          normkit::batch_norm_backward<T>(x1, dy1, dx1, this->gamma, this->running_mean,
                                          this->running_var, this->dgamma, this->dbeta);
        },
        kInvalid, {kOneValue});
    // Frozen statistics do not come from the batch: one value is fine.
    std::vector<T> dg(3), db(3);
    EXPECT_NO_THROW(normkit::batch_norm_backward<T>(x1, dy1, dx1, this->gamma, this->running_mean,
                                                    this->running_var, dg, db,
                                                    BackwardMode::frozen));
    this->dx = this->before[3];
  }
  const std::vector<Moments> single = {{1, 0.5, 0}, {1, 1, 0}, {1, 2, 0}};
  this->expect_rejected(
      [&] {
        normkit::batch_norm_update_running<T>(single, {this->running_mean, this->running_var, &this->batches});
      },
      kInvalid, {kOneValue});
}

TYPED_TEST(Rejected, PerChannelSizesMustMatch) {
  using T = TypeParam;
  const std::vector<T> two(2, T(1)), four(4, T(1));
  std::vector<T> two_out(2), four_out(4);
  this->expect_rejected([&] { this->forward(two, this->beta, {}, {}); }, kInvalid,
                        {"weight (gamma) should contain 3 elements (one per channel) not 2"});
  this->expect_rejected([&] { this->forward(this->gamma, four, {}, {}); }, kInvalid,
                        {"bias (beta) should contain 3 elements (one per channel) not 4"});
  this->expect_rejected(
      [&] { this->forward(this->gamma, this->beta, {two_out, this->save_invstd}, {}); }, kInvalid,
      {"save_mean should contain 3 elements", "not 2"});
  this->expect_rejected(
      [&] { this->forward(this->gamma, this->beta, {this->save_mean, four_out}, {}); }, kInvalid,
      {"save_invstd should contain 3 elements", "not 4"});
  this->expect_rejected(
      [&] {
        std::vector<T> rm(2, T(0)), rv(2, T(1));
        this->forward(this->gamma, this->beta, {this->save_mean, this->save_invstd}, {rm, rv, &this->batches});
      },
      kInvalid, {"running_mean should contain 3 elements", "not 2"});
  this->expect_rejected(
      [&] {
        std::vector<T> rv(4, T(1));
        this->forward(this->gamma, this->beta, {this->save_mean, this->save_invstd},
                      {this->running_mean, rv, &this->batches});
      },
      kInvalid, {"running_var should contain 3 elements", "not 4"});
  // Inference and backward.
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_inference<T>(this->xv(), this->yv(), two, this->beta,
                                                 this->running_mean, this->running_var);
      },
      kInvalid, {"weight (gamma) should contain 3 elements"});
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_inference<T>(this->xv(), this->yv(), this->gamma, this->beta,
                                                 two, this->running_var);
      },
      kInvalid, {"mean should contain 3 elements", "not 2"});
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_inference<T>(this->xv(), this->yv(), this->gamma, this->beta,
                                                 this->running_mean, four);
      },
      kInvalid, {"running_var should contain 3 elements", "not 4"});
  this->expect_rejected([&] { this->backward(this->gamma, two, this->running_var, this->dgamma, this->dbeta); },
                        kInvalid, {"mean should contain 3 elements", "not 2"});
  this->expect_rejected([&] { this->backward(this->gamma, this->running_mean, {}, this->dgamma, this->dbeta); },
                        kInvalid, {"invstd should contain 3 elements", "not 0"});
  this->expect_rejected(
      [&] { this->backward(this->gamma, this->running_mean, this->running_var, two_out, this->dbeta); },
      kInvalid, {"dgamma should contain 3 elements"});
  this->expect_rejected(
      [&] { this->backward(this->gamma, this->running_mean, this->running_var, this->dgamma, four_out); },
      kInvalid, {"dbeta should contain 3 elements"});
  std::vector<Moments> moments(2);
  EXPECT_TRUE(throws_error([&] { normkit::batch_norm_moments<T>(this->xv(), moments); }, kInvalid,
                           {"moments should contain 3 elements", "not 2"}));
}

TYPED_TEST(Rejected, RunningMeanAndVarGoTogether) {
  using T = TypeParam;
  this->expect_rejected(
      [&] {
        this->forward(this->gamma, this->beta, {this->save_mean, this->save_invstd},
                      {this->running_mean, {}, &this->batches});
      },
      kInvalid, {"running_mean and running_var must be given together", "3 and 0"});
  this->expect_rejected(
      [&] {
        this->forward(this->gamma, this->beta, {this->save_mean, this->save_invstd},
                      {{}, this->running_var, &this->batches});
      },
      kInvalid, {"running_mean and running_var must be given together", "0 and 3"});
  (void)sizeof(T);
}

TYPED_TEST(Rejected, EpsMustBePositiveAndFinite) {
  using T = TypeParam;
  for (const double eps : {0.0, -1e-5, kNaN, kInf}) {
    SCOPED_TRACE("eps " + std::to_string(eps));
    this->expect_rejected([&] { this->forward_with({eps, 0.1}); }, kInvalid,
                          {"eps must be positive and finite"});
    this->expect_rejected(
        [&] {
          normkit::batch_norm_forward_inference<T>(this->xv(), this->yv(), this->gamma, this->beta,
                                                   this->running_mean, this->running_var, eps);
        },
        kInvalid, {"eps must be positive and finite"});
    this->expect_rejected(
        [&] { normkit::batch_norm_invstd<T>(this->running_var, eps, this->save_invstd); }, kInvalid,
        {"eps must be positive and finite"});
  }
}

TYPED_TEST(Rejected, MomentumMustBeInZeroOne) {
  for (const double momentum : {-0.1, 1.5, kNaN, kInf, -kInf}) {
    SCOPED_TRACE("momentum " + std::to_string(momentum));
    this->expect_rejected([&] { this->forward_with({1e-5, momentum}); }, kInvalid,
                          {"momentum must be in [0, 1]"});
  }
}

TYPED_TEST(Rejected, CumulativeAverageNeedsTheCounter) {
  BatchNormOptions options;
  options.momentum = std::nullopt;
  this->expect_rejected(
      [&] {
        this->forward(this->gamma, this->beta, {this->save_mean, this->save_invstd},
                      {this->running_mean, this->running_var, nullptr}, options);
      },
      kInvalid, {"momentum = None", "needs num_batches_tracked"});
}

TYPED_TEST(Rejected, UnknownEnumValues) {
  BatchNormOptions options;
  options.momentum_convention = static_cast<normkit::MomentumConvention>(7);
  this->expect_rejected([&] { this->forward_with(options); }, kInvalid, {"momentum_convention"});
  options = {};
  options.running_variance = static_cast<normkit::RunningVariance>(7);
  this->expect_rejected([&] { this->forward_with(options); }, kInvalid, {"running_variance"});
  this->expect_rejected(
      [&] {
        this->backward(this->gamma, this->running_mean, this->running_var, this->dgamma,
                       this->dbeta, static_cast<BackwardMode>(7));
      },
      kInvalid, {"mode: unknown backward mode"});
}

TYPED_TEST(Rejected, EmptyTensors) {
  using T = TypeParam;
  for (const auto& sizes : {std::vector<int64_t>{0, 3, 2, 2}, std::vector<int64_t>{2, 3, 0, 2}}) {
    auto x0 = TensorView<const T>::contiguous(this->x.data(), sizes, Layout::NCHW);
    auto y0 = TensorView<T>::contiguous(this->y.data(), sizes, Layout::NCHW);
    this->expect_rejected(
        [&] {
          normkit::batch_norm_forward_training<T>(x0, y0, this->gamma, this->beta,
                                                  {this->save_mean, this->save_invstd},
                                                  {this->running_mean, this->running_var, &this->batches});
        },
        kInvalid, {"x: empty tensor", x0.shape_string()});
    this->expect_rejected(
        [&] {
          normkit::batch_norm_forward_inference<T>(x0, y0, this->gamma, this->beta,
                                                   this->running_mean, this->running_var);
        },
        kInvalid, {"x: empty tensor"});
    auto dy0 = TensorView<const T>::contiguous(this->dy.data(), sizes, Layout::NCHW);
    auto dx0 = TensorView<T>::contiguous(this->dx.data(), sizes, Layout::NCHW);
    this->expect_rejected(
        [&] {
          normkit::batch_norm_backward<T>(x0, dy0, dx0, this->gamma, this->running_mean,
                                          this->running_var, this->dgamma, this->dbeta);
        },
        kInvalid, {"x: empty tensor"});
    std::vector<Moments> moments(3);
    EXPECT_TRUE(throws_error([&] { normkit::batch_norm_moments<T>(x0, moments); }, kInvalid,
                             {"x: empty tensor"}));
  }
  // No channels.
  auto x_no_c = TensorView<const T>::contiguous(this->x.data(), {2, 0}, Layout::NC);
  auto y_no_c = TensorView<T>::contiguous(this->y.data(), {2, 0}, Layout::NC);
  this->expect_rejected(
      [&] { normkit::batch_norm_forward_training<T>(x_no_c, y_no_c, {}, {}, {}, {}); }, kInvalid,
      {"x: empty tensor"});
}

TYPED_TEST(Rejected, WrongNumberOfSizesForALayout) {
  using T = TypeParam;
  EXPECT_TRUE(throws_error(
      [&] { (void)TensorView<const T>::contiguous(this->x.data(), {2, 3, 4}, Layout::NCHW); },
      kInvalid, {"layout NCHW needs 4 sizes, got 3"}));
  EXPECT_TRUE(throws_error(
      [&] { (void)TensorView<const T>::contiguous(this->x.data(), {2, 3, 2, 2, 1, 1}, Layout::NDHWC); },
      kInvalid, {"layout NDHWC needs 5 sizes, got 6"}));
}

TYPED_TEST(Rejected, NonCollapsibleStrides) {
  using T = TypeParam;
  // [2, 3, 2, 2] NCHW with W rows 3 apart: H and W do not form one run.
  std::vector<T> big(64, T(1));
  const std::vector<int64_t> sizes = {2, 3, 2, 2}, pitched = {18, 6, 3, 1};
  auto x_pitched = TensorView<const T>::strided(big.data(), sizes, pitched, Layout::NCHW);
  auto y_pitched = TensorView<T>::strided(this->y.data(), sizes, pitched, Layout::NCHW);
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_training<T>(x_pitched, this->yv(), this->gamma, this->beta,
                                                {this->save_mean, this->save_invstd},
                                                {this->running_mean, this->running_var, &this->batches});
      },
      kInvalid, {"x: the strides of [2, 3, 2, 2] (NCHW)", "contiguous"});
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_training<T>(this->xv(), y_pitched, this->gamma, this->beta,
                                                {this->save_mean, this->save_invstd},
                                                {this->running_mean, this->running_var, &this->batches});
      },
      kInvalid, {"y: the strides"});
  auto dy_pitched = TensorView<const T>::strided(big.data(), sizes, pitched, Layout::NCHW);
  this->expect_rejected(
      [&] {
        normkit::batch_norm_backward<T>(this->xv(), dy_pitched, this->dxv(), this->gamma,
                                        this->running_mean, this->running_var, this->dgamma,
                                        this->dbeta);
      },
      kInvalid, {"dy: the strides"});
  const std::vector<int64_t> negative = {12, 4, -2, 1};
  auto x_negative = TensorView<const T>::strided(this->x.data() + 4, sizes, negative, Layout::NCHW);
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_training<T>(x_negative, this->yv(), {}, {}, {}, {});
      },
      kInvalid, {"x: negative strides"});
}

TYPED_TEST(Rejected, OutputShapeMustMatch) {
  using T = TypeParam;
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_training<T>(this->xv(), this->yv({2, 3, 4, 1}), this->gamma,
                                                this->beta, {this->save_mean, this->save_invstd},
                                                {this->running_mean, this->running_var, &this->batches});
      },
      kInvalid, {"y: shape [2, 3, 4, 1] (NCHW) does not match x's [2, 3, 2, 2] (NCHW)"});
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_training<T>(this->xv(), this->yv({2, 2, 2, 3}, Layout::NHWC),
                                                this->gamma, this->beta,
                                                {this->save_mean, this->save_invstd},
                                                {this->running_mean, this->running_var, &this->batches});
      },
      kInvalid, {"y: shape [2, 2, 2, 3] (NHWC) does not match x's"});
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_inference<T>(this->xv(), this->yv({2, 3, 4}, Layout::NCL),
                                                 this->gamma, this->beta, this->running_mean,
                                                 this->running_var);
      },
      kInvalid, {"y: shape [2, 3, 4] (NCL) does not match"});
  auto dx_wrong = TensorView<T>::contiguous(this->dx.data(), {2, 3, 1, 4}, Layout::NCHW);
  this->expect_rejected(
      [&] {
        normkit::batch_norm_backward<T>(this->xv(), this->dyv(), dx_wrong, this->gamma,
                                        this->running_mean, this->running_var, this->dgamma,
                                        this->dbeta);
      },
      kInvalid, {"dx: shape [2, 3, 1, 4] (NCHW) does not match"});
  auto dy_wrong = TensorView<const T>::contiguous(this->dy.data(), {4, 3, 1, 2}, Layout::NCHW);
  this->expect_rejected(
      [&] {
        normkit::batch_norm_backward<T>(this->xv(), dy_wrong, this->dxv(), this->gamma,
                                        this->running_mean, this->running_var, this->dgamma,
                                        this->dbeta);
      },
      kInvalid, {"dy: shape [4, 3, 1, 2] (NCHW) does not match"});
}

TYPED_TEST(Rejected, NullDataAndInPlaceWithOtherStrides) {
  using T = TypeParam;
  auto x_null = this->xv();
  x_null.data = nullptr;
  this->expect_rejected(
      [&] { normkit::batch_norm_forward_training<T>(x_null, this->yv(), {}, {}, {}, {}); },
      kInvalid, {"x: data pointer is null"});
  auto y_null = this->yv();
  y_null.data = nullptr;
  this->expect_rejected(
      [&] { normkit::batch_norm_forward_training<T>(this->xv(), y_null, {}, {}, {}, {}); },
      kInvalid, {"y: data pointer is null"});
  // y over x's memory, but as the channels-last arrangement of the same logical tensor.
  const std::vector<int64_t> sizes = {2, 3, 2, 2}, channels_last = {12, 1, 6, 3};
  auto y_alias = TensorView<T>::strided(this->x.data(), sizes, channels_last, Layout::NCHW);
  this->expect_rejected(
      [&] { normkit::batch_norm_forward_training<T>(this->xv(), y_alias, {}, {}, {}, {}); },
      kInvalid, {"y: in-place output must have the same strides as x"});
  auto dx_alias = TensorView<T>::strided(this->dy.data(), sizes, channels_last, Layout::NCHW);
  this->expect_rejected(
      [&] {
        normkit::batch_norm_backward<T>(this->xv(), this->dyv(), dx_alias, this->gamma,
                                        this->running_mean, this->running_var, {}, {});
      },
      kInvalid, {"dx: in-place output must have the same strides"});
}

TYPED_TEST(Rejected, VarianceMustLeaveRoomForEps) {
  using T = TypeParam;
  std::vector<T> bad_var = {T(1), T(-1), T(1)};
  this->expect_rejected(
      [&] {
        normkit::batch_norm_forward_inference<T>(this->xv(), this->yv(), this->gamma, this->beta,
                                                 this->running_mean, bad_var);
      },
      kInvalid, {"running_var[1] + eps must be positive"});
  this->expect_rejected([&] { normkit::batch_norm_invstd<T>(bad_var, 1e-5, this->save_invstd); },
                        kInvalid, {"var[1] + eps must be positive"});
  std::vector<T> two(2);
  EXPECT_TRUE(throws_error([&] { normkit::batch_norm_invstd<T>(this->running_var, 1e-5, two); },
                           kInvalid, {"invstd should contain 3 elements not 2"}));
}

// Thousands of channels: the inference invstd is computed in slices on several
// threads. A bad variance in any slice is still named (the first of two), and
// neither y nor invstd is written.
TEST(InferenceInvstdSlices, ABadVarianceInAnySliceIsNamedAndNothingIsWritten) {
  constexpr int64_t kN = 2, kC = 4100;
  std::vector<float> x(kN * kC, 1.0f), y(kN * kC, 7.0f), invstd(kC, 7.0f);
  const std::vector<float> gamma(kC, 1.0f), beta(kC, 0.0f), mean(kC, 0.0f);
  const auto xv = TensorView<const float>::contiguous(x.data(), {kN, kC}, Layout::NC);
  const auto yv = TensorView<float>::contiguous(y.data(), {kN, kC}, Layout::NC);
  for (const int threads : {2, 3}) {
    ThreadCount scope(threads);
    const std::vector<std::vector<int64_t>> cases = {{4090}, {2500, 4000}};
    for (const std::vector<int64_t>& bad : cases) {
      std::vector<float> var(kC, 1.0f);
      for (const int64_t c : bad) var[c] = -1.0f;
      const std::string first = "[" + std::to_string(bad[0]) + "] + eps must be positive";
      SCOPED_TRACE(std::to_string(threads) + " threads, first bad channel " + first);
      EXPECT_TRUE(throws_error(
          [&] { normkit::batch_norm_forward_inference<float>(xv, yv, gamma, beta, mean, var); },
          kInvalid, {"running_var" + first}));
      EXPECT_TRUE(throws_error([&] { normkit::batch_norm_invstd<float>(var, 1e-5, invstd); },
                               kInvalid, {"var" + first}));
      EXPECT_EQ(std::count(y.begin(), y.end(), 7.0f), kN * kC) << "y was written";
      EXPECT_EQ(std::count(invstd.begin(), invstd.end(), 7.0f), kC) << "invstd was written";
    }
  }
}

// NaN or inf in the data is a runtime error found after the statistics are
// computed; the running and saved statistics and the counter stay unchanged
// (y may hold partial results).
TYPED_TEST(Rejected, NonFiniteInputLeavesStatisticsUnchanged) {
  using T = TypeParam;
  for (const Layout layout : {Layout::NCHW, Layout::NHWC}) {
    for (const double bad : {kNaN, kInf, -kInf}) {
      SCOPED_TRACE(std::string(normkit::to_string(layout)) + ", value " + std::to_string(bad));
      // Element (n 1, c 1, h 0, w 1) in the layout's memory order.
      Buffer<T> xb(dense(layout, this->g));
      xb.scatter(this->x);
      const int64_t canonical = (1 * 3 + 1) * 4 + 1;
      for_each_element(xb.arrangement, [&](int64_t i, int64_t offset) {
        if (i == canonical) xb.storage[offset] = static_cast<T>(bad);
      });
      Buffer<T> yb(dense(layout, this->g));
      EXPECT_TRUE(throws_error(
          [&] {
            normkit::batch_norm_forward_training<T>(
                xb.cview(), yb.view(), this->gamma, this->beta, {this->save_mean, this->save_invstd},
                {this->running_mean, this->running_var, &this->batches});
          },
          kRuntime, {"x: channel 1 contains NaN or infinite values", "running statistics left unchanged"}));
      EXPECT_TRUE(this->unchanged());
      // Without running statistics too: the saved ones are not written.
      EXPECT_TRUE(throws_error(
          [&] {
            normkit::batch_norm_forward_training<T>(
                xb.cview(), yb.view(), this->gamma, this->beta, {this->save_mean, this->save_invstd}, {});
          },
          kRuntime, {"x: channel 1 contains NaN or infinite values"}));
      EXPECT_TRUE(this->unchanged());
    }
  }
  const std::vector<Moments> nan_moments = {{8, 0, 1}, {8, kNaN, 1}, {8, 0, 1}};
  this->expect_rejected(
      [&] {
        normkit::batch_norm_update_running<T>(nan_moments, {this->running_mean, this->running_var, &this->batches});
      },
      kRuntime, {"channel 1 contains NaN"});
}

// Forward-training writes the running and saved statistics on the threads that
// computed each block of channels (TrainingEpilogue) and puts them back when
// any block was faulty. On problems that the fast kernels split over two
// threads, in every form (rows in units, rows in phases, planes per channel,
// planes in pieces), a NaN in the last channel, which another thread than the
// first reports, must leave every channel's statistics and the counter as they
// were, for BN and BN+ReLU; a clean call must then still update all of them.
TEST(RejectedRunningStatistics, AFaultOnAnyThreadPutsEveryChannelBack) {
  const ThreadCount threads(2);
  struct Shape {
    std::vector<int64_t> dims;  // in the layout's order
    normkit::Layout layout;
  };
  const std::vector<Shape> shapes = {{{256, 1024}, normkit::Layout::NC},
                                     {{32, 4096}, normkit::Layout::NC},
                                     {{4096, 96}, normkit::Layout::NC},
                                     {{16, 16, 16, 64}, normkit::Layout::NHWC},
                                     {{8, 64, 32, 32}, normkit::Layout::NCHW},
                                     {{16, 128, 7, 7}, normkit::Layout::NCHW}};
  for (const Shape& shape : shapes) {
    int64_t numel = 1;
    for (const int64_t d : shape.dims) numel *= d;
    const int64_t C = shape.layout == normkit::Layout::NHWC ? shape.dims[3] : shape.dims[1];
    std::vector<float> x(static_cast<size_t>(numel)), y(x.size());
    std::vector<uint8_t> mask(static_cast<size_t>(normkit::relu_mask_bytes(numel)));
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 1000) * 1e-3f;
    const size_t last = x.size() - 1;  // in each of these dense layouts, of channel C-1
    const auto xv = normkit::ConstTensorView<float>::contiguous(x.data(), shape.dims, shape.layout);
    const auto yv = normkit::TensorView<float>::contiguous(y.data(), shape.dims, shape.layout);
    for (const bool fused : {false, true}) {
      SCOPED_TRACE(std::to_string(shape.dims[0]) + "x" + std::to_string(C) + " " +
                   std::string(normkit::to_string(shape.layout)) + (fused ? " BN+ReLU" : " BN"));
      auto call = [&](normkit::RunningStats<float> running, normkit::SavedStats<float> saved) {
        if (fused)
          normkit::batch_norm_relu_forward_training<float>(xv, yv, mask, {}, {}, saved, running);
        else
          normkit::batch_norm_forward_training<float>(xv, yv, {}, {}, saved, running);
      };
      const std::vector<float> rm0(C, 0.25f), rv0(C, 4.0f), sm0(C, 7.0f), si0(C, 9.0f);
      std::vector<float> rm = rm0, rv = rv0, sm = sm0, si = si0;
      int64_t batches = 3;
      x[last] = std::numeric_limits<float>::quiet_NaN();
      EXPECT_TRUE(throws_error([&] { call({rm, rv, &batches}, {sm, si}); }, kRuntime,
                               {"x: channel " + std::to_string(C - 1) + " contains NaN"}));
      EXPECT_EQ(rm, rm0);
      EXPECT_EQ(rv, rv0);
      EXPECT_EQ(sm, sm0);
      EXPECT_EQ(si, si0);
      EXPECT_EQ(batches, 3);
      EXPECT_TRUE(throws_error([&] { call({}, {sm, si}); }, kRuntime,
                               {"x: channel " + std::to_string(C - 1) + " contains NaN"}));
      EXPECT_EQ(sm, sm0);
      EXPECT_EQ(si, si0);
      x[last] = 0.5f;
      call({rm, rv, &batches}, {sm, si});
      EXPECT_EQ(batches, 4);
      for (int64_t c = 0; c < C; ++c)
        if (rm[c] == rm0[c] || rv[c] == rv0[c] || sm[c] == sm0[c] || si[c] == si0[c]) {
          ADD_FAILURE() << "channel " << c << " not updated by a clean batch";
          break;
        }
    }
  }
}

// A finite float32 batch whose variance is beyond float32's range (two values
// ±1.414e19 per channel: unbiased variance 4e38 > 3.4e38) would make the running
// variance infinite with momentum 1 (PyTorch lets it). Every entry point that
// updates running statistics refuses it and changes no statistic and no counter.
TEST(RejectedRunningStatistics, AVarianceBeyondFloatRangeIsRefusedEverywhere) {
  std::vector<float> x = {1.414e19f, -1.414e19f}, y(2), z(2, 0.0f);
  std::vector<uint8_t> mask(1);
  const auto xv = normkit::ConstTensorView<float>::contiguous(x.data(), {2, 1}, normkit::Layout::NC);
  const auto yv = normkit::TensorView<float>::contiguous(y.data(), {2, 1}, normkit::Layout::NC);
  const auto zv = normkit::ConstTensorView<float>::contiguous(z.data(), {2, 1}, normkit::Layout::NC);
  // instance norm: one sample, one channel, two positions
  const auto xi = normkit::ConstTensorView<float>::contiguous(x.data(), {1, 1, 2}, normkit::Layout::NCL);
  const auto yi = normkit::TensorView<float>::contiguous(y.data(), {1, 1, 2}, normkit::Layout::NCL);
  BatchNormOptions options;
  options.momentum = 1.0;
  const std::vector<std::pair<std::string, std::function<void(normkit::RunningStats<float>,
                                                              normkit::SavedStats<float>)>>>
      calls = {
          {"batch_norm_forward_training",
           [&](auto running, auto saved) {
             normkit::batch_norm_forward_training<float>(xv, yv, {}, {}, saved, running, options);
           }},
          {"batch_norm_relu_forward_training",
           [&](auto running, auto saved) {
             normkit::batch_norm_relu_forward_training<float>(xv, yv, mask, {}, {}, saved, running, options);
           }},
          {"batch_norm_add_relu_forward_training",
           [&](auto running, auto saved) {
             normkit::batch_norm_add_relu_forward_training<float>(xv, zv, yv, mask, {}, {}, saved, running,
                                                                  options);
           }},
          {"batch_renorm_forward_training",
           [&](auto running, auto saved) {
             normkit::batch_renorm_forward_training<float>(xv, yv, {}, {}, {saved.mean, saved.invstd, {}, {}},
                                                           running, {}, options);
           }},
          {"ghost_batch_norm_forward_training",
           [&](auto running, auto saved) {
             normkit::ghost_batch_norm_forward_training<float>(xv, yv, {}, {}, 2, saved, running, options);
           }},
          {"instance_norm_forward_training",
           [&](auto running, auto) {
             normkit::instance_norm_forward_training<float>(xi, yi, {}, {}, {}, running, options);
           }},
          {"batch_norm_update_running",
           [&](auto running, auto) {
             const std::vector<Moments> moments = {{2, 0, 2 * 1.414e19 * 1.414e19}};
             normkit::batch_norm_update_running<float>(moments, running, options);
           }},
      };
  for (const auto& entry : calls) {
    SCOPED_TRACE(entry.first);
    const auto& call = entry.second;  // (not a structured binding: clang 14 cannot capture those)
    std::vector<float> rm = {0.5f}, rv = {2.0f}, save_mean = {7.0f}, save_invstd = {9.0f};
    int64_t batches = 3;
    EXPECT_TRUE(throws_error([&] { call({rm, rv, &batches}, {save_mean, save_invstd}); }, kRuntime,
                             {"channel 0 would make the running variance", "beyond the range of float32",
                              "running statistics left unchanged"}));
    EXPECT_EQ(rm, std::vector<float>{0.5f});
    EXPECT_EQ(rv, std::vector<float>{2.0f});
    EXPECT_EQ(batches, 3);
    EXPECT_EQ(save_mean, std::vector<float>{7.0f});
    EXPECT_EQ(save_invstd, std::vector<float>{9.0f});
  }
  // With the default momentum 0.1 the same batch is representable and updates them.
  std::vector<float> rm = {0.5f}, rv = {2.0f};
  normkit::batch_norm_forward_training<float>(xv, yv, {}, {}, {}, {rm, rv, nullptr});
  EXPECT_TRUE(std::isfinite(rv[0]) && rv[0] > 1e37f) << rv[0];
}

TEST(RejectedSettings, SetNumThreadsNeedsAtLeastOne) {
  const int before = normkit::num_threads();
  for (const int n : {0, -3}) {
    EXPECT_TRUE(throws_error([&] { normkit::set_num_threads(n); }, ErrorKind::invalid_argument,
                             {"set_num_threads", ">= 1", "got " + std::to_string(n)}));
    EXPECT_EQ(normkit::num_threads(), before);
  }
}

TEST(RejectedSettings, UnknownLayoutName) {
  EXPECT_TRUE(throws_error([] { (void)normkit::layout_from_string("XYZ"); },
                           ErrorKind::invalid_argument, {"layout", "'XYZ'"}));
}

}  // namespace
