#pragma once
// The one way from a checked problem to a kernel, for every op family.
//
// Each family's contract (src/kernels/<family>.hpp) defines its problem
// structs and an entry type Impl: a name, `decline`, and one function per op.
// Its fast paths for float data form one ordered list, implementations()
// (every list is in src/cpu/implementations.cpp). `decline` returns why an
// entry cannot take a problem, or nullptr when it can; entries are asked in
// order, and the first that accepts runs. When every entry declines, or the
// data are double, the reference (src/ref/) runs: it takes every problem.
//
// NORMKIT_VERBOSE=1 (any value but "0") prints on stderr, for every op:
//   normkit: <op>: <entry> declined: <why>    for each entry passed over
//   normkit: <op>: <entry>                    the entry that ran
//   normkit: <op>: reference                  when every entry declined
//   normkit: <op>: reference (double data)
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string_view>
#include <type_traits>

namespace normkit::detail {

inline bool verbose() {
  static const bool on = [] {
    const char* value = std::getenv("NORMKIT_VERBOSE");
    return value && *value && std::string_view(value) != "0";
  }();
  return on;
}

// The first entry of `list` whose decline(shape...) accepts, or nullptr.
template <class Impl, class... Shape>
const Impl* choose(const char* op, std::span<const Impl> list, const Shape&... shape) {
  for (const Impl& impl : list) {
    const char* reason = impl.decline(shape...);
    if (!reason) {
      if (verbose()) std::fprintf(stderr, "normkit: %s: %s\n", op, impl.name);
      return &impl;
    }
    if (verbose()) std::fprintf(stderr, "normkit: %s: %s declined: %s\n", op, impl.name, reason);
  }
  if (verbose()) std::fprintf(stderr, "normkit: %s: reference\n", op);
  return nullptr;
}

// Runs `problem` with the `fast` function of the first entry that accepts
// `shape` (float problems), else with `reference` (double problems always).
template <class Impl, class Fast, class Problem, class... Shape>
void run(const char* op, std::span<const Impl> list, Fast Impl::*fast,
         void (*reference)(const Problem&), const Problem& problem, const Shape&... shape) {
  if constexpr (std::is_invocable_v<Fast, const Problem&>) {
    if (const Impl* impl = choose(op, list, shape...)) return (impl->*fast)(problem);
  } else if (verbose()) {
    std::fprintf(stderr, "normkit: %s: reference (double data)\n", op);
  }
  reference(problem);
}

}  // namespace normkit::detail
