#pragma once
// The ReLU mask of the fused BN+ReLU kernels (batch_norm_fused_planes.cpp,
// batch_norm_fused_rows.cpp): packing (y > 0) into bits and expanding bits
// back into g = mask ? dy : 0. The bit order is the contract's
// (kernels/batch_norm_fused.hpp, MaskOrder). Internal linkage, as
// leaf_loops.hpp explains.
//
// Packing and expanding bits needs compare-to-mask instructions the compiler
// does not derive, so these use intrinsics behind a runtime CPU check (not
// target_clones). Mask bytes shared by two runs (threads) are updated with
// atomic and/or on disjoint bits.
#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NORMKIT_X86 1
#endif

namespace normkit::kernels::cpu {
namespace {

// g is expanded from the bits in blocks this small, so that the reads of dy
// (expanding) and of x (using g) alternate quickly and both stream at once.
constexpr int64_t kExpandBlock = 512;


// Full bytes: out[j] bit l = (v[8j + l] > 0).
void pack_bytes_scalar(const float* v, int64_t bytes, uint8_t* out) {
  for (int64_t j = 0; j < bytes; ++j) {
    unsigned b = 0;
    for (int l = 0; l < 8; ++l) b |= static_cast<unsigned>(v[8 * j + l] > 0.0f) << l;
    out[j] = static_cast<uint8_t>(b);
  }
}

// g[8j + l] = (bit l of bits[j]) ? dy[8j + l] : 0.
void expand_bytes_scalar(const float* dy, const uint8_t* bits, int64_t bytes, float* g) {
  for (int64_t j = 0; j < bytes; ++j)
    for (int l = 0; l < 8; ++l) g[8 * j + l] = (bits[j] >> l) & 1u ? dy[8 * j + l] : 0.0f;
}

#ifdef NORMKIT_X86
void pack_bytes_sse2(const float* v, int64_t bytes, uint8_t* out) {
  const __m128 zero = _mm_setzero_ps();
  for (int64_t j = 0; j < bytes; ++j) {
    const int lo = _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(v + 8 * j), zero));
    const int hi = _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(v + 8 * j + 4), zero));
    out[j] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

__attribute__((target("avx2"))) void pack_bytes_avx2(const float* v, int64_t bytes, uint8_t* out) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t j = 0; j < bytes; ++j)
    out[j] = static_cast<uint8_t>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + 8 * j), zero, _CMP_GT_OQ)));
}

__attribute__((target("avx512f"))) void pack_bytes_avx512(const float* v, int64_t bytes,
                                                          uint8_t* out) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= bytes; j += 2) {
    const uint16_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + 8 * j), zero, _CMP_GT_OQ);
    std::memcpy(out + j, &m, 2);
  }
  pack_bytes_scalar(v + 8 * j, bytes - j, out + j);
}

void expand_bytes_sse2(const float* dy, const uint8_t* bits, int64_t bytes, float* g) {
  const __m128i lo_bits = _mm_setr_epi32(1, 2, 4, 8), hi_bits = _mm_setr_epi32(16, 32, 64, 128);
  for (int64_t j = 0; j < bytes; ++j) {
    const __m128i b = _mm_set1_epi32(bits[j]);
    const __m128 lo = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(b, lo_bits), lo_bits));
    const __m128 hi = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(b, hi_bits), hi_bits));
    _mm_storeu_ps(g + 8 * j, _mm_and_ps(lo, _mm_loadu_ps(dy + 8 * j)));
    _mm_storeu_ps(g + 8 * j + 4, _mm_and_ps(hi, _mm_loadu_ps(dy + 8 * j + 4)));
  }
}

__attribute__((target("avx2"))) void expand_bytes_avx2(const float* dy, const uint8_t* bits,
                                                       int64_t bytes, float* g) {
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t j = 0; j < bytes; ++j) {
    const __m256i b = _mm256_set1_epi32(bits[j]);
    const __m256 keep =
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, lane_bits), lane_bits));
    _mm256_storeu_ps(g + 8 * j, _mm256_and_ps(keep, _mm256_loadu_ps(dy + 8 * j)));
  }
}

__attribute__((target("avx512f"))) void expand_bytes_avx512(const float* dy, const uint8_t* bits,
                                                            int64_t bytes, float* g) {
  int64_t j = 0;
  for (; j + 2 <= bytes; j += 2) {
    uint16_t m;
    std::memcpy(&m, bits + j, 2);
    // A plain load, then the mask: a masked load streams much slower here, and
    // the empty asm keeps the compiler from folding the two back into one.
    __m512 v = _mm512_loadu_ps(dy + 8 * j);
    asm("" : "+v"(v));
    _mm512_storeu_ps(g + 8 * j, _mm512_maskz_mov_ps(m, v));
  }
  expand_bytes_scalar(dy + 8 * j, bits + j, bytes - j, g + 8 * j);
}
#endif

using PackBytes = void (*)(const float*, int64_t, uint8_t*);
using ExpandBytes = void (*)(const float*, const uint8_t*, int64_t, float*);

struct BitKernels {
  PackBytes pack;
  ExpandBytes expand;
};

BitKernels choose_bit_kernels() {
#ifdef NORMKIT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {pack_bytes_avx512, expand_bytes_avx512};
  if (__builtin_cpu_supports("avx2")) return {pack_bytes_avx2, expand_bytes_avx2};
  return {pack_bytes_sse2, expand_bytes_sse2};
#else
  return {pack_bytes_scalar, expand_bytes_scalar};
#endif
}

const BitKernels& bit_kernels() {
  static const BitKernels chosen = choose_bit_kernels();
  return chosen;
}

// Sets bits [first, first + count) of a byte that other threads may update at
// other bits: clear then set, each an atomic read-modify-write.
void update_byte(uint8_t* byte, unsigned range, unsigned bits) {
  __atomic_fetch_and(byte, static_cast<uint8_t>(~range), __ATOMIC_RELAXED);
  __atomic_fetch_or(byte, static_cast<uint8_t>(bits), __ATOMIC_RELAXED);
}

// Expands bits [first, first + count) of mask into g from dy.
[[maybe_unused]] void expand_bits(const float* dy, const uint8_t* mask, int64_t first, int64_t count,
                                 float* g) {
  int64_t k = 0;
  for (; k < count && (first + k) % 8 != 0; ++k)
    g[k] = (mask[(first + k) / 8] >> ((first + k) % 8)) & 1u ? dy[k] : 0.0f;
  const int64_t bytes = (count - k) / 8;
  bit_kernels().expand(dy + k, mask + (first + k) / 8, bytes, g + k);
  for (k += 8 * bytes; k < count; ++k)
    g[k] = (mask[(first + k) / 8] >> ((first + k) % 8)) & 1u ? dy[k] : 0.0f;
}

// Bits [first, first + count) of the mask: bit (first + k) = (v[k] > 0), for a
// run of floats; the bytes at the run's two ends are shared with other runs
// (other threads), so those are updated atomically.
void pack_positive_bits(const float* v, int64_t count, uint8_t* mask, int64_t first) {
  int64_t k = 0;
  if (first % 8 != 0) {
    const int start = static_cast<int>(first % 8);
    const int n = static_cast<int>(std::min<int64_t>(count, 8 - start));
    unsigned range = 0, bits = 0;
    for (int l = 0; l < n; ++l) {
      range |= 1u << (start + l);
      bits |= static_cast<unsigned>(v[l] > 0.0f) << (start + l);
    }
    update_byte(mask + first / 8, range, bits);
    k = n;
  }
  const int64_t bytes = (count - k) / 8;
  bit_kernels().pack(v + k, bytes, mask + (first + k) / 8);
  k += 8 * bytes;
  if (k < count) {
    unsigned range = 0, bits = 0;
    for (int l = 0; k + l < count; ++l) {
      range |= 1u << l;
      bits |= static_cast<unsigned>(v[k + l] > 0.0f) << l;
    }
    update_byte(mask + (first + k) / 8, range, bits);
  }
}

}  // namespace
}  // namespace normkit::kernels::cpu
