// Golden checksums: every public kernel function of the library on fixed
// problems, one FNV-1a checksum of the bytes of every output per line.
//
// Why: restructuring (moving files, one dispatch, one set of checks) must not
// change a single bit. Run it before and after and diff the two outputs; any
// difference is a behaviour change. Not a ctest: the bits depend on the
// machine's SIMD width (AVX-512 vs AVX2 clones), so the recorded file is only
// comparable on the machine that wrote it (tests/golden/README.md).
//
// Output lines: "<problem> t<threads> <function>.<output> <16 hex digits>".
// Every output buffer is filled with a fixed byte pattern before the call, so
// a checksum also covers the padding a function must leave alone.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <numeric>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"
#include "normkit/standardizer.hpp"

namespace nk = normkit;

namespace {

// ---------------------------------------------------------------- checksums and data

uint64_t fnv1a(const void* data, size_t bytes) {
  uint64_t h = 1469598103934665603ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

std::string g_prefix;

template <class V>
void print(const std::string& what, const V& values) {
  std::printf("%s %s %016llx\n", g_prefix.c_str(), what.c_str(),
              static_cast<unsigned long long>(
                  fnv1a(values.data(), values.size() * sizeof(values[0]))));
}

void print_scalar(const std::string& what, int64_t value) {
  std::printf("%s %s %016llx\n", g_prefix.c_str(), what.c_str(),
              static_cast<unsigned long long>(fnv1a(&value, sizeof value)));
}

// A call that throws prints the message's checksum instead: a change in which
// calls fail shows up as well.
template <class F>
void guarded(const std::string& what, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    std::printf("%s %s error %016llx\n", g_prefix.c_str(), what.c_str(),
                static_cast<unsigned long long>(fnv1a(e.what(), std::strlen(e.what()))));
  }
}

// splitmix64: the same stream on every machine.
struct Random {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform(double lo, double hi) {
    return lo + (hi - lo) * static_cast<double>(next() >> 11) * 0x1.0p-53;
  }
};

template <class T>
std::vector<T> random_values(size_t n, uint64_t seed, double lo, double hi) {
  Random r{seed};
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(r.uniform(lo, hi));
  return v;
}

// Outputs start as this pattern (not a number the kernels produce).
template <class T>
std::vector<T> sentinel(size_t n) {
  std::vector<T> v(n);
  std::memset(v.data(), 0x5a, n * sizeof(T));
  return v;
}

// ---------------------------------------------------------------- tensor problems

enum class Strides { dense, rows_padded, channel_padded, outer_padded, nchw_channels_last };

struct TensorProblem {
  const char* name;
  nk::Layout layout;
  std::vector<int64_t> sizes;  // in the layout's axis order (for nchw_channels_last: N, C, H, W)
  Strides strides = Strides::dense;
  int64_t groups = 1;          // for group norm
  int64_t virtual_batch = 2;   // for ghost batch norm
  bool in_place = false;       // also run the forward functions with y aliasing x
};

std::vector<int64_t> packed(const std::vector<int64_t>& extents) {
  std::vector<int64_t> s(extents.size());
  int64_t stride = 1;
  for (size_t axis = extents.size(); axis-- > 0;) {
    s[axis] = stride;
    stride *= extents[axis];
  }
  return s;
}

std::vector<int64_t> strides_of(const TensorProblem& p) {
  const auto& n = p.sizes;
  const int64_t pad = 3;
  switch (p.strides) {
    case Strides::dense: return packed(n);
    case Strides::rows_padded: {
      auto e = n;
      e.back() += pad;
      return packed(e);
    }
    case Strides::channel_padded: {
      auto s = packed(n);
      const int64_t spatial = std::accumulate(n.begin() + 2, n.end(), int64_t{1},
                                              std::multiplies<>());
      s[1] = spatial + pad;
      s[0] = n[1] * s[1] + pad;
      return s;
    }
    case Strides::outer_padded: {
      auto s = packed(n);
      s[0] += pad;
      return s;
    }
    case Strides::nchw_channels_last: {
      const int64_t c = n[1], h = n[2], w = n[3], cp = c + pad;
      return {h * w * cp, 1, w * cp, cp};
    }
  }
  return {};
}

int64_t storage_of(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  int64_t last = 0;
  for (size_t a = 0; a < sizes.size(); ++a) last += (sizes[a] - 1) * strides[a];
  return last + 1;
}

template <class T>
struct Tensor {
  std::vector<T> buffer;
  std::vector<int64_t> sizes, strides;
  nk::Layout layout;

  nk::TensorView<T> view() { return nk::TensorView<T>::strided(buffer.data(), sizes, strides, layout); }
  nk::ConstTensorView<T> cview() const {
    return nk::ConstTensorView<T>::strided(buffer.data(), sizes, strides, layout);
  }
};

template <class T>
Tensor<T> input(const TensorProblem& p, uint64_t seed, double lo, double hi) {
  Tensor<T> t{{}, p.sizes, strides_of(p), p.layout};
  t.buffer = random_values<T>(static_cast<size_t>(storage_of(t.sizes, t.strides)), seed, lo, hi);
  return t;
}

template <class T>
Tensor<T> output_like(const Tensor<T>& x) {
  Tensor<T> t = x;
  t.buffer = sentinel<T>(x.buffer.size());
  return t;
}

// x with a per-channel offset so that means are far from zero (the mean_hi trick matters).
template <class T>
Tensor<T> shifted_input(const TensorProblem& p, uint64_t seed) {
  Tensor<T> t = input<T>(p, seed, -2.0, 2.0);
  const int c_axis = nk::channel_axis(p.layout);
  // Walk every logical element and add 3 + c/2 to it.
  const int rank = static_cast<int>(p.sizes.size());
  std::vector<int64_t> idx(rank, 0);
  const int64_t numel = std::accumulate(p.sizes.begin(), p.sizes.end(), int64_t{1},
                                        std::multiplies<>());
  for (int64_t k = 0; k < numel; ++k) {
    int64_t off = 0;
    for (int a = 0; a < rank; ++a) off += idx[a] * t.strides[a];
    t.buffer[off] += static_cast<T>(3.0 + 0.5 * static_cast<double>(idx[c_axis]));
    for (int a = rank - 1; a >= 0; --a) {
      if (++idx[a] < p.sizes[a]) break;
      idx[a] = 0;
    }
  }
  return t;
}

template <class T>
struct Running {
  std::vector<T> mean, var;
  int64_t tracked = 5;
  Running(int64_t c, uint64_t seed)
      : mean(random_values<T>(c, seed, -0.5, 0.5)), var(random_values<T>(c, seed + 1, 0.5, 2.0)) {}
  nk::RunningStats<T> stats() { return {mean, var, &tracked}; }
  void print_all(const std::string& what) {
    print(what + ".running_mean", mean);
    print(what + ".running_var", var);
    print_scalar(what + ".num_batches_tracked", tracked);
  }
};

template <class T>
void run_batch_norm(const TensorProblem& p) {
  const auto x = shifted_input<T>(p, 11);
  const auto dy = input<T>(p, 12, -1.0, 1.0);
  const int64_t c = x.cview().channels();
  const auto gamma = random_values<T>(c, 13, 0.5, 1.5);
  const auto beta = random_values<T>(c, 14, -0.5, 0.5);
  const size_t cs = static_cast<size_t>(c);

  for (const bool keras : {false, true}) {
    for (const bool cumulative : {false, true}) {
      if (keras && cumulative) continue;
      nk::BatchNormOptions options = keras ? nk::BatchNormOptions::keras() : nk::BatchNormOptions{};
      if (cumulative) options.momentum = std::nullopt;
      const std::string name = std::string("bn_forward_training") + (keras ? "[keras]" : "") +
                               (cumulative ? "[cma]" : "");
      auto y = output_like(x);
      auto mean = sentinel<T>(cs), invstd = sentinel<T>(cs);
      Running<T> running(c, 15);
      guarded(name, [&] {
        nk::batch_norm_forward_training<T>(x.cview(), y.view(), gamma, beta, {mean, invstd},
                                           running.stats(), options);
      });
      print(name + ".y", y.buffer);
      print(name + ".save_mean", mean);
      print(name + ".save_invstd", invstd);
      running.print_all(name);
    }
  }
  {  // no γ, β, nothing saved or tracked
    auto y = output_like(x);
    guarded("bn_forward_training[bare]", [&] {
      nk::batch_norm_forward_training<T>(x.cview(), y.view(), {}, {}, {}, {});
    });
    print("bn_forward_training[bare].y", y.buffer);
  }
  if (p.in_place) {
    auto y = x;
    auto mean = sentinel<T>(cs), invstd = sentinel<T>(cs);
    guarded("bn_forward_training[in_place]", [&] {
      nk::batch_norm_forward_training<T>(y.cview(), y.view(), gamma, beta, {mean, invstd}, {});
    });
    print("bn_forward_training[in_place].y", y.buffer);
    print("bn_forward_training[in_place].save_mean", mean);
  }

  // Statistics for the functions that take them.
  std::vector<T> mean(cs), invstd(cs);
  nk::batch_norm_forward_training<T>(x.cview(), output_like(x).view(), {}, {}, {mean, invstd}, {});
  Running<T> stats(c, 16);

  {
    auto y = output_like(x);
    guarded("bn_forward_inference", [&] {
      nk::batch_norm_forward_inference<T>(x.cview(), y.view(), gamma, beta, stats.mean, stats.var,
                                          1e-3);
    });
    print("bn_forward_inference.y", y.buffer);
  }
  {
    auto y = output_like(x);
    guarded("bn_forward_apply", [&] {
      nk::batch_norm_forward_apply<T>(x.cview(), y.view(), gamma, beta, mean, invstd);
    });
    print("bn_forward_apply.y", y.buffer);
  }
  {
    std::vector<nk::Moments> moments(cs);
    guarded("bn_moments", [&] { nk::batch_norm_moments<T>(x.cview(), moments); });
    print("bn_moments.moments", moments);
    Running<T> running(c, 17);
    guarded("bn_update_running", [&] {
      nk::batch_norm_update_running<T>(moments, running.stats());
    });
    running.print_all("bn_update_running");
    auto inv = sentinel<T>(cs);
    guarded("bn_invstd", [&] { nk::batch_norm_invstd<T>(stats.var, 1e-5, inv); });
    print("bn_invstd.invstd", inv);
  }
  for (const auto mode : {nk::BackwardMode::training, nk::BackwardMode::frozen}) {
    const std::string name = mode == nk::BackwardMode::training ? "bn_backward[training]"
                                                                : "bn_backward[frozen]";
    auto dx = output_like(x);
    auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
    guarded(name, [&] {
      nk::batch_norm_backward<T>(x.cview(), dy.cview(), dx.view(), gamma, mean, invstd, dg, db,
                                 mode);
    });
    print(name + ".dx", dx.buffer);
    print(name + ".dgamma", dg);
    print(name + ".dbeta", db);
  }
  {
    auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
    guarded("bn_backward[no_dx]", [&] {
      nk::batch_norm_backward<T>(x.cview(), dy.cview(), {}, {}, mean, invstd, dg, db);
    });
    print("bn_backward[no_dx].dgamma", dg);
    print("bn_backward[no_dx].dbeta", db);
  }

  // ---- variants
  {
    auto y = output_like(x);
    auto m = sentinel<T>(cs), is = sentinel<T>(cs), r = sentinel<T>(cs), d = sentinel<T>(cs);
    Running<T> running(c, 18);
    guarded("renorm_forward_training", [&] {
      nk::batch_renorm_forward_training<T>(x.cview(), y.view(), gamma, beta, {m, is, r, d},
                                           running.stats(), {1.5, 0.3});
    });
    print("renorm_forward_training.y", y.buffer);
    print("renorm_forward_training.mean", m);
    print("renorm_forward_training.invstd", is);
    print("renorm_forward_training.r", r);
    print("renorm_forward_training.d", d);
    running.print_all("renorm_forward_training");
    auto dx = output_like(x);
    auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
    guarded("renorm_backward", [&] {
      nk::batch_renorm_backward<T>(x.cview(), dy.cview(), dx.view(), gamma, m, is, r, d, dg, db);
    });
    print("renorm_backward.dx", dx.buffer);
    print("renorm_backward.dgamma", dg);
    print("renorm_backward.dbeta", db);
  }
  {
    const int64_t groups = nk::ghost_batch_count(p.sizes[0], p.virtual_batch);
    auto y = output_like(x);
    auto m = sentinel<T>(cs * groups), is = sentinel<T>(cs * groups);
    Running<T> running(c, 19);
    guarded("ghost_forward_training", [&] {
      nk::ghost_batch_norm_forward_training<T>(x.cview(), y.view(), gamma, beta, p.virtual_batch,
                                               {m, is}, running.stats());
    });
    print("ghost_forward_training.y", y.buffer);
    print("ghost_forward_training.save_mean", m);
    print("ghost_forward_training.save_invstd", is);
    running.print_all("ghost_forward_training");
    auto dx = output_like(x);
    auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
    guarded("ghost_backward", [&] {
      nk::ghost_batch_norm_backward<T>(x.cview(), dy.cview(), dx.view(), gamma, p.virtual_batch,
                                       m, is, dg, db);
    });
    print("ghost_backward.dx", dx.buffer);
    print("ghost_backward.dgamma", dg);
    print("ghost_backward.dbeta", db);
  }
  {
    auto dx = output_like(x);
    auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
    guarded("frozen_backward", [&] {
      nk::frozen_batch_norm_backward<T>(x.cview(), dy.cview(), dx.view(), gamma, stats.mean,
                                        stats.var, 1e-5, dg, db);
    });
    print("frozen_backward.dx", dx.buffer);
    print("frozen_backward.dgamma", dg);
    print("frozen_backward.dbeta", db);
  }

  // ---- fused BN+ReLU, BN+Add+ReLU
  const auto z = input<T>(p, 20, -1.0, 1.0);
  const int64_t numel = std::accumulate(p.sizes.begin(), p.sizes.end(), int64_t{1},
                                        std::multiplies<>());
  const size_t mask_bytes = static_cast<size_t>(nk::relu_mask_bytes(numel));
  std::vector<uint8_t> mask_relu, mask_add;
  std::vector<T> fm(cs), fi(cs);
  for (const bool add : {false, true}) {
    const std::string name = add ? "bn_add_relu_forward_training" : "bn_relu_forward_training";
    auto y = output_like(x);
    std::vector<uint8_t> mask(mask_bytes, 0xa5);
    auto m = sentinel<T>(cs), is = sentinel<T>(cs);
    Running<T> running(c, 21);
    guarded(name, [&] {
      if (add)
        nk::batch_norm_add_relu_forward_training<T>(x.cview(), z.cview(), y.view(), mask, gamma,
                                                    beta, {m, is}, running.stats());
      else
        nk::batch_norm_relu_forward_training<T>(x.cview(), y.view(), mask, gamma, beta, {m, is},
                                                running.stats());
    });
    print(name + ".y", y.buffer);
    print(name + ".mask", mask);
    print(name + ".save_mean", m);
    print(name + ".save_invstd", is);
    running.print_all(name);
    (add ? mask_add : mask_relu) = mask;
    fm = m;
    fi = is;
  }
  if (p.in_place) {
    auto y = x;
    std::vector<uint8_t> mask(mask_bytes, 0xa5);
    guarded("bn_relu_forward_training[in_place]", [&] {
      nk::batch_norm_relu_forward_training<T>(y.cview(), y.view(), mask, gamma, beta, {}, {});
    });
    print("bn_relu_forward_training[in_place].y", y.buffer);
    print("bn_relu_forward_training[in_place].mask", mask);
  }
  for (const bool add : {false, true}) {
    const std::string name = add ? "bn_add_relu_forward_inference" : "bn_relu_forward_inference";
    auto y = output_like(x);
    std::vector<uint8_t> mask(mask_bytes, 0xa5);
    guarded(name, [&] {
      if (add)
        nk::batch_norm_add_relu_forward_inference<T>(x.cview(), z.cview(), y.view(), mask, gamma,
                                                     beta, stats.mean, stats.var);
      else
        nk::batch_norm_relu_forward_inference<T>(x.cview(), y.view(), mask, gamma, beta,
                                                 stats.mean, stats.var);
    });
    print(name + ".y", y.buffer);
    print(name + ".mask", mask);
  }
  for (const auto mode : {nk::BackwardMode::training, nk::BackwardMode::frozen}) {
    const std::string tag = mode == nk::BackwardMode::training ? "[training]" : "[frozen]";
    {
      auto dx = output_like(x);
      auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
      guarded("bn_relu_backward" + tag, [&] {
        nk::batch_norm_relu_backward<T>(x.cview(), dy.cview(), mask_relu, dx.view(), gamma, fm,
                                        fi, dg, db, mode);
      });
      print("bn_relu_backward" + tag + ".dx", dx.buffer);
      print("bn_relu_backward" + tag + ".dgamma", dg);
      print("bn_relu_backward" + tag + ".dbeta", db);
    }
    {
      auto dx = output_like(x), dz = output_like(x);
      auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
      guarded("bn_add_relu_backward" + tag, [&] {
        nk::batch_norm_add_relu_backward<T>(x.cview(), dy.cview(), mask_add, dx.view(), dz.view(),
                                            gamma, fm, fi, dg, db, mode);
      });
      print("bn_add_relu_backward" + tag + ".dx", dx.buffer);
      print("bn_add_relu_backward" + tag + ".dz", dz.buffer);
      print("bn_add_relu_backward" + tag + ".dgamma", dg);
      print("bn_add_relu_backward" + tag + ".dbeta", db);
    }
  }
  {
    auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
    guarded("bn_relu_backward[no_dx]", [&] {
      nk::batch_norm_relu_backward<T>(x.cview(), dy.cview(), mask_relu, {}, gamma, fm, fi, dg, db);
    });
    print("bn_relu_backward[no_dx].dgamma", dg);
    print("bn_relu_backward[no_dx].dbeta", db);
  }

  // ---- group norm, instance norm
  const int64_t n = p.sizes[0];
  const int64_t spatial = numel / (n * c);
  {
    const size_t ng = static_cast<size_t>(n * p.groups);
    auto y = output_like(x);
    auto m = sentinel<T>(ng), is = sentinel<T>(ng);
    guarded("gn_forward", [&] {
      nk::group_norm_forward<T>(x.cview(), y.view(), p.groups, gamma, beta, {m, is}, 1e-5);
    });
    print("gn_forward.y", y.buffer);
    print("gn_forward.save_mean", m);
    print("gn_forward.save_invstd", is);
    if (p.in_place) {
      auto yi = x;
      guarded("gn_forward[in_place]", [&] {
        nk::group_norm_forward<T>(yi.cview(), yi.view(), p.groups, {}, {}, {}, 1e-5);
      });
      print("gn_forward[in_place].y", yi.buffer);
    }
    auto dx = output_like(x);
    auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
    guarded("gn_backward", [&] {
      nk::group_norm_backward<T>(x.cview(), dy.cview(), dx.view(), p.groups, gamma, m, is, dg, db);
    });
    print("gn_backward.dx", dx.buffer);
    print("gn_backward.dgamma", dg);
    print("gn_backward.dbeta", db);
    std::vector<nk::Moments> moments(ng);
    guarded("gn_moments", [&] { nk::group_norm_moments<T>(x.cview(), p.groups, moments); });
    print("gn_moments.moments", moments);
  }
  if (spatial > 1) {
    const size_t nc = static_cast<size_t>(n * c);
    auto y = output_like(x);
    auto m = sentinel<T>(nc), is = sentinel<T>(nc);
    Running<T> running(c, 22);
    guarded("in_forward_training", [&] {
      nk::instance_norm_forward_training<T>(x.cview(), y.view(), gamma, beta, {m, is},
                                            running.stats());
    });
    print("in_forward_training.y", y.buffer);
    print("in_forward_training.save_mean", m);
    print("in_forward_training.save_invstd", is);
    running.print_all("in_forward_training");
    auto yi = output_like(x);
    guarded("in_forward_inference", [&] {
      nk::instance_norm_forward_inference<T>(x.cview(), yi.view(), gamma, beta, stats.mean,
                                             stats.var);
    });
    print("in_forward_inference.y", yi.buffer);
    auto dx = output_like(x);
    auto dg = sentinel<T>(cs), db = sentinel<T>(cs);
    guarded("in_backward", [&] {
      nk::instance_norm_backward<T>(x.cview(), dy.cview(), dx.view(), gamma, m, is, dg, db);
    });
    print("in_backward.dx", dx.buffer);
    print("in_backward.dgamma", dg);
    print("in_backward.dbeta", db);
  }
}

// ---------------------------------------------------------------- rows problems (LN, RMSNorm)

struct RowsProblem {
  const char* name;
  int64_t rows, cols, row_stride;
};

template <class T>
void run_layer_norm(const RowsProblem& p) {
  const size_t storage = static_cast<size_t>((p.rows - 1) * p.row_stride + p.cols);
  auto xs = random_values<T>(storage, 31, -2.0, 2.0);
  for (size_t i = 0; i < storage; ++i) xs[i] += static_cast<T>(1.0 + 0.01 * static_cast<double>(i % 97));
  const auto dys = random_values<T>(storage, 32, -1.0, 1.0);
  const nk::ConstRowsView<T> x{xs.data(), p.rows, p.cols, p.row_stride};
  const nk::ConstRowsView<T> dy{dys.data(), p.rows, p.cols, p.row_stride};
  const size_t cols = static_cast<size_t>(p.cols), rows = static_cast<size_t>(p.rows);
  const auto gamma = random_values<T>(cols, 33, 0.5, 1.5);
  const auto beta = random_values<T>(cols, 34, -0.5, 0.5);
  auto rows_of = [&](std::vector<T>& buffer) {
    return nk::RowsView<T>{buffer.data(), p.rows, p.cols, p.row_stride};
  };

  for (const bool affine : {true, false}) {
    const std::string tag = affine ? "" : "[no_affine]";
    const std::span<const T> g = affine ? std::span<const T>(gamma) : std::span<const T>();
    const std::span<const T> b = affine ? std::span<const T>(beta) : std::span<const T>();
    auto y = sentinel<T>(storage);
    auto mean = sentinel<T>(rows), invstd = sentinel<T>(rows);
    guarded("ln_forward" + tag, [&] {
      nk::layer_norm_forward<T>(x, rows_of(y), g, b, {mean, invstd}, 1e-5);
    });
    print("ln_forward" + tag + ".y", y);
    print("ln_forward" + tag + ".mean", mean);
    print("ln_forward" + tag + ".invstd", invstd);
    auto dx = sentinel<T>(storage);
    auto dg = sentinel<T>(affine ? cols : 0), db = sentinel<T>(affine ? cols : 0);
    guarded("ln_backward" + tag, [&] {
      nk::layer_norm_backward<T>(x, dy, rows_of(dx), g, mean, invstd, dg, db);
    });
    print("ln_backward" + tag + ".dx", dx);
    print("ln_backward" + tag + ".dgamma", dg);
    print("ln_backward" + tag + ".dbeta", db);

    auto ry = sentinel<T>(storage);
    auto inv_rms = sentinel<T>(rows);
    guarded("rms_forward" + tag, [&] { nk::rms_norm_forward<T>(x, rows_of(ry), g, 1e-6, inv_rms); });
    print("rms_forward" + tag + ".y", ry);
    print("rms_forward" + tag + ".inv_rms", inv_rms);
    auto rdx = sentinel<T>(storage);
    auto rdg = sentinel<T>(affine ? cols : 0);
    guarded("rms_backward" + tag, [&] {
      nk::rms_norm_backward<T>(x, dy, rows_of(rdx), g, inv_rms, rdg);
    });
    print("rms_backward" + tag + ".dx", rdx);
    print("rms_backward" + tag + ".dgamma", rdg);
  }
  {  // in place, parameter gradients only
    auto y = xs;
    const nk::RowsView<T> yv{y.data(), p.rows, p.cols, p.row_stride};
    guarded("ln_forward[in_place]", [&] { nk::layer_norm_forward<T>(yv, yv, gamma, beta, {}, 1e-5); });
    print("ln_forward[in_place].y", y);
    std::vector<T> mean(rows), invstd(rows);
    auto scratch = sentinel<T>(storage);
    nk::layer_norm_forward<T>(x, rows_of(scratch), gamma, beta, {mean, invstd}, 1e-5);
    auto dg = sentinel<T>(cols), db = sentinel<T>(cols);
    guarded("ln_backward[no_dx]", [&] {
      nk::layer_norm_backward<T>(x, dy, {}, gamma, mean, invstd, dg, db);
    });
    print("ln_backward[no_dx].dgamma", dg);
    print("ln_backward[no_dx].dbeta", db);
  }
}

// ---------------------------------------------------------------- fold, standardizer

template <class T>
void run_fold(int64_t out, int64_t rest, uint64_t seed) {
  const size_t o = static_cast<size_t>(out), w = static_cast<size_t>(out * rest);
  const auto weight = random_values<T>(w, seed, -1.0, 1.0);
  const auto bias = random_values<T>(o, seed + 1, -1.0, 1.0);
  const auto gamma = random_values<T>(o, seed + 2, 0.5, 1.5);
  const auto beta = random_values<T>(o, seed + 3, -0.5, 0.5);
  const auto mean = random_values<T>(o, seed + 4, -1.0, 1.0);
  const auto var = random_values<T>(o, seed + 5, 0.1, 3.0);
  for (const bool with_bias : {true, false}) {
    const std::string name = with_bias ? "fold" : "fold[no_bias]";
    auto fw = sentinel<T>(w), fb = sentinel<T>(o);
    guarded(name, [&] {
      nk::fold_batch_norm<T>(weight, with_bias ? std::span<const T>(bias) : std::span<const T>(),
                             gamma, beta, mean, var, 1e-5, fw, fb);
    });
    print(name + ".weight", fw);
    print(name + ".bias", fb);
  }
}

void run_standardizer(int64_t rows, int64_t features) {
  auto x = random_values<float>(static_cast<size_t>(rows * features), 41, -3.0, 5.0);
  for (int64_t i = 0; i < rows; ++i) x[static_cast<size_t>(i * features)] = 2.5f;  // constant feature
  nk::data::Standardizer s;
  s.fit(std::span<const float>(x).first(static_cast<size_t>((rows / 2) * features)), features);
  s.partial_fit(std::span<const float>(x).subspan(static_cast<size_t>((rows / 2) * features)),
                features);
  print("standardizer.mean", s.mean());
  print("standardizer.scale", s.scale());
  print("standardizer.variance", s.variance());
  print_scalar("standardizer.samples_seen", s.samples_seen());
  print("standardizer.moments", s.moments());
  auto t = x;
  s.transform(t);
  print("standardizer.transform", t);
  s.inverse_transform(t);
  print("standardizer.inverse_transform", t);
  std::ostringstream out;
  s.save(out);
  print("standardizer.save", out.str());
}

}  // namespace

int main() {
  using L = nk::Layout;
  const std::vector<TensorProblem> tensors = {
      {"nchw_4x8x5x7", L::NCHW, {4, 8, 5, 7}, Strides::dense, 4, 3, true},
      {"nhwc_4x5x7x8", L::NHWC, {4, 5, 7, 8}, Strides::dense, 2, 3, true},
      {"nchw_cl_3x16x6x5", L::NCHW, {3, 16, 6, 5}, Strides::nchw_channels_last, 4, 2},
      {"nchw_chpad_3x6x5x7", L::NCHW, {3, 6, 5, 7}, Strides::channel_padded, 3, 2},
      {"nchw_outpad_5x4x9x3", L::NCHW, {5, 4, 9, 3}, Strides::outer_padded, 2, 2},
      {"nhwc_rowpad_3x5x6x20", L::NHWC, {3, 5, 6, 20}, Strides::rows_padded, 5, 2},
      {"nc_64x33", L::NC, {64, 33}, Strides::dense, 3, 24, true},
      {"nc_rowpad_50x17", L::NC, {50, 17}, Strides::rows_padded, 1, 20},
      {"ncl_3x17x29", L::NCL, {3, 17, 29}, Strides::dense, 17, 2},
      {"nlc_3x29x17", L::NLC, {3, 29, 17}, Strides::dense, 1, 2},
      {"ncdhw_2x6x3x4x5", L::NCDHW, {2, 6, 3, 4, 5}, Strides::dense, 2, 1},
      {"ndhwc_2x3x4x5x6", L::NDHWC, {2, 3, 4, 5, 6}, Strides::dense, 3, 1},
      {"nchw_8x64x14x14", L::NCHW, {8, 64, 14, 14}, Strides::dense, 32, 3, true},
      {"nhwc_8x14x14x64", L::NHWC, {8, 14, 14, 64}, Strides::dense, 32, 3, true},
      {"nhwc_2x9x9x300", L::NHWC, {2, 9, 9, 300}, Strides::dense, 30, 1},
      {"nc_1000x7", L::NC, {1000, 7}, Strides::dense, 7, 300},
      {"nc_256x520", L::NC, {256, 520}, Strides::dense, 8, 100},
      {"nchw_2x3x1x1", L::NCHW, {2, 3, 1, 1}, Strides::dense, 3, 2},
      {"nchw_16x32x33x33", L::NCHW, {16, 32, 33, 33}, Strides::dense, 8, 5},
      {"nhwc_16x33x33x32", L::NHWC, {16, 33, 33, 32}, Strides::dense, 8, 5},
  };
  const std::vector<RowsProblem> rows = {
      {"rows_7x33", 7, 33, 33},         {"rows_64x256", 64, 256, 256},
      {"rows_5x1000s1003", 5, 1000, 1003}, {"rows_300x17s20", 300, 17, 20},
      {"rows_1x4096", 1, 4096, 4096},   {"rows_128x768", 128, 768, 768},
      {"rows_33x1", 33, 1, 1},
  };
  // Doubles run the reference: a subset of the shapes is enough.
  const std::vector<size_t> double_tensors = {0, 1, 2, 3, 5, 6, 8, 10, 11, 17};

  for (const int threads : {1, 2, 3}) {
    nk::set_num_threads(threads);
    const std::string t = " t" + std::to_string(threads);
    for (size_t i = 0; i < tensors.size(); ++i) {
      g_prefix = std::string(tensors[i].name) + "/f32" + t;
      run_batch_norm<float>(tensors[i]);
    }
    for (const size_t i : double_tensors) {
      g_prefix = std::string(tensors[i].name) + "/f64" + t;
      run_batch_norm<double>(tensors[i]);
    }
    for (const auto& r : rows) {
      g_prefix = std::string(r.name) + "/f32" + t;
      run_layer_norm<float>(r);
      g_prefix = std::string(r.name) + "/f64" + t;
      run_layer_norm<double>(r);
    }
    g_prefix = "fold_16x27/f32" + t;
    run_fold<float>(16, 27, 51);
    g_prefix = "fold_16x27/f64" + t;
    run_fold<double>(16, 27, 51);
    g_prefix = "fold_3x1/f32" + t;
    run_fold<float>(3, 1, 61);
    g_prefix = "standardizer_301x9" + t;
    run_standardizer(301, 9);
  }
  return 0;
}
