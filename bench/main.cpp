// normkit_bench: normkit, PyTorch and oneDNN batch normalization side by side,
// each as a multiple of a plain copy of the same tensor.
//
// Method. For each thread count and problem, every case (one library running
// one op) is set up, run once to cross-check its output against the first
// library's, and warmed up. Then rounds: each round runs every case once, in a
// freshly shuffled order, so that slow phases of a shared machine hit all cases
// alike; before each timed sample the caches are evicted (CacheFlush). Rounds
// continue up to --rounds, or until the time budget is spent (never fewer than
// a minimum). Reported: the median time per op, GB/s of the op's minimal
// traffic (harness.hpp, minimal_bytes), and the ratio of the medians to the
// copy's, measured in the same rounds; and how much of the CPUs other processes
// took meanwhile, since on a 2-core machine that distorts everything.
//
//   normkit_bench [--quick] [--threads 1,2] [--filter SUBSTRING]... [--all]
//                 [--rounds N] [--budget SECONDS] [--json PATH]
//                 [--warm-cache] [--cold-malloc] [--phases]
#include <malloc.h>
#include <omp.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "harness.hpp"

namespace normkit_bench {
namespace {

// The shapes measured: a row per shape, each in the listed memory formats.
// Rows marked `extended` run only with --all. To measure a new shape, add a
// row; a new kind ("layer_norm", "group_norm") also needs cases in the backends
// that implement it.
struct ShapeRow {
  const char* kind;
  std::vector<int64_t> sizes;  // N, C, spatial... (PyTorch order)
  std::vector<Memory> memories;
  bool extended;
};

const std::vector<ShapeRow>& shape_table() {
  // The default rows are the shapes the speed bars are set for (see bars_of);
  // the extended ones are for exploring.
  static const std::vector<ShapeRow> rows = {
      {"bn2d", {32, 64, 56, 56}, {Memory::channels_first, Memory::channels_last}, false},
      {"bn2d", {16, 256, 28, 28}, {Memory::channels_first, Memory::channels_last}, false},
      {"bn2d", {32, 2048, 7, 7}, {Memory::channels_first, Memory::channels_last}, false},
      {"bn1d", {256, 1024}, {Memory::channels_first}, false},
      {"bn1d", {32, 4096}, {Memory::channels_first}, false},
      // LayerNorm over the last dimension: 8192 rows (tokens) of 768 (BERT-base).
      {"layer_norm", {8192, 768}, {Memory::channels_first}, false},
      // GroupNorm(32).
      {"group_norm", {16, 256, 28, 28}, {Memory::channels_first, Memory::channels_last}, false},
      // Fused BN+ReLU and BN+Add+ReLU against the unfused sequences (normkit's, PyTorch's).
      {"bn_relu", {32, 64, 56, 56}, {Memory::channels_first, Memory::channels_last}, false},
      {"bn_add_relu", {32, 64, 56, 56}, {Memory::channels_first, Memory::channels_last}, false},
      // BN1d + ReLU (an MLP's hidden layer): the rows kernels.
      {"bn_relu", {32, 4096}, {Memory::channels_first}, false},
      {"bn2d", {64, 512, 14, 14}, {Memory::channels_first, Memory::channels_last}, true},
      // BN+ReLU on short planes (a ResNet's last stage): blocks of channels.
      {"bn_relu", {32, 2048, 7, 7}, {Memory::channels_first}, true},
      // 103 MB per tensor, three times a 32 MB L3 (outputs past every cache).
      {"bn2d", {128, 64, 56, 56}, {Memory::channels_first, Memory::channels_last}, true},
      {"bn3d", {4, 64, 16, 28, 28}, {Memory::channels_first, Memory::channels_last}, true},
      {"bn1d", {64, 256}, {Memory::channels_first}, true},
      // 32x4096's bytes with 32 times fewer channels: what 32x4096 spends beyond
      // it is per-channel work (moments merged, invstd's double square root and
      // division, the running statistics), which the floor does not have.
      {"bn1d", {1024, 128}, {Memory::channels_first}, true},
  };
  return rows;
}

struct Settings {
  bool quick = false;
  bool all = false;
  std::vector<int> threads = {1, 2};
  std::vector<std::string> filters;  // a case runs when its id contains every one
  std::string json_path;
  int warmup = 2;  // timed calls before the rounds (after the cross-check call)
  int min_rounds = 9;
  int max_rounds = 51;
  double budget = 15.0;      // seconds of rounds per (thread count, problem)
  double min_sample = 1e-3;  // shorter ops are repeated inside one sample (measure)
  bool warm_heap = true;     // see keep_freed_memory
  bool phases = false;       // also time the phases (Op::moments ...) of BN
  bool flush = true;         // see CacheFlush
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: normkit_bench [options]\n"
               "  --quick            fewer rounds (a smoke run, ~10 s)\n"
               "  --threads LIST     thread counts, comma-separated (default 1,2)\n"
               "  --filter SUBSTR    only cases whose id contains SUBSTR (case-insensitive;\n"
               "                     repeat to require several). Ids look like\n"
               "                     bn2d/32x64x56x56/NHWC/torch/forward-train\n"
               "  --all              also the extended shapes of the table in bench/main.cpp\n"
               "  --rounds N         at most N rounds per problem (default 51, quick 7)\n"
               "  --budget SECONDS   stop adding rounds after this long per problem and\n"
               "                     thread count (default 15, quick 2)\n"
               "  --json PATH        where to write results (default: bench_results.json\n"
               "                     next to this executable)\n"
               "  --warm-cache       do not evict the caches before each timed sample\n"
               "  --phases           also time batch norm's phases one by one (normkit's\n"
               "                     split API: moments, forward-apply, backward-reduce,\n"
               "                     backward-apply) next to the floor's single passes\n"
               "  --cold-malloc      keep glibc's malloc defaults: PyTorch's outputs then\n"
               "                     often come from fresh mmap()ed pages (page faults)\n");
}

std::string lower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

std::filesystem::path default_json_path() {
  std::error_code error;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", error);
  return error ? std::filesystem::path("bench_results.json")
               : exe.parent_path() / "bench_results.json";
}

Settings parse(int argc, char** argv) {
  Settings s;
  bool rounds_given = false, budget_given = false;
  const auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) {
      std::fprintf(stderr, "normkit_bench: %s needs a value\n", argv[i]);
      std::exit(2);
    }
    return argv[++i];
  };
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--quick") {
        s.quick = true;
      } else if (arg == "--all") {
        s.all = true;
      } else if (arg == "--threads") {
        s.threads.clear();
        std::string list = value(i);
        for (size_t pos = 0; pos <= list.size();) {
          const size_t comma = std::min(list.find(',', pos), list.size());
          const int n = std::stoi(list.substr(pos, comma - pos));
          if (n < 1) throw std::invalid_argument("thread count < 1");
          s.threads.push_back(n);
          pos = comma + 1;
        }
      } else if (arg == "--filter") {
        s.filters.push_back(lower(value(i)));
      } else if (arg == "--json") {
        s.json_path = value(i);
      } else if (arg == "--rounds") {
        s.max_rounds = std::stoi(value(i));
        rounds_given = true;
        if (s.max_rounds < 1) throw std::invalid_argument("rounds < 1");
      } else if (arg == "--budget") {
        s.budget = std::stod(value(i));
        budget_given = true;
      } else if (arg == "--warm-cache") {
        s.flush = false;
      } else if (arg == "--phases") {
        s.phases = true;
      } else if (arg == "--cold-malloc") {
        s.warm_heap = false;
      } else if (arg == "--help" || arg == "-h") {
        usage(stdout);
        std::exit(0);
      } else {
        std::fprintf(stderr, "normkit_bench: unknown argument %s\n", arg.c_str());
        usage(stderr);
        std::exit(2);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "normkit_bench: bad value (%s)\n", e.what());
    std::exit(2);
  }
  if (s.quick) {
    s.warmup = 1;
    s.min_rounds = 3;
    if (!rounds_given) s.max_rounds = 7;
    if (!budget_given) s.budget = 2.0;
  }
  s.min_rounds = std::min(s.min_rounds, s.max_rounds);
  if (s.json_path.empty()) s.json_path = default_json_path().string();
  return s;
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double quantile(std::vector<double> v, double q) {  // linear interpolation between order statistics
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

// Reads a buffer twice the size of the largest cache before every timed
// sample, so each sample starts from the same state: nothing of its tensors
// cached, no dirty lines of the previous case left to write back. Without it,
// how much of x (25.7 MB, against a 32 MB L3) is still cached depends on which
// case ran just before, in a shuffled order: noise.
class CacheFlush {
 public:
  CacheFlush() : buffer_(flush_bytes() / sizeof(float)) {}
  void operator()() const {
    const float* p = buffer_.data();
    const int64_t n = buffer_.size();
    float sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (int64_t i = 0; i < n; i += 16) sum += p[i];  // one float per 64-byte line
    sink_ = sum;
  }
  int64_t bytes() const { return buffer_.size() * static_cast<int64_t>(sizeof(float)); }

 private:
  // Twice the largest cache sysfs reports (cpuid in these VMs reports a 384 MB
  // L3 where sysfs says 32 MB), at least 64 MB.
  static int64_t flush_bytes() {
    int64_t largest = 0;
    for (int index = 0; index < 8; ++index) {
      std::ifstream in("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) +
                       "/size");
      int64_t size = 0;
      std::string unit;
      if (!(in >> size)) continue;
      in >> unit;
      if (unit == "K")
        size <<= 10;
      else if (unit == "M")
        size <<= 20;
      largest = std::max(largest, size);
    }
    return std::max<int64_t>(2 * largest, int64_t{64} << 20);
  }
  Buffer buffer_;
  mutable volatile float sink_ = 0;
};

// Who else used the CPUs while a problem was measured. On a 2-core machine
// another busy process distorts every multi-threaded figure (an OpenMP thread
// waits for a descheduled peer), so each block reports it:
//   others = (CPU time all processes used - this process's) / (wall time · CPUs),
//   steal  = time the hypervisor gave the virtual CPUs to someone else, same units.
struct CpuSnapshot {
  double wall = 0, busy = 0, steal = 0, own = 0;  // seconds
  static CpuSnapshot take() {
    CpuSnapshot snapshot;
    snapshot.wall = now();
    std::ifstream in("/proc/stat");
    std::string cpu;
    double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
    in >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
    const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
    snapshot.busy = (user + nice + system + irq + softirq) / tick;
    snapshot.steal = steal / tick;
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    snapshot.own = static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
    return snapshot;
  }
};

struct CpuShare {
  double others = 0, steal = 0;  // fractions of all CPUs' time
  double capacity = 0;           // CPU seconds: wall time · CPUs
  // More than 5% of the machine, beyond what /proc/stat's 10 ms ticks can blur.
  bool busy() const { return (others + steal) * capacity > 0.05 * capacity + 0.05; }
};

CpuShare cpu_share(const CpuSnapshot& a, const CpuSnapshot& b) {
  const double capacity = (b.wall - a.wall) * std::max(1u, std::thread::hardware_concurrency());
  if (capacity <= 0) return {};
  return {std::max(0.0, (b.busy - a.busy) - (b.own - a.own)) / capacity,
          std::max(0.0, b.steal - a.steal) / capacity, capacity};
}

struct Measured {
  Case c;
  std::string id;
  int inner = 1;                // calls per sample
  std::vector<double> samples;  // seconds per call, one per round
  double diff = -1;             // max |out - out_ref| / max |out_ref|; -1: not checked
  std::string diff_against;     // the library holding out_ref
};

std::string case_id(const Problem& p, const Case& c) {
  return p.kind + "/" + p.shape_string() + "/" + p.layout_name() + "/" + c.library + "/" +
         op_name(c.op);
}

bool selected(const Settings& s, const std::string& id) {
  const std::string l = lower(id);
  return std::all_of(s.filters.begin(), s.filters.end(),
                     [&](const std::string& f) { return l.find(f) != std::string::npos; });
}

// Runs every case once and compares its output with the first output of the
// same op. A case that throws is reported and dropped.
void cross_check(std::vector<Measured>& cases, int64_t numel) {
  std::map<Op, std::pair<std::string, std::vector<float>>> reference;
  std::vector<std::string> failed;
  for (auto& m : cases) {
    try {
      m.c.run();
    } catch (const std::exception& e) {
      std::printf("  %s: failed, left out: %s\n", m.id.c_str(), e.what());
      failed.push_back(m.id);
      continue;
    }
    if (!m.c.result) continue;
    const float* out = m.c.result();
    auto it = reference.find(m.c.op);
    if (it == reference.end()) {
      reference.emplace(m.c.op, std::make_pair(m.c.library, std::vector<float>(out, out + numel)));
      continue;
    }
    const std::vector<float>& ref = it->second.second;
    double worst = 0, scale = 0;
    for (int64_t i = 0; i < numel; ++i) {
      const double d = std::fabs(static_cast<double>(out[i]) - ref[i]);
      worst = std::isnan(d) ? INFINITY : std::max(worst, d);
      scale = std::max(scale, std::fabs(static_cast<double>(ref[i])));
    }
    m.diff = worst / std::max(scale, 1e-30);
    m.diff_against = it->second.first;
  }
  std::erase_if(cases, [&](const Measured& m) {
    return std::find(failed.begin(), failed.end(), m.id) != failed.end();
  });
}

struct Block {
  Problem problem;
  int threads;
  int rounds;
  double seconds;
  CpuShare load;                // during the rounds
  std::vector<Measured> cases;  // cases[0] is the copy
};

// Set up, cross-check, warm up and time every selected case of one problem.
bool measure(const Settings& s, const std::vector<Backend>& backends, const CacheFlush* flush,
             const Problem& problem, int threads, Block& block) {
  Data data = make_data(problem);
  std::vector<Measured> cases;
  cases.push_back({copy_case(data, threads), "", 1, {}, -1, ""});
  cases.push_back({streaming_copy_case(data, threads), "", 1, {}, -1, ""});
  if (problem.kind != "bn_relu" && problem.kind != "bn_add_relu")
    for (auto& c : floor_cases(data, threads)) cases.push_back({std::move(c), "", 1, {}, -1, ""});
  // Phases: batch norm's alone (normkit offers them for bn1d, bn2d, bn3d).
  const bool phases = s.phases && (problem.kind == "bn1d" || problem.kind == "bn2d" ||
                                   problem.kind == "bn3d");
  if (phases)
    for (auto& c : floor_phase_cases(data, threads))
      cases.push_back({std::move(c), "", 1, {}, -1, ""});
  for (const auto& backend : backends) {
    try {
      for (auto& c : backend.cases(data)) cases.push_back({std::move(c), "", 1, {}, -1, ""});
    } catch (const std::exception& e) {
      std::printf("  %s: no cases for %s: %s\n", backend.library.c_str(), problem.label().c_str(),
                  e.what());
    }
  }
  for (auto& m : cases) m.id = case_id(problem, m.c);
  std::erase_if(cases, [&](const Measured& m) {
    return m.c.op != Op::copy && (!selected(s, m.id) || (is_phase(m.c.op) && !phases));
  });
  if (cases.size() <= 1) return false;
  std::stable_sort(cases.begin(), cases.end(),
                   [](const Measured& a, const Measured& b) { return a.c.op < b.c.op; });

  cross_check(cases, problem.numel());
  // Every case makes the same number of calls per sample, as many as the copy
  // (cases[0], every ratio's denominator) needs to last min_sample: only the
  // first call of a sample starts from evicted caches, so a case repeated
  // fewer times than the copy would carry more of that cold call in its median
  // than the copy it is divided by. (Not the fastest case's count: the
  // streaming copy's would make the 12.8 MB blocks half warm.)
  int inner = 1;
  for (auto& m : cases) {
    double last = 0;
    for (int w = 0; w < s.warmup; ++w) {
      if (flush) (*flush)();
      const double t0 = now();
      m.c.run();
      last = now() - t0;
    }
    if (&m == &cases.front() && last > 0 && last < s.min_sample)
      inner = static_cast<int>(std::min(1000.0, std::ceil(s.min_sample / last)));
  }
  for (auto& m : cases) m.inner = inner;

  std::vector<size_t> order(cases.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::mt19937 shuffle_rng(12345u + static_cast<unsigned>(threads));
  const CpuSnapshot before = CpuSnapshot::take();
  const double start = before.wall;
  int rounds = 0;
  while (rounds < s.max_rounds && (rounds < s.min_rounds || now() - start < s.budget)) {
    std::shuffle(order.begin(), order.end(), shuffle_rng);
    for (size_t index : order) {
      Measured& m = cases[index];
      if (flush) (*flush)();
      const double t0 = now();
      for (int k = 0; k < m.inner; ++k) m.c.run();
      m.samples.push_back((now() - t0) / m.inner);
    }
    ++rounds;
  }
  const CpuSnapshot after = CpuSnapshot::take();
  for (auto& m : cases) {  // they point into `data`, about to go
    m.c.run = nullptr;
    m.c.result = nullptr;
  }
  block = {problem,         threads, rounds, after.wall - start, cpu_share(before, after),
           std::move(cases)};
  return true;
}

struct Row {
  double median, p25, p75, min, gbps, ratio, ratio_paired;
};

Row summarize(const Block& block, const Measured& m) {
  const Measured& copy = block.cases.front();
  std::vector<double> paired(m.samples.size());
  for (size_t r = 0; r < m.samples.size(); ++r) paired[r] = m.samples[r] / copy.samples[r];
  const double median = quantile(m.samples, 0.5);
  return {median,
          quantile(m.samples, 0.25),
          quantile(m.samples, 0.75),
          *std::min_element(m.samples.begin(), m.samples.end()),
          minimal_bytes(m.c.op, block.problem) / median * 1e-9,
          median / quantile(copy.samples, 0.5),
          quantile(paired, 0.5)};
}

// The speed bars normkit's batch normalization is held to, on the default
// shapes, at every thread count (the figures they were set from are 2-thread):
//   forward-train     <= 1.3 x copy channels-first, <= 1.8 x copy channels-last
//   forward+backward  <= 3.5 x copy channels-first, <= 4.5 x copy channels-last
//   inference         <= 1.1 x copy
//   NC (rank 2): small, overhead-bound problems; forward-train <= 2 copies + 5 us
//   every op with a PyTorch or oneDNN counterpart: <= 0.9 x the faster of them
// LayerNorm and GroupNorm: forward-train <= 1.5 x copy; fused kernels: <= 1.0 x
// normkit's unfused sequence. The "floor" column (floor_cases) is no bar: it
// says how much of a bar a two-pass kernel has left.
struct Bar {
  std::string name;     // what is compared, e.g. "x copy"
  double value, limit;  // in the bar's unit
  bool met() const { return value <= limit; }
  std::string text() const {
    char buffer[96];
    std::snprintf(buffer, sizeof buffer, "%s %.2f<=%.2f %s", name.c_str(), value, limit,
                  met() ? "ok" : "MISS");
    return buffer;
  }
};

double median_of(const Measured& m) { return quantile(m.samples, 0.5); }

// The median of `library`'s case for `op` in this block, or 0 when it has none.
double median_of(const Block& b, const std::string& library, Op op) {
  for (const auto& m : b.cases)
    if (m.c.library == library && m.c.op == op) return median_of(m);
  return 0;
}

std::vector<Bar> bars_of(const Block& b, const Measured& m) {
  std::vector<Bar> bars;
  if (m.c.library != "normkit") return bars;
  const std::string& kind = b.problem.kind;
  const double copy = median_of(b.cases.front()), median = median_of(m);
  // The family's bars (issue 5): LayerNorm and GroupNorm forward within 1.5x a
  // copy; a fused path faster than normkit's own unfused sequence.
  if (kind == "layer_norm" || kind == "group_norm") {
    if (m.c.op == Op::forward_training) bars.push_back({"x copy", median / copy, 1.5});
    return bars;
  }
  if (kind == "bn_relu" || kind == "bn_add_relu") {
    const double unfused = median_of(b, "normkit-unfused", m.c.op);
    if (unfused > 0) bars.push_back({"x unfused", median / unfused, 1.0});
    return bars;
  }
  if (kind.rfind("bn", 0) != 0) return bars;
  if (b.problem.rank() == 2) {
    if (m.c.op == Op::forward_training)
      bars.push_back({"us vs 2 copy+5us", median * 1e6, 2 * copy * 1e6 + 5});
  } else {
    const bool last = b.problem.memory == Memory::channels_last;
    double limit = 0;
    if (m.c.op == Op::forward_training) limit = last ? 1.8 : 1.3;
    if (m.c.op == Op::forward_backward) limit = last ? 4.5 : 3.5;
    if (m.c.op == Op::inference) limit = 1.1;
    if (limit > 0) bars.push_back({"x copy", median / copy, limit});
  }
  double best_other = 0;
  for (const char* other : {"torch", "onednn"}) {
    const double t = median_of(b, other, m.c.op);
    if (t > 0 && (best_other == 0 || t < best_other)) best_other = t;
  }
  // Issue 14: no row where a peer wins, by a margin (normkit <= 0.9 x the faster).
  if (best_other > 0) bars.push_back({"x best other", median / best_other, 0.9});
  return bars;
}

std::string bars_text(const std::vector<Bar>& bars) {
  std::string text;
  for (const auto& bar : bars) text += (text.empty() ? "" : "; ") + bar.text();
  return text;
}

void print_block(const Block& b) {
  const double tensor_mb = static_cast<double>(b.problem.numel()) * sizeof(float) * 1e-6;
  std::printf(
      "\n%s, float32, %d thread%s: %.1f MB per tensor, %d rounds in %.1f s; "
      "other processes used %.0f%% of the CPUs, steal %.0f%%\n",
      b.problem.label().c_str(), b.threads, b.threads == 1 ? "" : "s", tensor_mb, b.rounds,
      b.seconds, 100 * b.load.others, 100 * b.load.steal);
  if (b.load.busy())
    std::printf(
        "  ** the machine was busy: these figures are distorted; run again when it is idle **\n");
  std::printf("  %-17s %-8s %10s %17s %7s %7s %8s  %s\n", "op", "library", "median ms",
              "p25-p75 ms", "GB/s", "x copy", "diff", "note");
  for (const auto& m : b.cases) {
    const Row r = summarize(b, m);
    char diff[32] = "";
    if (m.diff >= 0) std::snprintf(diff, sizeof diff, "%.0e", m.diff);
    const std::string bars = bars_text(bars_of(b, m));
    std::printf("  %-17s %-8s %10.3f %8.3f-%-8.3f %7.1f %7.2f %8s  %s%s%s%s\n", op_name(m.c.op),
                m.c.library.c_str(), r.median * 1e3, r.p25 * 1e3, r.p75 * 1e3, r.gbps, r.ratio,
                diff, m.c.note.c_str(), m.diff > 1e-3 ? "  ** OUTPUT DIFFERS **" : "",
                bars.empty() ? "" : "  bars: ", bars.c_str());
  }
  std::fflush(stdout);
}

nlohmann::json block_json(const Block& b) {
  nlohmann::json results = nlohmann::json::array();
  for (const auto& m : b.cases) {
    const Row r = summarize(b, m);
    nlohmann::json j = {
        {"id", m.id},
        {"kind", b.problem.kind},
        {"sizes", b.problem.sizes},
        {"layout", b.problem.layout_name()},
        {"threads", b.threads},
        {"library", m.c.library},
        {"op", op_name(m.c.op)},
        {"note", m.c.note},
        {"bytes", minimal_bytes(m.c.op, b.problem)},
        {"rounds", b.rounds},
        {"cpu_share_other_processes", b.load.others},
        {"cpu_share_steal", b.load.steal},
        {"calls_per_sample", m.inner},
        {"median_s", r.median},
        {"p25_s", r.p25},
        {"p75_s", r.p75},
        {"min_s", r.min},
        {"gbps", r.gbps},
        {"ratio_to_copy", r.ratio},                // median / copy's median
        {"ratio_to_copy_paired", r.ratio_paired},  // median over rounds of time / copy's time
        {"samples_s", m.samples},
    };
    const auto bars = bars_of(b, m);
    if (!bars.empty()) {
      j["bars"] = nlohmann::json::array();
      for (const auto& bar : bars)
        j["bars"].push_back(
            {{"name", bar.name}, {"value", bar.value}, {"limit", bar.limit}, {"met", bar.met()}});
    }
    if (m.diff >= 0) {
      j["max_rel_diff"] = m.diff;
      j["diff_against"] = m.diff_against;
    }
    results.push_back(std::move(j));
  }
  return results;
}

// One line per normkit case: its ratio to the copy next to the other
// libraries', and its bars. Returns the number of bars missed.
struct Summary {
  std::vector<std::string> lines;
  int bars = 0, missed = 0;
  std::map<int, std::pair<int, int>> by_threads;  // thread count -> (checked, missed)

  void add(const Block& b) {
    const double copy = median_of(b.cases.front());
    for (const auto& m : b.cases) {
      if (m.c.library != "normkit") continue;
      const auto ratio = [&](const char* library) {
        const double t = median_of(b, library, m.c.op);
        char text[16] = "-";
        if (t > 0) std::snprintf(text, sizeof text, "%.2f", t / copy);
        return std::string(text);
      };
      const auto row_bars = bars_of(b, m);
      for (const auto& bar : row_bars) {
        ++bars;
        missed += bar.met() ? 0 : 1;
        ++by_threads[b.threads].first;
        by_threads[b.threads].second += bar.met() ? 0 : 1;
      }
      char line[512];
      std::snprintf(line, sizeof line, "  %-26s %2d  %-17s %7.2f %7.2f %7s %7s %7s  %s",
                    b.problem.label().c_str(), b.threads, op_name(m.c.op), median_of(m) * 1e3,
                    median_of(m) / copy, ratio("torch").c_str(), ratio("onednn").c_str(),
                    ratio("floor").c_str(), bars_text(row_bars).c_str());
      lines.emplace_back(line);
    }
  }
  void print() const {
    if (lines.empty()) return;
    std::printf(
        "\nSummary: normkit, x copy next to PyTorch's, oneDNN's and the two-pass floor's\n"
        "(medians, same rounds; floor: see floor_cases in bench/harness.hpp)\n");
    std::printf("  %-26s %2s  %-17s %7s %7s %7s %7s %7s  %s\n", "problem", "T", "op", "ms",
                "normkit", "torch", "onednn", "floor", "bars (value<=limit)");
    for (const auto& line : lines) std::printf("%s\n", line.c_str());
    // The bars are set for 2 threads (bench/README.md): each thread count apart.
    std::string split;
    for (const auto& [threads, counts] : by_threads)
      split += (split.empty() ? "" : "; ") + std::to_string(threads) + " thread" +
               (threads == 1 ? "" : "s") + ": " + std::to_string(counts.first) + " checked, " +
               std::to_string(counts.second) + " missed";
    std::printf("bars: %d checked, %d missed (%s)\n", bars, missed, split.c_str());
  }
};

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

std::string utc_time() {
  const std::time_t t = std::time(nullptr);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return text;
}

// PyTorch allocates every output (25 MB for the main shape). With glibc's
// defaults such a block is often mmap()ed fresh or trimmed back to the system
// when freed, so the next call pays a page fault per 4 KB page: a cost of the
// benchmark loop, not of the kernel, and it swamps the kernel on some calls.
// Serving every block from the heap and never returning freed memory lets
// PyTorch reuse warm pages, as a long-running training process mostly does.
void keep_freed_memory() {
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, -1);
}

int run(int argc, char** argv) {
  const Settings s = parse(argc, argv);
  const double start = now();
  if (s.warm_heap) keep_freed_memory();
  std::vector<Backend> backends = {normkit_backend()};
#ifdef NORMKIT_BENCH_WITH_TORCH
  backends.push_back(torch_backend());
#endif
#ifdef NORMKIT_BENCH_WITH_ONEDNN
  backends.push_back(onednn_backend());
#endif

  const unsigned cpus = std::thread::hardware_concurrency();
  const CpuSnapshot idle_start = CpuSnapshot::take();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const CpuShare load_before = cpu_share(idle_start, CpuSnapshot::take());
  std::printf("normkit_bench: %s, %u CPUs; ", cpu_model().c_str(), cpus);
  for (const auto& b : backends) std::printf("%s %s  ", b.library.c_str(), b.version.c_str());
  std::printf(
      "\nmedian of shuffled rounds; GB/s of minimal traffic (forward, inference: x + y;"
      " backward: x + dy + dx;\nforward+backward: both); x copy = median / copy's median"
      " (same rounds, same thread count);\ndiff = max|out - out_ref| / max|out_ref|, "
      "out_ref = the op's first library.\n"
      "malloc: %s\n",
      s.warm_heap ? "freed memory kept and reused (--cold-malloc: glibc defaults)"
                  : "glibc defaults (page faults in PyTorch's allocations)");
  if (load_before.busy())
    std::printf(
        "warning: before starting, other processes used %.0f%% of the CPUs (steal %.0f%%):\n"
        "the figures, multi-threaded ones most, will show it\n",
        100 * load_before.others, 100 * load_before.steal);
  for (int t : s.threads)
    if (cpus && static_cast<unsigned>(t) > cpus)
      std::printf("warning: %d threads on %u CPUs: the figures measure oversubscription\n", t,
                  cpus);

  std::unique_ptr<CacheFlush> flush;
  if (s.flush) flush = std::make_unique<CacheFlush>();
  std::printf("caches: %s\n",
              flush ? ("evicted before every sample (" + std::to_string(flush->bytes() >> 20) +
                       " MB read; --warm-cache: not)")
                          .c_str()
                    : "not evicted between samples");

  nlohmann::json results = nlohmann::json::array();
  Summary summary;
  for (int threads : s.threads) {
    omp_set_num_threads(threads);
    for (const auto& b : backends) b.set_threads(threads);
    for (const auto& row : shape_table()) {
      if (row.extended && !s.all) continue;
      for (Memory memory : row.memories) {
        const Problem problem{row.kind, row.sizes, memory};
        Block block;
        if (!measure(s, backends, flush.get(), problem, threads, block)) continue;
        print_block(block);
        summary.add(block);
        for (auto& j : block_json(block)) results.push_back(std::move(j));
      }
    }
  }

  summary.print();
  nlohmann::json versions = nlohmann::json::object();
  for (const auto& b : backends) versions[b.library] = b.version;
  if (results.empty()) {
    std::fprintf(stderr, "normkit_bench: no case matches the filters; nothing written\n");
    return 1;
  }
  const nlohmann::json doc = {
      {"tool", "normkit_bench"},
      {"time_utc", utc_time()},
      {"cpu", cpu_model()},
      {"cpus", cpus},
      {"cpu_share_other_processes_before", load_before.others},
      {"compiler", __VERSION__},
      {"versions", versions},
      {"settings",
       {{"quick", s.quick},
        {"all", s.all},
        {"threads", s.threads},
        {"filters", s.filters},
        {"warmup_calls", s.warmup},
        {"min_rounds", s.min_rounds},
        {"max_rounds", s.max_rounds},
        {"budget_s_per_problem", s.budget},
        {"cache_flush_bytes", flush ? flush->bytes() : 0},
        {"malloc", s.warm_heap ? "M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1 (freed memory reused)"
                               : "glibc defaults"}}},
      {"results", results},
      {"bars", {{"checked", summary.bars}, {"missed", summary.missed}}},
  };
  const std::filesystem::path path(s.json_path);
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  std::ofstream out(path);
  out << doc.dump(1) << "\n";
  if (!out) {
    std::fprintf(stderr, "normkit_bench: could not write %s\n", path.c_str());
    return 1;
  }
  std::printf("\n%zu results written to %s; total %.0f s\n", results.size(), path.c_str(),
              now() - start);
  return 0;
}

}  // namespace
}  // namespace normkit_bench

int main(int argc, char** argv) {
  try {
    return normkit_bench::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "normkit_bench: %s\n", e.what());
    return 1;
  }
}
