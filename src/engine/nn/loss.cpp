#include <cmath>
#include <vector>

#include "normkit/engine/nn.hpp"
#include "support.hpp"

namespace normkit::nn {

// loss = mean_n (logsumexp(z_n) - z_n[label_n]);  dL/dz_n = (softmax(z_n) - onehot_n) / N.
LossResult softmax_cross_entropy(const Tensor& logits, const int32_t* labels, Tensor* dlogits) {
  if (logits.shape.size() != 2) engine::fail_invalid("loss: logits must be [N, classes]");
  const int64_t n = logits.shape[0], k = logits.shape[1];
  if (dlogits) dlogits->reshape({n, k}, MemoryFormat::channels_first);
  LossResult result;
  std::vector<double> exps(static_cast<size_t>(k));  // exp(z - max), taken once per value
  for (int64_t i = 0; i < n; ++i) {
    const float* z = logits.data.data() + i * k;
    const int32_t label = labels[i];
    if (label < 0 || label >= k)
      engine::fail_invalid("loss: label ", label, " out of range [0, ", k, ")");
    int64_t best = 0;
    for (int64_t j = 1; j < k; ++j)
      if (z[j] > z[best]) best = j;
    const double max = z[best];
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      exps[j] = std::exp(z[j] - max);
      sum += exps[j];
    }
    result.loss += std::log(sum) + max - z[label];
    result.correct += best == label;
    if (dlogits) {
      float* g = dlogits->data.data() + i * k;
      for (int64_t j = 0; j < k; ++j)
        g[j] = static_cast<float>((exps[j] / sum - (j == label ? 1.0 : 0.0)) /
                                  static_cast<double>(n));
    }
  }
  result.loss /= static_cast<double>(n);
  return result;
}

}  // namespace normkit::nn
