#pragma once
// Non-temporal (streaming) stores for large outputs, shared by the batch-norm
// paths (batch_norm_planes.cpp, batch_norm_rows.cpp). Internal linkage, as
// leaf_loops.hpp explains.
#include <unistd.h>
#include <xmmintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "normkit/tensor.hpp"

namespace normkit::kernels::cpu {
namespace {

// Outputs at least half as large as the last-level cache are written with
// non-temporal stores. An ordinary store first reads the line it writes: for a
// kernel that reads x once and writes y, that is a third tensor's worth of
// memory traffic (the copy the benchmark compares with pays it too). An output
// this large would not stay in cache for its consumer anyway; a smaller one
// might, and streaming it past the cache was measured to cost more than it
// saves (12.8 MB tensors, 32 MB L3).
// The cache size comes from sysfs: in virtual machines cpuid (and so
// sysconf) can report a much larger L3 than the one the guest shares.
int64_t last_level_cache_bytes() {
  int64_t size = 0;
  if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long value = 0;
    char unit = 0;
    if (std::fscanf(f, "%ld%c", &value, &unit) >= 1)
      size = int64_t{value} << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
    std::fclose(f);
  }
  if (size <= 0) size = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return size > 0 ? size : int64_t{32} << 20;
}

int64_t streaming_bytes() {
  static const int64_t bytes = std::max<int64_t>(int64_t{8} << 20, last_level_cache_bytes() / 2);
  return bytes;
}

// Streaming pays only over long contiguous stretches: a stretch that ends
// inside a cache line leaves a partly written line, which costs more than the
// read it saves (7×7 planes: runs of 196 bytes). In place (the output is an
// input), streamed lines would leave the cache while the rest of them is still
// to be read: ordinary stores then.
constexpr int64_t kMinStreamedFloats = 256;
bool streaming_output(const Geometry& g, const float* out, const float* in,
                      const float* other_in = nullptr) {
  const bool rows = g.inner == 1;
  const int64_t stretch = rows ? (g.outer_stride == g.channels ? g.outer * g.channels : g.channels)
                               : (g.inner_stride == 1 ? g.inner : 1);
  return out != in && out != other_in && stretch >= kMinStreamedFloats &&
         g.outer * g.channels * g.inner * static_cast<int64_t>(sizeof(float)) >= streaming_bytes();
}

// ----- non-temporal (streaming) stores, see streaming_bytes -----
// Four floats per 16-byte aligned store; the unaligned head and the tail of a
// run go through the same SSE operations one float at a time, so on this path
// every element is rounded alike (separate multiply and add, never fused).
// `step` is 0 for one coefficient per run (planes), 1 for one per element (rows).

inline bool aligned16(const float* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline void stream_apply(const float* x, float* y, int64_t len, const float* mean_hi,
                         const float* scale, const float* shift, int64_t step) {
  const auto one = [&](int64_t i) {
    const int64_t c = i * step;
    const __m128 v = _mm_add_ss(
        _mm_mul_ss(_mm_sub_ss(_mm_load_ss(x + i), _mm_load_ss(mean_hi + c)), _mm_load_ss(scale + c)),
        _mm_load_ss(shift + c));
    y[i] = _mm_cvtss_f32(v);
  };
  int64_t i = 0;
  for (; i < len && !aligned16(y + i); ++i) one(i);
  const __m128 m1 = _mm_set1_ps(*mean_hi), s1 = _mm_set1_ps(*scale), t1 = _mm_set1_ps(*shift);
  for (; i + 4 <= len; i += 4) {
    const __m128 m = step ? _mm_loadu_ps(mean_hi + i) : m1;
    const __m128 sc = step ? _mm_loadu_ps(scale + i) : s1;
    const __m128 t = step ? _mm_loadu_ps(shift + i) : t1;
    _mm_stream_ps(y + i, _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(x + i), m), sc), t));
  }
  for (; i < len; ++i) one(i);
}

// dx = (a·dy + b·(x - mean_hi)) + k, in that order, as the ordinary path.
inline void stream_backward(const float* x, const float* dy, float* dx, int64_t len,
                            const float* mean_hi, const float* a, const float* b, const float* k,
                            int64_t step) {
  const auto one = [&](int64_t i) {
    const int64_t c = i * step;
    const __m128 ag = _mm_mul_ss(_mm_load_ss(a + c), _mm_load_ss(dy + i));
    const __m128 bx = _mm_mul_ss(_mm_load_ss(b + c), _mm_sub_ss(_mm_load_ss(x + i), _mm_load_ss(mean_hi + c)));
    dx[i] = _mm_cvtss_f32(_mm_add_ss(_mm_add_ss(ag, bx), _mm_load_ss(k + c)));
  };
  int64_t i = 0;
  for (; i < len && !aligned16(dx + i); ++i) one(i);
  const __m128 m1 = _mm_set1_ps(*mean_hi), a1 = _mm_set1_ps(*a), b1 = _mm_set1_ps(*b),
               k1 = _mm_set1_ps(*k);
  for (; i + 4 <= len; i += 4) {
    const __m128 m = step ? _mm_loadu_ps(mean_hi + i) : m1;
    const __m128 av = step ? _mm_loadu_ps(a + i) : a1;
    const __m128 bv = step ? _mm_loadu_ps(b + i) : b1;
    const __m128 kv = step ? _mm_loadu_ps(k + i) : k1;
    const __m128 ag = _mm_mul_ps(av, _mm_loadu_ps(dy + i));
    const __m128 bx = _mm_mul_ps(bv, _mm_sub_ps(_mm_loadu_ps(x + i), m));
    _mm_stream_ps(dx + i, _mm_add_ps(_mm_add_ps(ag, bx), kv));
  }
  for (; i < len; ++i) one(i);
}

}  // namespace
}  // namespace normkit::kernels::cpu
