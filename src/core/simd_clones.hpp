#pragma once
// NORMKIT_SIMD_CLONES compiles a function for x86-64-v4 (AVX-512), x86-64-v3
// (AVX2+FMA) and baseline x86-64, with a choice at run time (GCC's
// target_clones; there is no -march=native). For functions with internal
// linkage, so that every file has its own clones and resolver. The v3/v4 clones
// may contract a·b + c into one FMA, which the baseline clone cannot.
//
// Not with clang: clang 14 gives the resolver of an internal-linkage clone a
// global symbol, so two files' copies collide at link time (and it refuses
// [[maybe_unused]] next to target_clones). Clang builds (sanitizers, fuzzing,
// the second-compiler check) run the baseline loops.
//
// NORMKIT_HAS_SIMD_CLONES: whether they exist. Hand-written AVX-512 loops that
// must give the clones' bits (cpu/streamed_output.hpp, stream_rows_avx512) are
// built only then: on an AVX-512 CPU the clones contract as those loops do.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NORMKIT_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define NORMKIT_HAS_SIMD_CLONES 1
#else
#define NORMKIT_SIMD_CLONES
#define NORMKIT_HAS_SIMD_CLONES 0
#endif

// NORMKIT_IVDEP: GCC's promise that a loop's iterations do not depend on each
// other (the outputs may be inputs, so `restrict` cannot say it). Clang does
// not know the pragma, and warned at each use.
#if defined(__GNUC__) && !defined(__clang__)
#define NORMKIT_IVDEP _Pragma("GCC ivdep")
#else
#define NORMKIT_IVDEP
#endif
