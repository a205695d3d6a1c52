// A repeated call allocates nothing: every float op's temporaries come from
// the threads' Workspaces (src/core/workspace.hpp), which keep their memory
// between calls. Fresh vectors per call had glibc trim and regrow the heap
// (brk, a TLB flush on every core, a page fault per 4 KB): BN+ReLU backward
// of 32x4096 took 8x its time.
//
// Its own executable: it replaces the global operator new to count calls, on
// every thread. Each op runs twice (the threads' arenas grow to fit), then a
// third time, which must not call operator new. The shapes are the common
// forms (the dispatch tests check that a fast entry takes each), sized to
// reach each kernel's schedules: column units, chunks and stripes of rows,
// long rows, whole channels or samples per thread, and pieces of them.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <new>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"

namespace {
std::atomic<int64_t> g_allocations{0};
}  // namespace

// (GCC sees free() given what operator new returned; here operator new is malloc.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(std::size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size ? size : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop

namespace {

using namespace normkit;

int64_t allocations_of(const std::function<void()>& op) {
  op();
  op();
  const int64_t before = g_allocations.load();
  op();
  return g_allocations.load() - before;
}

struct Problem {
  std::string name;
  std::vector<int64_t> sizes;  // in the layout's memory order
  Layout layout;
  int64_t channels;
};

// N, C, S: NCHW {N, C, 1, S}, NHWC {N, 1, S, C}, NC {N, C}.
std::vector<Problem> problems() {
  return {
      {"64x1024 NC (column units)", {64, 1024}, Layout::NC, 1024},
      {"256x1024 NC (rows in phases)", {256, 1024}, Layout::NC, 1024},
      {"32x4096 NC (long rows)", {32, 4096}, Layout::NC, 4096},
      {"4096x64 NC (stripes)", {4096, 64}, Layout::NC, 64},
      {"64x100 NC (unblocked channels)", {64, 100}, Layout::NC, 100},
      {"8x64x14x14 NCHW", {8, 64, 14, 14}, Layout::NCHW, 64},
      {"2x4x64x64 NCHW (pieces of channels)", {2, 4, 64, 64}, Layout::NCHW, 4},
      {"16x256x7x7 NCHW", {16, 256, 7, 7}, Layout::NCHW, 256},
      {"8x14x14x64 NHWC", {8, 14, 14, 64}, Layout::NHWC, 64},
      {"4x7x7x2048 NHWC", {4, 7, 7, 2048}, Layout::NHWC, 2048},
  };
}

struct Tensors {
  explicit Tensors(const Problem& p) : channels(p.channels) {
    numel = 1;
    for (int64_t s : p.sizes) numel *= s;
    x.resize(numel);
    dy.resize(numel);
    for (int64_t i = 0; i < numel; ++i) {
      x[i] = static_cast<float>((i * 7919) % 1000) * 0.01f - 3.0f;
      dy[i] = static_cast<float>((i * 104729) % 1000) * 0.001f - 0.5f;
    }
    y.resize(numel);
    dx.resize(numel);
    z = x;
    mask.resize((numel + 7) / 8);
    for (auto* v : {&gamma, &beta, &mean, &invstd, &running_mean, &running_var, &dgamma, &dbeta})
      v->assign(channels, 1.0f);
    sum_dy.assign(channels, 0.0);
    sum_dy_xhat.assign(channels, 0.0);
  }
  int64_t channels, numel = 0;
  std::vector<float> x, dy, y, dx, z, gamma, beta, mean, invstd, running_mean, running_var,
      dgamma, dbeta;
  std::vector<double> sum_dy, sum_dy_xhat;
  std::vector<uint8_t> mask;
};

class Allocations : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override { set_num_threads(GetParam()); }
};

TEST_P(Allocations, RepeatedBatchNormCallsAllocateNothing) {
  for (const Problem& p : problems()) {
    Tensors t(p);
    auto view = [&](std::vector<float>& v) {
      return TensorView<float>::contiguous(v.data(), p.sizes, p.layout);
    };
    const auto x = view(t.x), dy = view(t.dy), y = view(t.y), dx = view(t.dx), z = view(t.z);
    const SavedStats<float> saved{t.mean, t.invstd};
    const RunningStats<float> running{t.running_mean, t.running_var};
    batch_norm_forward_training<float>(x, y, t.gamma, t.beta, saved, {});  // the saved statistics
    const std::vector<std::pair<std::string, std::function<void()>>> ops = {
        {"forward-train",
         [&] { batch_norm_forward_training<float>(x, y, t.gamma, t.beta, {}, running); }},
        {"inference",
         [&] {
           batch_norm_forward_inference<float>(x, y, t.gamma, t.beta, t.running_mean,
                                               t.running_var, 1e-5);
         }},
        {"backward",
         [&] {
           batch_norm_backward<float>(x, dy, dx, t.gamma, t.mean, t.invstd, t.dgamma, t.dbeta,
                                      BackwardMode::training);
         }},
        {"backward-reduce",
         [&] {
           batch_norm_backward_reduce<float>(x, dy, t.mean, t.invstd, t.sum_dy, t.sum_dy_xhat);
         }},
        {"backward-apply",
         [&] {
           batch_norm_backward_apply<float>(x, dy, dx, t.gamma, t.mean, t.invstd, t.sum_dy,
                                            t.sum_dy_xhat, static_cast<double>(t.numel));
         }},
        {"relu forward-train",
         [&] {
           batch_norm_relu_forward_training<float>(x, y, t.mask, t.gamma, t.beta, {}, running);
         }},
        {"relu inference",
         [&] {
           batch_norm_relu_forward_inference<float>(x, y, t.mask, t.gamma, t.beta,
                                                    t.running_mean, t.running_var);
         }},
        {"add+relu forward-train",
         [&] {
           batch_norm_add_relu_forward_training<float>(x, z, y, t.mask, t.gamma, t.beta, {}, {});
         }},
        {"relu backward",
         [&] {
           batch_norm_relu_backward<float>(x, dy, t.mask, dx, t.gamma, t.mean, t.invstd,
                                           t.dgamma, t.dbeta);
         }},
    };
    for (const auto& [name, op] : ops)
      EXPECT_EQ(allocations_of(op), 0) << name << ", " << p.name << ", " << GetParam()
                                       << " threads";
  }
}

TEST_P(Allocations, RepeatedBatchNormVariantCallsAllocateNothing) {
  for (const Problem& p : problems()) {
    Tensors t(p);
    auto view = [&](std::vector<float>& v) {
      return TensorView<float>::contiguous(v.data(), p.sizes, p.layout);
    };
    const auto x = view(t.x), dy = view(t.dy), y = view(t.y), dx = view(t.dx);
    const int64_t C = p.channels, virtual_batch = 2, ghosts = p.sizes[0] / virtual_batch;
    std::vector<float> r(C, 1.0f), d(C, 0.0f), ghost_mean(ghosts * C), ghost_invstd(ghosts * C);
    const RunningStats<float> running{t.running_mean, t.running_var};
    ghost_batch_norm_forward_training<float>(x, y, t.gamma, t.beta, virtual_batch,
                                             {ghost_mean, ghost_invstd}, {});
    const std::vector<std::pair<std::string, std::function<void()>>> ops = {
        {"batch renorm forward-train",
         [&] {
           batch_renorm_forward_training<float>(x, y, t.gamma, t.beta, {t.mean, t.invstd, r, d},
                                                running, {3.0, 5.0});
         }},
        {"batch renorm backward",
         [&] {
           batch_renorm_backward<float>(x, dy, dx, t.gamma, t.mean, t.invstd, r, d, t.dgamma,
                                        t.dbeta);
         }},
        {"ghost forward-train",
         [&] {
           ghost_batch_norm_forward_training<float>(x, y, t.gamma, t.beta, virtual_batch, {},
                                                    running);
         }},
        {"ghost backward",
         [&] {
           ghost_batch_norm_backward<float>(x, dy, dx, t.gamma, virtual_batch, ghost_mean,
                                            ghost_invstd, t.dgamma, t.dbeta);
         }},
        {"frozen backward",
         [&] {
           frozen_batch_norm_backward<float>(x, dy, dx, t.gamma, t.running_mean, t.running_var,
                                             1e-5, t.dgamma, t.dbeta);
         }},
    };
    for (const auto& [name, op] : ops)
      EXPECT_EQ(allocations_of(op), 0) << name << ", " << p.name << ", " << GetParam()
                                       << " threads";
  }
}

TEST_P(Allocations, RepeatedGroupAndInstanceNormCallsAllocateNothing) {
  for (const Problem& p : problems()) {
    if (p.layout == Layout::NC) continue;
    Tensors t(p);
    auto view = [&](std::vector<float>& v) {
      return TensorView<float>::contiguous(v.data(), p.sizes, p.layout);
    };
    const auto x = view(t.x), dy = view(t.dy), y = view(t.y), dx = view(t.dx);
    const int64_t n = p.sizes[0], groups = p.channels % 32 == 0 ? 32 : p.channels;
    std::vector<float> mean(n * p.channels, 0.0f), invstd(n * p.channels, 1.0f);
    const std::span<float> gm(mean.data(), n * groups), gi(invstd.data(), n * groups);
    const std::vector<std::pair<std::string, std::function<void()>>> ops = {
        {"group norm forward",
         [&] { group_norm_forward<float>(x, y, groups, t.gamma, t.beta, {gm, gi}); }},
        {"group norm backward",
         [&] {
           group_norm_backward<float>(x, dy, dx, groups, t.gamma, gm, gi, t.dgamma, t.dbeta);
         }},
        {"instance norm forward-train",
         [&] {
           instance_norm_forward_training<float>(x, y, t.gamma, t.beta, {mean, invstd},
                                                 {t.running_mean, t.running_var});
         }},
    };
    for (const auto& [name, op] : ops)
      EXPECT_EQ(allocations_of(op), 0) << name << ", " << p.name << ", " << GetParam()
                                       << " threads";
  }
}

TEST_P(Allocations, RepeatedLayerAndRmsNormCallsAllocateNothing) {
  for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
           {512, 768}, {8, 4096}, {4096, 64}}) {
    std::vector<float> x(rows * cols), dy(rows * cols, 0.25f), y(rows * cols), dx(rows * cols);
    for (int64_t i = 0; i < rows * cols; ++i) x[i] = static_cast<float>(i % 97) * 0.1f;
    std::vector<float> gamma(cols, 1.0f), beta(cols, 0.0f), dgamma(cols), dbeta(cols);
    std::vector<float> mean(rows), invstd(rows);
    const auto xv = RowsView<float>::contiguous(x.data(), rows, cols);
    const auto yv = RowsView<float>::contiguous(y.data(), rows, cols);
    const auto dyv = RowsView<float>::contiguous(dy.data(), rows, cols);
    const auto dxv = RowsView<float>::contiguous(dx.data(), rows, cols);
    layer_norm_forward<float>(xv, yv, gamma, beta, {mean, invstd});
    const std::vector<std::pair<std::string, std::function<void()>>> ops = {
        {"layer norm forward", [&] { layer_norm_forward<float>(xv, yv, gamma, beta, {mean, invstd}); }},
        {"layer norm backward",
         [&] { layer_norm_backward<float>(xv, dyv, dxv, gamma, mean, invstd, dgamma, dbeta); }},
        {"rms norm forward", [&] { rms_norm_forward<float>(xv, yv, gamma, 1e-6, invstd); }},
        {"rms norm backward",
         [&] { rms_norm_backward<float>(xv, dyv, dxv, gamma, invstd, dgamma); }},
    };
    for (const auto& [name, op] : ops)
      EXPECT_EQ(allocations_of(op), 0) << name << ", " << rows << "x" << cols << ", "
                                       << GetParam() << " threads";
  }
}

INSTANTIATE_TEST_SUITE_P(Threads, Allocations, ::testing::Values(1, 2),
                         [](const auto& param_info) { return std::to_string(param_info.param) + "_threads"; });

}  // namespace
