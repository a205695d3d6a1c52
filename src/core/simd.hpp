#pragma once
// NORMKIT_SIMD_CLONES compiles a function for x86-64-v4 (AVX-512), x86-64-v3
// (AVX2+FMA) and baseline x86-64, chosen at run time (GCC's target_clones);
// there is no -march=native. Put it on plain (non-template) functions with
// internal linkage, so each file has its own resolver. The v3/v4 clones may
// contract a·b + c into one FMA, which the baseline clone cannot: bits are the
// same for any thread count on one machine, and may differ in the last place
// between machines that run different clones.
#if defined(__x86_64__) && defined(__GNUC__)
#define NORMKIT_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NORMKIT_SIMD_CLONES
#endif
