// Data-parallel training step: time, the part spent in collectives, and the
// bytes each rank sends, for one process against N ranks with synchronized
// batch norm and with batch norm per rank. Run under mpirun (make
// bench-distributed runs it on 2 ranks):
//
//   mpirun -np 2 build/bench/normkit_distributed_bench [--model cnn-small]
//       [--batch 128] [--steps 20] [--rounds 6] [--json FILE]
//
// Every round runs the three arms one after the other on the same random data
// (timing only; the model is cnn-small or mlp-paper):
//   one process   rank 0 alone with every core (the other ranks wait, asleep);
//   sync BN       every rank, cores / ranks threads each, a shard of the global batch;
//   local BN      the same without synchronized statistics (ghost BN of the shard).
// Reported: medians over the rounds after the first (a warm-up) of the time per
// step; the time inside collectives (transfer and waiting for the slowest rank)
// split into batch-norm statistics (double gathers) and the gradient sum (float
// gathers); payload bytes sent per step per rank. Also the machine's collective
// costs: an all-gather of one double (latency) and of 4 MB of floats
// (bandwidth), and the one-thread compute time per step at per-rank batches
// 2..global (the inputs of a model of step time against rank count).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <omp.h>

#include "normkit/engine/distributed.hpp"
#include "normkit/engine/train.hpp"
#include "normkit/threading.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::ordered_json;
namespace dist = normkit::dist;
namespace nn = normkit::nn;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// A communicator that forwards to another and accounts for the time and bytes
// of its collectives, by kind: double gathers carry batch-norm statistics (and
// the per-epoch replica check), float gathers the gradient sum.
class Timed final : public dist::Communicator {
 public:
  explicit Timed(dist::Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void all_gather(std::span<const double> mine, std::span<double> all) override {
    const auto t = Clock::now();
    inner_.all_gather(mine, all);
    stats_seconds += seconds_since(t);
    stats_bytes += static_cast<double>(mine.size_bytes());
    ++stats_calls;
  }
  void all_gather(std::span<const float> mine, std::span<float> all) override {
    const auto t = Clock::now();
    inner_.all_gather(mine, all);
    gradient_seconds += seconds_since(t);
    gradient_bytes += static_cast<double>(mine.size_bytes());
    ++gradient_calls;
  }
  [[noreturn]] void abort(int code) noexcept override {
    inner_.abort(code);
    std::_Exit(code);  // not reached; GCC does not carry [[noreturn]] through the virtual call
  }
  void reset() {
    stats_seconds = gradient_seconds = stats_bytes = gradient_bytes = 0;
    stats_calls = gradient_calls = 0;
  }

  double stats_seconds = 0, gradient_seconds = 0, stats_bytes = 0, gradient_bytes = 0;
  int64_t stats_calls = 0, gradient_calls = 0;

 private:
  dist::Communicator& inner_;
};

void set_threads(int threads) {
  normkit::set_num_threads(threads);
  omp_set_num_threads(threads);
}

normkit::data::Dataset random_set(const std::vector<int64_t>& shape, int64_t count) {
  normkit::data::Dataset set;
  set.sample_shape = shape;
  set.num_classes = 10;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal;
  set.features.resize(static_cast<size_t>(count * set.sample_size()));
  for (float& v : set.features) v = normal(rng);
  for (int64_t i = 0; i < count; ++i) set.labels.push_back(static_cast<int32_t>(rng() % 10));
  return set;
}

struct Arm {
  std::string name;
  std::unique_ptr<nn::Model> model;
  std::unique_ptr<nn::Optimizer> optimizer;
  bool distributed, sync_bn;
  std::vector<double> step_seconds, stats_seconds, gradient_seconds;
  double stats_bytes = 0, gradient_bytes = 0;
  double stats_calls = 0, gradient_calls = 0;
};

std::unique_ptr<nn::Model> make_model(const std::string& preset) {
  auto model = std::make_unique<nn::Model>(nn::ModelSpec::preset(preset),
                                           nn::MemoryFormat::channels_last);
  model->initialize({}, 1);
  return model;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Waits for rank 0 (all ranks call it): the other ranks sleep in the poll.
void everyone_here(dist::Communicator& group) {
  const double one = 1;
  std::vector<double> all(static_cast<size_t>(group.size()));
  group.all_gather(std::span<const double>(&one, 1), all);
}

// Median seconds of `repeats` all-gathers of `count` values per rank.
template <class T>
double gather_seconds(dist::Communicator& group, int64_t count, int repeats) {
  std::vector<T> mine(static_cast<size_t>(count), T(1)), all(mine.size() * group.size());
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    everyone_here(group);
    const auto t = Clock::now();
    group.all_gather(std::span<const T>(mine), std::span<T>(all));
    times.push_back(seconds_since(t));
  }
  return median(times);
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "cnn-small", json_path;
  int64_t batch = 128, steps = 20;
  int rounds = 6;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return std::string(argv[++i]);
    };
    if (a == "--model") preset = value();
    else if (a == "--batch") batch = std::stoll(value());
    else if (a == "--steps") steps = std::stoll(value());
    else if (a == "--rounds") rounds = std::stoi(value());
    else if (a == "--json") json_path = value();
    else {
      std::fprintf(stderr, "usage: mpirun -np N %s [--model cnn-small|mlp-paper] [--batch B] "
                           "[--steps S] [--rounds R] [--json FILE]\n", argv[0]);
      return a == "--help" ? 0 : 2;
    }
  }
  auto world = dist::started_by_mpi_launcher() ? dist::mpi_world(600) : dist::single_process();
  dist::Communicator& group = *world;
  const int ranks = group.size(), rank = group.rank();
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads_per_rank = std::max(1, cores / ranks);
  Timed timed(group);

  const auto spec = nn::ModelSpec::preset(preset);
  const auto data = random_set(spec.input_shape, batch * steps);
  std::vector<Arm> arms;
  arms.push_back({"one process", make_model(preset), nullptr, false, false, {}, {}, {}});
  arms.push_back({"sync BN", make_model(preset), nullptr, true, true, {}, {}, {}});
  arms.push_back({"local BN", make_model(preset), nullptr, true, false, {}, {}, {}});
  for (auto& arm : arms) {
    arm.optimizer = nn::make_sgd({0.01f, 0.9f}, arm.model->parameters());
    if (arm.distributed) arm.model->synchronize_batch_norm(arm.sync_bn ? &timed : nullptr);
  }
  const int64_t parameters = arms[0].model->parameter_count();

  for (int round = 0; round < rounds; ++round) {
    for (auto& arm : arms) {
      everyone_here(group);
      if (!arm.distributed && rank != 0) continue;  // rank 0 alone; the others wait below
      set_threads(arm.distributed ? threads_per_rank : cores);
      timed.reset();
      const auto r = normkit::train::train_epoch(*arm.model, *arm.optimizer, data, batch, 1,
                                                 round, {}, {}, arm.distributed ? &timed : nullptr);
      if (round == 0) continue;  // warm-up
      arm.step_seconds.push_back(r.seconds / static_cast<double>(steps));
      arm.stats_seconds.push_back(timed.stats_seconds / static_cast<double>(steps));
      arm.gradient_seconds.push_back(timed.gradient_seconds / static_cast<double>(steps));
      arm.stats_bytes = timed.stats_bytes / static_cast<double>(steps);
      arm.gradient_bytes = timed.gradient_bytes / static_cast<double>(steps);
      arm.stats_calls = static_cast<double>(timed.stats_calls) / static_cast<double>(steps);
      arm.gradient_calls = static_cast<double>(timed.gradient_calls) / static_cast<double>(steps);
    }
  }
  everyone_here(group);

  // The machine's collective costs, and one-thread compute per step by per-rank batch.
  const double latency = gather_seconds<double>(group, 1, 200);
  const int64_t big = 1 << 20;  // 4 MB of floats per rank
  const double big_seconds = gather_seconds<float>(group, big, 20);
  json compute = json::array();
  if (rank == 0) {
    set_threads(1);
    for (int64_t b = 2; b <= batch; b *= 2) {
      auto model = make_model(preset);
      auto sgd = nn::make_sgd({0.01f, 0.9f}, model->parameters());
      const auto small = random_set(spec.input_shape, b * 8);
      normkit::train::train_epoch(*model, *sgd, small, b, 1, 0);  // warm-up
      std::vector<double> t;
      for (int e = 1; e <= 3; ++e)
        t.push_back(normkit::train::train_epoch(*model, *sgd, small, b, 1, e).seconds / 8.0);
      compute.push_back({{"batch", b}, {"seconds", median(t)}});
    }
  }
  everyone_here(group);
  if (rank != 0) return 0;  // rank 0 reports (the other ranks did not time "one process")

  json out = {{"model", preset},
              {"parameters", parameters},
              {"global_batch", batch},
              {"ranks", ranks},
              {"cores", cores},
              {"threads_per_rank", threads_per_rank},
              {"steps_per_round", steps},
              {"rounds_measured", rounds - 1},
              {"allgather_1_double_seconds", latency},
              {"allgather_4MB_floats_seconds", big_seconds},
              {"allgather_bytes_per_second",
               static_cast<double>(big * sizeof(float)) * (ranks - 1) / std::max(big_seconds, 1e-12)},
              {"compute_one_thread", compute},
              {"arms", json::array()}};
  std::printf("%s, global batch %lld, %d rank(s) x %d thread(s) vs one process x %d threads; "
              "medians of %d rounds of %lld steps\n\n",
              preset.c_str(), static_cast<long long>(batch), ranks, threads_per_rank, cores,
              rounds - 1, static_cast<long long>(steps));
  std::printf("%-12s %10s %12s %12s %10s %14s %14s\n", "arm", "step ms", "BN sync ms",
              "grad sum ms", "comm %", "BN bytes/step", "grad bytes/step");
  for (const auto& arm : arms) {
    const double step = median(arm.step_seconds), bn = median(arm.stats_seconds),
                 grad = median(arm.gradient_seconds);
    std::printf("%-12s %10.2f %12.3f %12.3f %9.1f%% %14.0f %14.0f\n", arm.name.c_str(), step * 1e3,
                bn * 1e3, grad * 1e3, 100.0 * (bn + grad) / step, arm.stats_bytes,
                arm.gradient_bytes);
    out["arms"].push_back({{"arm", arm.name},
                           {"step_seconds", step},
                           {"step_seconds_rounds", arm.step_seconds},
                           {"bn_sync_seconds", bn},
                           {"gradient_sum_seconds", grad},
                           {"communication_fraction", (bn + grad) / step},
                           {"bn_bytes_sent_per_step", arm.stats_bytes},
                           {"gradient_bytes_sent_per_step", arm.gradient_bytes},
                           {"bn_collectives_per_step", arm.stats_calls},
                           {"gradient_collectives_per_step", arm.gradient_calls}});
  }
  std::printf("\nall-gather of 1 double: %.1f us; of 4 MB of floats per rank: %.2f ms (%.2f GB/s "
              "received per rank)\n",
              latency * 1e6, big_seconds * 1e3,
              out["allgather_bytes_per_second"].get<double>() / 1e9);
  std::printf("one-thread compute per step:");
  for (const auto& c : compute)
    std::printf("  b=%lld %.2f ms", static_cast<long long>(c["batch"].get<int64_t>()),
                c["seconds"].get<double>() * 1e3);
  std::printf("\n");
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(2) << '\n';
  return 0;
}
