// The training engine through an installed normkit (normkit::engine): a small
// model learns a separable two-class problem, and its checkpoint survives a
// round trip through bytes (zlib's crc32). Uses the engine's private
// dependencies (oneDNN for the matrix products, zlib) only through the engine.
#include <cmath>
#include <cstdio>
#include <vector>

#include <normkit/engine/checkpoint.hpp>
#include <normkit/engine/nn.hpp>
#include <normkit/engine/train.hpp>

bool engine_ok() {
  namespace nn = normkit::nn;
  // 64 samples of 4 features; the class is the sign of feature 0 (+ small, fixed noise).
  normkit::data::Dataset set;
  set.sample_shape = {4};
  set.num_classes = 2;
  for (int i = 0; i < 64; ++i) {
    const float a = static_cast<float>((i * 37) % 64) / 32.0f - 1.0f + 1.0f / 64;
    set.features.insert(set.features.end(), {a, 0.25f * std::sin(static_cast<float>(i)),
                                             0.5f, static_cast<float>(i % 3)});
    set.labels.push_back(a > 0 ? 1 : 0);
  }
  nn::Model model(nn::ModelSpec::parse("input 4; linear 8 bias=0; batchnorm; relu; linear 2"));
  model.initialize({}, 7);
  auto sgd = nn::make_sgd({0.1f, 0.9f}, model.parameters());
  double first = 0, last = 0;
  for (int epoch = 0; epoch < 20; ++epoch) {
    const double loss = normkit::train::train_epoch(model, *sgd, set, 16, 3, epoch).loss;
    (epoch == 0 ? first : last) = loss;
  }
  const auto evaluation = normkit::train::evaluate(model, set);
  const auto checkpoint =
      normkit::io::make_checkpoint(model, sgd.get(), {}, {20, 3, 16, "", {}});
  const auto restored = normkit::io::from_bytes(normkit::io::to_bytes(checkpoint), "memory");
  const auto again = normkit::train::evaluate(*normkit::io::build_model(restored), set);
  const bool ok = std::isfinite(last) && last < first && evaluation.accuracy >= 0.9 &&
                  again.loss == evaluation.loss;
  std::printf("engine: loss %.4f -> %.4f, accuracy %.3f, checkpoint round trip %s\n", first, last,
              evaluation.accuracy, again.loss == evaluation.loss ? "exact" : "DIFFERENT");
  return ok;
}
