#pragma once
// Shared test support: logical shapes, strided buffers with sentinel padding,
// seeded data, tolerance checks and error checks.
//
// Every tensor in these tests has a *canonical* form: the logical values in
// [N, C, S] order, channels-first and dense, S the product of the spatial sizes
// (row-major). A view in any layout and with any strides is built by scattering
// the canonical values into a buffer; outputs are gathered back to canonical
// order and compared with the oracle, which always runs on the canonical form.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "normkit/normkit.hpp"

namespace normkit_test {

using normkit::Layout;

// ---------------------------------------------------------------- shapes

// Logical extent: N, C and 0..3 spatial sizes.
struct Logical {
  int64_t n = 1, c = 1;
  std::vector<int64_t> spatial;

  int64_t s() const {
    return std::accumulate(spatial.begin(), spatial.end(), int64_t{1}, std::multiplies<>());
  }
  int64_t m() const { return n * s(); }  // values per channel
  int64_t numel() const { return n * c * s(); }
  int64_t channel_of(int64_t canonical) const { return (canonical / s()) % c; }
  std::string describe(int64_t canonical) const {
    const int64_t S = s();
    std::ostringstream out;
    out << "(n " << canonical / (c * S) << ", c " << (canonical / S) % c << ", s " << canonical % S
        << ")";
    return out.str();
  }
};

inline int spatial_rank(Layout layout) { return normkit::rank_of(layout) - 2; }

// Sizes in the layout's axis order.
inline std::vector<int64_t> sizes_in(Layout layout, const Logical& g) {
  std::vector<int64_t> sizes{g.n};
  if (normkit::is_channels_last(layout)) {
    sizes.insert(sizes.end(), g.spatial.begin(), g.spatial.end());
    sizes.push_back(g.c);
  } else {
    sizes.push_back(g.c);
    sizes.insert(sizes.end(), g.spatial.begin(), g.spatial.end());
  }
  return sizes;
}

// A physical arrangement of a logical tensor: layout, sizes and strides in the
// layout's axis order, and the number of elements of the buffer holding it.
struct Arrangement {
  Layout layout = Layout::NC;
  Logical logical;
  std::vector<int64_t> sizes, strides;
  int64_t storage = 0;

  bool dense() const { return storage == logical.numel(); }
  std::string describe() const {
    std::ostringstream out;
    out << normkit::to_string(layout) << " sizes [";
    for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
    out << "] strides [";
    for (size_t i = 0; i < strides.size(); ++i) out << (i ? ", " : "") << strides[i];
    out << "]";
    return out.str();
  }
};

inline Arrangement with_strides(Layout layout, const Logical& g, std::vector<int64_t> strides) {
  Arrangement a{layout, g, sizes_in(layout, g), std::move(strides), 0};
  int64_t last = 0;
  for (size_t axis = 0; axis < a.sizes.size(); ++axis) {
    if (a.sizes[axis] == 0) return a;  // empty: no storage
    last += (a.sizes[axis] - 1) * a.strides[axis];
  }
  a.storage = last + 1;
  return a;
}

// Strides of a dense tensor whose axes (layout order) have the given extents.
inline std::vector<int64_t> packed_strides(const std::vector<int64_t>& extents) {
  std::vector<int64_t> strides(extents.size());
  int64_t stride = 1;
  for (size_t axis = extents.size(); axis-- > 0;) {
    strides[axis] = stride;
    stride *= std::max<int64_t>(extents[axis], 1);
  }
  return strides;
}

inline Arrangement dense(Layout layout, const Logical& g) {
  return with_strides(layout, g, packed_strides(sizes_in(layout, g)));
}

// Channels-last rows of `c + pad` elements: the last `pad` of each row are padding.
inline Arrangement rows_padded(Layout layout, const Logical& g, int64_t pad) {
  auto extents = sizes_in(layout, g);
  extents.back() += pad;
  return with_strides(layout, g, packed_strides(extents));
}

// Channels-first with `pad` elements after every [C, spatial] block (a batch
// slice of a larger buffer): outer stride C*S + pad.
inline Arrangement outer_padded(Layout layout, const Logical& g, int64_t pad) {
  auto strides = packed_strides(sizes_in(layout, g));
  strides[0] += pad;
  return with_strides(layout, g, strides);
}

// Channels-first with `pad` elements after every channel's spatial block and
// after every [C, spatial] block: channel stride S + pad.
inline Arrangement channel_padded(Layout layout, const Logical& g, int64_t pad) {
  auto strides = packed_strides(sizes_in(layout, g));
  strides[1] = g.s() + pad;
  strides[0] = g.c * strides[1] + pad;
  return with_strides(layout, g, strides);
}

// A logical NCHW view with channels-last strides (PyTorch's channels_last),
// optionally with padded rows (c + pad elements per position).
inline Arrangement nchw_channels_last(const Logical& g, int64_t pad = 0) {
  const int64_t h = g.spatial.at(0), w = g.spatial.at(1), cp = g.c + pad;
  return with_strides(Layout::NCHW, g, {h * w * cp, 1, w * cp, cp});
}

// Calls f(canonical_index, offset) for every logical element, in memory order
// (axes sorted by decreasing stride), so large strided buffers stream.
template <class F>
void for_each_element(const Arrangement& a, F&& f) {
  const Logical& g = a.logical;
  const int rank = static_cast<int>(a.sizes.size());
  if (g.numel() == 0) return;
  // Canonical stride of each layout axis.
  std::vector<int64_t> canon(rank);
  const bool last = normkit::is_channels_last(a.layout);
  const int c_axis = last ? rank - 1 : 1;
  const int first_spatial = last ? 1 : 2;
  canon[0] = g.c * g.s();
  canon[c_axis] = g.s();
  int64_t stride = 1;
  for (int j = static_cast<int>(g.spatial.size()) - 1; j >= 0; --j) {
    canon[first_spatial + j] = stride;
    stride *= g.spatial[j];
  }
  std::vector<int> order;
  for (int axis = 0; axis < rank; ++axis)
    if (a.sizes[axis] > 1) order.push_back(axis);
  std::stable_sort(order.begin(), order.end(),
                   [&](int p, int q) { return a.strides[p] > a.strides[q]; });
  if (order.empty()) {
    f(int64_t{0}, int64_t{0});
    return;
  }
  const int inner = order.back();
  const int64_t inner_size = a.sizes[inner], inner_mem = a.strides[inner], inner_can = canon[inner];
  std::vector<int64_t> index(order.size(), 0);
  int64_t mem = 0, can = 0;
  for (;;) {
    for (int64_t i = 0; i < inner_size; ++i) f(can + i * inner_can, mem + i * inner_mem);
    int k = static_cast<int>(order.size()) - 2;
    for (; k >= 0; --k) {
      const int axis = order[k];
      mem += a.strides[axis];
      can += canon[axis];
      if (++index[k] < a.sizes[axis]) break;
      mem -= a.strides[axis] * a.sizes[axis];
      can -= canon[axis] * a.sizes[axis];
      index[k] = 0;
    }
    if (k < 0) return;
  }
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Recognisable NaNs: an output element still holding one was never written;
// an input padding element holding one poisons any statistic that reads it.
template <class T>
T sentinel();
template <>
inline float sentinel<float>() {
  return std::bit_cast<float>(uint32_t{0x7fc0dead});
}
template <>
inline double sentinel<double>() {
  return std::bit_cast<double>(uint64_t{0x7ff80000deadbeefULL});
}

// A buffer holding one arrangement, every element initially `fill`.
template <class T>
struct Buffer {
  Arrangement arrangement;
  std::vector<T> storage;

  explicit Buffer(Arrangement a, T fill = sentinel<T>())
      : arrangement(std::move(a)), storage(static_cast<size_t>(arrangement.storage), fill) {}

  normkit::TensorView<T> view() {
    return normkit::TensorView<T>::strided(storage.data(), arrangement.sizes, arrangement.strides,
                                           arrangement.layout);
  }
  normkit::TensorView<const T> cview() const {
    return normkit::TensorView<const T>::strided(storage.data(), arrangement.sizes,
                                                 arrangement.strides, arrangement.layout);
  }
  template <class U>
  void scatter(const std::vector<U>& canonical) {
    for_each_element(arrangement, [&](int64_t i, int64_t offset) {
      storage[offset] = static_cast<T>(canonical[i]);
    });
  }
  std::vector<T> gather() const {
    std::vector<T> canonical(static_cast<size_t>(arrangement.logical.numel()));
    for_each_element(arrangement,
                     [&](int64_t i, int64_t offset) { canonical[i] = storage[offset]; });
    return canonical;
  }
  // Every element outside the logical tensor still holds `fill`, bit for bit.
  ::testing::AssertionResult padding_is(T fill, std::string_view what) const {
    if (arrangement.dense()) return ::testing::AssertionSuccess();
    std::vector<uint8_t> logical(storage.size(), 0);
    for_each_element(arrangement, [&](int64_t, int64_t offset) { logical[offset] = 1; });
    int64_t changed = 0, first = -1;
    for (size_t k = 0; k < storage.size(); ++k)
      if (!logical[k] && !same_bits(storage[k], fill)) {
        if (first < 0) first = static_cast<int64_t>(k);
        ++changed;
      }
    if (changed == 0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << what << ": " << changed << " padding elements were overwritten, first at offset "
           << first << " (now " << storage[first] << "), in " << arrangement.describe();
  }
};

// ---------------------------------------------------------------- data

// SplitMix64: fast and seedable, so a 50M-element tensor costs milliseconds.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  int64_t integer(int64_t lo, int64_t hi) {  // [lo, hi]
    return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo + 1));
  }

 private:
  uint64_t state_;
};

inline uint64_t seed_of(std::string_view text) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (const char ch : text) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ULL;
  return h;
}

// Canonical float data, channel c uniform with mean mean[c] and std stddev[c].
inline std::vector<float> channel_data(const Logical& g, const std::vector<double>& mean,
                                       const std::vector<double>& stddev, Rng& rng) {
  std::vector<float> data(static_cast<size_t>(g.numel()));
  const int64_t S = g.s();
  const double half_width = std::sqrt(3.0);
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t c = 0; c < g.c; ++c) {
      float* p = data.data() + (n * g.c + c) * S;
      for (int64_t s = 0; s < S; ++s)
        p[s] = static_cast<float>(mean[c] + stddev[c] * rng.uniform(-half_width, half_width));
    }
  return data;
}

inline std::vector<float> uniform_floats(size_t count, double lo, double hi, Rng& rng) {
  std::vector<float> v(count);
  for (auto& e : v) e = static_cast<float>(rng.uniform(lo, hi));
  return v;
}

template <class To, class From>
std::vector<To> convert(const std::vector<From>& v) {
  return std::vector<To>(v.begin(), v.end());
}

// The canonical [N, C, S] tensor as a dense NCL view: the oracle's input.
template <class T>
normkit::TensorView<T> canonical_view(T* data, const Logical& g) {
  return normkit::TensorView<T>::contiguous(data, {g.n, g.c, g.s()}, Layout::NCL);
}

// ---------------------------------------------------------------- tolerances

// |got - want| <= atol * scale + rtol * |want|, llm.c's validate_result with a
// scale: `scale` is the size of the terms an output is computed from (1 for
// outputs of unit scale; per channel where it differs, see the callers).
struct Tolerance {
  double atol, rtol;
};

// Set NORMKIT_TEST_VERBOSE=1 to print, for every check, the worst error as a
// fraction of its bound (how much headroom a tolerance has).
inline bool verbose() {
  static const bool on = [] {
    const char* v = std::getenv("NORMKIT_TEST_VERBOSE");
    return v && *v && std::string(v) != "0";
  }();
  return on;
}

// Elementwise check of `got` against `want`. With `shape`, values are canonical
// [N, C, S] tensors and channel_scale[c] is the scale of channel c; without it,
// values are per channel and channel_scale[i] is the scale of value i.
template <class G, class W>
::testing::AssertionResult all_close(std::string_view what, const std::vector<G>& got,
                                     const std::vector<W>& want, Tolerance tol,
                                     const Logical* shape = nullptr,
                                     const std::vector<double>* channel_scale = nullptr) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " values, expected " << want.size();
  int64_t failures = 0, worst = -1;
  double worst_ratio = 0;
  // Channel of element i without a division per element: canonical data runs
  // through blocks of S values per (n, c).
  const int64_t run = shape ? std::max<int64_t>(shape->s(), 1) : 1;
  const int64_t channels = shape ? shape->c : static_cast<int64_t>(got.size());
  int64_t channel = 0, in_run = 0;
  for (size_t i = 0; i < got.size(); ++i, ++in_run) {
    if (in_run == run) {
      in_run = 0;
      if (++channel == channels) channel = 0;
    }
    const double scale = channel_scale ? (*channel_scale)[channel] : 1.0;
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    const double bound = tol.atol * scale + tol.rtol * std::fabs(w);
    const double err = std::fabs(g - w);
    const double ratio = std::isnan(err) ? std::numeric_limits<double>::infinity()
                         : bound > 0     ? err / bound
                         : err > 0       ? std::numeric_limits<double>::infinity()
                                         : 0.0;
    if (!(err <= bound)) ++failures;  // NaN counts as a failure
    if (worst < 0 || ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = static_cast<int64_t>(i);
    }
  }
  if (verbose())
    std::printf("[ headroom ] %.*s: worst error %.3g of its bound\n",
                static_cast<int>(what.size()), what.data(), worst_ratio);
  if (failures == 0) return ::testing::AssertionSuccess();
  const double g = static_cast<double>(got[worst]), w = static_cast<double>(want[worst]);
  const double scale = channel_scale ? (*channel_scale)[shape ? shape->channel_of(worst) : worst]
                                     : 1.0;
  auto failure = ::testing::AssertionFailure();
  failure.operator<<(what) << ": " << failures << " of " << got.size()
                           << " values out of tolerance; worst at index " << worst;
  if (shape) failure << " " << shape->describe(worst);
  failure << ": got " << std::hexfloat << g << " (" << std::defaultfloat << g << "), expected "
          << w << ", |diff| " << std::fabs(g - w) << " > " << tol.atol * scale + tol.rtol * std::fabs(w)
          << " (atol " << tol.atol << " * scale " << scale << " + rtol " << tol.rtol << ")";
  return failure;
}

template <class T>
::testing::AssertionResult bitwise_equal(std::string_view what, const std::vector<T>& a,
                                         const std::vector<T>& b) {
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << what << ": sizes " << a.size() << " and " << b.size();
  for (size_t i = 0; i < a.size(); ++i)
    if (!same_bits(a[i], b[i]))
      return ::testing::AssertionFailure()
             << what << ": first difference at index " << i << ": " << std::hexfloat << a[i]
             << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------- errors and threads

// f() throws normkit::Error of `kind` whose message contains every one of `parts`.
template <class F>
::testing::AssertionResult throws_error(F&& f, normkit::ErrorKind kind,
                                        std::initializer_list<std::string_view> parts) {
  try {
    f();
  } catch (const normkit::Error& e) {
    if (e.kind() != kind)
      return ::testing::AssertionFailure()
             << "wrong ErrorKind (" << static_cast<int>(e.kind()) << ") for: " << e.what();
    const std::string message = e.what();
    for (const auto part : parts)
      if (message.find(part) == std::string::npos)
        return ::testing::AssertionFailure()
               << "message \"" << message << "\" does not contain \"" << part << "\"";
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw something other than normkit::Error: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// Sets the thread count for a scope and restores the previous one.
class ThreadCount {
 public:
  explicit ThreadCount(int n) : saved_(normkit::num_threads()) { normkit::set_num_threads(n); }
  ~ThreadCount() { normkit::set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};

inline std::string test_name_safe(std::string text) {
  for (auto& ch : text)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return text;
}

// Names parameterized tests by their parameter's `name` member.
struct ByName {
  template <class P>
  std::string operator()(const ::testing::TestParamInfo<P>& param) const {
    return test_name_safe(param.param.name);
  }
};

}  // namespace normkit_test
