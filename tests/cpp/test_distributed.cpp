// Data-parallel training across MPI ranks (ctest runs this under
// `mpirun -np N` for N = 1, 2, 3; without a launcher it runs as one process).
//
// The claims, each against one process training the same model on the same
// data with the whole batch (every rank computes that reference itself):
// - synchronized BN: N ranks × a shard of batch B give one process's losses,
//   evaluation and parameters to float rounding; one rank gives them bit for bit;
// - batch norm per rank (synchronized BN off) is ghost BN with the shard as
//   ghost batch;
// - every rank ends every epoch with the same parameters, and a rank that
//   differs is detected.
// Uneven shards (batch 16 over 3 ranks, a last batch of 11) and dropout (whose
// masks follow the global batch) are part of every run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>

#include "nn_test_support.hpp"
#include "normkit/engine/distributed.hpp"
#include "normkit/engine/train.hpp"

namespace {

using normkit::dist::Communicator;
using normkit::nn::Model;
using normkit::nn::ModelSpec;

Communicator* group = nullptr;
constexpr normkit::nn::MemoryFormat kFormats[] = {normkit::nn::MemoryFormat::channels_first,
                                                  normkit::nn::MemoryFormat::channels_last};

constexpr const char* kSpec =
    "input 2 4 4; conv 4 3 pad=1 bias=0; batchnorm; relu; maxpool 2; flatten;"
    "linear 16 bias=0; batchnorm; sigmoid; dropout 0.1; linear 4";
// The same with a 1x1 first conv, whose output the BN after it recomputes
// piece by piece (RecomputedOutput: 2 multiply-adds an output).
constexpr const char* kRecomputedSpec =
    "input 2 4 4; conv 4 1 bias=0; batchnorm; relu; maxpool 2; flatten;"
    "linear 16 bias=0; batchnorm; sigmoid; dropout 0.1; linear 4";

struct Trained {
  std::vector<double> losses, accuracies;
  normkit::train::Evaluation evaluation;
  std::vector<std::vector<float>> state;  // parameters and buffers, in Model::state() order
  std::vector<std::string> names;
};

// `epochs` epochs of SGD with momentum; with `ranks` data-parallel over `group`.
Trained train(const std::string& spec, normkit::nn::MemoryFormat format, Communicator* ranks,
              bool sync_bn, int64_t batch_size, const normkit::data::Dataset& data,
              const normkit::data::Dataset& test, int64_t epochs = 3) {
  Model model(ModelSpec::parse(spec), format);
  model.initialize({}, 7);
  if (ranks) model.synchronize_batch_norm(sync_bn ? ranks : nullptr);
  auto sgd = normkit::nn::make_sgd({0.05f, 0.9f, 1e-4f}, model.parameters());
  Trained t;
  for (int64_t epoch = 0; epoch < epochs; ++epoch) {
    const auto r = normkit::train::train_epoch(model, *sgd, data, batch_size, 11, epoch, {}, {}, ranks);
    t.losses.push_back(r.loss);
    t.accuracies.push_back(r.accuracy);
  }
  t.evaluation = normkit::train::evaluate(model, test, 32, ranks);
  for (const auto& [name, values] : model.state()) {
    t.names.push_back(name);
    t.state.push_back(*values);
  }
  return t;
}

// Largest |a - b| over a tensor, relative to its largest |b| (at least 1).
double relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 1;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return diff / scale;
}

// Losses, accuracies, evaluation and every parameter and buffer of `got` match
// `want` within `tolerance` (relative); bit for bit when tolerance is 0.
void expect_same_training(const Trained& got, const Trained& want, double tolerance,
                          bool compare_buffers = true) {
  ASSERT_EQ(got.names, want.names);
  for (size_t e = 0; e < want.losses.size(); ++e) {
    SCOPED_TRACE("epoch " + std::to_string(e + 1));
    EXPECT_NEAR(got.losses[e], want.losses[e], tolerance * want.losses[e]);
    EXPECT_EQ(got.accuracies[e], want.accuracies[e]);
  }
  EXPECT_NEAR(got.evaluation.loss, want.evaluation.loss, tolerance * want.evaluation.loss);
  EXPECT_EQ(got.evaluation.confusion, want.evaluation.confusion);
  double worst = 0;
  for (size_t i = 0; i < want.state.size(); ++i) {
    const bool buffer = want.names[i].find("running") != std::string::npos ||
                        want.names[i].find("num_batches") != std::string::npos;
    if (buffer && !compare_buffers) continue;
    const double d = relative_difference(got.state[i], want.state[i]);
    worst = std::max(worst, d);
    EXPECT_LE(d, tolerance) << want.names[i];
  }
  if (group->rank() == 0)
    std::printf("[ measured ] %d rank(s): worst relative parameter difference %.3g, final loss "
                "%.9g vs %.9g\n",
                group->size(), worst, got.losses.back(), want.losses.back());
}

const normkit::data::Dataset& train_set() {
  static const auto set = nn_test::blobs(203, 1);  // batch 16: 12 full batches and one of 11
  return set;
}
const normkit::data::Dataset& test_set() {
  static const auto set = nn_test::blobs(100, 2);
  return set;
}

// Float rounding only: measured differences are around 1e-6 after 39 steps;
// a wrong statistic, gradient or shard gives 1e-2 and more.
constexpr double kRoundingTolerance = 1e-4;

TEST(DataParallel, SynchronizedBatchNormEqualsOneProcessWithTheWholeBatch) {
  for (const char* spec : {kSpec, kRecomputedSpec})
  for (const auto format : kFormats) {
    SCOPED_TRACE(std::string(nn_test::name_of(format)) + ", " + spec);
    const Trained one = train(spec, format, nullptr, true, 16, train_set(), test_set());
    const Trained many = train(spec, format, group, true, 16, train_set(), test_set());
    // One rank takes the data-parallel path (moments, merge, from_moments; reduce,
    // sum, apply; gradient sum) and must land on the same bits.
    expect_same_training(many, one, group->size() == 1 ? 0.0 : kRoundingTolerance);
  }
}

// Without synchronization each rank normalizes its shard: ghost BN with a ghost
// batch of batch / ranks (equal shards here), as far as training goes. Running
// statistics differ by design (the ranks' are averaged every step; ghost BN
// updates once per ghost batch) and are not compared.
TEST(DataParallel, BatchNormPerRankIsGhostBatchNormOfTheShard) {
  const int ranks = group->size();
  const int64_t shard = 6, batch = shard * ranks;
  const auto data = nn_test::blobs(12 * batch, 3);
  std::string ghost = kSpec;
  for (size_t at; (at = ghost.find("batchnorm;")) != std::string::npos;)
    ghost.replace(at, 10, "ghostbatchnorm size=" + std::to_string(shard) + ";");
  const auto format = normkit::nn::MemoryFormat::channels_last;
  const Trained want = train(ghost, format, nullptr, false, batch, data, test_set());
  const Trained got = train(kSpec, format, group, false, batch, data, test_set());
  ASSERT_EQ(got.losses.size(), want.losses.size());
  for (size_t e = 0; e < want.losses.size(); ++e)
    EXPECT_NEAR(got.losses[e], want.losses[e], kRoundingTolerance * want.losses[e]);
  for (size_t i = 0; i < want.state.size(); ++i) {
    const bool parameter = want.names[i].find("weight") != std::string::npos ||
                           want.names[i].find("bias") != std::string::npos;
    if (parameter) {
      EXPECT_LE(relative_difference(got.state[i], want.state[i]), kRoundingTolerance)
          << want.names[i];
    }
  }
}

// Every rank holds the same bits after training (train_epoch checks it too);
// a rank whose parameters differ is named.
TEST(DataParallel, ReplicasAreIdenticalAndADivergedRankIsNamed) {
  const Trained t = train(kSpec, normkit::nn::MemoryFormat::channels_last, group, true, 16,
                          train_set(), test_set(), 1);
  std::vector<const std::vector<float>*> arrays;
  for (const auto& s : t.state) arrays.push_back(&s);
  const uint64_t mine = normkit::dist::fingerprint(arrays);
  EXPECT_NO_THROW(normkit::dist::check_same(*group, mine, "the parameters"));
  if (group->size() < 2) return;
  const uint64_t perturbed = group->rank() == group->size() - 1 ? mine ^ 1 : mine;
  const std::string expected = "rank " + std::to_string(group->size() - 1) +
                               " disagrees with rank 0 on the parameters";
  try {
    normkit::dist::check_same(*group, perturbed, "the parameters");
    ADD_FAILURE() << "a diverged rank went unnoticed";
  } catch (const normkit::Error& e) {
    EXPECT_EQ(std::string(e.what()), expected);
  }
}

TEST(DataParallel, CollectivesCombineInRankOrder) {
  const int ranks = group->size(), rank = group->rank();
  // Sums: rank r contributes r + 1 and 1e16·(r == 0): in rank order 1e16 absorbs
  // nothing the later ranks add (each < 2), so the result shows the order.
  std::vector<double> values = {static_cast<double>(rank + 1), rank == 0 ? 1e16 : 1.0};
  normkit::dist::all_reduce_sum(*group, values);
  EXPECT_EQ(values[0], ranks * (ranks + 1) / 2.0);
  double ordered = 1e16;
  for (int r = 1; r < ranks; ++r) ordered += 1.0;
  EXPECT_EQ(values[1], ordered);
  // Floats travel as floats and add in double: 2^24 + 1 + ... is exact there.
  const std::vector<float> floats = {16777216.0f, 1.0f};
  std::vector<double> sums(2);
  normkit::dist::all_reduce_sum(*group, floats, sums);
  EXPECT_EQ(sums[0], 16777216.0 * ranks);
  EXPECT_EQ(sums[1], 1.0 * ranks);
  // Moments: rank r holds the values {r, r + 1}; merged, all of them.
  std::vector<normkit::Moments> m = {{2, rank + 0.5, 0.5}};
  normkit::dist::merge_moments(*group, m);
  normkit::Moments want;
  for (int r = 0; r < ranks; ++r) want.merge({2, r + 0.5, 0.5});
  EXPECT_EQ(m[0].count, want.count);
  EXPECT_EQ(m[0].mean, want.mean);
  EXPECT_EQ(m[0].m2, want.m2);
  // Shards cover a batch in rank order, the first ones one larger.
  int64_t next = 0;
  for (int r = 0; r < 3; ++r) {
    const auto s = normkit::dist::shard_of(16, r, 3);
    EXPECT_EQ(s.first, next);
    EXPECT_EQ(s.count, r == 0 ? 6 : 5);
    next += s.count;
  }
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  std::unique_ptr<Communicator> world = normkit::dist::started_by_mpi_launcher()
                                            ? normkit::dist::mpi_world(60)
                                            : normkit::dist::single_process();
  group = world.get();
  int failed = RUN_ALL_TESTS();
  // The job fails if any rank failed; every rank learns it, so all exit alike.
  std::vector<double> failures = {static_cast<double>(failed != 0)};
  normkit::dist::all_reduce_sum(*group, failures);
  return failures[0] > 0 ? 1 : 0;
}
