// The process group of a data-parallel `normkit train`: joined when an MPI
// launcher started this process, left with MPI_Finalize on success or an
// interruption every rank agreed on (train::train_epoch), and with MPI_Abort on
// an error (the other ranks would otherwise wait in their next
// collective until it timed out).
#include <omp.h>
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include <fmt/format.h>

#include "cli.hpp"
#include "normkit/threading.hpp"

namespace normkit::cli {

namespace {
std::unique_ptr<dist::Communicator>& group_storage() {
  static std::unique_ptr<dist::Communicator> group;
  return group;
}
}  // namespace

dist::Communicator* join_process_group(const GroupFlags& flags) {
  auto& group = group_storage();
  if (group) return group.get();
  if (!dist::started_by_mpi_launcher()) {
    if (flags.ranks > 1)
      usage_error(fmt::format("--ranks {}: this process was not started by an MPI launcher; run "
                              "mpirun -np {} normkit train ...",
                              flags.ranks, flags.ranks));
    return nullptr;
  }
  group = dist::mpi_world(flags.timeout);
  if (flags.ranks > 0 && flags.ranks != group->size())
    usage_error(fmt::format("--ranks {}: the launcher started {} ranks", flags.ranks, group->size()));
  // Only rank 0 reports: the others' normal output would repeat it.
  if (group->rank() != 0 && !std::freopen("/dev/null", "w", stdout))
    runtime_error("cannot silence the standard output of rank " + std::to_string(group->rank()));
  // The ranks on one machine share its cores (--threads overrides).
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  const int local_ranks = local ? std::max(1, std::atoi(local)) : 1;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  apply_threads(std::max(1, cores / local_ranks));
  return group.get();
}

dist::Communicator* process_group() { return group_storage().get(); }

bool writes_files() { return !process_group() || process_group()->rank() == 0; }

std::string rank_prefix() {
  const auto* group = process_group();
  return group ? fmt::format("rank {} of {}: ", group->rank(), group->size()) : "";
}

int leave_process_group(int code) {
  auto& group = group_storage();
  if (!group) return code;
  if (code != 0 && code != 128 + SIGINT && code != 128 + SIGTERM) {
    std::fflush(stdout);
    std::fflush(stderr);
    group->abort(code);
  }
  group.reset();  // MPI_Finalize
  return code;
}

}  // namespace normkit::cli
