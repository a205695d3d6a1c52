#pragma once
// The rows form's statistics, gradient-sum and output loops over one chunk of
// rows (channels contiguous), shared by batch_norm_rows.cpp and
// batch_norm_fused_rows.cpp: BN+ReLU's moments and sums are BN's bit for bit,
// which the engine relies on (it fuses "batchnorm; relu", and synchronized BN
// and probes run the layers unfused). group_norm_rows.cpp takes the apply
// (rows_apply_chunk): the same formula over per-channel coefficients. Internal
// linkage, as leaf_loops.hpp explains.
#include <algorithm>
#include <cstdint>

#include "core/parallel.hpp"
#include "core/simd_clones.hpp"
#include "cpu/coefficients.hpp"
#include "cpu/leaf_loops.hpp"
#include "cpu/streamed_output.hpp"

namespace normkit::kernels::cpu {
namespace {

// Rows kernels walk channels in register blocks of kRowBlock, the last one
// kNarrowRowBlock wide when that is what remains (32, 96, 160 channels): a
// block's accumulators and coefficients stay in registers (rather than being
// loaded and stored for every row), and its part of a chunk (at most 64 rows ×
// 64 floats = 16 KB) stays in L1 between passes. Every channel still adds its
// rows in row order, so blocking changes no result; channels past the last
// whole block take the plain loops. Only short rows are blocked: with long ones
// (1024 channels and more) a block is a narrow strided column of the chunk,
// which the hardware prefetchers follow worse than whole rows, and whose rows,
// 4 KB or more apart, compete for the same few L1 sets. (The apply takes wider
// blocks: kApplyBlock.)
constexpr int64_t kRowBlock = 64;
constexpr int64_t kNarrowRowBlock = 32;
constexpr int64_t kMaxBlockedChannels = 256;
constexpr int64_t kColumnBlock = 256;
constexpr int64_t kRowGroup = 4;
// The apply (one read of x, one write of y, nothing kept between passes) takes
// wider register blocks, up to a whole row of kApplyBlock channels: a block's
// coefficients stay in registers (or are spilled once per block instead of
// reloaded per element), and each row is read in runs of up to 1 KB. Measured
// in cache at 2 threads: the inference of 16×256×28×28 NHWC went from 1.5× to
// 1.2× a copy (blocks of 64 before), forward-train of 256×1024 (units of 256
// channels) from 66-70 to 49-51 µs. Longer rows are taken one at a time, with
// the coefficients loaded per vector: groups of kRowGroup rows (coefficients
// loaded once per group, four streams of x and of y) measured slower on a Xeon
// (2 threads, bench medians of two runs each): 32×2048×7×7 NHWC inference
// 1.07-1.10 ms against 0.86-0.88 (a copy: 0.78-0.85), bn1d 256×1024 33-38 µs
// against 28-30, 32×4096 37-41 against 36-37.
constexpr int64_t kApplyBlock = 256;
[[maybe_unused]] inline int64_t blocked_channels(int64_t channels) {
  return channels <= kMaxBlockedChannels ? channels / kNarrowRowBlock * kNarrowRowBlock : 0;
}

// Runs block.template operator()<B>(c0) for the register blocks of channels
// [0, blocked), blocked a multiple of kNarrowRowBlock. The lambdas passed here
// are always inlined, so they are compiled for their SIMD clone's instruction
// set (an outlined lambda would be baseline x86-64, without FMA: other bits).
template <class Block>
[[gnu::always_inline]] inline void for_each_row_block(int64_t blocked, Block&& block) {
  int64_t c0 = 0;
  for (; c0 + kRowBlock <= blocked; c0 += kRowBlock) block.template operator()<kRowBlock>(c0);
  if (c0 < blocked) block.template operator()<kNarrowRowBlock>(c0);
}

// The apply's blocks (kApplyBlock, then as for_each_row_block) over rows of
// `channels` values: returns how many channels they cover, all but the last
// channels % 32, or none on rows longer than kApplyBlock.
template <class Block>
[[gnu::always_inline]] inline int64_t for_each_apply_block(int64_t channels, Block&& block) {
  if (channels > kApplyBlock) return 0;
  if (channels == kApplyBlock) {
    block.template operator()<kApplyBlock>(0);
    return kApplyBlock;
  }
  const int64_t blocked = channels / kNarrowRowBlock * kNarrowRowBlock;
  for_each_row_block(blocked, block);
  return blocked;
}

// g of row r, channels [c0, c0 + B), from a leaf::GradientSource: dy itself,
// or mask ? dy : 0 (reading the row's bits 32 at a time) written into g.
template <bool Masked, int B>
[[gnu::always_inline]] inline const float* row_block_gradient(const leaf::GradientSource& src,
                                                              int64_t r, int64_t c0, float* g) {
  const float* gp = src.dy + r * src.stride + c0;
  if constexpr (!Masked) return gp;
  for (int h = 0; h < B / 32; ++h) {
    const uint32_t m =
        leaf::mask_bits(src.mask, src.bit_first + r * src.bit_stride + c0 + 32 * h, 32);
    for (int l = 0; l < 32; ++l) g[32 * h + l] = leaf::lane_gradient<true>(gp + 32 * h, m, l);
  }
  return g;
}

// The chunk after `chunk` of x (and of dy for the gradient sums; null for the
// statistics): same columns, `rows` rows, none when 0. The statistics' second
// pass and the gradient sums' register blocks request its lines while they add
// the current chunk: the hardware prefetchers follow a chunk's short strided
// columns badly. It may be the next thread's first chunk: then it is requested twice,
// once too early.
struct NextChunk {
  const float* x = nullptr;
  const float* dy = nullptr;
  int64_t rows = 0;
};
template <class Geometry>
NextChunk next_chunk(const leaf::RowPlan& plan, int64_t chunk, const Geometry& gx, const float* x,
                     const Geometry* gdy = nullptr, const float* dy = nullptr) {
  if (chunk + 1 >= plan.chunks) return {};
  const int64_t r = plan.first_row(chunk + 1);
  return {x + r * gx.outer_stride, dy ? dy + r * gdy->outer_stride : nullptr,
          plan.rows_in(chunk + 1)};
}

// Per-channel moments of one chunk (at most kMaxChunkRows rows): the same two
// passes as planes, vectorized across channels: the chunk's mean shifted by its
// first row, then corrected sums around it.
[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_chunk_moments(const float* __restrict x, int64_t stride, int64_t rows,
                        int64_t channels, int64_t blocked, float* __restrict sum,
                        float* __restrict center, float* __restrict sum_d2,
                        double* __restrict mean, double* __restrict m2,
                        const NextChunk& next = {}) {
  const double n = static_cast<double>(rows);
  for_each_row_block(blocked, [&]<int B>(int64_t c0) __attribute__((always_inline)) {
    leaf::rows_block_moments<B>(x + c0, stride, rows, mean + c0, m2 + c0,
                                next.rows > 0 ? next.x + c0 : nullptr, next.rows);
  });
  const int64_t c0 = blocked;
  // Long rows: columns of kColumnBlock channels, so that the sums stay in L1
  // and a column of the chunk in L2 between the passes; kRowGroup rows at a
  // time, added one after the other, so a sum is loaded and stored once per group.
  // The second pass asks for the same column of the next chunk.
  for (int64_t b0 = c0; b0 < channels; b0 += kColumnBlock) {
    const int64_t b1 = std::min(channels, b0 + kColumnBlock);
    std::fill(sum + b0, sum + b1, 0.0f);
    for (int64_t r = 0; r < rows; r += kRowGroup) {
      const float* xp = x + r * stride;
      const int64_t group = std::min(kRowGroup, rows - r);
      if (group == kRowGroup) {
        for (int64_t c = b0; c < b1; ++c) {
          float a = sum[c];
          for (int j = 0; j < kRowGroup; ++j) a += xp[j * stride + c] - x[c];
          sum[c] = a;
        }
      } else {
        for (int64_t j = 0; j < group; ++j)
          for (int64_t c = b0; c < b1; ++c) sum[c] += xp[j * stride + c] - x[c];
      }
    }
    leaf::chunk_centers(n, b1 - b0, x + b0, sum + b0, center + b0);
    std::fill(sum + b0, sum + b1, 0.0f);
    std::fill(sum_d2 + b0, sum_d2 + b1, 0.0f);
    for (int64_t r = 0; r < rows; r += kRowGroup) {
      leaf::request_lines(next.x, stride, r, std::min(r + kRowGroup, next.rows), b0, b1);
      const float* xp = x + r * stride;
      const int64_t group = std::min(kRowGroup, rows - r);
      if (group == kRowGroup) {
        for (int64_t c = b0; c < b1; ++c) {
          float a1 = sum[c], a2 = sum_d2[c];
          for (int j = 0; j < kRowGroup; ++j) {
            const float d = xp[j * stride + c] - center[c];
            a1 += d;
            a2 += d * d;
          }
          sum[c] = a1;
          sum_d2[c] = a2;
        }
      } else {
        for (int64_t j = 0; j < group; ++j)
          for (int64_t c = b0; c < b1; ++c) {
            const float d = xp[j * stride + c] - center[c];
            sum[c] += d;
            sum_d2[c] += d * d;
          }
      }
    }
    leaf::chunk_moments(n, b1 - b0, center + b0, sum + b0, sum_d2 + b0, mean + b0, m2 + b0);
  }
}

// The blocked part of rows_gradient_sums_chunk (below): channels [0, blocked)
// in register blocks, g from a leaf::GradientSource (row r's bits start at
// bit_first + r·bit_stride), so that the fused kernel's masked sums add
// exactly BN's values in BN's order.
template <bool Masked>
[[gnu::always_inline]] inline void rows_gradient_sums_blocks(
    const float* __restrict x, int64_t x_stride, const leaf::GradientSource& src, int64_t rows,
    int64_t blocked, const float* __restrict center, double* __restrict sum_dy,
    double* __restrict sum_dy_xc, const NextChunk& next) {
  for_each_row_block(blocked, [&]<int B>(int64_t c0) __attribute__((always_inline)) {
    double s1[B], s2[B], ctr[B];
    for (int l = 0; l < B; ++l) {
      s1[l] = sum_dy[c0 + l];
      s2[l] = sum_dy_xc[c0 + l];
      ctr[l] = center[c0 + l];
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (r < next.rows) {
        leaf::request_lines(next.x, x_stride, r, r + 1, c0, c0 + B);
        leaf::request_lines(next.dy, src.stride, r, r + 1, c0, c0 + B);
      }
      const float* xp = x + r * x_stride + c0;
      float masked[B];
      const float* g = row_block_gradient<Masked, B>(src, r, c0, masked);
      for (int l = 0; l < B; ++l) {
        s1[l] += g[l];
        s2[l] += g[l] * (static_cast<double>(xp[l]) - ctr[l]);
      }
    }
    for (int l = 0; l < B; ++l) {
      sum_dy[c0 + l] = s1[l];
      sum_dy_xc[c0 + l] = s2[l];
    }
  });
}

// rows_gradient_sums_blocks with g = mask ? dy : 0, every channel in a block
// (channels a multiple of kNarrowRowBlock, however many).
[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_gradient_sums_masked_chunk(const float* __restrict x, int64_t x_stride,
                                     const leaf::GradientSource& src, int64_t rows,
                                     int64_t channels, const float* __restrict center,
                                     double* __restrict sum_dy, double* __restrict sum_dy_xc,
                                     NextChunk next = {}) {
  rows_gradient_sums_blocks<true>(x, x_stride, src, rows, channels, center, sum_dy, sum_dy_xc,
                                  next);
}

// Σdy and Σdy·(x - mean) of one chunk per channel, added to a stripe's double
// sums (double: dy is not centred, so the second sum cancels heavily).
[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_gradient_sums_chunk(const float* __restrict x, int64_t x_stride,
                              const float* __restrict dy, int64_t dy_stride, int64_t rows,
                              int64_t channels, int64_t blocked, const float* __restrict center,
                              double* __restrict sum_dy, double* __restrict sum_dy_xc,
                              NextChunk next = {}) {
  rows_gradient_sums_blocks<false>(x, x_stride, {dy, dy_stride}, rows, blocked, center, sum_dy,
                                   sum_dy_xc, next);
  // Long rows: whole rows, kRowGroup at a time, one after the other (a sum is
  // loaded and stored once per group), and no requests for the next chunk: the
  // hardware prefetchers follow whole rows. Columns of 256 channels with the
  // next chunk requested took 1.15-1.48 × a one-pass Σdy, Σdy·x over the same
  // data (32×7×7×1024-4096 NHWC, 1 and 2 threads), whole rows 0.97-1.07.
  for (int64_t r = 0; r < rows; r += kRowGroup) {
    const float* xp = x + r * x_stride;
    const float* gp = dy + r * dy_stride;
    const int64_t group = std::min(kRowGroup, rows - r);
    if (group == kRowGroup) {
      for (int64_t c = blocked; c < channels; ++c) {
        const double ctr = center[c];
        double s1 = sum_dy[c], s2 = sum_dy_xc[c];
        for (int j = 0; j < kRowGroup; ++j) {
          const double g = gp[j * dy_stride + c];
          s1 += g;
          s2 += g * (static_cast<double>(xp[j * x_stride + c]) - ctr);
        }
        sum_dy[c] = s1;
        sum_dy_xc[c] = s2;
      }
    } else {
      for (int64_t j = 0; j < group; ++j)
        for (int64_t c = blocked; c < channels; ++c) {
          const double g = gp[j * dy_stride + c];
          sum_dy[c] += g;
          sum_dy_xc[c] +=
              g * (static_cast<double>(xp[j * x_stride + c]) - static_cast<double>(center[c]));
        }
    }
  }
}

// y = (x - mean_hi)·scale + shift per channel over one chunk of rows; with
// Relu, y = relu(that + z) (z may be null): BN+ReLU's forward is BN's to the
// bit before the ReLU. Channels in register blocks (for_each_apply_block), the
// rest one row at a time (see kApplyBlock). (ivdep: y may be x or z, but
// element c of a row is read only for its own store.)
template <bool Relu>
[[gnu::always_inline]] inline void rows_apply_body(const float* x, int64_t x_stride,
                                                   const float* z, int64_t z_stride, float* y,
                                                   int64_t y_stride, int64_t rows,
                                                   int64_t channels,
                                                   const float* __restrict mean_hi,
                                                   const float* __restrict scale,
                                                   const float* __restrict shift) {
  const auto out = [](float p) __attribute__((always_inline)) {
    return Relu && p < 0.0f ? 0.0f : p;
  };
  const auto block = [&]<int B>(int64_t c0) __attribute__((always_inline)) {
    float m[B], sc[B], t[B];
    for (int l = 0; l < B; ++l) {
      m[l] = mean_hi[c0 + l];
      sc[l] = scale[c0 + l];
      t[l] = shift[c0 + l];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride + c0;
      float* yp = y + r * y_stride + c0;
      if (z) {
        const float* zp = z + r * z_stride + c0;
        for (int l = 0; l < B; ++l) yp[l] = out((xp[l] - m[l]) * sc[l] + t[l] + zp[l]);
      } else {
        for (int l = 0; l < B; ++l) yp[l] = out((xp[l] - m[l]) * sc[l] + t[l]);
      }
    }
  };
  const int64_t blocked = for_each_apply_block(channels, block);
  // (z is tested outside the loops: a select inside them is if-converted into
  // masked multiplies, which are not contracted into FMAs, and BN+ReLU's y
  // would round otherwise than BN's.)
  for (int64_t r = 0; r < rows && blocked < channels; ++r) {
    const float* xp = x + r * x_stride;
    float* yp = y + r * y_stride;
    if (z) {
      const float* zp = z + r * z_stride;
      NORMKIT_IVDEP
      for (int64_t c = blocked; c < channels; ++c)
        yp[c] = out((xp[c] - mean_hi[c]) * scale[c] + shift[c] + zp[c]);
    } else {
      NORMKIT_IVDEP
      for (int64_t c = blocked; c < channels; ++c)
        yp[c] = out((xp[c] - mean_hi[c]) * scale[c] + shift[c]);
    }
  }
}

[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_apply_chunk(const float* x, int64_t x_stride, float* y, int64_t y_stride, int64_t rows,
                      int64_t channels, const float* __restrict mean_hi,
                      const float* __restrict scale, const float* __restrict shift) {
  rows_apply_body<false>(x, x_stride, nullptr, 0, y, y_stride, rows, channels, mean_hi, scale,
                         shift);
}

#if NORMKIT_HAS_SIMD_CLONES
// N per-channel arrays copied, each followed by its first 16 values again
// (channels repeated), so that a line crossing the end of a row loads its
// coefficients in one go.
template <size_t N>
std::array<const float*, N> extended_coefficients(leaf::Workspace& ws,
                                                  const std::array<const float*, N>& from,
                                                  int64_t channels) {
  float* const storage = ws.take_for_overwrite<float>(N * (channels + 16)).data();
  std::array<const float*, N> out;
  for (size_t a = 0; a < N; ++a) {
    float* to = storage + a * (channels + 16);
    std::copy(from[a], from[a] + channels, to);
    for (int64_t j = 0; j < 16; ++j) to[channels + j] = from[a][j % channels];
    out[a] = to;
  }
  return out;
}
// y = (x - mean_hi)·scale + shift, the coefficients (mean_hi, scale, shift)
// per channel.
__attribute__((target("avx512f"))) inline void rows_apply_streamed_avx512(
    const float* x, float* y, int64_t n, int64_t channels,
    const std::array<const float*, 3>& coefficients) {
  leaf::Workspace ws;
  const auto k = extended_coefficients(ws, coefficients, channels);
  stream_rows_avx512<1>({y}, n, channels,
                        [&](int64_t i, int64_t c, __mmask16 lanes) __attribute__((
                            target("avx512f"), always_inline)) {
    const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i), _mm512_loadu_ps(k[0] + c));
    return Lines<1>{
        _mm512_fmadd_ps(v, _mm512_loadu_ps(k[1] + c), _mm512_loadu_ps(k[2] + c))};
  });
}
// dx = a·g + b·(x - mean_hi) + k (the coefficients mean_hi, a, b, k per
// channel), as GCC contracts it: a·g fused onto b·(x - mean_hi), then + k;
// g = dy, or with a mask (mask_bit: the mask's bit index of value 0) dy where
// the bit is set and +0 elsewhere, also written to dz (when not null).
template <bool Masked>
__attribute__((target("avx512f"))) inline void rows_backward_apply_streamed_avx512(
    const float* x, const float* dy, const uint8_t* mask, int64_t mask_bit, float* dx, float* dz,
    int64_t n, int64_t channels, const std::array<const float*, 4>& coefficients) {
  leaf::Workspace ws;
  const auto k = extended_coefficients(ws, coefficients, channels);
  stream_rows_avx512<2>({dx, dz}, n, channels,
                        [&](int64_t i, int64_t c, __mmask16 lanes) __attribute__((
                            target("avx512f"), always_inline)) {
    __mmask16 kept = lanes;
    if constexpr (Masked)
      kept &= static_cast<__mmask16>(
          leaf::mask_bits(mask, mask_bit + i, __builtin_popcount(static_cast<unsigned>(lanes))));
    const __m512 g = _mm512_maskz_loadu_ps(kept, dy + i);
    const __m512 centered =
        _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i), _mm512_loadu_ps(k[0] + c));
    const __m512 sum = _mm512_fmadd_ps(_mm512_loadu_ps(k[1] + c), g,
                                       _mm512_mul_ps(_mm512_loadu_ps(k[2] + c), centered));
    return Lines<2>{_mm512_add_ps(sum, _mm512_loadu_ps(k[3] + c)), g};
  });
}
#endif

// write_outputs over rows [0, rows) of `width` values, in pieces of a
// RowPlan's chunk (at most 64 rows of 64K values): a thread's share of rows
// (for_thread_rows) taken by the register-block loops piece by piece, each piece
// in L1 across its blocks, as when the share was called chunk by chunk.
// write(first, count, out) as write_outputs', `first` counted from row 0.
template <size_t N, class Write>
void write_row_pieces(bool stream, const std::array<Output, N>& outputs, int64_t rows,
                      int64_t width, Write&& write) {
  const int64_t piece = std::clamp<int64_t>(leaf::kRowChunkElements / std::max<int64_t>(width, 1),
                                            1, leaf::kMaxChunkRows);
  for (int64_t p0 = 0; p0 < rows; p0 += piece) {
    std::array<Output, N> at = outputs;
    for (Output& o : at)
      if (o.data) o.data += p0 * o.stride;
    write_outputs<N>(stream, at, std::min(piece, rows - p0), width,
                     [&](int64_t first, int64_t count, const auto& out) {
      write(p0 + first, count, out);
    });
  }
}

// rows_apply_chunk writing through the streamed buffer when `stream`
// (cpu/streamed_output.hpp: outputs larger than the threads' L2): BN's and
// GroupNorm's rows outputs; contiguous rows on AVX-512 CPUs straight from the
// loop (rows_apply_streamed_avx512).
[[maybe_unused]] void apply_rows_to(bool stream, const float* x, int64_t x_stride, float* y,
                                    int64_t y_stride, int64_t rows, int64_t channels,
                                    const float* mean_hi, const float* scale,
                                    const float* shift) {
#if NORMKIT_HAS_SIMD_CLONES
  if (streams_straight(stream, rows * channels, channels, {x_stride, y_stride}, {y}))
    return rows_apply_streamed_avx512(x, y, rows * channels, channels, {mean_hi, scale, shift});
#endif
  write_row_pieces<1>(stream, {{{y, y_stride}}}, rows, channels,
                      [&](int64_t r0, int64_t n, const auto& out) {
    rows_apply_chunk(x + r0 * x_stride, x_stride, out[0].data, out[0].stride, n, channels,
                     mean_hi, scale, shift);
  });
}

[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_apply_relu_chunk(const float* x, int64_t x_stride, const float* z, int64_t z_stride,
                           float* y, int64_t y_stride, int64_t rows, int64_t channels,
                           const float* __restrict mean_hi, const float* __restrict scale,
                           const float* __restrict shift) {
  rows_apply_body<true>(x, x_stride, z, z_stride, y, y_stride, rows, channels, mean_hi, scale,
                        shift);
}

// dx = a·g + b·(x - mean_hi) + k per channel over one chunk of rows, g from a
// leaf::GradientSource: channels [0, blocked) in register blocks, the rest
// one row at a time, as in the apply (32×2048×7×7 NHWC backward: 2.35-2.41 ms
// with groups of kRowGroup rows, 2.18-2.21 without). Masked (every channel
// blocked) also writes dz = g when dz is not null, and dx only when dx is not
// null. dx may be dy (same strides): element c of a row is read only for its
// own store.
template <bool Masked>
[[gnu::always_inline]] inline void rows_backward_apply_body(
    const float* x, int64_t x_stride, const leaf::GradientSource& src, float* dx,
    int64_t dx_stride, float* dz, int64_t dz_stride, int64_t rows, int64_t channels,
    int64_t blocked, const float* mean_hi, const float* a, const float* b, const float* k) {
  for_each_row_block(blocked, [&]<int B>(int64_t c0) __attribute__((always_inline)) {
    float m[B], av[B], bv[B], kv[B];
    for (int l = 0; l < B; ++l) {
      m[l] = mean_hi[c0 + l];
      av[l] = a[c0 + l];
      bv[l] = b[c0 + l];
      kv[l] = k[c0 + l];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xp = x + r * x_stride + c0;
      float masked[B];
      const float* g = row_block_gradient<Masked, B>(src, r, c0, masked);
      if (Masked && dz)
        for (int l = 0; l < B; ++l) dz[r * dz_stride + c0 + l] = g[l];
      if (!Masked || dx)
        for (int l = 0; l < B; ++l)
          dx[r * dx_stride + c0 + l] = av[l] * g[l] + bv[l] * (xp[l] - m[l]) + kv[l];
    }
  });
  if constexpr (!Masked) {
    const float* dy = src.dy;
    const int64_t dy_stride = src.stride;
    for (int64_t r = 0; r < rows && blocked < channels; ++r) {
      const float* xp = x + r * x_stride;
      const float* gp = dy + r * dy_stride;
      float* dp = dx + r * dx_stride;
      NORMKIT_IVDEP
      for (int64_t c = blocked; c < channels; ++c)
        dp[c] = a[c] * gp[c] + b[c] * (xp[c] - mean_hi[c]) + k[c];
    }
  }
}

// rows_backward_apply_body from dy.
[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_backward_apply_chunk(const float* x, int64_t x_stride, const float* dy,
                               int64_t dy_stride, float* dx, int64_t dx_stride, int64_t rows,
                               int64_t channels, int64_t blocked, const float* mean_hi,
                               const float* a, const float* b, const float* k) {
  rows_backward_apply_body<false>(x, x_stride, {dy, dy_stride}, dx, dx_stride, nullptr, 0, rows,
                                  channels, blocked, mean_hi, a, b, k);
}

// rows_backward_apply_body with g = mask ? dy : 0, every channel in a block
// (channels a multiple of kNarrowRowBlock, however many).
[[maybe_unused]] NORMKIT_SIMD_CLONES
void rows_backward_apply_masked_chunk(const float* x, int64_t x_stride,
                                      const leaf::GradientSource& src, float* dx,
                                      int64_t dx_stride, float* dz, int64_t dz_stride,
                                      int64_t rows, int64_t channels, const float* mean_hi,
                                      const float* a, const float* b, const float* k) {
  rows_backward_apply_body<true>(x, x_stride, src, dx, dx_stride, dz, dz_stride, rows, channels,
                                 channels, mean_hi, a, b, k);
}

// ---- column units: small problems ----
// When all rows of a block of channels fit in L2 and the rows are few
// (32×4096), each thread takes whole blocks of channels ("units") over all
// rows: their moments, coefficients and apply (or gradient sums and dx) in one
// go, while the block is in cache, with no barrier between the phases: on such
// a problem the phased path's barriers, merges of every channel per chunk and
// second read of x cost more than the data passes. A channel's sums run over
// the same chunks and stripes (RowPlan) in the same order as the phased path:
// the results are bitwise the same, for any width and any thread count.
// With more rows the phased path wins when its chunks keep the threads evenly
// busy: a unit's column has its rows C floats apart (4-16 KB when C is a power
// of two, so in the same cache sets) and its second pass no longer finds them
// in cache. Measured at 2 threads, backward and forward-train, 8 calls after
// evicting the caches, units against phased: 256×1024 122/72 µs against
// 76/55, 1024×64 34/27 against 23/15, 256×256 33/22 against 29/18; but
// 196×2048 (7 chunks of rows for 2 threads) 181/99 against 205/130. At 1
// thread phased was as fast or faster (256×1024 backward 197 against 231 µs),
// but for 1024×64 and 512×64, 4-5% slower.
constexpr int64_t kUnitBytes = 256 * 1024;  // a unit's part of x (and of dy)
constexpr int64_t kUnitRows = 64;
struct ColumnUnits {
  int64_t width = 0, count = 0;  // count 0: the phased path
  struct Channels {
    int64_t first, width;
  };
  // Unit u's channels of `channels`: the last unit may be narrower.
  Channels of(int64_t u, int64_t channels) const {
    return {u * width, std::min(width, channels - u * width)};
  }
};
// Units are at most
// kColumnBlock wide (the sums stay in L1), in steps of 16 channels (whole cache
// lines), and as many as keep the threads evenly busy. Only when a full-width
// unit fits: narrower ones read x in short strided runs, which the prefetchers
// follow badly (32×2048×7×7 NHWC in units of 32 channels took twice as long as
// the phased path).
[[maybe_unused]] ColumnUnits column_units(const leaf::RowPlan& plan, int threads) {
  int64_t width = std::min(kColumnBlock, plan.channels);
  if (plan.rows * width * static_cast<int64_t>(sizeof(float)) > kUnitBytes) return {};
  if (plan.rows > kUnitRows && leaf::whole_units_per_thread(plan.chunks, threads)) return {};
  int64_t count = (plan.channels + width - 1) / width;
  if (!leaf::whole_units_per_thread(count, threads)) {
    const int64_t even = (count + threads - 1) / threads * threads;
    width = ((plan.channels + even - 1) / even + 15) / 16 * 16;
    count = (plan.channels + width - 1) / width;
  }
  return {width, count};
}

// A unit narrower than the rows is walked row by row, not in register blocks:
// a block's column of a long row's rows, 4 KB or more apart, falls into a few
// L1 sets (and L2 sets) and is evicted before its next pass.
[[maybe_unused]] int64_t unit_blocked(const leaf::RowPlan& plan, int64_t width) {
  return width == plan.channels ? blocked_channels(width) : 0;
}

// Moments of channels [c0, c0 + width) over all rows into mean and m2: chunks
// merged in order within each stripe, stripes in order, as rows_moments_phase.
// Returns the count.
[[maybe_unused]] double unit_moments(const Geometry& g, const leaf::RowPlan& plan,
                                     const float* x, int64_t c0, int64_t width, double* mean,
                                     double* m2) {
  leaf::Workspace ws;
  float* const sums = ws.take_for_overwrite<float>(3 * width).data();
  double* const stripe_mean = ws.take_for_overwrite<double>(width).data();
  double* const stripe_m2 = ws.take_for_overwrite<double>(width).data();
  double* const chunk_mean = ws.take_for_overwrite<double>(width).data();
  double* const chunk_m2 = ws.take_for_overwrite<double>(width).data();
  double count = 0;
  for (int64_t s = 0; s < plan.stripes; ++s) {
    double stripe_count = 0;
    for (int64_t k = plan.first_chunk(s); k < plan.first_chunk(s + 1); ++k) {
      const int64_t n = plan.rows_in(k);
      rows_chunk_moments(x + plan.first_row(k) * g.outer_stride + c0, g.outer_stride, n, width,
                         unit_blocked(plan, width), sums, sums + width, sums + 2 * width,
                         chunk_mean, chunk_m2);
      leaf::merge_moment_arrays(stripe_count, stripe_mean, stripe_m2, static_cast<double>(n),
                                chunk_mean, chunk_m2, width);
      stripe_count += static_cast<double>(n);
    }
    leaf::merge_moment_arrays(count, mean, m2, stripe_count, stripe_mean, stripe_m2, width);
    count += stripe_count;
  }
  return count;
}

// A backward's column unit u (batch norm's and BN+ReLU's): per channel Σdy and
// Σdy·(x - mean_hi) summed over each stripe's chunks in order
// (sums(r0, rows, c0, width, mean_hi, sum_dy, sum_dy_xc) adds one chunk) and
// the stripes added in order, as the phased paths do; the coefficients
// (finish_channel_from_hi); then apply(c0, width, mean_hi, a, b, k) while the
// unit's columns are in cache.
template <class Backward, class Sums, class Apply>
void unit_backward(const Backward& p, const leaf::RowPlan& plan, ColumnUnits units, int64_t u,
                   Sums&& sums, Apply&& apply) {
  const auto [c0, width] = units.of(u, plan.channels);
  leaf::Workspace ws;  // this thread's
  float* const mean_hi = ws.take_for_overwrite<float>(4 * width).data();
  float *const a = mean_hi + width, *const b = a + width, *const k = b + width;
  // a stripe's Σdy, Σdy·(x - mean_hi), and their totals
  double* const stripe = ws.take_for_overwrite<double>(2 * width).data();
  double* const total = ws.take<double>(2 * width).data();
  for (int64_t c = 0; c < width; ++c) mean_hi[c] = static_cast<float>(p.mean[c0 + c]);
  for (int64_t s = 0; s < plan.stripes; ++s) {
    std::fill(stripe, stripe + 2 * width, 0.0);
    for (int64_t chunk = plan.first_chunk(s); chunk < plan.first_chunk(s + 1); ++chunk)
      sums(plan.first_row(chunk), plan.rows_in(chunk), c0, width, mean_hi, stripe, stripe + width);
    for (int64_t c = 0; c < 2 * width; ++c) total[c] += stripe[c];
  }
  for (int64_t c = 0; c < width; ++c) {
    const BackwardCoefficients bc = finish_channel_from_hi(p, c0 + c, total[c], total[width + c]);
    a[c] = bc.a;
    b[c] = bc.b;
    k[c] = bc.k;
  }
  apply(c0, width, mean_hi, a, b, k);
}

// Moments per channel over all rows: chunks merged in order within each
// stripe, stripes merged in order (in blocks of channels, one block per task).
// Runs inside a parallel region (orphaned omp for); each merged block of
// channels is handed to on_block(c0, width, count, mean, m2) by the thread that
// merged it, mean and m2 pointing at channel c0.
template <class Geometry, class OnBlock>
void rows_moments_phase(const Geometry& g, const float* x, double* stripe_mean, double* stripe_m2,
                        double* stripe_count, OnBlock on_block) {
  const leaf::RowPlan plan(g);
  const int64_t C = plan.channels;
  constexpr int64_t kChannelBlock = 256;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  leaf::Workspace ws;  // this thread's
  float* const sums = ws.take_for_overwrite<float>(3 * C).data();
  double* const chunk_mean = ws.take_for_overwrite<double>(C).data();
  double* const chunk_m2 = ws.take_for_overwrite<double>(C).data();
#pragma omp for schedule(static)
  for (int64_t s = 0; s < plan.stripes; ++s) {
    double count = 0;
    for (int64_t k = plan.first_chunk(s); k < plan.first_chunk(s + 1); ++k) {
      const int64_t n = plan.rows_in(k);
      rows_chunk_moments(x + plan.first_row(k) * g.outer_stride, g.outer_stride, n, C,
                         blocked_channels(C), sums, sums + C, sums + 2 * C, chunk_mean, chunk_m2,
                         next_chunk(plan, k, g, x));
      leaf::merge_moment_arrays(count, stripe_mean + s * C, stripe_m2 + s * C,
                          static_cast<double>(n), chunk_mean, chunk_m2, C);
      count += static_cast<double>(n);
    }
    stripe_count[s] = count;
  }
#pragma omp for schedule(static)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t c0 = block * kChannelBlock, width = std::min(kChannelBlock, C - c0);
    double count = stripe_count[0];
    for (int64_t s = 1; s < plan.stripes; ++s) {
      leaf::merge_moment_arrays(count, stripe_mean + c0, stripe_m2 + c0, stripe_count[s],
                          stripe_mean + s * C + c0, stripe_m2 + s * C + c0, width);
      count += stripe_count[s];
    }
    on_block(c0, width, count, stripe_mean + c0, stripe_m2 + c0);
  }
}

// Inside a parallel region (or on the calling thread alone): body(first,
// count) over this thread's static share of the plan's chunks as one range of
// rows, if it has any. An apply, which reduces nothing, takes its share in one
// call: the streamed stores' fence (stream_rows_avx512) once per thread, not
// once per chunk of 16 KB (32x64x56x56 NHWC inference at 2 threads: 0.73-0.77
// x copy with a fence per chunk, 0.69 without).
template <class Body>
void for_thread_rows(const leaf::RowPlan& plan, Body&& body) {
  const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
  const int64_t c0 = plan.chunks * t / threads, c1 = plan.chunks * (t + 1) / threads;
  if (c1 == c0) return;
  const int64_t first = plan.first_row(c0);
  body(first, plan.first_row(c1 - 1) + plan.rows_in(c1 - 1) - first);
}

// A forward-training over rows in one parallel region (opening one and waking
// threads costs microseconds, which small problems notice): the moments
// (rows_moments_phase), each merged block finished by finish_forward_block
// into mean_hi, scale and shift; then apply_rows(first, count) over this
// thread's share of the rows, once every coefficient is in. Batch norm's and
// BN+ReLU's.
template <class Forward, class ApplyRows>
void rows_forward_training_region(const Forward& p, const leaf::RowPlan& plan, int threads,
                                  float* mean_hi, float* scale, float* shift,
                                  ApplyRows&& apply_rows) {
  leaf::Workspace ws;
  double* const stripe_mean = ws.take_for_overwrite<double>(plan.stripes * plan.channels).data();
  double* const stripe_m2 = ws.take_for_overwrite<double>(plan.stripes * plan.channels).data();
  double* const stripe_count = ws.take_for_overwrite<double>(plan.stripes).data();
  detail::parallel_region(threads, [&] {
    rows_moments_phase(p.x_geom, p.x, stripe_mean, stripe_m2, stripe_count,
                       [&](int64_t c0, int64_t width, double count, const double* mean,
                           const double* m2) {
                         finish_forward_block(p, c0, width, count, mean, m2, mean_hi, scale,
                                              shift);
                       });
    // (after rows_moments_phase, which ends with the coefficients and a barrier)
    for_thread_rows(plan, apply_rows);
  });
}

// rows_moments_phase over every block, into out (its own parallel region);
// done(c0, width) after each block's are written (bn::MomentsReport).
template <class Geometry, class Done = void (*)(int64_t, int64_t)>
void rows_moments_into(const Geometry& g, const float* x, Moments* out, int threads,
                       const Done& done = [](int64_t, int64_t) {}) {
  const leaf::RowPlan plan(g);
  leaf::Workspace ws;
  double* const stripe_mean = ws.take_for_overwrite<double>(plan.stripes * plan.channels).data();
  double* const stripe_m2 = ws.take_for_overwrite<double>(plan.stripes * plan.channels).data();
  double* const stripe_count = ws.take_for_overwrite<double>(plan.stripes).data();
  detail::parallel_region(threads, [&] {
    rows_moments_phase(g, x, stripe_mean, stripe_m2, stripe_count,
                       [&](int64_t c0, int64_t width, double count, const double* mean,
                           const double* m2) {
                         for (int64_t c = 0; c < width; ++c) out[c0 + c] = {count, mean[c], m2[c]};
                         done(c0, width);
                       });
  });
}

}  // namespace
}  // namespace normkit::kernels::cpu
