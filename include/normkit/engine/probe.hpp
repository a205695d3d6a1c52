#pragma once
// Probes: what a model's layers do on a fixed probe batch, measured without
// changing the model (parameters, gradients' meaning, running statistics and
// every other buffer are as they were afterwards). The lab's experiments read
// them (the BN paper's Figure 1 percentiles, gradient flow by depth,
// Santurkar et al.'s internal-covariate-shift measure); `normkit train
// --probe-every K` writes them to steps.jsonl.
#include <cstdint>
#include <string>
#include <vector>

#include "normkit/engine/nn.hpp"

namespace normkit::probe {

struct Options {
  int64_t units = 4;  // units (channels) per activation layer whose percentiles are kept
  std::vector<double> percentiles = {15, 50, 85};
  bool gradients = true;  // per-layer weight-gradient norms
  // Santurkar et al. 2018's gradient ICS per weight layer i: G = ∂L/∂W_i with all
  // layers at θ; G' = the same after the layers before i took a plain gradient
  // step θ_j − lr·∂L/∂θ_j. Costs one forward and backward per weight layer.
  bool ics = false;
  double ics_lr = 0.1;
};

// One activation layer's input (the pre-activation) and output over the batch.
struct ActivationStats {
  size_t layer = 0;          // index in the model
  std::string type;          // relu, sigmoid, tanh
  int64_t units = 0;         // channels
  double input_mean = 0, input_std = 0;  // over all units and samples
  // percentiles[u][p]: percentile p of unit u's input over samples (and positions).
  std::vector<std::vector<double>> percentiles;
  double output_mean = 0;
  double dead_fraction = 0;  // units whose output is 0 for every probe sample
};

// A batch-norm layer's statistics on the probe batch, over channels.
struct NormStats {
  size_t layer = 0;
  std::string type;
  double batch_mean_abs = 0, batch_var = 0;      // mean over channels of |μ_B| and σ²_B of its input
  double running_mean_abs = 0, running_var = 0;  // the same of its running statistics
  std::vector<double> gamma, beta;               // of the first Options::units channels
};

struct WeightLayerStats {
  size_t layer = 0;
  std::string type;               // linear, conv
  double grad_norm = 0;           // ‖∂L/∂W‖₂
  double weight_norm = 0;         // ‖W‖₂
  double ics_distance = -1;       // ‖G − G'‖₂ / ‖G‖₂ (−1: not measured)
  double ics_cosine = 2;          // cos(G, G') (2: not measured)
};

struct Result {
  double loss = 0, accuracy = 0;  // on the probe batch, in train mode
  std::vector<ActivationStats> activations;
  std::vector<NormStats> norms;
  std::vector<WeightLayerStats> weights;
};

// Runs the probe on `batch` (a tensor in the model's format) with `labels`, in
// train mode (batch statistics, as training sees them). Restores every buffer
// and parameter and zeroes the gradients before returning.
Result run(nn::Model& model, const nn::Tensor& batch, const std::vector<int32_t>& labels,
           const Options& options);

}  // namespace normkit::probe
