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
  s->forward_training();  // the saved statistics the backward case uses

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
            if (kind == "group_norm") return group_norm_cases(data);
            return {};
          }};
}

}  // namespace normkit_bench
