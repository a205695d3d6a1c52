// PyTorch's CPU batch and layer normalization (libtorch 1.13), called in this process
// through the ATen ops nn.BatchNorm2d reaches: native_batch_norm (training:
// saves mean/invstd and updates running statistics; eval: running statistics)
// and native_batch_norm_backward with all three gradients. Inputs wrap the
// harness's buffers (from_blob, same pages as every other library); outputs are
// allocated by PyTorch on each call, as they are in a training step.
//
// Only per-operator headers: <ATen/ATen.h> or <torch/torch.h> would triple the
// compile time of this file.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/native_batch_norm.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/native_group_norm.h>
#include <ATen/ops/native_group_norm_backward.h>
#include <torch/version.h>

#include <cstdio>
#include <memory>
#include <tuple>

#include "harness.hpp"

namespace normkit_bench {
namespace {

constexpr double kMomentum = 0.1;
constexpr double kEps = 1e-5;

struct State {
  at::Tensor x, dy, weight, bias, running_mean, running_var;
  at::Tensor eval_mean, eval_var;     // inference's statistics, which training leaves alone
  at::Tensor save_mean, save_invstd;  // from the last forward-training
  at::Tensor out;                     // the last call's output, kept alive as a caller would

  void forward_training() {
    std::tie(out, save_mean, save_invstd) = at::native_batch_norm(
        x, weight, bias, running_mean, running_var, /*training=*/true, kMomentum, kEps);
  }
  void backward() {
    out = std::get<0>(at::native_batch_norm_backward(dy, x, weight, running_mean, running_var,
                                                     save_mean, save_invstd, /*train=*/true, kEps,
                                                     {true, true, true}));
  }
  void inference() {
    out = std::get<0>(at::native_batch_norm(x, weight, bias, eval_mean, eval_var,
                                            /*training=*/false, kMomentum, kEps));
  }
};

at::Tensor wrap(const Buffer& buffer, at::IntArrayRef sizes, at::IntArrayRef strides) {
  return at::from_blob(buffer.data(), sizes, strides, at::TensorOptions().dtype(at::kFloat));
}

std::vector<Case> batch_norm_cases(Data& data) {
  const Problem& p = data.problem;
  const std::vector<int64_t> strides = p.strides();
  const std::vector<int64_t> channel_size = {p.channels()};
  auto s = std::make_shared<State>();
  s->x = wrap(data.x, p.sizes, strides);
  s->dy = wrap(data.dy, p.sizes, strides);
  // Per-channel tensors are PyTorch's own copies: forward-training updates the running ones.
  s->weight = wrap(data.gamma, channel_size, {1}).clone();
  s->bias = wrap(data.beta, channel_size, {1}).clone();
  s->running_mean = wrap(data.running_mean, channel_size, {1}).clone();
  s->running_var = wrap(data.running_var, channel_size, {1}).clone();
  s->eval_mean = s->running_mean.clone();
  s->eval_var = s->running_var.clone();
  s->forward_training();  // the saved statistics the backward case uses

  std::string note =
      p.memory == Memory::channels_last && p.rank() > 2 ? "channels_last" : "contiguous";
  const auto out = [s] { return static_cast<const float*>(s->out.data_ptr<float>()); };
  return {
      {"torch", Op::clone, note + ", x.clone(): allocates", [s] { s->out = s->x.clone(); },
       nullptr},
      {"torch", Op::forward_training, note, [s] { s->forward_training(); }, out},
      {"torch", Op::backward, note, [s] { s->backward(); }, out},
      {"torch", Op::forward_backward, note,
       [s] {
         s->forward_training();
         s->backward();
       },
       out},
      {"torch", Op::inference, note, [s] { s->inference(); }, out},
  };
}

// torch.nn.LayerNorm(C) on [N, C]: native_layer_norm (saves mean and rstd) and
// native_layer_norm_backward with all three gradients.
struct LayerNormState {
  at::Tensor x, dy, weight, bias, mean, rstd, out;
  std::vector<int64_t> normalized_shape;

  void forward() {
    std::tie(out, mean, rstd) = at::native_layer_norm(x, normalized_shape, weight, bias, kEps);
  }
  void backward() {
    out = std::get<0>(at::native_layer_norm_backward(dy, x, normalized_shape, mean, rstd, weight,
                                                     bias, {true, true, true}));
  }
};

std::vector<Case> layer_norm_cases(Data& data) {
  const Problem& p = data.problem;
  const std::vector<int64_t> cols = {p.channels()};
  auto s = std::make_shared<LayerNormState>();
  s->x = wrap(data.x, p.sizes, p.strides());
  s->dy = wrap(data.dy, p.sizes, p.strides());
  s->weight = wrap(data.gamma, cols, {1}).clone();
  s->bias = wrap(data.beta, cols, {1}).clone();
  s->normalized_shape = cols;
  s->forward();  // the saved statistics the backward case uses
  const auto out = [s] { return static_cast<const float*>(s->out.data_ptr<float>()); };
  return {
      {"torch", Op::clone, "x.clone(): allocates", [s] { s->out = s->x.clone(); }, nullptr},
      {"torch", Op::forward_training, "native_layer_norm", [s] { s->forward(); }, out},
      {"torch", Op::backward, "native_layer_norm_backward", [s] { s->backward(); }, out},
      {"torch", Op::forward_backward, "",
       [s] {
         s->forward();
         s->backward();
       },
       out},
  };
}

// relu(bn(x)) and relu(bn(x) + z) as a PyTorch model runs them (torchvision's
// BasicBlock: out = bn(x); out += identity; out = relu(out), the last two in
// place), and autograd's backward: threshold_backward(dy, y, 0) (= dz), then
// native_batch_norm_backward.
struct FusedState : State {
  bool add = false;
  at::Tensor z, y, g;

  void fused_forward() {
    at::Tensor bn;
    std::tie(bn, save_mean, save_invstd) = at::native_batch_norm(
        x, weight, bias, running_mean, running_var, /*training=*/true, kMomentum, kEps);
    if (add) bn.add_(z);
    y = at::relu_(bn);
    out = y;
  }
  void fused_backward() {
    g = at::threshold_backward(dy, y, 0);
    out = std::get<0>(at::native_batch_norm_backward(g, x, weight, running_mean, running_var,
                                                     save_mean, save_invstd, /*train=*/true, kEps,
                                                     {true, true, true}));
  }
};

std::vector<Case> fused_cases(Data& data, bool add) {
  const Problem& p = data.problem;
  const std::vector<int64_t> strides = p.strides();
  const std::vector<int64_t> channel_size = {p.channels()};
  auto s = std::make_shared<FusedState>();
  s->add = add;
  s->x = wrap(data.x, p.sizes, strides);
  s->dy = wrap(data.dy, p.sizes, strides);
  s->z = wrap(data.dy, p.sizes, strides).clone();  // own pages, dy's values (as normkit's)
  s->weight = wrap(data.gamma, channel_size, {1}).clone();
  s->bias = wrap(data.beta, channel_size, {1}).clone();
  s->running_mean = wrap(data.running_mean, channel_size, {1}).clone();
  s->running_var = wrap(data.running_var, channel_size, {1}).clone();
  s->fused_forward();

  std::string note = std::string(p.memory == Memory::channels_last ? "channels_last" : "contiguous") +
                     (add ? ", bn, add_, relu_" : ", bn, relu_") +
                     "; bwd: threshold_backward, bn bwd" +
                     // A pre-activation within float rounding of 0 may take the other side of
                     // the ReLU in PyTorch (its channels_last statistics are summed in float):
                     // those few elements make the backward diff large.
                     (p.memory == Memory::channels_last ? " (diff: ReLU kink flips)" : "");
  // Read back in the problem's memory order (the cross-check only; not timed):
  // threshold_backward's output need not keep dy's channels_last strides.
  const auto format = p.memory == Memory::channels_last && p.rank() == 4 ? at::MemoryFormat::ChannelsLast
                                                                         : at::MemoryFormat::Contiguous;
  const auto out = [s, format] {
    s->out = s->out.contiguous(format);
    return static_cast<const float*>(s->out.data_ptr<float>());
  };
  return {
      {"torch", Op::forward_training, note, [s] { s->fused_forward(); }, out},
      {"torch", Op::backward, note, [s] { s->fused_backward(); }, out},
      {"torch", Op::forward_backward, note,
       [s] {
         s->fused_forward();
         s->fused_backward();
       },
       out},
  };
}

// GroupNorm(32) through the ATen ops nn.GroupNorm reaches: native_group_norm
// (returns y and the per-(n, g) mean and rstd) and native_group_norm_backward.
constexpr int64_t kGroups = 32;

struct GroupNormState {
  at::Tensor x, dy, weight, bias, mean, rstd, out;
  int64_t n = 0, c = 0, hw = 0;

  void forward() { std::tie(out, mean, rstd) = at::native_group_norm(x, weight, bias, n, c, hw, kGroups, kEps); }
  bool channels_last = false;

  // libtorch 1.13's native_group_norm_backward gives wrong gradients for
  // channels_last x and dy (checked against its own contiguous results), so
  // they go in contiguous, as autograd's path does; the copies are timed, and
  // the result is turned back into channels_last (untimed) for the cross-check.
  void backward() {
    if (channels_last) {
      out = std::get<0>(at::native_group_norm_backward(dy.contiguous(), x.contiguous(), mean, rstd,
                                                       weight, n, c, hw, kGroups,
                                                       {true, true, true}));
    } else {
      out = std::get<0>(at::native_group_norm_backward(dy, x, mean, rstd, weight, n, c, hw,
                                                       kGroups, {true, true, true}));
    }
  }
  at::Tensor checked;
  const float* result() {
    checked = out.contiguous(channels_last ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous);
    return checked.data_ptr<float>();
  }
};

std::vector<Case> group_norm_cases(Data& data) {
  const Problem& p = data.problem;
  const std::vector<int64_t> strides = p.strides();
  const std::vector<int64_t> channel_size = {p.channels()};
  auto s = std::make_shared<GroupNormState>();
  s->x = wrap(data.x, p.sizes, strides);
  s->dy = wrap(data.dy, p.sizes, strides);
  s->weight = wrap(data.gamma, channel_size, {1}).clone();
  s->bias = wrap(data.beta, channel_size, {1}).clone();
  s->n = p.sizes[0];
  s->c = p.channels();
  s->hw = p.numel() / (s->n * s->c);
  s->channels_last = p.memory == Memory::channels_last && p.rank() > 2;
  s->forward();

  const std::string note = s->channels_last ? "channels_last" : "contiguous";
  const std::string backward_note =
      s->channels_last ? "channels_last; x, dy copied to contiguous (1.13's kernel is wrong on "
                         "channels_last)"
                       : note;
  const auto out = [s] { return s->result(); };
  return {
      {"torch", Op::forward_training, note, [s] { s->forward(); }, out},
      {"torch", Op::backward, backward_note, [s] { s->backward(); }, out},
      {"torch", Op::forward_backward, backward_note,
       [s] {
         s->forward();
         s->backward();
       },
       out},
  };
}

}  // namespace

Backend torch_backend() {
  return {"torch", TORCH_VERSION,
          // PyTorch's intra-op pool is OpenMP here (libgomp, shared with normkit
          // and oneDNN); at::set_num_threads sets it and records the count.
          [](int threads) {
            at::set_num_threads(threads);
            if (at::get_num_threads() != threads)
              std::printf("warning: torch runs %d threads, not %d\n", at::get_num_threads(),
                          threads);
          },
          [](Data& data) -> std::vector<Case> {
            const std::string& kind = data.problem.kind;
            if (kind == "bn1d" || kind == "bn2d" || kind == "bn3d") return batch_norm_cases(data);
            if (kind == "layer_norm") return layer_norm_cases(data);
            if (kind == "bn_relu") return fused_cases(data, false);
            if (kind == "bn_add_relu") return fused_cases(data, true);
            if (kind == "group_norm") return group_norm_cases(data);
            return {};
          }};
}

}  // namespace normkit_bench
