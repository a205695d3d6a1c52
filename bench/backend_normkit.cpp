// normkit's batch normalization through its public API, as a user calls it:
// forward-training also saves the statistics and updates running ones, as
// PyTorch's does.
#include <algorithm>
#include <memory>
#include <vector>

#include "harness.hpp"
#include "normkit/normkit.hpp"

namespace normkit_bench {
namespace {

using normkit::Layout;
using normkit::TensorView;

// Channels-last problems use normkit's own channels-last layouts (NHWC, ...),
// sizes in memory order; channels-first ones the layout of their rank.
// (A logical NCHW view with channels_last strides collapses to the same
// geometry, so the kernels see the same problem either way.)
Layout layout_of(const Problem& p) {
  const bool last = p.memory == Memory::channels_last && p.rank() > 2;
  switch (p.rank()) {
    case 2:
      return Layout::NC;
    case 3:
      return last ? Layout::NLC : Layout::NCL;
    case 4:
      return last ? Layout::NHWC : Layout::NCHW;
    default:
      return last ? Layout::NDHWC : Layout::NCDHW;
  }
}

std::vector<int64_t> sizes_in_memory_order(const Problem& p) {
  std::vector<int64_t> sizes = p.sizes;
  if (p.memory == Memory::channels_last && p.rank() > 2)
    std::rotate(sizes.begin() + 1, sizes.begin() + 2, sizes.end());  // N, C, H, W -> N, H, W, C
  return sizes;
}

struct State {
  TensorView<float> x, dy, y, dx;
  std::vector<float> gamma, beta, running_mean, running_var, save_mean, save_invstd;
  std::vector<float> eval_mean, eval_var;  // inference's statistics, which training leaves alone
  std::vector<float> dgamma, dbeta;
  int64_t batches = 0;
  // The phases (--phases): the split API synchronized BN calls.
  std::vector<normkit::Moments> moments;
  std::vector<double> sum_dy, sum_dy_xhat;
  double count = 0;  // values per channel

  void forward_training() {
    normkit::batch_norm_forward_training<float>(x, y, gamma, beta, {save_mean, save_invstd},
                                                {running_mean, running_var, &batches});
  }
  void backward() {
    normkit::batch_norm_backward<float>(x, dy, dx, gamma, save_mean, save_invstd, dgamma, dbeta,
                                        normkit::BackwardMode::training);
  }
  void inference() {
    normkit::batch_norm_forward_inference<float>(x, y, gamma, beta, eval_mean, eval_var);
  }
  void statistics() { normkit::batch_norm_moments<float>(x, moments); }
  void forward_apply() {
    normkit::batch_norm_forward_apply<float>(x, y, gamma, beta, save_mean, save_invstd);
  }
  void backward_reduce() {
    normkit::batch_norm_backward_reduce<float>(x, dy, save_mean, save_invstd, sum_dy,
                                               sum_dy_xhat);
  }
  void backward_apply() {
    normkit::batch_norm_backward_apply<float>(x, dy, dx, gamma, save_mean, save_invstd, sum_dy,
                                              sum_dy_xhat, count);
  }
};

std::vector<Case> batch_norm_cases(Data& data) {
  const Problem& p = data.problem;
  const auto sizes = sizes_in_memory_order(p);
  const Layout layout = layout_of(p);
  const auto c = static_cast<size_t>(p.channels());
  auto s = std::make_shared<State>();
  s->x = TensorView<float>::contiguous(data.x.data(), sizes, layout);
  s->dy = TensorView<float>::contiguous(data.dy.data(), sizes, layout);
  s->y = TensorView<float>::contiguous(data.y.data(), sizes, layout);
  s->dx = TensorView<float>::contiguous(data.dx.data(), sizes, layout);
  s->gamma.assign(data.gamma.data(), data.gamma.data() + c);
  s->beta.assign(data.beta.data(), data.beta.data() + c);
  s->running_mean.assign(data.running_mean.data(), data.running_mean.data() + c);
  s->running_var.assign(data.running_var.data(), data.running_var.data() + c);
  s->eval_mean = s->running_mean;
  s->eval_var = s->running_var;
  s->save_mean.resize(c);
  s->save_invstd.resize(c);
  s->dgamma.resize(c);
  s->dbeta.resize(c);
  s->moments.resize(c);
  s->sum_dy.resize(c);
  s->sum_dy_xhat.resize(c);
  s->count = static_cast<double>(p.numel() / p.channels());
  s->forward_training();  // the saved statistics the backward case uses
  s->backward_reduce();   // the sums backward-apply uses

  const std::string note = std::string("Layout::") + std::string(normkit::to_string(layout));
  const auto y = [s] { return static_cast<const float*>(s->y.data); };
  const auto dx = [s] { return static_cast<const float*>(s->dx.data); };
  return {
      {"normkit", Op::forward_training, note, [s] { s->forward_training(); }, y},
      {"normkit", Op::backward, note, [s] { s->backward(); }, dx},
      {"normkit", Op::forward_backward, note,
       [s] {
         s->forward_training();
         s->backward();
       },
       dx},
      {"normkit", Op::inference, note, [s] { s->inference(); }, y},
      {"normkit", Op::moments, note + ", batch_norm_moments", [s] { s->statistics(); }, nullptr},
      {"normkit", Op::forward_apply, note + ", batch_norm_forward_apply",
       [s] { s->forward_apply(); }, y},
      {"normkit", Op::backward_reduce, note + ", batch_norm_backward_reduce",
       [s] { s->backward_reduce(); }, nullptr},
      {"normkit", Op::backward_apply, note + ", batch_norm_backward_apply",
       [s] { s->backward_apply(); }, dx},
  };
}

// Layer normalization: the problem's N×C is rows × cols, normalized over C
// (gamma and beta hold C values), as torch.nn.LayerNorm(C) on an [N, C] input.
struct LayerNormState {
  normkit::ConstRowsView<float> x, dy;
  normkit::RowsView<float> y, dx;
  std::vector<float> gamma, beta, mean, invstd, dgamma, dbeta;

  void forward() {
    normkit::layer_norm_forward<float>(x, y, gamma, beta, {mean, invstd});
  }
  void backward() {
    normkit::layer_norm_backward<float>(x, dy, dx, gamma, mean, invstd, dgamma, dbeta);
  }
};

std::vector<Case> layer_norm_cases(Data& data) {
  const Problem& p = data.problem;
  const int64_t rows = p.numel() / p.channels(), cols = p.channels();
  const auto c = static_cast<size_t>(cols);
  auto s = std::make_shared<LayerNormState>();
  s->x = normkit::ConstRowsView<float>::contiguous(data.x.data(), rows, cols);
  s->dy = normkit::ConstRowsView<float>::contiguous(data.dy.data(), rows, cols);
  s->y = normkit::RowsView<float>::contiguous(data.y.data(), rows, cols);
  s->dx = normkit::RowsView<float>::contiguous(data.dx.data(), rows, cols);
  s->gamma.assign(data.gamma.data(), data.gamma.data() + c);
  s->beta.assign(data.beta.data(), data.beta.data() + c);
  s->mean.resize(static_cast<size_t>(rows));
  s->invstd.resize(static_cast<size_t>(rows));
  s->dgamma.resize(c);
  s->dbeta.resize(c);
  s->forward();  // the saved statistics the backward case uses

  const std::string note = "rows " + std::to_string(rows) + " x " + std::to_string(cols);
  const auto y = [s] { return static_cast<const float*>(s->y.data); };
  const auto dx = [s] { return static_cast<const float*>(s->dx.data); };
  return {
      {"normkit", Op::forward_training, note, [s] { s->forward(); }, y},
      {"normkit", Op::backward, note, [s] { s->backward(); }, dx},
      {"normkit", Op::forward_backward, note,
       [s] {
         s->forward();
         s->backward();
       },
       dx},
  };
}

// ---- fused BN+ReLU / BN+Add+ReLU ("bn_relu", "bn_add_relu") next to normkit's
// own unfused sequence: BN, then a separate (add and) ReLU pass; backward: a
// mask-apply pass g = (y > 0) ? dy : 0 (= dz), then BN backward of g.

struct FusedState : State {
  bool add = false;
  Buffer z, dz, bn, g;  // residual and its gradient; the unfused intermediates
  TensorView<float> zv, dzv;
  std::vector<uint8_t> mask;
  int64_t numel = 0;

  void fused_forward() {
    if (add)
      normkit::batch_norm_add_relu_forward_training<float>(x, zv, y, mask, gamma, beta,
                                                           {save_mean, save_invstd},
                                                           {running_mean, running_var, &batches});
    else
      normkit::batch_norm_relu_forward_training<float>(x, y, mask, gamma, beta,
                                                       {save_mean, save_invstd},
                                                       {running_mean, running_var, &batches});
  }
  void fused_backward() {
    if (add)
      normkit::batch_norm_add_relu_backward<float>(x, dy, mask, dx, dzv, gamma, save_mean,
                                                   save_invstd, dgamma, dbeta);
    else
      normkit::batch_norm_relu_backward<float>(x, dy, mask, dx, gamma, save_mean, save_invstd,
                                               dgamma, dbeta);
  }
  // The unfused sequence: every pass its own loop over whole tensors.
  void unfused_forward() {
    TensorView<float> bn_view = y;
    bn_view.data = bn.data();
    normkit::batch_norm_forward_training<float>(x, bn_view, gamma, beta, {save_mean, save_invstd},
                                                {running_mean, running_var, &batches});
    const float* b = bn.data();
    const float* zp = z.data();
    float* out = y.data;
    const int64_t n = numel;
    if (add) {
#pragma omp parallel for num_threads(normkit::num_threads()) schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const float p = b[i] + zp[i];
        out[i] = p < 0.0f ? 0.0f : p;
      }
    } else {
#pragma omp parallel for num_threads(normkit::num_threads()) schedule(static)
      for (int64_t i = 0; i < n; ++i) out[i] = b[i] < 0.0f ? 0.0f : b[i];
    }
  }
  void unfused_backward() {
    const float* out = y.data;
    const float* d = dy.data;
    float* gp = add ? dz.data() : g.data();
    const int64_t n = numel;
#pragma omp parallel for num_threads(normkit::num_threads()) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float grad = d[i];  // loaded unconditionally, so the loop vectorizes as a blend
      gp[i] = out[i] > 0.0f ? grad : 0.0f;
    }
    TensorView<const float> g_view = x;
    g_view.data = gp;
    normkit::batch_norm_backward<float>(x, g_view, dx, gamma, save_mean, save_invstd, dgamma,
                                        dbeta, normkit::BackwardMode::training);
  }
};

std::vector<Case> fused_cases(Data& data, bool add) {
  const Problem& p = data.problem;
  const auto sizes = sizes_in_memory_order(p);
  const Layout layout = layout_of(p);
  const auto c = static_cast<size_t>(p.channels());
  auto s = std::make_shared<FusedState>();
  s->add = add;
  s->numel = p.numel();
  s->x = TensorView<float>::contiguous(data.x.data(), sizes, layout);
  s->dy = TensorView<float>::contiguous(data.dy.data(), sizes, layout);
  s->y = TensorView<float>::contiguous(data.y.data(), sizes, layout);
  s->dx = TensorView<float>::contiguous(data.dx.data(), sizes, layout);
  // The residual: its own pages, with dy's values (the same in every library).
  s->z = Buffer(p.numel());
  std::copy(data.dy.data(), data.dy.data() + p.numel(), s->z.data());
  s->dz = Buffer(p.numel());
  s->bn = Buffer(p.numel());
  s->g = Buffer(p.numel());
  s->zv = TensorView<float>::contiguous(s->z.data(), sizes, layout);
  s->dzv = TensorView<float>::contiguous(s->dz.data(), sizes, layout);
  s->mask.resize(static_cast<size_t>(normkit::relu_mask_bytes(p.numel())));
  s->gamma.assign(data.gamma.data(), data.gamma.data() + c);
  s->beta.assign(data.beta.data(), data.beta.data() + c);
  s->running_mean.assign(data.running_mean.data(), data.running_mean.data() + c);
  s->running_var.assign(data.running_var.data(), data.running_var.data() + c);
  s->save_mean.resize(c);
  s->save_invstd.resize(c);
  s->dgamma.resize(c);
  s->dbeta.resize(c);
  s->fused_forward();  // the mask and statistics the backward cases use

  const std::string note = std::string("Layout::") + std::string(normkit::to_string(layout));
  const std::string unfused_note =
      note + (add ? ", BN then add+relu pass; bwd: mask pass then BN bwd"
                  : ", BN then relu pass; bwd: mask pass then BN bwd");
  const auto y = [s] { return static_cast<const float*>(s->y.data); };
  const auto dx = [s] { return static_cast<const float*>(s->dx.data); };
  return {
      {"normkit", Op::forward_training, note + ", fused", [s] { s->fused_forward(); }, y},
      {"normkit", Op::backward, note + ", fused, bit mask", [s] { s->fused_backward(); }, dx},
      {"normkit", Op::forward_backward, note + ", fused",
       [s] {
         s->fused_forward();
         s->fused_backward();
       },
       dx},
      {"normkit-unfused", Op::forward_training, unfused_note, [s] { s->unfused_forward(); }, y},
      {"normkit-unfused", Op::backward, unfused_note, [s] { s->unfused_backward(); }, dx},
      {"normkit-unfused", Op::forward_backward, unfused_note,
       [s] {
         s->unfused_forward();
         s->unfused_backward();
       },
       dx},
  };
}

// GroupNorm(32) (kind "group_norm"): forward saves the per-(n, g) statistics,
// as PyTorch's native_group_norm does.
constexpr int64_t kGroups = 32;

struct GroupNormState {
  TensorView<float> x, dy, y, dx;
  std::vector<float> gamma, beta, save_mean, save_invstd, dgamma, dbeta;

  void forward() {
    normkit::group_norm_forward<float>(x, y, kGroups, gamma, beta, {save_mean, save_invstd});
  }
  void backward() {
    normkit::group_norm_backward<float>(x, dy, dx, kGroups, gamma, save_mean, save_invstd, dgamma,
                                        dbeta);
  }
};

std::vector<Case> group_norm_cases(Data& data) {
  const Problem& p = data.problem;
  const auto sizes = sizes_in_memory_order(p);
  const Layout layout = layout_of(p);
  const auto c = static_cast<size_t>(p.channels());
  const auto stats = static_cast<size_t>(p.sizes[0] * kGroups);
  auto s = std::make_shared<GroupNormState>();
  s->x = TensorView<float>::contiguous(data.x.data(), sizes, layout);
  s->dy = TensorView<float>::contiguous(data.dy.data(), sizes, layout);
  s->y = TensorView<float>::contiguous(data.y.data(), sizes, layout);
  s->dx = TensorView<float>::contiguous(data.dx.data(), sizes, layout);
  s->gamma.assign(data.gamma.data(), data.gamma.data() + c);
  s->beta.assign(data.beta.data(), data.beta.data() + c);
  s->save_mean.resize(stats);
  s->save_invstd.resize(stats);
  s->dgamma.resize(c);
  s->dbeta.resize(c);
  s->forward();  // the saved statistics the backward case uses

  const std::string note = std::string("G=32, Layout::") + std::string(normkit::to_string(layout));
  const auto y = [s] { return static_cast<const float*>(s->y.data); };
  const auto dx = [s] { return static_cast<const float*>(s->dx.data); };
  return {
      {"normkit", Op::forward_training, note, [s] { s->forward(); }, y},
      {"normkit", Op::backward, note, [s] { s->backward(); }, dx},
      {"normkit", Op::forward_backward, note,
       [s] {
         s->forward();
         s->backward();
       },
       dx},
  };
}

}  // namespace

Backend normkit_backend() {
  return {"normkit", normkit::version, [](int threads) { normkit::set_num_threads(threads); },
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
