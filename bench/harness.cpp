#include "harness.hpp"

#include <omp.h>
#include <xmmintrin.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>

#include "core/simd_clones.hpp"
#include "cpu/streamed_output.hpp"

namespace normkit_bench {

int64_t Problem::numel() const {
  int64_t n = 1;
  for (int64_t size : sizes) n *= size;
  return n;
}

std::vector<int64_t> Problem::strides() const {
  const int r = rank();
  std::vector<int64_t> strides(sizes.size());
  if (memory == Memory::channels_first || r <= 2) {
    int64_t step = 1;
    for (int axis = r - 1; axis >= 0; --axis) {
      strides[axis] = step;
      step *= sizes[axis];
    }
  } else {
    // Memory order N, spatial..., C: channels fastest.
    strides[1] = 1;
    int64_t step = sizes[1];
    for (int axis = r - 1; axis >= 2; --axis) {
      strides[axis] = step;
      step *= sizes[axis];
    }
    strides[0] = step;
  }
  return strides;
}

std::string Problem::layout_name() const {
  static const char* const first[] = {"", "", "NC", "NCL", "NCHW", "NCDHW"};
  static const char* const last[] = {"", "", "NC", "NLC", "NHWC", "NDHWC"};
  if (rank() < 2 || rank() > 5) return "?";
  return memory == Memory::channels_last ? last[rank()] : first[rank()];
}

std::string Problem::shape_string() const {
  std::string s;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += 'x';
    s += std::to_string(sizes[i]);
  }
  return s;
}

std::string Problem::label() const { return kind + " " + shape_string() + " " + layout_name(); }

Buffer::Buffer(int64_t count) : size_(count) {
  const size_t bytes = (static_cast<size_t>(count) * sizeof(float) + 63) / 64 * 64;
  data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
  if (!data_) throw std::bad_alloc();
  std::memset(data_.get(), 0, bytes);
}

namespace {

// xorshift: fast enough that filling 100 MB takes no noticeable time.
struct Random {
  uint64_t state;
  float uniform() {  // [0, 1)
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return static_cast<float>(state >> 40) * 0x1p-24f;
  }
  void fill(Buffer& b, float lo, float hi) {
    for (int64_t i = 0; i < b.size(); ++i) b.data()[i] = lo + (hi - lo) * uniform();
  }
};

}  // namespace

Data make_data(const Problem& problem) {
  const int64_t n = problem.numel(), c = problem.channels();
  Data d{problem,   Buffer(n), Buffer(n), Buffer(n), Buffer(n),
         Buffer(n), Buffer(c), Buffer(c), Buffer(c), Buffer(c)};
  Random random{0x9E3779B97F4A7C15ull};
  random.fill(d.x, -1.0f, 3.0f);
  random.fill(d.dy, -1.0f, 1.0f);
  random.fill(d.gamma, 0.5f, 1.5f);
  random.fill(d.beta, -0.5f, 0.5f);
  random.fill(d.running_mean, 0.0f, 2.0f);
  random.fill(d.running_var, 0.5f, 2.0f);
  return d;
}

const char* op_name(Op op) {
  switch (op) {
    case Op::copy:
      return "copy";
    case Op::copy_streaming:
      return "copy-streaming";
    case Op::clone:
      return "clone";
    case Op::forward_training:
      return "forward-train";
    case Op::backward:
      return "backward";
    case Op::forward_backward:
      return "forward+backward";
    case Op::inference:
      return "inference";
    case Op::moments:
      return "moments";
    case Op::forward_apply:
      return "forward-apply";
    case Op::backward_reduce:
      return "backward-reduce";
    case Op::backward_apply:
      return "backward-apply";
  }
  return "?";
}

bool is_phase(Op op) {
  return op == Op::moments || op == Op::forward_apply || op == Op::backward_reduce ||
         op == Op::backward_apply;
}

Case copy_case(Data& data, int threads) {
  const float* src = data.x.data();
  float* dst = data.copy.data();
  const int64_t n = data.problem.numel();
  Case c{"copy", Op::copy, "", nullptr, nullptr};
  if (threads == 1) {
    c.note = "std::memcpy, 1 thread";
    c.run = [=] { std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); };
  } else {
    c.note = "std::memcpy of a contiguous 1/" + std::to_string(threads) + " per thread, " +
             std::to_string(threads) + " OpenMP threads";
    c.run = [=] {
#pragma omp parallel num_threads(threads)
      {
        // Chunk boundaries on 64-byte lines, so no two threads write one line.
        const int64_t lines = (n + 15) / 16, t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t begin = std::min(n, lines * t / T * 16);
        const int64_t end = std::min(n, lines * (t + 1) / T * 16);
        if (end > begin)
          std::memcpy(dst + begin, src + begin, static_cast<size_t>(end - begin) * sizeof(float));
      }
    };
  }
  return c;
}

Case streaming_copy_case(Data& data, int threads) {
  const float* src = data.x.data();
  float* dst = data.copy.data();
  const int64_t n = data.problem.numel();
  Case c{"copy", Op::copy_streaming,
         "non-temporal stores as normkit's outputs (cpu::stream_copy), " +
             std::to_string(threads) + " thread" + (threads == 1 ? "" : "s"),
         nullptr, nullptr};
  c.run = [=] {
#pragma omp parallel num_threads(threads)
    {
      const int64_t lines = (n + 15) / 16, t = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t begin = std::min(n, lines * t / T * 16);
      normkit::kernels::cpu::stream_copy(src + begin, dst + begin,
                                         std::min(n, lines * (t + 1) / T * 16) - begin);
      _mm_sfence();
    }
  };
  return c;
}

namespace {

// The floor's passes over [begin, end) of one thread's share (floor_cases).
// Sums in double lanes the compiler may reorder (omp simd): their value is
// never used, only their cost.
struct Sums {
  double a = 0, b = 0;
};
NORMKIT_SIMD_CLONES
Sums sums_pass(const float* __restrict u, const float* __restrict v, int64_t begin, int64_t end) {
  double a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = begin; i < end; ++i) {
    a += u[i];
    b += static_cast<double>(u[i]) * v[i];
  }
  return {a, b};
}

NORMKIT_SIMD_CLONES
void output_pass(const float* __restrict u, const float* __restrict v, float* __restrict out,
                 int64_t begin, int64_t end, float a, float b, float c) {
  if (v == nullptr) {
    for (int64_t i = begin; i < end; ++i) out[i] = a * u[i] + b;
  } else {
    for (int64_t i = begin; i < end; ++i) out[i] = a * u[i] + b * v[i] + c;
  }
}

// Runs pass(begin, end) on `threads` threads, each on a contiguous share cut
// on 64-byte lines (as copy_case).
template <class Pass>
void on_shares(int64_t n, int threads, Pass pass) {
#pragma omp parallel num_threads(threads)
  {
    const int64_t lines = (n + 15) / 16, t = omp_get_thread_num(), T = omp_get_num_threads();
    pass(std::min(n, lines * t / T * 16), std::min(n, lines * (t + 1) / T * 16));
  }
}

}  // namespace

std::vector<Case> floor_cases(Data& data, int threads) {
  const float* x = data.x.data();
  const float* dy = data.dy.data();
  float* y = data.y.data();
  float* dx = data.dx.data();
  const int64_t n = data.problem.numel();
  const auto forward = [=] {
    on_shares(n, threads, [&](int64_t begin, int64_t end) {
      const Sums s = sums_pass(x, x, begin, end);  // used, so the pass is kept
      output_pass(x, nullptr, y, begin, end, 0.5f, static_cast<float>(s.a * 1e-30), 0);
    });
  };
  const auto backward = [=] {
    on_shares(n, threads, [&](int64_t begin, int64_t end) {
      const Sums s = sums_pass(dy, x, begin, end);
      output_pass(dy, x, dx, begin, end, 0.5f, 0.25f, static_cast<float>(s.b * 1e-30));
    });
  };
  const auto inference = [=] {
    on_shares(n, threads, [&](int64_t begin, int64_t end) {
      output_pass(x, nullptr, y, begin, end, 0.5f, 0.25f, 0);
    });
  };
  const std::string note = "two-pass floor, memory order, " + std::to_string(threads) +
                           " thread" + (threads == 1 ? "" : "s");
  return {{"floor", Op::forward_training, note, forward, nullptr},
          {"floor", Op::backward, note, backward, nullptr},
          {"floor", Op::forward_backward, note, [=] { forward(); backward(); }, nullptr},
          {"floor", Op::inference, "one pass, memory order", inference, nullptr}};
}

std::vector<Case> floor_phase_cases(Data& data, int threads) {
  const int64_t n = data.problem.numel();
  // The sums go somewhere the compiler cannot see through, so the passes stay.
  auto sink = std::make_shared<double>(0);
  const auto sums = [=](const float* u, const float* v) {
    return [=] {
      on_shares(n, threads, [&](int64_t begin, int64_t end) {
        const Sums s = sums_pass(u, v, begin, end);
#pragma omp atomic
        *sink += s.a + s.b;
      });
    };
  };
  const auto output = [=](const float* u, const float* v, float* out) {
    return [=] {
      on_shares(n, threads, [&](int64_t begin, int64_t end) {
        output_pass(u, v, out, begin, end, 0.5f, 0.25f, 0.125f);
      });
    };
  };
  const float *x = data.x.data(), *dy = data.dy.data();
  const std::string note = "one pass, memory order, " + std::to_string(threads) + " thread" +
                           (threads == 1 ? "" : "s");
  return {{"floor", Op::moments, note, sums(x, x), nullptr},
          {"floor", Op::forward_apply, note, output(x, nullptr, data.y.data()), nullptr},
          {"floor", Op::backward_reduce, note, sums(dy, x), nullptr},
          {"floor", Op::backward_apply, note, output(dy, x, data.dx.data()), nullptr}};
}

double minimal_bytes(Op op, const Problem& problem) {
  const double tensor = static_cast<double>(problem.numel()) * sizeof(float);
  // bn_add_relu also reads the residual (forward) and writes its gradient (backward).
  const double residual = problem.kind == "bn_add_relu" ? tensor : 0.0;
  switch (op) {
    case Op::backward:
      return 3 * tensor + residual;
    case Op::forward_backward:
      return 5 * tensor + 2 * residual;
    case Op::forward_training:
    case Op::inference:
      return 2 * tensor + residual;
    case Op::moments:
      return tensor;
    case Op::forward_apply:
    case Op::backward_reduce:
      return 2 * tensor;
    case Op::backward_apply:
      return 3 * tensor;
    default:
      return 2 * tensor;
  }
}

}  // namespace normkit_bench
