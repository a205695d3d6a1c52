// Fast BN+ReLU and BN+Add+ReLU for float data, forward and backward.
//
// The same two paths as batch_norm_cpu.cpp, chosen by the strides:
//   planes: channels-first with contiguous inner runs (NCL, NCHW, NCDHW);
//   rows:   contiguous channels, a row of C values per position (NHWC, ...).
// Both also need the mask's bit order to be the (o, c, i) order their loops
// walk (true for every non-overlapping view of those two kinds); anything else
// runs the reference.
//
// Forward = batch statistics (the scheme of batch_norm_cpu.cpp: pieces fixed by
// the geometry, float lanes inside a piece, Chan merges in double in a fixed
// order) + one pass that writes y = relu(BN(x) [+ z]) and packs the mask from
// the y just written (y > 0 exactly where the pre-activation is > 0). Planes
// works channel at a time when the channels keep every thread busy, so x is
// re-read from cache for the apply pass, as the unfused BN kernel does.
//
// Backward = the BN backward of g = mask ? dy : 0, where g is expanded from the
// bits into a small per-thread buffer (L1, 512 elements at a time) right before
// each leaf loop uses it: it never exists as a tensor, and the mask costs 1/32
// of dy's bytes. (BN+Add+ReLU expands straight into dz, which is g.)
//
// Determinism: the pieces, chunks and merge orders depend only on the geometry,
// and mask bytes shared by two runs (threads) are updated with atomic and/or on
// disjoint bits, so every result is bitwise identical for any thread count.
//
// SIMD: leaf loops are plain loops compiled for AVX-512, AVX2 and baseline x86-64
// (target_clones; those shared with batch_norm_cpu.cpp are in leaf_loops.hpp);
// packing and expanding bits needs compare-to-mask instructions the compiler
// does not derive, so those use intrinsics behind a runtime CPU check. The
// AVX2 and AVX-512 clones may contract multiply-adds into FMAs (GCC does in
// C++ even in ISO mode), so bits are identical for any thread count on one
// machine, not across machines that run different clones.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/parallel.hpp"
#include "kernels/batch_norm_fused.hpp"
#include "leaf_loops.hpp"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NORMKIT_X86 1
#endif

namespace normkit::kernels {

// ======================= bits =======================
namespace {

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
void expand_bits(const float* dy, const uint8_t* mask, int64_t first, int64_t count, float* g) {
  int64_t k = 0;
  for (; k < count && (first + k) % 8 != 0; ++k)
    g[k] = (mask[(first + k) / 8] >> ((first + k) % 8)) & 1u ? dy[k] : 0.0f;
  const int64_t bytes = (count - k) / 8;
  bit_kernels().expand(dy + k, mask + (first + k) / 8, bytes, g + k);
  for (k += 8 * bytes; k < count; ++k)
    g[k] = (mask[(first + k) / 8] >> ((first + k) % 8)) & 1u ? dy[k] : 0.0f;
}

}  // namespace

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

namespace {

using detail::threads_for;
using leaf::GradientSums;
using leaf::gradient_sums_run;
using leaf::merge_moment_arrays;
using leaf::param_or;
using leaf::Pieces;
using leaf::RowPlan;
using leaf::scratch;
using leaf::whole_units_per_thread;

// ======================= leaf loops =======================

// g is expanded from the bits in blocks this small, so that the reads of dy
// (expanding) and of x (using g) alternate quickly and both stream at once.
constexpr int64_t kExpandBlock = 512;

// y = relu((x - mean_hi)·scale + shift) over one run; relu keeps NaN.
NORMKIT_SIMD_CLONES
void apply_relu_run(const float* __restrict x, float* __restrict y, int64_t len,
                    ApplyCoefficients k) {
  for (int64_t i = 0; i < len; ++i) {
    const float p = (x[i] - k.mean_hi) * k.scale + k.shift;
    y[i] = p < 0.0f ? 0.0f : p;
  }
}

// y = relu((x - mean_hi)·scale + shift + z) over one run.
NORMKIT_SIMD_CLONES
void apply_add_relu_run(const float* __restrict x, const float* __restrict z, float* __restrict y,
                        int64_t len, ApplyCoefficients k) {
  for (int64_t i = 0; i < len; ++i) {
    const float p = (x[i] - k.mean_hi) * k.scale + k.shift + z[i];
    y[i] = p < 0.0f ? 0.0f : p;
  }
}

// dx = a·g + b·(x - mean_hi) + k over one run.
NORMKIT_SIMD_CLONES
void backward_apply_run(const float* __restrict x, const float* __restrict g, float* dx,
                        int64_t len, BackwardCoefficients k) {
  for (int64_t i = 0; i < len; ++i) dx[i] = k.a * g[i] + k.b * (x[i] - k.mean_hi) + k.k;
}

// ======================= planes =======================

Moments piece_moments(const Geometry& g, const float* x, int64_t c, const Pieces::Span& s) {
  return leaf::run_moments(x + g.offset(s.first_run, c, s.first_inner), s.runs, s.len,
                           g.outer_stride);
}

void piece_forward_apply(const FusedForward<float>& p, int64_t c, const Pieces::Span& s,
                         ApplyCoefficients k) {
  for (int64_t r = s.first_run; r < s.first_run + s.runs; ++r) {
    const float* xr = p.x + p.x_geom.offset(r, c, s.first_inner);
    float* yr = p.y + p.y_geom.offset(r, c, s.first_inner);
    if (p.z)
      apply_add_relu_run(xr, p.z + p.z_geom.offset(r, c, s.first_inner), yr, s.len, k);
    else
      apply_relu_run(xr, yr, s.len, k);
    if (p.mask) pack_positive_bits(yr, s.len, p.mask, p.order.bit(r, c, s.first_inner));
  }
}

ApplyCoefficients forward_coefficients(const FusedForward<float>& p, int64_t c) {
  const double mean = p.training ? p.moments[c].mean : p.mean[c];
  const double invstd =
      p.training ? invstd_of(p.moments[c].biased_variance(), p.eps) : p.invstd[c];
  return apply_coefficients(mean, invstd, param_or(p.gamma, c, 1.0), param_or(p.beta, c, 0.0));
}

void planes_forward(const FusedForward<float>& p) {
  const Geometry& g = p.x_geom;
  const Pieces pieces(g);
  const int threads = threads_for(g.channels * g.reduction_size());
  if (whole_units_per_thread(g.channels, threads)) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      if (p.training) {
        Moments m;
        for (int64_t i = 0; i < pieces.per_channel; ++i)
          m.merge(piece_moments(g, p.x, c, pieces.span(g, i)));
        p.moments[c] = m;
      }
      const ApplyCoefficients k = forward_coefficients(p, c);
      for (int64_t i = 0; i < pieces.per_channel; ++i)
        piece_forward_apply(p, c, pieces.span(g, i), k);
    }
    return;
  }
  const int64_t total = g.channels * pieces.per_channel;
  std::vector<Moments> partial(p.training ? total : 0);
  std::vector<ApplyCoefficients> coeff(g.channels);
#pragma omp parallel num_threads(threads)
  {
    if (p.training) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < total; ++t)
        partial[t] =
            piece_moments(g, p.x, t / pieces.per_channel, pieces.span(g, t % pieces.per_channel));
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      if (p.training) {
        Moments m;
        for (int64_t i = 0; i < pieces.per_channel; ++i) m.merge(partial[c * pieces.per_channel + i]);
        p.moments[c] = m;
      }
      coeff[c] = forward_coefficients(p, c);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t) {
      const int64_t c = t / pieces.per_channel;
      piece_forward_apply(p, c, pieces.span(g, t % pieces.per_channel), coeff[c]);
    }
  }
}

// Σg and Σg·(x - mean) of a piece, g expanded run by run into L1 scratch.
GradientSums piece_gradient_sums(const FusedBackward<float>& p, int64_t c, const Pieces::Span& s,
                                 float* g) {
  const auto center = static_cast<float>(p.mean[c]);
  double sum_g = 0, sum_g_xc = 0;
  for (int64_t r = s.first_run; r < s.first_run + s.runs; ++r)
    for (int64_t i0 = 0; i0 < s.len; i0 += kExpandBlock) {
      const int64_t i = s.first_inner + i0, len = std::min(kExpandBlock, s.len - i0);
      expand_bits(p.dy + p.dy_geom.offset(r, c, i), p.mask, p.order.bit(r, c, i), len, g);
      const GradientSums block = gradient_sums_run(p.x + p.x_geom.offset(r, c, i), g, len, center);
      sum_g += block.sum_g;
      sum_g_xc += block.sum_g_xc;
    }
  // The float centre's error, taken off in double.
  return {sum_g, sum_g_xc - sum_g * (p.mean[c] - center)};
}

void piece_backward_apply(const FusedBackward<float>& p, int64_t c, const Pieces::Span& s,
                          BackwardCoefficients k, float* scratch_g) {
  for (int64_t r = s.first_run; r < s.first_run + s.runs; ++r)
    for (int64_t i0 = 0; i0 < s.len; i0 += kExpandBlock) {
      const int64_t i = s.first_inner + i0, len = std::min(kExpandBlock, s.len - i0);
      // dz is g itself: expand straight into it.
      float* g = p.dz ? p.dz + p.dz_geom.offset(r, c, i) : scratch_g;
      expand_bits(p.dy + p.dy_geom.offset(r, c, i), p.mask, p.order.bit(r, c, i), len, g);
      if (p.dx)
        backward_apply_run(p.x + p.x_geom.offset(r, c, i), g, p.dx + p.dx_geom.offset(r, c, i),
                           len, k);
    }
}

BackwardCoefficients finish_channel(const FusedBackward<float>& p, int64_t c, double sum_g,
                                    double sum_g_xmu) {
  p.sum_dy[c] = sum_g;
  p.sum_dy_xhat[c] = sum_g_xmu * p.invstd[c];
  return backward_coefficients(p.mean[c], p.invstd[c], param_or(p.gamma, c, 1.0), sum_g,
                               p.sum_dy_xhat[c], static_cast<double>(p.x_geom.reduction_size()),
                               p.mode);
}

void planes_backward(const FusedBackward<float>& p) {
  const Geometry& g = p.x_geom;
  const Pieces pieces(g);
  const int threads = threads_for(2 * g.channels * g.reduction_size());
  const auto scratch_len = static_cast<size_t>(std::min(g.inner, kExpandBlock));
  const bool second_pass = p.dx || p.dz;
  if (whole_units_per_thread(g.channels, threads)) {
#pragma omp parallel num_threads(threads)
    {
      float* const gbuf = scratch<float>(0, scratch_len);
#pragma omp for schedule(static)
      for (int64_t c = 0; c < g.channels; ++c) {
        double sum_g = 0, sum_g_xmu = 0;
        for (int64_t i = 0; i < pieces.per_channel; ++i) {
          const GradientSums s = piece_gradient_sums(p, c, pieces.span(g, i), gbuf);
          sum_g += s.sum_g;
          sum_g_xmu += s.sum_g_xc;
        }
        const BackwardCoefficients k = finish_channel(p, c, sum_g, sum_g_xmu);
        if (second_pass)
          for (int64_t i = 0; i < pieces.per_channel; ++i)
            piece_backward_apply(p, c, pieces.span(g, i), k, gbuf);
      }
    }
    return;
  }
  const int64_t total = g.channels * pieces.per_channel;
  std::vector<GradientSums> partial(total);
  std::vector<BackwardCoefficients> coeff(g.channels);
#pragma omp parallel num_threads(threads)
  {
    float* const gbuf = scratch<float>(0, scratch_len);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t)
      partial[t] = piece_gradient_sums(p, t / pieces.per_channel,
                                       pieces.span(g, t % pieces.per_channel), gbuf);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.channels; ++c) {
      double sum_g = 0, sum_g_xmu = 0;
      for (int64_t i = 0; i < pieces.per_channel; ++i) {
        sum_g += partial[c * pieces.per_channel + i].sum_g;
        sum_g_xmu += partial[c * pieces.per_channel + i].sum_g_xc;
      }
      coeff[c] = finish_channel(p, c, sum_g, sum_g_xmu);
    }
    if (second_pass) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < total; ++t) {
        const int64_t c = t / pieces.per_channel;
        piece_backward_apply(p, c, pieces.span(g, t % pieces.per_channel), coeff[c], gbuf);
      }
    }
  }
}

bool planes_order(const Geometry& x, const MaskOrder& order) {
  return order.inner == 1 && (x.channels == 1 || order.channel == x.inner) &&
         (x.outer == 1 || order.outer == x.channels * x.inner);
}

const char* planes_decline(const Geometry& x, std::initializer_list<const Geometry*> others,
                           const MaskOrder& order) {
  if (x.inner_stride != 1 || x.inner < 2) return "inner run is not contiguous";
  for (const Geometry* o : others)
    if (o->inner_stride != 1 || o->inner != x.inner || o->outer != x.outer)
      return "an output or gradient is not laid out like x";
  if (!planes_order(x, order)) return "the mask order is not (outer, channel, inner)";
  return nullptr;
}

// ======================= rows =======================

// One chunk's per-channel moments: mean shifted by the first row, then
// corrected sums around it, vectorized across channels.
NORMKIT_SIMD_CLONES
void rows_chunk_moments(const float* __restrict x, int64_t stride, int64_t rows, int64_t channels,
                        float* __restrict sum, float* __restrict center, float* __restrict sum_d2,
                        double* __restrict mean, double* __restrict m2) {
  const double n = static_cast<double>(rows);
  std::fill(sum, sum + channels, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xp = x + r * stride;
    for (int64_t c = 0; c < channels; ++c) sum[c] += xp[c] - x[c];
  }
  for (int64_t c = 0; c < channels; ++c)
    center[c] = static_cast<float>(static_cast<double>(x[c]) + static_cast<double>(sum[c]) / n);
  std::fill(sum, sum + channels, 0.0f);
  std::fill(sum_d2, sum_d2 + channels, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xp = x + r * stride;
    for (int64_t c = 0; c < channels; ++c) {
      const float d = xp[c] - center[c];
      sum[c] += d;
      sum_d2[c] += d * d;
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    const double sd = sum[c];
    mean[c] = center[c] + sd / n;
    m2[c] = sum_d2[c] - sd * sd / n;
  }
}

// Chunks merged in order within each stripe, stripes merged in order.
void rows_moments(const Geometry& g, const float* x, Moments* out, int threads) {
  const RowPlan plan(g);
  const int64_t C = plan.channels;
  double* const stripe_mean = scratch<double>(0, plan.stripes * C);
  double* const stripe_m2 = scratch<double>(1, plan.stripes * C);
  double* const stripe_count = scratch<double>(2, plan.stripes);
#pragma omp parallel num_threads(threads)
  {
    float* const sums = scratch<float>(3, 3 * C);
    double* const chunk_mean = scratch<double>(4, C);
    double* const chunk_m2 = scratch<double>(5, C);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < plan.stripes; ++s) {
      double count = 0;
      for (int64_t k = plan.first_chunk(s); k < plan.first_chunk(s + 1); ++k) {
        const int64_t n = plan.rows_in(k);
        rows_chunk_moments(x + plan.first_row(k) * g.outer_stride, g.outer_stride, n, C, sums,
                           sums + C, sums + 2 * C, chunk_mean, chunk_m2);
        merge_moment_arrays(count, stripe_mean + s * C, stripe_m2 + s * C, static_cast<double>(n),
                            chunk_mean, chunk_m2, C);
        count += static_cast<double>(n);
      }
      stripe_count[s] = count;
    }
  }
  // Stripes in order (C values each: cheap, one thread).
  double count = stripe_count[0];
  for (int64_t s = 1; s < plan.stripes; ++s) {
    merge_moment_arrays(count, stripe_mean, stripe_m2, stripe_count[s], stripe_mean + s * C,
                        stripe_m2 + s * C, C);
    count += stripe_count[s];
  }
  for (int64_t c = 0; c < C; ++c) out[c] = {count, stripe_mean[c], stripe_m2[c]};
}

NORMKIT_SIMD_CLONES
void rows_apply_relu_chunk(const float* x, int64_t x_stride, const float* z, int64_t z_stride,
                           float* y, int64_t y_stride, int64_t rows, int64_t channels,
                           const float* __restrict mean_hi, const float* __restrict scale,
                           const float* __restrict shift) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xp = x + r * x_stride;
    float* yp = y + r * y_stride;
    if (z) {
      const float* zp = z + r * z_stride;
      for (int64_t c = 0; c < channels; ++c) {
        const float p = (xp[c] - mean_hi[c]) * scale[c] + shift[c] + zp[c];
        yp[c] = p < 0.0f ? 0.0f : p;
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        const float p = (xp[c] - mean_hi[c]) * scale[c] + shift[c];
        yp[c] = p < 0.0f ? 0.0f : p;
      }
    }
  }
}

void rows_forward(const FusedForward<float>& p) {
  const Geometry& gx = p.x_geom;
  const int64_t C = gx.channels;
  const int threads = threads_for(C * gx.outer);
  if (p.training) rows_moments(gx, p.x, p.moments, threads);
  std::vector<float> mean_hi(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const ApplyCoefficients k = forward_coefficients(p, c);
    mean_hi[c] = k.mean_hi;
    scale[c] = k.scale;
    shift[c] = k.shift;
  }
  const RowPlan plan(gx);
  const bool y_dense = p.y_geom.outer_stride == C;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
    const int64_t r0 = plan.first_row(chunk), rows = plan.rows_in(chunk);
    float* y = p.y + r0 * p.y_geom.outer_stride;
    rows_apply_relu_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride,
                          p.z ? p.z + r0 * p.z_geom.outer_stride : nullptr, p.z_geom.outer_stride,
                          y, p.y_geom.outer_stride, rows, C, mean_hi.data(), scale.data(),
                          shift.data());
    if (!p.mask) continue;
    if (y_dense) {
      pack_positive_bits(y, rows * C, p.mask, r0 * C);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        pack_positive_bits(y + r * p.y_geom.outer_stride, C, p.mask, (r0 + r) * C);
    }
  }
}

// Σg and Σg·(x - center) of one chunk per channel, into a stripe's double sums.
NORMKIT_SIMD_CLONES
void rows_gradient_sums_chunk(const float* __restrict x, int64_t x_stride,
                              const float* __restrict g, int64_t rows, int64_t channels,
                              const float* __restrict center, double* __restrict sum_g,
                              double* __restrict sum_g_xc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xp = x + r * x_stride;
    const float* gp = g + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const double gv = gp[c];
      sum_g[c] += gv;
      sum_g_xc[c] += gv * (static_cast<double>(xp[c]) - static_cast<double>(center[c]));
    }
  }
}

NORMKIT_SIMD_CLONES
void rows_backward_apply_chunk(const float* x, int64_t x_stride, const float* g, float* dx,
                               int64_t dx_stride, int64_t rows, int64_t channels,
                               const float* mean_hi, const float* a, const float* b,
                               const float* k) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xp = x + r * x_stride;
    const float* gp = g + r * channels;
    float* dp = dx + r * dx_stride;
    for (int64_t c = 0; c < channels; ++c)
      dp[c] = a[c] * gp[c] + b[c] * (xp[c] - mean_hi[c]) + k[c];
  }
}

// g of a chunk's rows, packed (rows × C) into `g`.
void rows_expand_chunk(const FusedBackward<float>& p, int64_t r0, int64_t rows, float* g) {
  const int64_t C = p.x_geom.channels;
  if (p.dy_geom.outer_stride == C) {
    expand_bits(p.dy + r0 * C, p.mask, r0 * C, rows * C, g);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    expand_bits(p.dy + (r0 + r) * p.dy_geom.outer_stride, p.mask, (r0 + r) * C, C, g + r * C);
}

void rows_backward(const FusedBackward<float>& p) {
  const Geometry& gx = p.x_geom;
  const RowPlan plan(gx);
  const int64_t C = plan.channels;
  const int threads = threads_for(2 * C * plan.rows);
  double* const stripe_g = scratch<double>(0, plan.stripes * C);
  double* const stripe_g_xmu = scratch<double>(1, plan.stripes * C);
  std::fill(stripe_g, stripe_g + plan.stripes * C, 0.0);
  std::fill(stripe_g_xmu, stripe_g_xmu + plan.stripes * C, 0.0);
  std::vector<float> mean_hi(C), a(C), b(C), k(C);
  std::vector<double> mean_error(C);
  for (int64_t c = 0; c < C; ++c) {
    mean_hi[c] = static_cast<float>(p.mean[c]);
    mean_error[c] = p.mean[c] - mean_hi[c];
  }
  const int64_t block_rows = std::clamp<int64_t>(kExpandBlock / std::max<int64_t>(C, 1), 1, plan.chunk_rows);
  const auto chunk_elements = static_cast<size_t>(block_rows * C);
#pragma omp parallel num_threads(threads)
  {
    float* const g = scratch<float>(2, chunk_elements);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < plan.stripes; ++s)
      for (int64_t chunk = plan.first_chunk(s); chunk < plan.first_chunk(s + 1); ++chunk) {
        const int64_t first = plan.first_row(chunk), end = first + plan.rows_in(chunk);
        for (int64_t r0 = first; r0 < end; r0 += block_rows) {
          const int64_t rows = std::min(block_rows, end - r0);
          rows_expand_chunk(p, r0, rows, g);
          rows_gradient_sums_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride, g, rows, C,
                                   mean_hi.data(), stripe_g + s * C, stripe_g_xmu + s * C);
        }
      }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      double sum_g = 0, sum_g_xmu = 0;
      for (int64_t s = 0; s < plan.stripes; ++s) {
        sum_g += stripe_g[s * C + c];
        sum_g_xmu += stripe_g_xmu[s * C + c];
      }
      sum_g_xmu -= sum_g * mean_error[c];
      const BackwardCoefficients bc = finish_channel(p, c, sum_g, sum_g_xmu);
      a[c] = bc.a;
      b[c] = bc.b;
      k[c] = bc.k;
    }
    if (p.dx || p.dz) {
#pragma omp for schedule(static)
      for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
        const int64_t first = plan.first_row(chunk), end = first + plan.rows_in(chunk);
        for (int64_t r0 = first; r0 < end; r0 += block_rows) {
          const int64_t rows = std::min(block_rows, end - r0);
          rows_expand_chunk(p, r0, rows, g);
          if (p.dx)
            rows_backward_apply_chunk(p.x + r0 * gx.outer_stride, gx.outer_stride, g,
                                      p.dx + r0 * p.dx_geom.outer_stride, p.dx_geom.outer_stride,
                                      rows, C, mean_hi.data(), a.data(), b.data(), k.data());
          if (p.dz)
            for (int64_t r = 0; r < rows; ++r)
              std::copy(g + r * C, g + (r + 1) * C, p.dz + (r0 + r) * p.dz_geom.outer_stride);
        }
      }
    }
  }
}

const char* rows_decline(const Geometry& x, std::initializer_list<const Geometry*> others,
                         const MaskOrder& order) {
  if (x.inner != 1 || (x.channel_stride != 1 && x.channels > 1))
    return "channels are not contiguous rows";
  for (const Geometry* o : others)
    if (o->inner != 1 || (o->channel_stride != 1 && o->channels > 1) || o->outer != x.outer)
      return "an output or gradient is not laid out like x";
  if (order.channel != 1 || (x.outer > 1 && order.outer != x.channels))
    return "the mask order is not (row, channel)";
  return nullptr;
}

}  // namespace

namespace fused_cpu {

const char* forward(const FusedForward<float>& p) {
  const char* planes = planes_decline(p.x_geom, {&p.y_geom, &p.z_geom}, p.order);
  if (!planes) {
    planes_forward(p);
    return nullptr;
  }
  const char* rows = rows_decline(p.x_geom, {&p.y_geom, &p.z_geom}, p.order);
  if (!rows) {
    rows_forward(p);
    return nullptr;
  }
  return rows;
}

const char* backward(const FusedBackward<float>& p) {
  const char* planes =
      planes_decline(p.x_geom, {&p.dy_geom, &p.dx_geom, &p.dz_geom}, p.order);
  if (!planes) {
    planes_backward(p);
    return nullptr;
  }
  const char* rows = rows_decline(p.x_geom, {&p.dy_geom, &p.dx_geom, &p.dz_geom}, p.order);
  if (!rows) {
    rows_backward(p);
    return nullptr;
  }
  return rows;
}

}  // namespace fused_cpu

}  // namespace normkit::kernels
