// Trains a model preset on Fashion-MNIST with the engine and prints one JSON
// line per epoch; scripts/compare_pytorch_speed.py times it against PyTorch.
//
//   train_fashion_mnist [--model mlp-paper|cnn-small] [--norm batch|none]
//       [--epochs 1] [--batch-size 128] [--lr 0.05] [--momentum 0.9]
//       [--format nchw|nhwc] [--threads N] [--seed 1] [--data DIR] [--no-standardize]
//
// Inputs are standardized per pixel (fitted on the training set), He
// initialization, SGD. "seconds" is the training time of the epoch only
// (batching, forward, loss, backward, optimizer step), not the evaluation.
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "normkit/engine/data.hpp"
#include "normkit/engine/nn.hpp"
#include "normkit/engine/train.hpp"
#include "normkit/standardizer.hpp"
#include "normkit/threading.hpp"

namespace {

[[noreturn]] void usage(const char* message) {
  std::fprintf(stderr, "train_fashion_mnist: %s\n", message);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_name = "cnn-small", norm = "batch", format = "nhwc";
  std::string directory = normkit::data::kFashionMnistDirectory;
  int64_t epochs = 1, batch_size = 128;
  double lr = 0.05, momentum = 0.9;
  int threads = 0;
  uint64_t seed = 1;
  bool standardize = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--no-standardize") {
      standardize = false;
      continue;
    }
    if (i + 1 >= argc) usage(("missing value for " + arg).c_str());
    const std::string value = argv[++i];
    if (arg == "--model") model_name = value;
    else if (arg == "--norm") norm = value;
    else if (arg == "--format") format = value;
    else if (arg == "--data") directory = value;
    else if (arg == "--epochs") epochs = std::stoll(value);
    else if (arg == "--batch-size") batch_size = std::stoll(value);
    else if (arg == "--lr") lr = std::stod(value);
    else if (arg == "--momentum") momentum = std::stod(value);
    else if (arg == "--threads") threads = std::stoi(value);
    else if (arg == "--seed") seed = std::stoull(value);
    else usage(("unknown option " + arg).c_str());
  }
  if (format != "nchw" && format != "nhwc") usage("--format must be nchw or nhwc");
  if (norm != "batch" && norm != "none") usage("--norm must be batch or none");
  try {
    if (threads > 0) {
      normkit::set_num_threads(threads);
      omp_set_num_threads(threads);
    }
    normkit::data::Dataset train, test;
    {
      // The matrix products' kernels compile on the other core meanwhile.
      const normkit::nn::KernelWarmUp warm_up;
      train = normkit::data::load_mnist_directory(directory, normkit::data::Split::train);
      test = normkit::data::load_mnist_directory(directory, normkit::data::Split::test);
    }
    if (standardize) {
      normkit::data::Standardizer s;
      s.fit(train.features, train.sample_size());
      s.transform(train.features);
      s.transform(test.features);
    }
    auto spec = normkit::nn::ModelSpec::preset(model_name);
    if (norm == "none") spec = spec.without_batch_norm();
    const auto memory_format = format == "nhwc" ? normkit::nn::MemoryFormat::channels_last
                                                : normkit::nn::MemoryFormat::channels_first;
    normkit::nn::Model model(spec, memory_format);
    model.initialize({normkit::nn::Init::he}, seed);
    auto sgd = normkit::nn::make_sgd({static_cast<float>(lr), static_cast<float>(momentum)},
                                     model.parameters());
    for (int64_t epoch = 0; epoch < epochs; ++epoch) {
      const auto result = normkit::train::train_epoch(model, *sgd, train, batch_size, seed, epoch);
      const auto eval = normkit::train::evaluate(model, test);
      std::printf(
          "{\"model\": \"%s\", \"format\": \"%s\", \"threads\": %d, \"epoch\": %lld, "
          "\"seconds\": %.4f, \"train_loss\": %.6f, \"train_acc\": %.6f, \"test_loss\": %.6f, "
          "\"test_acc\": %.6f}\n",
          model_name.c_str(), format.c_str(), normkit::num_threads(),
          static_cast<long long>(epoch + 1), result.seconds, result.loss, result.accuracy, eval.loss,
          eval.accuracy);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_fashion_mnist: %s\n", e.what());
    return 1;
  }
  return 0;
}
