#pragma once
// What the engine needs besides the kernel library's public headers: building
// normkit::Error messages, how many threads a loop deserves and its parallel
// region, and compiling a leaf loop for several ISAs. The engine uses the
// kernel library only through include/normkit/, as any user would, so these
// few lines are its own (the kernel library keeps the same ideas in
// src/core/check.hpp, src/core/parallel.hpp and src/cpu/leaf_loops.hpp).
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "normkit/error.hpp"
#include "normkit/threading.hpp"

// NORMKIT_ENGINE_SIMD_CLONES compiles a function for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2+FMA) and baseline x86-64, chosen at run time (GCC's
// target_clones; there is no -march=native). For plain (non-template)
// functions with internal linkage, so each file has its own resolver. Not with
// clang: clang 14 gives such resolvers global symbols (see src/cpu/leaf_loops.hpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NORMKIT_ENGINE_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NORMKIT_ENGINE_SIMD_CLONES
#endif

namespace normkit::engine {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

template <class... Parts>
[[noreturn]] void fail_invalid(const Parts&... parts) {
  throw Error(ErrorKind::invalid_argument, concat(parts...));
}

template <class... Parts>
[[noreturn]] void fail_runtime(const Parts&... parts) {
  throw Error(ErrorKind::runtime, concat(parts...));
}

// Room for `count` values, if the system grants it, before a loader fills
// them: a hint that lets it write its data once into their place. Without it
// (a limit on the address space, a count from a corrupt file) the vector grows
// as it is filled, and the loader still finds the file's real length. The room
// asks to be backed by transparent huge pages where the kernel does so on
// request (THP "madvise", Debian's default): one page fault per 2 MB instead of
// 512. Also only a hint; a kernel that declines changes nothing.
template <class T>
void reserve_hint(std::vector<T>& values, uint64_t count) {
  try {
    values.reserve(static_cast<size_t>(std::min<uint64_t>(count, values.max_size())));
  } catch (const std::bad_alloc&) {
    return;
  } catch (const std::length_error&) {
    return;
  }
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(values.data());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + values.capacity() * sizeof(T)) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// a·b and a + b, or a normkit::Error naming `what` when the result does not fit
// in 64 bits (sizes from specs and files are checked before they are used).
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) fail_invalid(what, " overflows: ", a, " x ", b);
  return r;
}
inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) fail_invalid(what, " overflows: ", a, " + ", b);
  return r;
}

// Counter-based randomness (dropout masks, BN noise, data shifts): splitmix64's
// step and finalizer, so a draw depends only on its key (seed, step, index),
// never on the order or thread that asks for it.
// A splitmix64 stream's state advances by this odd constant per draw.
constexpr uint64_t kSplitmix64Increment = 0x9e3779b97f4a7c15ull;
inline uint64_t splitmix64(uint64_t z) {
  z += kSplitmix64Increment;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
// A hash's top 53 bits as a double in [0, 1).
inline double unit_uniform(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }

// Opening a parallel region costs microseconds, and on a shared machine a
// region stalls whenever another process holds one of its cores, so small
// loops run on fewer threads. Results never depend on the choice.
inline int threads_for(int64_t elements) {
  constexpr int64_t kElementsPerThread = 32768;
  return static_cast<int>(std::clamp<int64_t>(elements / kElementsPerThread, 1, num_threads()));
}

// body() on `threads` threads, or on the caller without a region when that is
// one (unless inside a caller's active region): libgomp builds a team even
// for a region of one, about 2 us, which mlp-paper's activations paid a
// dozen times a step. Worksharing loops inside body work either way.
template <class Body>
void parallel_region(int threads, Body&& body) {
  if (threads <= 1 && !omp_in_parallel()) {
    body();
    return;
  }
#pragma omp parallel num_threads(threads)
  body();
}

// body(i) for i in [0, count), statically split over `threads` threads.
template <class Body>
void parallel_for(int threads, int64_t count, Body&& body) {
  if (threads <= 1 && !omp_in_parallel()) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < count; ++i) body(i);
}

}  // namespace normkit::engine
