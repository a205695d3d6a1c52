#pragma once
// What the layers on oneDNN primitives share (conv_layer.cpp, layers.cpp).
//
// Determinism: oneDNN's kernels split their work, and with it the order of
// their sums, by the number of threads they see when a primitive is created.
// The engine creates every primitive for one thread (OneThread) and runs it on
// chunks of work whose boundaries depend only on the problem, spread over
// normkit's threads by for_each_chunk; sums across chunks are added in chunk
// order. So results depend on the problem, never on the thread count.
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <map>

#include "normkit/threading.hpp"

namespace normkit::nn::detail {

const dnnl::engine& cpu_engine();

// oneDNN sizes a primitive's work split by omp_get_max_threads() when the
// primitive is created, and opens a parallel region of that size when it runs
// outside one: under this guard, it is a one-thread primitive.
class OneThread {
 public:
  OneThread() : previous_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(previous_); }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;

 private:
  int previous_;
};

// oneDNN's default scratchpad is one buffer shared by every primitive: two
// primitives running at once on two threads would write the same memory (a
// race that changed a cnn-small run at 2 threads). Every primitive here is made
// with user_scratchpad() and given the running thread's own scratchpad.
inline dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}
// The calling thread's scratchpad, grown to fit desc (a thread runs one
// primitive at a time, so one buffer per thread serves them all).
dnnl::memory thread_scratchpad(const dnnl::memory::desc& desc);

// Values (primitives and what goes with them) made on first use for a key (a
// chunk's size), then reused; chunks on several threads look them up, so the
// map is read and filled under a lock.
template <class Value>
class Cache {
 public:
  template <class Make>
  Value& get(int64_t key, const Make& make) {
    Value* found = nullptr;
#pragma omp critical(normkit_primitive_cache)
    {
      auto it = values_.find(key);
      if (it == values_.end()) it = values_.emplace(key, make()).first;
      found = &it->second;
    }
    return *found;
  }
  // Not while a chunk may be looking a value up.
  void clear() { values_.clear(); }

 private:
  std::map<int64_t, Value> values_;
};

// Runs body(chunk, thread) for every chunk in [0, chunks) on up to
// num_threads() threads (thread < that count), one chunk at a time per thread,
// taken dynamically so that a thread held up by another process does not hold
// up the rest; an exception in any chunk is rethrown here.
template <class Body>
void for_each_chunk(int64_t chunks, const Body& body) {
  const int threads = static_cast<int>(std::clamp<int64_t>(chunks, 1, num_threads()));
  if (threads == 1) {  // no region to open (mlp-paper's small products)
    OneThread one_thread;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) body(chunk, 0);
    return;
  }
  std::exception_ptr failure;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    omp_set_num_threads(1);  // oneDNN in a team of one would open a region of its own
    try {
      body(chunk, omp_get_thread_num());
    } catch (...) {
#pragma omp critical(normkit_chunk_failure)
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
}

}  // namespace normkit::nn::detail
