#pragma once
// Data-parallel training: a group of processes ("ranks") that each take a shard
// of every global batch, sum their gradients, and (synchronized batch norm)
// merge their per-channel statistics, so that every rank holds the same
// parameters after every step.
//
// The engine talks to the group only through Communicator: one collective,
// all_gather (of doubles or floats), from which the sums and merges below are
// built in rank order.
// A fixed order makes a run reproducible for a given number of ranks and gives
// every rank the same bits; it costs ranks × the data of an all-reduce (a ring
// all-reduce receives about twice the data). Implementations: one process
// (single_process) and MPI (mpi_world, Debian's OpenMPI).
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "normkit/moments.hpp"

namespace normkit::dist {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Every rank's `mine` (the same length on every rank) concatenated in rank
  // order into `all` (size() × mine.size() values). A collective: every rank
  // calls it, in the same sequence. Throws normkit::Error (runtime) when the
  // group does not complete it within the communicator's timeout (a rank died,
  // is stuck, or runs a different sequence of collectives).
  virtual void all_gather(std::span<const double> mine, std::span<double> all) = 0;
  virtual void all_gather(std::span<const float> mine, std::span<float> all) = 0;
  // Ends every rank of the group with exit status `code`: after an error on one
  // rank the others would wait in their next collective, so this is how a
  // program leaves a group it cannot finish with. Never returns.
  [[noreturn]] virtual void abort(int code) noexcept = 0;
  // Bytes this process has passed to all_gather (sent) and received from it,
  // since it was created: the benchmark's "bytes per step".
  int64_t bytes_sent() const noexcept { return sent_; }
  int64_t bytes_received() const noexcept { return received_; }

 protected:
  void count_bytes(int64_t sent, int64_t received) noexcept {
    sent_ += sent;
    received_ += received;
  }

 private:
  int64_t sent_ = 0, received_ = 0;
};

// The group of one process: all_gather copies.
std::unique_ptr<Communicator> single_process();

// True when an MPI launcher (mpirun, mpiexec, srun with PMIx) started this
// process: its environment names a rank. Without a launcher a program runs as
// one process and never initializes MPI (initializing a singleton costs a second).
bool started_by_mpi_launcher();

// MPI_COMM_WORLD: initializes MPI (once per process; finalized when the
// returned object is destroyed). Collectives that do not complete within
// `timeout_seconds` throw. Waiting ranks poll and sleep instead of spinning,
// so a rank that waits leaves the cores to those still computing.
std::unique_ptr<Communicator> mpi_world(double timeout_seconds);

// ---------------------------------------------------------------- collectives

// Element-wise sum over ranks, added in rank order.
void all_reduce_sum(Communicator& group, std::span<double> values);
// The same for float values (sent as floats: half the bytes), summed in double.
void all_reduce_sum(Communicator& group, std::span<const float> values, std::span<double> sums);

// Every rank's per-channel moments merged in rank order (Moments::merge): the
// statistics of the batch the ranks' shards form together, in rank order.
void merge_moments(Communicator& group, std::span<Moments> moments);

// Throws normkit::Error (runtime) unless every rank passes the same
// fingerprint: "rank 2 disagrees with rank 0 on <what>".
void check_same(Communicator& group, uint64_t fingerprint, const std::string& what);

// FNV-1a over the bytes of some float arrays, or of a text (fingerprints for check_same).
uint64_t fingerprint(const std::vector<const std::vector<float>*>& arrays);
uint64_t fingerprint(const std::string& text);

// ---------------------------------------------------------------- sharding

// The samples [first, first + count) of a global batch of `size` that `rank` of
// `ranks` takes: contiguous shards in rank order, the first size % ranks one
// sample larger. Concatenated in rank order they are the batch.
struct Shard {
  int64_t first = 0, count = 0;
};
Shard shard_of(int64_t size, int rank, int ranks);

}  // namespace normkit::dist
