// MPI_COMM_WORLD as a Communicator (OpenMPI from Debian). all_gather is a
// non-blocking MPI_Iallgather completed by polling, which gives every
// collective a deadline, and lets a waiting rank sleep rather than spin on a
// core that a rank still computing needs.
#include <mpi.h>

#include <chrono>
#include <limits>
#include <thread>

#include "normkit/engine/distributed.hpp"
#include "support.hpp"

namespace normkit::dist {

using engine::fail_invalid;
using engine::fail_runtime;

namespace {

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  return std::string(text, static_cast<size_t>(length));
}

class MpiWorld final : public Communicator {
 public:
  explicit MpiWorld(double timeout_seconds) : timeout_(timeout_seconds) {
    if (!(timeout_seconds > 0)) fail_invalid("timeout must be positive, got ", timeout_seconds);
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) fail_invalid("MPI is already initialized in this process");
    int provided = 0;
    if (const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
        rc != MPI_SUCCESS)
      fail_runtime("MPI_Init failed: ", mpi_error_text(rc));
    // Errors come back as codes (and become normkit::Error), not as aborts.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  ~MpiWorld() override { MPI_Finalize(); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_gather(std::span<const double> mine, std::span<double> all) override {
    gather(mine, all, MPI_DOUBLE);
  }
  void all_gather(std::span<const float> mine, std::span<float> all) override {
    gather(mine, all, MPI_FLOAT);
  }

  [[noreturn]] void abort(int code) noexcept override {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; in case it does
  }

 private:
  template <class T>
  void gather(std::span<const T> mine, std::span<T> all, MPI_Datatype type) {
    if (all.size() != mine.size() * static_cast<size_t>(size_))
      fail_invalid("all_gather: expected room for ", mine.size() * static_cast<size_t>(size_),
                   " values, got ", all.size());
    if (mine.size() > static_cast<size_t>(std::numeric_limits<int>::max()))
      fail_invalid("all_gather: ", mine.size(), " values are more than one MPI message holds");
    const int count = static_cast<int>(mine.size());
    MPI_Request request;
    if (const int rc = MPI_Iallgather(mine.data(), count, type, all.data(), count, type,
                                      MPI_COMM_WORLD, &request);
        rc != MPI_SUCCESS)
      fail_runtime("MPI_Iallgather failed: ", mpi_error_text(rc));
    wait(request);
    ++collectives_;
    count_bytes(static_cast<int64_t>(mine.size_bytes()),
                static_cast<int64_t>(mine.size_bytes()) * (size_ - 1));
  }

  // Polls the request: spins briefly (a collective among ranks that arrive
  // together completes in microseconds), then sleeps between polls.
  void wait(MPI_Request& request) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const auto deadline = start + std::chrono::duration<double>(timeout_);
    for (int polls = 0;; ++polls) {
      int done = 0;
      if (const int rc = MPI_Test(&request, &done, MPI_STATUS_IGNORE); rc != MPI_SUCCESS)
        fail_runtime("collective ", collectives_ + 1, " failed: ", mpi_error_text(rc));
      if (done) return;
      if (polls < 2000) continue;
      if (clock::now() > deadline)
        fail_runtime("collective ", collectives_ + 1, " did not complete within ", timeout_,
                     " s: another rank died, is stuck, or runs a different program");
      std::this_thread::sleep_for(std::chrono::microseconds(polls < 20000 ? 20 : 200));
    }
  }

  double timeout_;
  int rank_ = 0, size_ = 1;
  int64_t collectives_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> mpi_world(double timeout_seconds) {
  return std::make_unique<MpiWorld>(timeout_seconds);
}

}  // namespace normkit::dist
