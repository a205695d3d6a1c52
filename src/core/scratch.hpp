#pragma once
// Per-thread scratch that outlives a call. A fresh large vector per call is
// fresh pages from the kernel: their faults, and glibc giving the heap's top
// back on free (brk, and a TLB flush on every core of the process), took 7%
// of a 32x4096 batch-norm forward-training at one thread (54 us), as much as
// a small problem's coefficients.
//
// Internal linkage: each translation unit that includes this has its own
// buffers, and each thread its own, so a caller's slot and its callee's never
// meet across files; within a file, a call's buffers must not be used by a
// callee or by another thread, and `slot` tells them apart.
#include <cstddef>
#include <vector>

namespace normkit::detail {
namespace {

template <class T>
[[maybe_unused]] T* scratch(int slot, size_t count) {
  thread_local std::vector<T> buffers[8];
  auto& buffer = buffers[slot];
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

}  // namespace
}  // namespace normkit::detail
