#pragma once
// A call's temporary arrays (per-channel coefficients, partial sums, a block
// of expanded gradients), taken from memory each thread keeps between calls.
//
// Why not a std::vector per call: glibc hands the top of the heap back to the
// kernel when a free leaves more than 128 KB there, and serves blocks over
// 128 KB from fresh mmap()ed pages. A call whose temporaries cross that size
// then pays brk/munmap, a TLB flush on every core of the process and a page
// fault per 4 KB, every time. Measured at 2 threads: batch norm + ReLU
// backward of 32x4096 took 34-36x a copy of its input this way and 10x with
// glibc's trimming turned off (glibc.malloc.trim_threshold); the group norm
// of 32x4096 allocated 1.6 MB (forward) and 4.3 MB (backward) per call.
//
// A Workspace is a frame on the calling thread's arena: take() hands out
// 64-byte aligned arrays from it, and the destructor gives them back (the
// memory stays with the thread). Frames nest: a callee's Workspace opens
// above its caller's, and is closed first, as scopes are. A thread's first
// calls grow its arena; once it holds a call's largest need in one block,
// later calls of that size allocate nothing.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <type_traits>

namespace normkit::detail {

class Workspace {
 public:
  Workspace();
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // count value-initialized T (zeros for arithmetic types), as std::vector<T>(count).
  template <class T>
  std::span<T> take(size_t count) {
    std::span<T> out = take_for_overwrite<T>(count);
    std::uninitialized_value_construct(out.begin(), out.end());
    return out;
  }
  // count T left as they are: for arrays the caller writes before reading.
  template <class T>
  std::span<T> take_for_overwrite(size_t count) {
    static_assert(std::is_trivially_destructible_v<T> && alignof(T) <= kAlignment);
    return {static_cast<T*>(bytes(count * sizeof(T))), count};
  }

  // values converted to T, in an array of their own.
  template <class T, class U>
  std::span<T> copy(std::span<U> values) {
    std::span<T> out = take_for_overwrite<T>(values.size());
    std::copy(values.begin(), values.end(), out.begin());
    return out;
  }

  static constexpr size_t kAlignment = 64;

 private:
  void* bytes(size_t size);
  size_t block_;  // where this frame began on the thread's arena
  size_t used_;
};

}  // namespace normkit::detail
