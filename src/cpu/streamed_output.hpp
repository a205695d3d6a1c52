#pragma once
// Outputs larger than the writing threads' L2 go to memory with non-temporal
// (streaming) stores. An ordinary store first reads the line it writes (a
// read for ownership); a streaming store of a whole line does not, so an
// output on its way to memory anyway costs one transfer instead of two.
// Measured with the bench (caches evicted, 2 threads, the two ways alternated
// in one session), x a copy: BN inference 32x64x56x56 NCHW 1.04-1.06 ->
// 0.86-0.89, forward-train 1.66 -> 1.46-1.50, backward 1.91-1.96 -> 1.70-1.74;
// 16x256x28x28 NHWC forward+backward 4.36-4.40 -> 3.76-3.80; BN+Add+ReLU
// 32x64x56x56 NCHW backward 3.39 -> 2.30, BN+ReLU forward-train 1.75 ->
// 1.46. With the output's lines in L3 already (a loop of BN inference, then a
// copy of y, on 25.7 MB tensors), neither the kernel nor the reader of y
// changed: 1.28 / 1.87 ms against 1.30 / 1.88. oneDNN's JIT batch norm
// streams its aligned outputs too. On 12.8 MB tensors with the caches warm
// (the same buffers every round) ordinary stores measured faster; evicted,
// streaming is: the rule follows the evicted case (docs/design.md).
//
// The kernel computes a block of the output into a buffer in L1 with its own
// loop, then streams the buffer out: the same loop writes the same bits
// either way, and its clones (target_clones) stay as they are
// (tests/cpp/test_batch_norm_numerics.cpp, StreamedOutputs). Contiguous rows,
// and BN's and group norm's planes, skip the buffer on AVX-512 CPUs:
// stream_rows_avx512 below.
// Internal linkage, as the other shared headers (src/cpu/README.md, rule 5).
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "core/simd_clones.hpp"
#include "core/workspace.hpp"

namespace normkit::kernels::cpu {
namespace {

// The buffer: 32 KB, in L1 (or L2) next to the loop's inputs: room for one
// output's 4096-value units and two outputs' 56×56 planes.
constexpr int64_t kStreamBlock = 8192;

// Streaming stores are weakly ordered: a thread's are done (visible) before
// anyone reads what they wrote. Every streamed pass ends with this; a series
// of straight runs (kFence false below) ends with one.
inline void streamed_stores_done() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// A core's L2 cache (sysconf; 1 MB when it does not say).
[[maybe_unused]] int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? int64_t{reported} : int64_t{1} << 20;
  }();
  return bytes;
}

// Whether an output of `elements` floats, written by `threads` threads, is
// streamed: when it cannot stay in their L2 caches.
[[maybe_unused]] bool stream_output(int64_t elements, int threads) {
  return elements * int64_t{sizeof(float)} > l2_bytes() * threads;
}

// dst[0, n) = src[0, n): whole 64-byte lines of dst with streaming stores,
// the partial lines at either end with ordinary ones (a streaming store of
// part of a line costs a read and a write in memory). A line in one AVX-512
// store where the CPU has it, else in four SSE2 ones (every x86-64): at 2
// threads, alternated bench runs, the NHWC backward of 16×256×28×28 went from
// 2.39× a copy to 2.23-2.24, of 32×64×56×56 from 2.12-2.15 to 2.06-2.10.
#if defined(__SSE2__)
__attribute__((target("avx512f"))) inline void stream_lines_avx512(const float* src, float* dst,
                                                                   int64_t n) {
  for (int64_t i = 0; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
}
#endif
[[maybe_unused]] void stream_copy(const float* src, float* dst, int64_t n) {
#if defined(__SSE2__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 64 != 0; ++i) dst[i] = src[i];
  if (avx512) {
    const int64_t whole_lines = (n - i) / 16 * 16;
    stream_lines_avx512(src + i, dst + i, whole_lines);
    i += whole_lines;
  }
  for (; i + 16 <= n; i += 16)
    for (int64_t j = i; j < i + 16; j += 4) _mm_stream_ps(dst + j, _mm_loadu_ps(src + j));
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
#endif
}

// Runs shorter than this, apart from each other, are written in place: most
// of their lines would be partial (32x2048x7x7 NCHW backward, runs of 49
// values 401 KB apart: 3.3 -> 16 x a copy when streamed).
constexpr int64_t kMinStreamedRun = 256;

// One output of a kernel's pass: row r at data + r·stride (data may be null:
// not wanted).
struct Output {
  float* data;
  int64_t stride;
};

// The buffer's share of each wanted output.
template <size_t N>
int64_t buffer_share(const std::array<Output, N>& outputs) {
  int64_t wanted = 0;
  for (const Output& o : outputs) wanted += o.data != nullptr;
  return kStreamBlock / std::max<int64_t>(wanted, 1);
}

// Whether write_outputs (below) streams these outputs, for callers that plan
// around it: `stream`, rows that fit the buffer, and no output in runs shorter
// than kMinStreamedRun (a run: the whole rows when they are contiguous, one
// row otherwise).
template <size_t N>
bool streams(bool stream, const std::array<Output, N>& outputs, int64_t rows, int64_t width) {
  if (!stream || width == 0 || width > buffer_share(outputs)) return false;
  for (const Output& o : outputs)
    if (o.data && (o.stride == width ? rows * width : width) < kMinStreamedRun) return false;
  return true;
}

// `rows` rows of `width` floats in each output (one or two: BN+Add+ReLU's dx
// and dz): write(r0, count, out) computes rows [r0, r0 + count) into out (a
// std::array<Output, N>). With `stream`, out is the buffer, streamed to the
// outputs after each call; contiguous rows (stride == width: a dense NCHW
// unit of short planes, where they are not streamed straight) go out as one
// run. Otherwise (or when the rows are too wide for the buffer, or too short
// to stream: `streams`) out is the outputs themselves, in one call.
template <size_t N, class Write>
void write_outputs(bool stream, const std::array<Output, N>& outputs, int64_t rows,
                   int64_t width, Write&& write) {
  if (!streams(stream, outputs, rows, width)) return write(int64_t{0}, rows, outputs);
  const int64_t share = buffer_share(outputs);
  detail::Workspace ws;
  float* const buffer = ws.take_for_overwrite<float>(kStreamBlock).data();
  std::array<Output, N> in_buffer;
  for (size_t i = 0, used = 0; i < N; ++i)
    in_buffer[i] = {outputs[i].data ? buffer + share * static_cast<int64_t>(used++) : nullptr,
                    width};
  const int64_t step = share / width;
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t count = std::min(step, rows - r0);
    write(r0, count, in_buffer);
    for (size_t i = 0; i < N; ++i) {
      const Output& o = outputs[i];
      if (!o.data) continue;
      if (o.stride == width) {
        stream_copy(in_buffer[i].data, o.data + r0 * o.stride, count * width);
      } else {
        for (int64_t r = 0; r < count; ++r)
          stream_copy(in_buffer[i].data + r * width, o.data + (r0 + r) * o.stride, width);
      }
    }
  }
  streamed_stores_done();
}

#if NORMKIT_HAS_SIMD_CLONES
// Contiguous outputs straight to memory on AVX-512 CPUs: whole 64-byte lines
// with streaming stores, the partial lines at either end with ordinary
// (masked) ones. Through the 32 KB buffer (write_outputs) a block is
// computed and then copied out, so the reads of the inputs and the streamed
// writes take turns; straight from the loop they overlap. 25.7 MB NHWC, C = 64,
// at 2 threads, x memcpy: an apply 0.71 straight, 0.95-0.99 through the buffer.
// The lines' arithmetic is the AVX-512 clones' (with GCC's FMA contraction):
// the same bits (the StreamedOutputs tests fail otherwise). Measured on the
// Intel VM only (see docs/design.md on an earlier attempt).
// `values` values in rows (or runs) of `width`, each input and output with
// `strides`: straight when they are contiguous (every stride `width`) and
// long enough to stream (kMinStreamedRun, as write_outputs' rule).
[[maybe_unused]] bool streams_straight(bool stream, int64_t values, int64_t width,
                                       std::initializer_list<int64_t> strides,
                                       std::initializer_list<const float*> outputs) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!stream || !avx512 || values < kMinStreamedRun) return false;
  for (const int64_t s : strides)
    if (s != width) return false;
  const float* first = nullptr;  // the outputs (null: none) in the same place of a line
  for (const float* o : outputs) {
    if (o && reinterpret_cast<uintptr_t>(o) % sizeof(float)) return false;  // never on a line
    if (o && first && (reinterpret_cast<uintptr_t>(o) - reinterpret_cast<uintptr_t>(first)) % 64)
      return false;
    if (o && !first) first = o;
  }
  return true;
}
// A line's values for each of N outputs (a struct: std::array<__m512, N>
// drops __m512's attributes, and GCC warns).
template <size_t N>
struct Lines {
  __m512 v[N];
  const __m512& operator[](size_t o) const { return v[o]; }
};
// outs[o][i] for i in [0, n), value i of channel i % channels: line(i, c,
// lanes) gives each output's 16 values from i (channel c; only `lanes` of them
// at the ends). The outputs share their alignment (streams_straight);
// null ones are skipped. Ends with a fence unless the caller fences after a
// series of calls (kFence false).
template <size_t N, bool kFence = true, class Line>
__attribute__((target("avx512f"))) inline void stream_rows_avx512(
    const std::array<float*, N>& outs, int64_t n, int64_t channels, Line&& line) {
  int64_t i = 0, c = 0;
  const auto advance = [&](int64_t by) {  // (a division only for fewer than 16 channels:
    i += by;                               // one per line would chain the lines)
    c += by;
    if (c >= channels) c = channels >= 16 ? c - channels : c % channels;
  };
  const auto store_part = [&](__mmask16 lanes) __attribute__((target("avx512f"), always_inline)) {
    const auto v = line(i, c, lanes);
    for (size_t o = 0; o < N; ++o)
      if (outs[o]) _mm512_mask_storeu_ps(outs[o] + i, lanes, v[o]);
  };
  const float* aligned_by = outs[0] ? outs[0] : outs[N - 1];
  if (const int64_t head = std::min<int64_t>(
          n, (16 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(aligned_by) % 64 / 4)) % 16);
      head > 0) {
    store_part(static_cast<__mmask16>((1u << head) - 1));
    advance(head);
  }
  for (; i + 16 <= n; advance(16)) {
    const auto v = line(i, c, __mmask16{0xffff});
    for (size_t o = 0; o < N; ++o)
      if (outs[o]) _mm512_stream_ps(outs[o] + i, v[o]);
  }
  if (i < n) store_part(static_cast<__mmask16>((1u << (n - i)) - 1));
  if constexpr (kFence) streamed_stores_done();
}
// y[0, n) = (x - mean_hi)·scale + shift straight, as the clones' loops
// contract it (FMA), for a series of runs with constant coefficients each
// (a channel's planes, its pieces): without the fence, which the caller
// gives once after the series (streamed_stores_done). y may be x.
__attribute__((target("avx512f"))) inline void stream_apply_run_avx512(const float* x, float* y,
                                                                       int64_t n, float mean_hi,
                                                                       float scale, float shift) {
  const __m512 m = _mm512_set1_ps(mean_hi), s = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift);
  stream_rows_avx512<1, false>({y}, n, n,
                               [&](int64_t i, int64_t, __mmask16 lanes) __attribute__((
                                   target("avx512f"), always_inline)) {
    return Lines<1>{_mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i), m), s, b)};
  });
}
#endif

}  // namespace
}  // namespace normkit::kernels::cpu
