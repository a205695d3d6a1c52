#include <gtest/gtest.h>
#include <vector>
#include "normkit/normkit.hpp"
TEST(Smoke, ForwardTrainingMeanIsZero) {
  std::vector<float> x = {1, 2, 3, 4}, y(4), mean(1), invstd(1);
  auto xv = normkit::TensorView<float>::contiguous(x.data(), {4, 1}, normkit::Layout::NC);
  auto yv = normkit::TensorView<float>::contiguous(y.data(), {4, 1}, normkit::Layout::NC);
  normkit::batch_norm_forward_training<float>(xv, yv, {}, {}, {mean, invstd}, {});
  EXPECT_FLOAT_EQ(mean[0], 2.5f);
  EXPECT_NEAR(y[0] + y[3], 0.0f, 1e-6);
}
