// Stopping on SIGINT and SIGTERM (train.hpp: install_stop_handlers).
//
// The signals are never handled on a thread that computes. oneDNN 2.x's JIT
// sgemm (Debian's 2.6.3; fixed in 3.x, oneDNN issue #4845) points the stack
// pointer into a heap buffer while it runs, so a handler that runs on a thread
// inside it has its signal frame written over the heap: glibc then aborts
// ("corrupted size vs. prev_size") or a product comes out wrong. A Ctrl-C in the
// middle of a step did that to about one interrupted run in thirty on a loaded
// machine. So install_stop_handlers starts one thread of its own that takes
// the signals with sigwait, then blocks them in the thread that calls it (the
// threads it starts afterwards, OpenMP's among them, inherit the mask) and in
// the calling thread's OpenMP threads already running. The handler stays for
// threads started earlier that it cannot reach (MPI's), which run no products.
#include <omp.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>

#include "normkit/engine/train.hpp"
#include "support.hpp"

namespace normkit::train {

namespace {
// One word, so that taking a signal and clear_stop cannot interleave: the
// signal asking to stop (0 for none) and, in kTaken, whether a signal has been
// taken since clear_stop (the next one ends the process). request_stop (another
// rank's signal) sets the signal alone. Lock-free: a signal handler touches it.
std::atomic<int> state{0};
constexpr int kTaken = 1 << 30;
std::atomic<pid_t> waiter_process{0};  // the process whose waiting thread runs
static_assert(std::atomic<int>::is_always_lock_free && std::atomic<pid_t>::is_always_lock_free);

sigset_t stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

// The first signal is recorded; the second ends the process by its default
// action. Only async-signal-safe calls: it is also the handler.
void take(int signal, bool in_handler) {
  int now = state.load();
  while (!(now & kTaken))
    if (state.compare_exchange_weak(now, kTaken | signal)) return;
  struct sigaction fallback {};
  fallback.sa_handler = SIG_DFL;
  sigemptyset(&fallback.sa_mask);
  ::sigaction(SIGINT, &fallback, nullptr);
  ::sigaction(SIGTERM, &fallback, nullptr);
  // A handler's own signal is blocked until it returns; then the raised one ends the process.
  if (!in_handler) {
    const sigset_t set = stop_signals();
    ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  }
  ::raise(signal);
}

extern "C" void stop_handler(int signal) {
  const int saved = errno;
  take(signal, true);
  errno = saved;
}

void wait_for_stop_signals() {
  const sigset_t set = stop_signals();
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);  // sigwait takes only blocked signals
  for (;;) {
    int signal = 0;
    if (::sigwait(&set, &signal) == 0) take(signal, false);
  }
}

// A child of fork() has no waiting thread: it starts as a process that never
// called install_stop_handlers (nothing recorded, the signals unblocked).
extern "C" void reset_in_child() {
  state.store(0);
  waiter_process.store(0);
  const sigset_t set = stop_signals();
  ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}
}  // namespace

void install_stop_handlers() {
  static std::once_flag at_fork;
  std::call_once(at_fork, [] { ::pthread_atfork(nullptr, nullptr, reset_in_child); });
  struct sigaction action {};
  action.sa_handler = stop_handler;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // reads and writes in progress carry on
  for (const int signal : {SIGINT, SIGTERM})
    if (::sigaction(signal, &action, nullptr) != 0)
      engine::fail_runtime("cannot install the handler of signal ", signal, ": ", std::strerror(errno));
  // The waiting thread first: if it cannot start, nothing is blocked.
  const pid_t self = ::getpid();
  if (waiter_process.exchange(self) != self) {
    try {
      std::thread(wait_for_stop_signals).detach();
    } catch (const std::system_error& e) {
      waiter_process.store(0);
      engine::fail_runtime("cannot start the thread that waits for stop signals: ", e.what());
    }
  }
  const sigset_t set = stop_signals();
  if (const int error = ::pthread_sigmask(SIG_BLOCK, &set, nullptr); error != 0)
    engine::fail_runtime("cannot block the stop signals: ", std::strerror(error));
#pragma omp parallel num_threads(omp_get_max_threads())
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

void request_stop(int signal) noexcept {
  int now = state.load();
  while (!state.compare_exchange_weak(now, (now & kTaken) | signal)) {
  }
}
int stop_signal() noexcept { return state.load() & ~kTaken; }
void clear_stop() noexcept { state.store(0); }

}  // namespace normkit::train
