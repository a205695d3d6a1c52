#pragma once
// The benchmark's vocabulary: a problem (one shape in one memory format), the
// data every library reads, and the cases (one library running one op) that
// the harness times side by side.
//
// Normalization is memory-bound, so every case is reported next to a plain copy
// of the same tensor measured in the same rounds: "× copy" is the figure that
// survives a noisy, shared machine (bench/README.md).
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace normkit_bench {

// Where the channels sit in memory. Sizes are always given in PyTorch's logical
// order (N, C, spatial...); channels_last is PyTorch's channels_last /
// channels_last_3d (NHWC, NDHWC). For rank 2 (NC) both are the same.
enum class Memory { channels_first, channels_last };

// One measured shape. `kind` names the normalization ("bn1d", "bn2d", "bn3d",
// "bn_relu" and "bn_add_relu" for the fused BN+ReLU and BN+Add+ReLU,
// "layer_norm", "group_norm"); a library that does not know a kind offers no
// cases for it.
struct Problem {
  std::string kind;
  std::vector<int64_t> sizes;  // N, C, spatial...
  Memory memory = Memory::channels_first;

  int64_t numel() const;
  int64_t channels() const { return sizes.at(1); }
  int rank() const { return static_cast<int>(sizes.size()); }
  // Element strides of the logical sizes in this memory format.
  std::vector<int64_t> strides() const;
  std::string layout_name() const;   // "NC", "NCHW", "NHWC", ...
  std::string shape_string() const;  // "32x64x56x56"
  std::string label() const;         // "bn2d 32x64x56x56 NHWC"
};

// 64-byte aligned float storage, touched once at allocation so page faults
// never land inside a timed call.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t count);
  float* data() const { return data_.get(); }
  int64_t size() const { return size_; }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  int64_t size_ = 0;
};

// The tensors of one problem, shared by every library so all of them read the
// same pages. Big buffers are in the problem's memory order; per-channel
// buffers hold C values. Libraries that allocate their own outputs (PyTorch)
// may ignore y and dx.
struct Data {
  Problem problem;
  Buffer x, dy;  // inputs, random
  Buffer y, dx;  // outputs
  Buffer copy;   // the copy baseline's destination
  Buffer gamma, beta, running_mean, running_var;
};
Data make_data(const Problem& problem);

enum class Op {
  copy,            // the baseline (copy_case)
  copy_streaming,  // for reference: the same copy with non-temporal stores
  clone,           // PyTorch's x.clone(), which allocates its output
  forward_training,
  backward,
  forward_backward,
  inference,
  // The phases of a two-pass kernel, timed one by one with --phases: normkit's
  // split API (what synchronized BN calls), next to the floor's single passes.
  moments,          // per-channel statistics of x
  forward_apply,    // y from x and given statistics
  backward_reduce,  // per-channel Σdy and Σdy·x̂
  backward_apply,   // dx from x, dy and given sums
};
const char* op_name(Op op);  // "forward-train", "backward", ...
bool is_phase(Op op);         // one of the four above
// What the op must at least read and write, in bytes:
//   copy, clone, forward-train, inference: read x, write y        (2 tensors)
//   backward:                              read x, dy, write dx   (3 tensors)
//   forward+backward:                      both of the above      (5 tensors)
//   moments: read x (1); backward-reduce: read x, dy (2);
//   forward-apply: as inference (2); backward-apply: as backward (3)
double minimal_bytes(Op op, const Problem& problem);

// One library running one op on one problem.
struct Case {
  std::string library;  // "copy", "normkit", "torch", "onednn"
  Op op = Op::copy;
  std::string note;  // how it runs: implementation name, caveats
  std::function<void()> run;
  // Optional: the output to cross-check after run() (y, or dx for the
  // backward ops), numel() floats in the problem's memory order.
  std::function<const float*()> result;
};

// The baseline every case is divided by: x copied into a preallocated buffer
// (data.copy) with `threads` threads, each copying a contiguous share with
// std::memcpy. (glibc's memcpy uses ordinary stores below its non-temporal
// threshold, x86_non_temporal_threshold, which is hundreds of MB on these
// machines: every output line is read before it is written.)
Case copy_case(Data& data, int threads);
// The same copy with non-temporal (streaming) stores, which skip reading the
// destination: what a kernel using them can reach. Reported, not a baseline.
Case streaming_copy_case(Data& data, int threads);

// For reference, the floor of any two-pass kernel: its memory traffic and the
// least arithmetic on it, with one constant for the whole tensor instead of
// per-channel ones, in memory order, `threads` threads (library "floor"):
//   forward-train     Σx and Σx², then y = a·x + b      (read x twice, write y)
//   inference         y = a·x + b
//   backward          Σdy and Σdy·x, then dx = a·dy + b·x + c
//   forward+backward  both
// A kernel that reads its inputs once for the statistics and once more for the
// output cannot beat its row; a bar set below it needs the data kept in cache
// between the passes. Not cross-checked: the outputs mean nothing.
std::vector<Case> floor_cases(Data& data, int threads);
// The floor of each phase: its passes above, one at a time (moments: Σx and
// Σx²; forward-apply: y = a·x + b; backward-reduce: Σdy and Σdy·x;
// backward-apply: dx = a·dy + b·x + c).
std::vector<Case> floor_phase_cases(Data& data, int threads);

// A library under test. set_threads is called before a thread count's cases
// are built; cases() builds (and may run once, to set up saved statistics) the
// cases it offers for a problem, or none.
struct Backend {
  std::string library;
  std::string version;
  std::function<void(int threads)> set_threads;
  std::function<std::vector<Case>(Data& data)> cases;
};

// Backends, each in its own translation unit so that a library can be left
// out of the build (bench/CMakeLists.txt).
Backend normkit_backend();
#ifdef NORMKIT_BENCH_WITH_TORCH
Backend torch_backend();
#endif
#ifdef NORMKIT_BENCH_WITH_ONEDNN
Backend onednn_backend();
#endif

}  // namespace normkit_bench
