#pragma once
// The training engine: layers with forward and backward, a sequential model
// built from a text spec, softmax cross-entropy, SGD and Adam.
//
// Activations are float tensors with a logical shape [N, C] or [N, C, H, W]
// stored channels-first or channels-last (MemoryFormat). Matrix multiply and
// convolution run on oneDNN; batch normalization runs on normkit's kernels.
#include <cstdint>
#include <iosfwd>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "normkit/batch_norm.hpp"
#include "normkit/tensor.hpp"

namespace normkit::dist {
class Communicator;  // distributed.hpp
}

namespace normkit::nn {

enum class Mode { train, eval };
enum class MemoryFormat { channels_first, channels_last };

struct Tensor {
  std::vector<int64_t> shape;  // logical: [N, C] or [N, C, H, W]
  MemoryFormat format = MemoryFormat::channels_first;
  std::vector<float> data;

  int64_t numel() const noexcept;
  // Sets shape and format and sizes data (keeping its capacity).
  void reshape(std::vector<int64_t> new_shape, MemoryFormat new_format);
  // A view with the logical axis order (NC or NCHW) and the strides of `format`.
  TensorView<float> view();
  TensorView<const float> view() const;
};

struct Parameter {
  std::string name;  // "weight", "bias"
  std::vector<float> value, grad;
};

// A named non-trained state array (BN running statistics).
struct Buffer {
  std::string name;
  std::vector<float>* values;
};

enum class Init { he, xavier, normal };
struct InitOptions {
  Init kind = Init::he;
  float normal_std = 0.01f;  // for Init::normal
};

class Layer {
 public:
  virtual ~Layer() = default;
  virtual std::string type() const = 0;      // "linear", "conv", "batchnorm", ...
  virtual std::string describe() const = 0;  // "linear(784 -> 100, bias)"
  // Checks the input shape (throws normkit::Error naming the layer) and gives the output shape.
  virtual std::vector<int64_t> output_shape(const std::vector<int64_t>& input) const = 0;
  // In train mode, keeps what backward needs.
  virtual const Tensor& forward(const Tensor& x, Mode mode) = 0;
  // dL/dy -> dL/dx; adds parameter gradients to Parameter::grad. With
  // need_input_grad false (the first layer) dx is not computed and the
  // returned tensor is empty.
  virtual const Tensor& backward(const Tensor& dy, bool need_input_grad) = 0;
  virtual std::vector<Parameter*> parameters() { return {}; }
  virtual std::vector<Buffer> buffers() { return {}; }
  virtual void initialize(const InitOptions&, std::mt19937_64&) {}
  // Randomness in forward (dropout) is a function of (seed, step), so a resumed
  // run draws what an uninterrupted one would.
  virtual void set_step(uint64_t /*seed*/, uint64_t /*step*/) {}
  // Batch-norm layers (batchnorm, batchrenorm, ghostbatchnorm): frozen, they use
  // their running statistics in training too and never update them, while γ and β
  // still learn. Returns false for layers that have no such mode.
  virtual bool set_frozen(bool /*frozen*/) { return false; }
  // Data-parallel training (distributed.hpp): this process's batch holds samples
  // [first_sample, ...) of the global batch. Randomness drawn per element
  // (dropout) is then the global batch's, as one process would draw it.
  virtual void set_batch_offset(int64_t /*first_sample*/) {}
  // Synchronized batch norm: from now on the layer's batch statistics are those
  // of the global batch, merged across `group` (nullptr: this process's batch
  // again). Returns the number of batch-norm layers set (0 for layers without
  // such a mode; a residual block counts its own).
  virtual int set_batch_sync(dist::Communicator* /*group*/) { return 0; }
};

// What a model takes in memory, computed from its spec alone (ModelSpec::size:
// nothing is allocated), so that an absurd spec is refused before it exhausts
// the machine.
struct ModelSize {
  int64_t parameters = 0;   // trained values; each also has a gradient
  int64_t buffers = 0;      // running statistics
  int64_t activations = 0;  // floats per sample that training keeps: every layer's
                            // output and input gradient, the convolutions'
                            // per-chunk weight gradients, max-pooling positions
  // Parameters, their gradients and up to two optimizer values each (Adam's
  // moments), the buffers, and the activations of a batch, in bytes.
  double training_bytes(int64_t batch) const;
  // "43.2 GB (parameters, gradients and optimizer state 9.6 GB, activations for
  // a batch of 128 33.6 GB)"
  std::string describe(int64_t batch) const;
};
// The memory of this machine (physical RAM), in bytes.
double physical_memory_bytes();
// "1.5 GB", "340 MB".
std::string byte_text(double bytes);

// A model spec: one layer per line or ';'-separated, e.g.
//   input 1 28 28; conv 32 3 pad=1 bias=0; batchnorm; relu; maxpool 2;
//   flatten; linear 128 bias=0; batchnorm; relu; linear 10
// Layers: input C [H W], linear OUT [bias=0|1], conv OUT K [stride=S] [pad=P] [bias=0|1],
// maxpool K [stride=S], avgpool K [stride=S], relu, sigmoid, tanh, dropout P, flatten,
// batchnorm [eps=E] [momentum=M] [frozen=0|1],
// batchrenorm [eps=E] [momentum=M] [rmax=R] [dmax=D] [warmup=STEPS] [frozen=0|1]
//   (Batch Renormalization; rmax 1 -> R and dmax 0 -> D linearly over STEPS training steps;
//   defaults 3, 5, 500),
// ghostbatchnorm [eps=E] [momentum=M] [size=S] [frozen=0|1] (Ghost BN, virtual batches of S
//   samples, default 32; every virtual batch, the last included, needs more than one value
//   per channel). frozen=1: running statistics used in training too and never updated.
// layernorm [eps=E] (over all of a sample's features), rmsnorm [eps=E] (RMS normalization over
//   them: no centering, no β; eps defaults to float's machine epsilon, as torch.nn.RMSNorm),
//   groupnorm [groups=G] [eps=E],
// instancenorm [eps=E] [momentum=M]. The batch-norm layers also take noise=S: "noisy BN"
//   (Santurkar et al. 2018), a random per-element scale and shift after the normalization
//   whose distribution changes every training step (batch_norm_layers.cpp).
// A residual block: "residual; LAYERS...; [shortcut; LAYERS...;] end" computes
// relu(body(x) + shortcut(x)), the shortcut the identity when not given; a body
// ending in batchnorm runs its BN, the sum and the ReLU fused (BN+Add+ReLU).
// docs/model-spec.md documents all of it, with the JSON form of specs.
struct ModelSpec {
  struct LayerSpec {
    std::string type;
    std::vector<std::string> args;  // positional
    std::map<std::string, std::string> options;
    std::vector<LayerSpec> body, shortcut;  // a residual block's layers
    bool operator==(const LayerSpec&) const = default;
  };
  std::vector<int64_t> input_shape;  // [C] or [C, H, W]
  std::vector<LayerSpec> layers;

  // The text above, or the same as JSON: {"input": [1, 28, 28], "layers": ["conv 32 3
  // pad=1", {"type": "batchnorm", "args": [], "options": {"momentum": 0.1}}, ...]}
  // (a layer a line of text or an object). Throws normkit::Error naming the statement.
  static ModelSpec parse(const std::string& text_or_json);
  static ModelSpec preset(const std::string& name);  // "mlp-paper", "cnn-small"
  // A plain MLP for samples of `input_shape` and `classes` outputs, from
  // comma-separated options (defaults in brackets): depth=L hidden layers [3],
  // width=W [100], act=relu|sigmoid|tanh [relu], bn=before|after the activation
  // or none in the hidden layers [before], dropout=P after each hidden layer [0],
  // input_bn=0|1: a batchnorm on the inputs [0]. "depth=3,width=100,act=sigmoid" is mlp-paper.
  static ModelSpec mlp(const std::string& options, const std::vector<int64_t>& input_shape,
                       int64_t classes);
  std::string to_string() const;                     // parse(to_string()) == *this
  // The same model without its normalization layers; a layer that fed one gets
  // its bias back (the normalization's β made it redundant).
  ModelSpec without_batch_norm() const;
  // The same model with each batchnorm layer replaced (the --norm switch):
  //   batch: as given; none: without_batch_norm(); frozen: batchnorm frozen=1;
  //   renorm: batchrenorm; ghost: ghostbatchnorm; layer: layernorm;
  //   group: groupnorm with the most groups up to 32 that divide the channels
  //   (at least two channels per group on flat features);
  //   instance: instancenorm, except after a flat layer
  //   ([N, C] has one value per sample and channel: nothing to normalize), where
  //   the batchnorm is dropped as with none; noisy: batchnorm noise=1. eps and momentum carry over where
  //   the new layer takes them. Throws normkit::Error for an unknown name.
  ModelSpec with_norm(const std::string& norm) const;
  static const std::vector<std::string>& norm_kinds();
  // The sizes of its model, with overflow-checked arithmetic (a size that does not
  // fit in 64 bits is a normkit::Error naming the layer). Layers up to the first
  // one whose input does not suit it: building the model names that problem.
  ModelSize size() const;
  bool operator==(const ModelSpec&) const = default;
};

class Model {
 public:
  // Refuses (normkit::Error, runtime) a spec whose parameters, gradients and
  // buffers alone would not fit in this machine's memory, before allocating.
  Model(const ModelSpec& spec, MemoryFormat format = MemoryFormat::channels_first);
  const ModelSpec& spec() const noexcept { return spec_; }
  MemoryFormat format() const noexcept { return format_; }

  void initialize(const InitOptions& options, uint64_t seed);
  // first_sample: where this process's batch starts in the global batch
  // (data-parallel training; Layer::set_batch_offset).
  void set_step(uint64_t seed, uint64_t step, int64_t first_sample = 0);
  // x: [N, ...input_shape] in the model's format. Returns logits [N, classes].
  // In train mode a batchnorm followed by relu runs as one pass (the fused
  // batch_norm_relu kernels, the ReLU mask kept as bits); the relu layer is
  // then skipped and keeps no output of its own. A "maxpool 2" after that relu
  // joins the pass too (batchnorm, relu and 2×2 max pooling: the relu's output
  // is never written; synchronized BN too), and is skipped likewise. Frozen or
  // noisy BN runs the separate layers. Without a batchnorm, "relu; maxpool K"
  // runs as one pass (the pooling, then the ReLU of each maximum).
  const Tensor& forward(const Tensor& x, Mode mode);
  void backward(const Tensor& dlogits);
  void zero_grad();
  // Freezes every batch-norm layer (batchnorm, batchrenorm, ghostbatchnorm): from now
  // on they normalize with their running statistics in training too, never update
  // them, and still train γ and β. The spec records it (frozen=1), so checkpoints
  // and to_string() keep it. Returns the number of layers frozen.
  int freeze_batch_norm();
  // Synchronized batch norm across `group` (nullptr: off): every batchnorm layer
  // normalizes with the statistics of the global batch (all ranks' shards), as
  // one process with the whole batch would. Ghost BN keeps its virtual batches
  // within each rank's shard; batch renormalization has no synchronized form
  // (normkit::Error). Returns the number of layers synchronized.
  int synchronize_batch_norm(dist::Communicator* group);

  std::vector<Parameter*> parameters();
  // Parameters and buffers by qualified name ("3.weight", "4.running_mean").
  std::vector<std::pair<std::string, std::vector<float>*>> state();
  int64_t parameter_count();
  std::string summary();
  const std::vector<std::unique_ptr<Layer>>& layers() const noexcept { return layers_; }

 private:
  ModelSpec spec_;
  MemoryFormat format_;
  std::vector<std::unique_ptr<Layer>> layers_;
};

// The matrix products' kernels, compiled on a thread of its own while the
// program does other start-up work (loading data). Without it, oneDNN's
// sgemm compiles its kernels in the first backward of a process: 25 ms,
// about 5% of a mlp-paper epoch. The thread takes no signals; a failure
// there is left for the products themselves to report. Destruction waits.
class KernelWarmUp {
 public:
  KernelWarmUp();
  ~KernelWarmUp();
  KernelWarmUp(const KernelWarmUp&) = delete;
  KernelWarmUp& operator=(const KernelWarmUp&) = delete;

 private:
  std::thread thread_;
};

// Mean softmax cross-entropy over the batch; writes dL/dlogits and returns the
// loss. Also counts correct argmax predictions.
struct LossResult {
  double loss = 0;
  int64_t correct = 0;
};
LossResult softmax_cross_entropy(const Tensor& logits, const int32_t* labels, Tensor* dlogits);

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // One update from the parameters' gradients.
  void step(const std::vector<Parameter*>& parameters) { update(parameters, false); }
  // step(), then every gradient set to zero as it is read: what step() and
  // Model::zero_grad() do, with one pass over the gradients less.
  void step_and_zero_grad(const std::vector<Parameter*>& parameters) { update(parameters, true); }
  virtual std::string name() const = 0;
  // Optimizer state (momentum buffers, Adam moments, step count) for checkpoints.
  virtual std::vector<std::vector<float>*> state() = 0;
  virtual int64_t& steps() = 0;
  // The hyper-parameters by name ("lr" is the current learning_rate), so a
  // checkpoint can rebuild the optimizer (normkit::io::make_optimizer).
  virtual std::map<std::string, double> options() const { return {{"lr", learning_rate}}; }
  float learning_rate = 0.01f;

 protected:
  virtual void update(const std::vector<Parameter*>& parameters, bool zero_grad) = 0;
};

struct SgdOptions {
  float lr = 0.01f, momentum = 0.0f, weight_decay = 0.0f;
  bool nesterov = false;
};
struct AdamOptions {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.0f;
};
std::unique_ptr<Optimizer> make_sgd(const SgdOptions& options, const std::vector<Parameter*>& parameters);
std::unique_ptr<Optimizer> make_adam(const AdamOptions& options, const std::vector<Parameter*>& parameters);

}  // namespace normkit::nn
