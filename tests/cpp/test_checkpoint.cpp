// Checkpoints: exact round trips (the resumed model and optimizer step exactly
// as the originals), every truncation and corruption rejected with an error
// naming the file, lengths that lie never allocated, and the atomic save
// leaving the previous file intact when writing fails.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "normkit/engine/checkpoint.hpp"
#include "normkit/error.hpp"

namespace {

namespace fs = std::filesystem;
using normkit::Error;
using normkit::ErrorKind;
namespace io = normkit::io;
namespace nn = normkit::nn;

constexpr size_t kHeader = 20;  // magic 8, version 4, content size 8

// A fresh directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "normkit-ckpt-XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::vector<char> read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const fs::path& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Recomputes the trailing CRC32, so a test can hand the parser a file whose
// checksum is right but whose fields lie.
void reseal(std::vector<char>& bytes) {
  const size_t body = bytes.size() - 4;
  const auto crc = static_cast<uint32_t>(
      crc32_z(crc32_z(0, Z_NULL, 0), reinterpret_cast<const Bytef*>(bytes.data()), body));
  std::memcpy(bytes.data() + body, &crc, 4);
}

// Expects from_bytes to throw a runtime normkit::Error naming `source` and
// containing `words`.
void expect_rejected(const std::vector<char>& bytes, const std::string& words,
                     const std::string& source = "test.nkc") {
  try {
    io::from_bytes(bytes, source);
    ADD_FAILURE() << "accepted a bad checkpoint (expected '" << words << "')";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::runtime);
    const std::string message = e.what();
    EXPECT_NE(message.find("'" + source + "'"), std::string::npos) << message;
    EXPECT_NE(message.find(words), std::string::npos) << message;
  }
}

struct Trained {
  std::unique_ptr<nn::Model> model;
  std::unique_ptr<nn::Optimizer> optimizer;
  normkit::data::Standardizer standardizer;
  std::vector<float> x;
  std::vector<int32_t> labels;
};

// One training step on a fixed batch: loss, backward, optimizer step.
void step(nn::Model& model, nn::Optimizer& optimizer, const std::vector<float>& x,
          const std::vector<int32_t>& labels) {
  nn::Tensor batch, dlogits;
  const int64_t features = model.spec().input_shape[0];
  batch.reshape({static_cast<int64_t>(labels.size()), features}, nn::MemoryFormat::channels_first);
  std::copy(x.begin(), x.end(), batch.data.begin());
  const nn::Tensor& logits = model.forward(batch, nn::Mode::train);
  nn::softmax_cross_entropy(logits, labels.data(), &dlogits);
  model.zero_grad();
  model.backward(dlogits);
  optimizer.step(model.parameters());
}

// A small model with BN, trained a few steps so that parameters, running
// statistics and optimizer state all differ from their initial values.
Trained trained(const std::string& optimizer = "sgd", int64_t hidden = 8) {
  Trained t;
  const auto spec = nn::ModelSpec::parse("input 5; linear " + std::to_string(hidden) +
                                         " bias=0; batchnorm; relu; linear 3");
  t.model = std::make_unique<nn::Model>(spec);
  t.model->initialize({}, 7);
  t.optimizer = optimizer == "sgd" ? io::make_optimizer("sgd", {{"lr", 0.1}, {"momentum", 0.9}},
                                                        t.model->parameters())
                                   : io::make_optimizer("adam", {{"lr", 0.01}, {"beta2", 0.99}},
                                                        t.model->parameters());
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(2.0f, 3.0f);
  for (int i = 0; i < 16 * 5; ++i) t.x.push_back(normal(rng));
  for (int i = 0; i < 16; ++i) t.labels.push_back(i % 3);
  t.standardizer.fit(t.x, 5);
  for (int i = 0; i < 3; ++i) step(*t.model, *t.optimizer, t.x, t.labels);
  return t;
}

io::Checkpoint checkpoint_of(Trained& t) {
  io::TrainingProgress progress;
  progress.epochs_done = 3;
  progress.seed = 0xfeedfacecafebeefull;
  progress.batch_size = 16;
  progress.application = R"({"note": "anything the application keeps"})";
  return io::make_checkpoint(*t.model, t.optimizer.get(), t.standardizer, progress);
}

std::vector<std::vector<float>> parameters_of(nn::Model& model) {
  std::vector<std::vector<float>> out;
  for (const auto& [name, values] : model.state()) out.push_back(*values);
  return out;
}

// ---------------------------------------------------------------- round trip

TEST(Checkpoint, RoundTripIsExactAndResumesBitwise) {
  for (const std::string optimizer : {"sgd", "adam"}) {
    SCOPED_TRACE(optimizer);
    TempDir dir;
    Trained t = trained(optimizer);
    const io::Checkpoint saved = checkpoint_of(t);
    const fs::path path = dir.path() / "run.nkc";
    io::save_checkpoint(path, saved);
    const io::Checkpoint loaded = io::load_checkpoint(path);

    EXPECT_EQ(loaded.spec, saved.spec);
    EXPECT_EQ(loaded.format, saved.format);
    EXPECT_EQ(loaded.state, saved.state);
    EXPECT_EQ(loaded.optimizer.name, optimizer);
    EXPECT_EQ(loaded.optimizer.options, saved.optimizer.options);
    EXPECT_EQ(loaded.optimizer.steps, 3);
    EXPECT_EQ(loaded.optimizer.arrays, saved.optimizer.arrays);
    EXPECT_EQ(loaded.progress.epochs_done, 3);
    EXPECT_EQ(loaded.progress.seed, 0xfeedfacecafebeefull);
    EXPECT_EQ(loaded.progress.batch_size, 16);
    EXPECT_EQ(loaded.progress.application, saved.progress.application);
    ASSERT_TRUE(loaded.standardizer.fitted());
    EXPECT_EQ(loaded.standardizer.mean(), t.standardizer.mean());
    EXPECT_EQ(loaded.standardizer.scale(), t.standardizer.scale());
    EXPECT_EQ(io::to_bytes(loaded), read_file(path));  // the format is canonical

    // The running statistics are in the state (names as Model::state gives them).
    bool has_running_var = false;
    for (const auto& [name, values] : loaded.state) has_running_var |= name == "1.running_var";
    EXPECT_TRUE(has_running_var);

    // Two more steps from the checkpoint equal two more steps of the original.
    auto model = io::build_model(loaded);
    auto opt = io::build_optimizer(loaded, *model);
    ASSERT_TRUE(opt);
    EXPECT_EQ(opt->options(), t.optimizer->options());
    for (int i = 0; i < 2; ++i) {
      step(*t.model, *t.optimizer, t.x, t.labels);
      step(*model, *opt, t.x, t.labels);
    }
    EXPECT_EQ(parameters_of(*model), parameters_of(*t.model));
    EXPECT_EQ(opt->steps(), t.optimizer->steps());
  }
}

TEST(Checkpoint, WithoutOptimizerOrStandardizer) {
  Trained t = trained();
  io::Checkpoint c = io::make_checkpoint(*t.model, nullptr, {}, {});
  const io::Checkpoint loaded = io::from_bytes(io::to_bytes(c), "bare.nkc");
  EXPECT_TRUE(loaded.optimizer.name.empty());
  EXPECT_FALSE(loaded.standardizer.fitted());
  auto model = io::build_model(loaded);
  EXPECT_EQ(io::build_optimizer(loaded, *model), nullptr);
  EXPECT_EQ(parameters_of(*model), parameters_of(*t.model));
}

TEST(Checkpoint, ChannelsLastFormatIsKept) {
  const auto spec = nn::ModelSpec::preset("cnn-small");
  nn::Model model(spec, nn::MemoryFormat::channels_last);
  model.initialize({}, 1);
  const auto loaded = io::from_bytes(io::to_bytes(io::make_checkpoint(model, nullptr, {}, {})), "x");
  EXPECT_EQ(loaded.format, nn::MemoryFormat::channels_last);
  EXPECT_EQ(io::build_model(loaded)->format(), nn::MemoryFormat::channels_last);
}

// ---------------------------------------------------------------- bad files

TEST(Checkpoint, EveryTruncationIsRejected) {
  Trained t = trained();
  const std::vector<char> bytes = io::to_bytes(checkpoint_of(t));
  for (size_t length = 0; length < bytes.size(); ++length) {
    SCOPED_TRACE(length);
    const std::vector<char> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(length));
    expect_rejected(cut, length == 0 ? "empty" : "truncated");
  }
}

TEST(Checkpoint, TruncatedFileNamesTheFile) {
  TempDir dir;
  Trained t = trained();
  const fs::path path = dir.path() / "cut.nkc";
  io::save_checkpoint(path, checkpoint_of(t));
  const std::vector<char> bytes = read_file(path);
  for (const size_t length : {size_t{5}, kHeader, bytes.size() / 2, bytes.size() - 1}) {
    write_file(path, {bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(length)});
    try {
      io::load_checkpoint(path);
      ADD_FAILURE() << "accepted a file cut to " << length << " bytes";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
    }
  }
}

TEST(Checkpoint, FlippedBytesAreRejected) {
  Trained t = trained();
  const std::vector<char> bytes = io::to_bytes(checkpoint_of(t));
  // Every byte of the content and the checksum: the CRC catches each flip.
  for (size_t i = kHeader; i < bytes.size(); ++i) {
    SCOPED_TRACE(i);
    std::vector<char> bad = bytes;
    bad[i] = static_cast<char>(bad[i] ^ 0x10);
    expect_rejected(bad, "checksum mismatch");
  }
  std::vector<char> bad = bytes;
  bad[1] = 'X';
  expect_rejected(bad, "not a normkit checkpoint");
  bad = bytes;
  bad[kHeader - 1] = 1;  // the content size's top byte: a size far beyond the file
  expect_rejected(bad, "truncated");
  bad = bytes;
  bad.push_back(0);
  expect_rejected(bad, "unexpected bytes");
}

TEST(Checkpoint, WrongMagicAndVersion) {
  Trained t = trained();
  std::vector<char> bytes = io::to_bytes(checkpoint_of(t));
  const std::string text = "input 5; linear 3\nthis is a model spec, not a checkpoint\n";
  expect_rejected({text.begin(), text.end()}, "not a normkit checkpoint (wrong magic number)");

  std::vector<char> newer = bytes;
  const uint32_t version = io::kCheckpointVersion + 1;
  std::memcpy(newer.data() + 8, &version, 4);
  reseal(newer);
  expect_rejected(newer, "unsupported checkpoint version " + std::to_string(version));
}

// Version 2 appended the position in the epoch (five 8-byte fields); a version 1
// file, the same bytes without them, still loads at the epoch's start.
TEST(Checkpoint, MidEpochPositionRoundTripsAndVersion1StillLoads) {
  Trained t = trained();
  io::Checkpoint c = checkpoint_of(t);
  c.progress.position = {3, 2.75, 40, 48, 1.5};
  const std::vector<char> bytes = io::to_bytes(c);
  EXPECT_EQ(io::from_bytes(bytes, "v2.nkc").progress.position, c.progress.position);

  std::vector<char> v1(bytes.begin(), bytes.end() - 4 - 40);
  v1.resize(v1.size() + 4);
  const uint32_t version = 1;
  const uint64_t content = v1.size() - kHeader - 4;
  std::memcpy(v1.data() + 8, &version, 4);
  std::memcpy(v1.data() + 12, &content, 8);
  reseal(v1);
  const io::Checkpoint old = io::from_bytes(v1, "v1.nkc");
  EXPECT_EQ(old.progress.position, io::TrainingProgress{}.position);
  EXPECT_EQ(old.progress.epochs_done, c.progress.epochs_done);
  EXPECT_EQ(old.state, c.state);

  for (const auto& impossible : {normkit::train::EpochPosition{-1, 0, 0, 0, 0},
                                 normkit::train::EpochPosition{2, 1.0, 33, 32, 0},
                                 normkit::train::EpochPosition{2, NAN, 3, 32, 0},
                                 normkit::train::EpochPosition{2, 1.0, 3, 32, -1}}) {
    c.progress.position = impossible;
    expect_rejected(io::to_bytes(c), "impossible position in the epoch");
  }
}

TEST(Checkpoint, LyingLengthsWithAValidChecksumAllocateNothing) {
  Trained t = trained();
  const std::vector<char> bytes = io::to_bytes(checkpoint_of(t));
  // The first field is the spec string: its length is at the start of the content.
  std::vector<char> bad = bytes;
  const uint64_t huge = uint64_t{1} << 60;
  std::memcpy(bad.data() + kHeader, &huge, 8);
  reseal(bad);
  expect_rejected(bad, "model spec claims");

  // The standardizer's feature count (after its magic "NKSTD001").
  bad = bytes;
  const std::string magic = "NKSTD001";
  const auto at = std::search(bad.begin(), bad.end(), magic.begin(), magic.end());
  ASSERT_NE(at, bad.end());
  const uint64_t features = uint64_t{1} << 25;
  std::memcpy(&*(at + 8), &features, 8);
  reseal(bad);
  expect_rejected(bad, "standardizer");
}

TEST(Checkpoint, StateMustMatchTheModelOfItsSpec) {
  Trained t = trained();
  io::Checkpoint c = checkpoint_of(t);

  io::Checkpoint other_spec = c;  // a wider hidden layer: every size differs
  other_spec.spec = nn::ModelSpec::parse("input 5; linear 9 bias=0; batchnorm; relu; linear 3");
  expect_rejected(io::to_bytes(other_spec),
                  "its state arrays hold 100 values, the model of its spec has 112 parameters");

  io::Checkpoint moved = c;  // the same total, one value moved from one array to the next
  moved.state[1].second.push_back(moved.state[0].second.back());
  moved.state[0].second.pop_back();
  expect_rejected(io::to_bytes(moved), "state array '0.weight' has 39 values, the model expects 40");

  io::Checkpoint renamed = c;
  renamed.state[0].first = "0.kernel";
  expect_rejected(io::to_bytes(renamed), "is '0.kernel', the model expects '0.weight'");

  io::Checkpoint missing = c;
  missing.state.pop_back();
  expect_rejected(io::to_bytes(missing), "its state arrays hold 97 values");

  io::Checkpoint split = c;  // the same values in one array more
  split.state.push_back({"9.extra", {split.state.back().second.back()}});
  split.state[split.state.size() - 2].second.pop_back();
  expect_rejected(io::to_bytes(split), "holds 9 state arrays, its model has 8");

  io::Checkpoint nan = c;
  nan.state[0].second[2] = std::numeric_limits<float>::quiet_NaN();
  expect_rejected(io::to_bytes(nan), "NaN");

  io::Checkpoint short_velocity = c;
  short_velocity.optimizer.arrays[1].pop_back();
  expect_rejected(io::to_bytes(short_velocity), "sgd state array 1");

  io::Checkpoint bad_optimizer = c;
  bad_optimizer.optimizer.name = "rmsprop";
  expect_rejected(io::to_bytes(bad_optimizer), "unknown optimizer 'rmsprop'");

  io::Checkpoint bad_option = c;
  bad_option.optimizer.options["lr"] = -1;
  expect_rejected(io::to_bytes(bad_option), "bad optimizer");

  io::Checkpoint bad_spec = c;
  bad_spec.spec.layers.back().type = "softmax";  // to_string writes it, parse refuses it
  expect_rejected(io::to_bytes(bad_spec), "model spec does not parse");
}

// A small, checksum-valid file whose spec asks for 12 billion parameters (a
// 2.2 KB file of this kind once made `normkit info` take 3.1 GB before failing):
// refused from the spec's sizes, before a model is built.
TEST(Checkpoint, ArraysAreCheckedAgainstTheSpecsSizesBeforeTheModelIsBuilt) {
  Trained t = trained();
  io::Checkpoint c = checkpoint_of(t);
  c.spec = nn::ModelSpec::parse("input 5; linear 1000000000 bias=0; batchnorm; relu; linear 3");
  expect_rejected(io::to_bytes(c),
                  "its state arrays hold 100 values, the model of its spec has 12000000004 parameters");
  c.spec = nn::ModelSpec::parse("input 10000000 10000000 10000000; flatten; linear 3");
  expect_rejected(io::to_bytes(c), "the input's size overflows");
}

TEST(Checkpoint, MissingFileAndDirectory) {
  TempDir dir;
  for (const fs::path& path : {dir.path() / "absent.nkc", dir.path()}) {
    try {
      io::load_checkpoint(path);
      ADD_FAILURE() << "loaded " << path;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::runtime);
      EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
    }
  }
}

// ---------------------------------------------------------------- atomic save

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

TEST(Checkpoint, SaveReplacesTheOldFile) {
  TempDir dir;
  Trained small = trained("sgd", 4), large = trained("adam", 32);
  const fs::path path = dir.path() / "checkpoint.nkc";
  io::save_checkpoint(path, checkpoint_of(small));
  io::save_checkpoint(path, checkpoint_of(large));
  EXPECT_EQ(read_file(path), io::to_bytes(checkpoint_of(large)));
  EXPECT_EQ(names_in(dir.path()), std::vector<std::string>{"checkpoint.nkc"});
  EXPECT_EQ(fs::status(path).permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read |
                fs::perms::others_read);
}

// A write that fails half-way (the file size limit, which binds root too):
// the previous checkpoint is untouched and no temporary file remains.
TEST(Checkpoint, FailedWriteLeavesThePreviousCheckpoint) {
  TempDir dir;
  Trained small = trained("sgd", 4), large = trained("adam", 64);
  const fs::path path = dir.path() / "checkpoint.nkc";
  io::save_checkpoint(path, checkpoint_of(small));
  const std::vector<char> before = read_file(path);
  const io::Checkpoint next = checkpoint_of(large);
  ASSERT_GT(io::to_bytes(next).size(), before.size() + 1024);

  rlimit old_limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  rlimit limit = old_limit;
  limit.rlim_cur = before.size() + 512;  // room for the old size, not the new one
  const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limit), 0);
  std::string message;
  try {
    io::save_checkpoint(path, next);
  } catch (const Error& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  ::signal(SIGXFSZ, old_handler);

  ASSERT_FALSE(message.empty()) << "the save should have failed";
  EXPECT_NE(message.find(path.string()), std::string::npos) << message;
  EXPECT_NE(message.find("previous checkpoint is unchanged"), std::string::npos) << message;
  EXPECT_EQ(read_file(path), before);
  EXPECT_EQ(names_in(dir.path()), std::vector<std::string>{"checkpoint.nkc"});
  EXPECT_NO_THROW(io::load_checkpoint(path));
}

// The rename fails (the target is a non-empty directory) after the temporary
// file was written: it is removed and nothing else changes.
TEST(Checkpoint, FailedRenameRemovesTheTemporaryFile) {
  TempDir dir;
  Trained t = trained();
  const fs::path target = dir.path() / "taken";
  fs::create_directory(target);
  write_file(target / "keep", {'k'});
  EXPECT_THROW(io::save_checkpoint(target, checkpoint_of(t)), Error);
  EXPECT_EQ(names_in(dir.path()), std::vector<std::string>{"taken"});
  EXPECT_EQ(names_in(target), std::vector<std::string>{"keep"});
}

TEST(Checkpoint, UnwritableOrMissingDirectory) {
  TempDir dir;
  Trained t = trained();
  const fs::path path = dir.path() / "checkpoint.nkc";
  io::save_checkpoint(path, checkpoint_of(t));
  const std::vector<char> before = read_file(path);
  try {
    io::save_checkpoint(dir.path() / "no" / "such" / "dir.nkc", checkpoint_of(t));
    ADD_FAILURE() << "saved into a missing directory";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot create a temporary file"), std::string::npos) << e.what();
  }
  if (::geteuid() != 0) {  // root writes anywhere; the size-limit test covers root
    fs::permissions(dir.path(), fs::perms::owner_read | fs::perms::owner_exec);
    EXPECT_THROW(io::save_checkpoint(path, checkpoint_of(t)), Error);
    fs::permissions(dir.path(), fs::perms::owner_all);
  }
  EXPECT_EQ(read_file(path), before);
}

// A crash mid-save leaves at most a stray temporary file next to the intact
// checkpoint; loading is unaffected and the next save removes it (and only it).
TEST(Checkpoint, StrayTemporaryFileFromACrashIsRemovedByTheNextSave) {
  TempDir dir;
  Trained t = trained();
  const fs::path path = dir.path() / "checkpoint.nkc";
  io::save_checkpoint(path, checkpoint_of(t));
  const std::vector<char> bytes = read_file(path);
  write_file(dir.path() / ".checkpoint.nkc.tmp-abc123",
             {bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(bytes.size() / 3)});
  for (const char* other : {".other.nkc.tmp-abc123", ".checkpoint.nkc.tmp-abc", "checkpoint.nkc.tmp-abc123"})
    write_file(dir.path() / other, {'x'});
  EXPECT_NO_THROW(io::load_checkpoint(path));
  io::save_checkpoint(path, checkpoint_of(t));
  EXPECT_EQ(read_file(path), bytes);
  EXPECT_EQ(names_in(dir.path()),
            (std::vector<std::string>{".checkpoint.nkc.tmp-abc", ".other.nkc.tmp-abc123",
                                      "checkpoint.nkc", "checkpoint.nkc.tmp-abc123"}));
}

// ---------------------------------------------------------------- injected faults
//
// The test executable is linked with -Wl,--wrap for each system call of the
// save (tests/cpp/CMakeLists.txt), so a test can make exactly one of them fail
// as a full or broken disk would, or kill the process right before it.

struct Injection {
  std::string call;  // "" = none
  bool kill = false;
  int error = ENOSPC;
};
Injection injection;

// True when `call` must fail now (errno set); kills the process when asked to.
bool strike(const char* call) {
  if (injection.call != call) return false;
  if (injection.kill) ::raise(SIGKILL);
  errno = injection.error;
  return true;
}

}  // namespace

extern "C" {
int __real_mkstemp(char* name);
ssize_t __real_write(int fd, const void* data, size_t size);
int __real_fchmod(int fd, mode_t mode);
int __real_fsync(int fd);
int __real_close(int fd);
int __real_rename(const char* from, const char* to);

int __wrap_mkstemp(char* name) { return strike("mkstemp") ? -1 : __real_mkstemp(name); }
// A full disk takes part of the data first: half of the first write goes
// through, the rest fails.
ssize_t __wrap_write(int fd, const void* data, size_t size) {
  if (injection.call == "write" && !injection.kill && size > 1) {
    injection.call = "write, again";
    return __real_write(fd, data, size / 2);
  }
  if (strike("write") || strike("write, again")) return -1;
  return __real_write(fd, data, size);
}
int __wrap_fchmod(int fd, mode_t mode) { return strike("fchmod") ? -1 : __real_fchmod(fd, mode); }
int __wrap_fsync(int fd) { return strike("fsync") ? -1 : __real_fsync(fd); }
int __wrap_close(int fd) {
  if (injection.call == "close") {  // Linux closes the descriptor even when close reports an error
    __real_close(fd);
    strike("close");
    return -1;
  }
  return __real_close(fd);
}
int __wrap_rename(const char* from, const char* to) {
  return strike("rename") ? -1 : __real_rename(from, to);
}
}

namespace {

const std::vector<std::string> kSaveCalls = {"mkstemp", "write", "fchmod", "fsync", "close", "rename"};

// A saved checkpoint (`before`, its bytes) and the larger one the test tries to save over it.
struct SaveOverAnother {
  TempDir dir;
  fs::path path = dir.path() / "checkpoint.nkc";
  Trained small = trained("sgd", 4), large = trained("adam", 16);
  io::Checkpoint next = checkpoint_of(large);
  std::vector<char> before;
  SaveOverAnother() {
    io::save_checkpoint(path, checkpoint_of(small));
    before = read_file(path);
  }
};

// Each call of the save failing (ENOSPC, or EIO where a disk reports that):
// an error naming the file and the step, the previous checkpoint byte for byte
// as it was and loadable, no temporary file left.
TEST(Checkpoint, AFailureAtEveryStepOfTheSaveLeavesThePreviousCheckpoint) {
  SaveOverAnother s;
  const fs::path& path = s.path;
  const std::vector<char>& before = s.before;
  const io::Checkpoint& next = s.next;
  for (const auto& call : kSaveCalls) {
    for (const int error : {ENOSPC, EIO}) {
      SCOPED_TRACE(call + " fails with " + std::strerror(error));
      injection = {call, false, error};
      std::string message;
      try {
        io::save_checkpoint(path, next);
      } catch (const Error& e) {
        message = e.what();
      }
      injection = {};
      ASSERT_FALSE(message.empty()) << "the save did not fail";
      EXPECT_NE(message.find(path.string()), std::string::npos) << message;
      EXPECT_NE(message.find(std::strerror(error)), std::string::npos) << message;
      EXPECT_NE(message.find("previous checkpoint is unchanged"), std::string::npos) << message;
      EXPECT_EQ(read_file(path), before);
      EXPECT_EQ(names_in(s.dir.path()), std::vector<std::string>{"checkpoint.nkc"});
      EXPECT_NO_THROW(io::load_checkpoint(path));
    }
  }
  io::save_checkpoint(path, next);  // and with the disk working again, the save goes through
  EXPECT_EQ(read_file(path), io::to_bytes(next));
}

// The process killed right before each call of the save (SIGKILL, in a child):
// the previous checkpoint is intact; a temporary file may remain (a kill after
// the write, before the rename, leaves the complete new file under its
// temporary name), and the next save removes it.
TEST(Checkpoint, AKillAtEveryStepOfTheSaveLeavesALoadableCheckpoint) {
  SaveOverAnother s;
  const fs::path& path = s.path;
  const std::vector<char>& before = s.before;
  const io::Checkpoint& next = s.next;
  for (const auto& call : kSaveCalls) {
    SCOPED_TRACE("killed before " + call);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      injection = {call, true};
      io::save_checkpoint(path, next);
      ::_exit(0);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "the child was not killed";
    EXPECT_EQ(read_file(path), before);
    EXPECT_NO_THROW(io::load_checkpoint(path));
    const auto names = names_in(s.dir.path());
    if (call == "mkstemp") {
      EXPECT_EQ(names, std::vector<std::string>{"checkpoint.nkc"});
    } else {
      ASSERT_EQ(names.size(), 2u);
      EXPECT_TRUE(names[0].starts_with(".checkpoint.nkc.tmp-")) << names[0];
      if (call == "rename") {
        EXPECT_EQ(read_file(s.dir.path() / names[0]), io::to_bytes(next));
      }
    }
  }
  io::save_checkpoint(path, checkpoint_of(s.small));
  EXPECT_EQ(names_in(s.dir.path()), std::vector<std::string>{"checkpoint.nkc"});
  EXPECT_EQ(read_file(path), before);
}

TEST(Checkpoint, MakeOptimizerChecksNamesAndOptions) {
  Trained t = trained();
  EXPECT_THROW(io::make_optimizer("sgd", {{"beta1", 0.9}}, t.model->parameters()), Error);
  EXPECT_THROW(io::make_optimizer("sgd", {{"nesterov", 0.5}, {"momentum", 0.9}}, t.model->parameters()),
               Error);
  EXPECT_THROW(io::make_optimizer("lbfgs", {}, t.model->parameters()), Error);
  auto sgd = io::make_optimizer("sgd", {{"lr", 0.5}, {"nesterov", 1}, {"momentum", 0.5}},
                                t.model->parameters());
  EXPECT_EQ(sgd->options().at("nesterov"), 1.0);
  EXPECT_EQ(sgd->learning_rate, 0.5f);
}

}  // namespace
