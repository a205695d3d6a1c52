// The collectives data-parallel training is built from, on Communicator's one
// all_gather, each combining the ranks' parts in rank order; the group of one
// process; sharding of a global batch.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "normkit/engine/distributed.hpp"
#include "support.hpp"

namespace normkit::dist {

using engine::fail_invalid;
using engine::fail_runtime;

namespace {

class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_gather(std::span<const double> mine, std::span<double> all) override { copy(mine, all); }
  void all_gather(std::span<const float> mine, std::span<float> all) override { copy(mine, all); }
  [[noreturn]] void abort(int code) noexcept override { std::_Exit(code); }

 private:
  template <class T>
  static void copy(std::span<const T> mine, std::span<T> all) {
    if (all.size() != mine.size())
      fail_invalid("all_gather: expected room for ", mine.size(), " values, got ", all.size());
    std::copy(mine.begin(), mine.end(), all.begin());
  }
};

// sums[i] = Σ over ranks of every rank's values[i], in rank order, in double.
template <class T>
void ordered_sums(Communicator& group, std::span<const T> values, std::span<double> sums) {
  const int ranks = group.size();
  const size_t n = values.size();
  if (sums.size() != n) fail_invalid("all_reduce_sum: ", n, " values but room for ", sums.size());
  std::vector<T> all(n * static_cast<size_t>(ranks));
  group.all_gather(values, all);
  for (size_t i = 0; i < n; ++i) sums[i] = all[i];
  for (int r = 1; r < ranks; ++r) {
    const T* part = all.data() + static_cast<size_t>(r) * n;
    for (size_t i = 0; i < n; ++i) sums[i] += part[i];
  }
}

}  // namespace

std::unique_ptr<Communicator> single_process() { return std::make_unique<SingleProcess>(); }

bool started_by_mpi_launcher() {
  // OpenMPI's mpirun sets OMPI_COMM_WORLD_SIZE; PMIx launchers (srun, prterun)
  // PMIX_RANK; MPICH-style ones PMI_RANK.
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"})
    if (std::getenv(name)) return true;
  return false;
}

void all_reduce_sum(Communicator& group, std::span<double> values) {
  if (group.size() == 1) return;
  ordered_sums<double>(group, values, values);
}

void all_reduce_sum(Communicator& group, std::span<const float> values, std::span<double> sums) {
  ordered_sums<float>(group, values, sums);
}

void merge_moments(Communicator& group, std::span<Moments> moments) {
  const int ranks = group.size();
  if (ranks == 1) return;
  const size_t channels = moments.size();
  std::vector<double> mine(3 * channels), all(3 * channels * static_cast<size_t>(ranks));
  for (size_t c = 0; c < channels; ++c) {
    mine[3 * c] = moments[c].count;
    mine[3 * c + 1] = moments[c].mean;
    mine[3 * c + 2] = moments[c].m2;
  }
  group.all_gather(mine, all);
  for (size_t c = 0; c < channels; ++c) {
    Moments merged;
    for (int r = 0; r < ranks; ++r) {
      const double* m = all.data() + (static_cast<size_t>(r) * channels + c) * 3;
      merged.merge({m[0], m[1], m[2]});
    }
    moments[c] = merged;
  }
}

void check_same(Communicator& group, uint64_t fingerprint, const std::string& what) {
  const int ranks = group.size();
  if (ranks == 1) return;
  // Two 32-bit halves: doubles hold them exactly.
  const double mine[2] = {static_cast<double>(fingerprint >> 32),
                          static_cast<double>(fingerprint & 0xffffffffu)};
  std::vector<double> all(2 * static_cast<size_t>(ranks));
  group.all_gather(mine, all);
  for (int r = 1; r < ranks; ++r)
    if (all[2 * r] != all[0] || all[2 * r + 1] != all[1])
      fail_runtime("rank ", r, " disagrees with rank 0 on ", what);
}

namespace {
constexpr uint64_t kFnvStart = 1469598103934665603ull;
uint64_t fnv1a(uint64_t h, const void* data, size_t size) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < size; ++i) h = (h ^ bytes[i]) * 1099511628211ull;
  return h;
}
}  // namespace

uint64_t fingerprint(const std::vector<const std::vector<float>*>& arrays) {
  uint64_t h = kFnvStart;
  for (const auto* a : arrays) h = fnv1a(h, a->data(), a->size() * sizeof(float));
  return h;
}

uint64_t fingerprint(const std::string& text) { return fnv1a(kFnvStart, text.data(), text.size()); }

Shard shard_of(int64_t size, int rank, int ranks) {
  if (ranks < 1 || rank < 0 || rank >= ranks)
    fail_invalid("shard_of: rank ", rank, " of ", ranks, " ranks");
  const int64_t base = size / ranks, extra = size % ranks;
  return {rank * base + std::min<int64_t>(rank, extra), base + (rank < extra ? 1 : 0)};
}

}  // namespace normkit::dist
