// Checkpoints: serialization, validation and the atomic save. The layout is
// documented in include/normkit/engine/checkpoint.hpp.
//
// Loading never trusts a length: every count is checked against the bytes that
// remain before anything is allocated for it, so a corrupted size field cannot
// ask for gigabytes. Everything is read into a Checkpoint value and checked
// against the model and optimizer its spec builds; the caller's objects are
// only touched afterwards (build_model, build_optimizer), so a bad file is
// never partly loaded.
#include "normkit/engine/checkpoint.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "support.hpp"

namespace normkit::io {

static_assert(std::endian::native == std::endian::little,
              "the checkpoint format is little-endian; this build writes arrays as raw bytes");

namespace {

constexpr char kMagic[8] = {'\x89', 'N', 'K', 'C', 'K', 'P', 'T', '\n'};
constexpr size_t kHeaderSize = sizeof kMagic + 4 + 8;  // magic, version, content size
constexpr size_t kChecksumSize = 4;

[[noreturn]] void fail_file(const std::string& source, const auto&... parts) {
  engine::fail_runtime("checkpoint '", source, "': ", parts...);
}

uint32_t checksum(const char* data, size_t size) {
  return static_cast<uint32_t>(
      crc32_z(crc32_z(0, Z_NULL, 0), reinterpret_cast<const Bytef*>(data), size));
}

// ---------------------------------------------------------------- writing

class Writer {
 public:
  std::vector<char> bytes;

  void raw(const void* data, size_t size) {
    const auto* p = static_cast<const char*>(data);
    bytes.insert(bytes.end(), p, p + size);
  }
  void u32(uint32_t v) { raw(&v, sizeof v); }
  void u64(uint64_t v) { raw(&v, sizeof v); }
  void i64(int64_t v) { raw(&v, sizeof v); }
  void f64(double v) { raw(&v, sizeof v); }
  void string(const std::string& s) {
    u64(s.size());
    raw(s.data(), s.size());
  }
  void floats(const std::vector<float>& v) {
    u64(v.size());
    raw(v.data(), v.size() * sizeof(float));
  }
};

// ---------------------------------------------------------------- reading

// Reads the content section; every read is bounded by what remains of it.
class Reader {
 public:
  Reader(const char* data, size_t size, const std::string& source)
      : p_(data), end_(data + size), source_(source) {}

  size_t remaining() const { return static_cast<size_t>(end_ - p_); }

  void raw(void* out, size_t size, const char* what) {
    if (size > remaining())
      fail_file(source_, "corrupted: ", what, " needs ", size, " bytes, only ", remaining(),
                " remain");
    std::memcpy(out, p_, size);
    p_ += size;
  }
  uint32_t u32(const char* what) {
    uint32_t v;
    raw(&v, sizeof v, what);
    return v;
  }
  uint64_t u64(const char* what) {
    uint64_t v;
    raw(&v, sizeof v, what);
    return v;
  }
  int64_t i64(const char* what) {
    int64_t v;
    raw(&v, sizeof v, what);
    return v;
  }
  double f64(const char* what) {
    double v;
    raw(&v, sizeof v, what);
    return v;
  }
  // A count of items of `item_size` bytes each, checked against the bytes left
  // (item_size 0: each item takes at least one byte, e.g. a non-empty record).
  uint64_t count(size_t item_size, const char* what) {
    const uint64_t n = u64(what);
    const uint64_t per = item_size == 0 ? 1 : item_size;
    if (n > remaining() / per)
      fail_file(source_, "corrupted: ", what, " claims ", n, " items of ", per,
                " bytes, only ", remaining(), " bytes remain");
    return n;
  }
  std::string string(const char* what) {
    const uint64_t n = count(1, what);
    std::string s(static_cast<size_t>(n), '\0');
    raw(s.data(), s.size(), what);
    return s;
  }
  std::vector<float> floats(const char* what) {
    const uint64_t n = count(sizeof(float), what);
    std::vector<float> v(static_cast<size_t>(n));
    raw(v.data(), v.size() * sizeof(float), what);
    return v;
  }

 private:
  const char* p_;
  const char* end_;
  const std::string& source_;
};

std::string shape_of(size_t n) { return std::to_string(n) + " values"; }

// Standardizer::save writes an 8-byte magic, a u64 feature count and three
// doubles per feature; the count is checked against the block's size here so
// that Standardizer::load never allocates for a count the bytes do not back.
data::Standardizer read_standardizer(const std::string& block, const std::string& source) {
  if (block.empty()) return {};
  uint64_t n = 0;
  if (block.size() >= 16) std::memcpy(&n, block.data() + 8, sizeof n);
  if (block.size() < 16 || n == 0 || n > (block.size() - 16) / 24 || block.size() != 16 + n * 24)
    fail_file(source, "corrupted: the standardizer block has ", block.size(),
              " bytes, which does not match its feature count");
  try {
    std::istringstream in(block);
    return data::Standardizer::load(in);
  } catch (const Error& e) {
    fail_file(source, e.what());
  }
}

// Everything that does not depend on the byte layout: the state against the
// model its spec builds, the optimizer against that model's parameters.
void validate(const Checkpoint& c, const std::string& source) {
  // The arrays against the sizes of the spec's model before that model is built:
  // a small file whose spec asks for billions of parameters allocates nothing.
  nn::ModelSize size;
  try {
    size = c.spec.size();
  } catch (const Error& e) {
    fail_file(source, "its model spec does not build a model: ", e.what());
  }
  uint64_t stored = 0;
  for (const auto& array : c.state) stored += array.second.size();
  const auto planned = static_cast<uint64_t>(size.parameters) + static_cast<uint64_t>(size.buffers);
  if (stored != planned)
    fail_file(source, "its state arrays hold ", stored, " values, the model of its spec has ",
              planned, " parameters and buffer values");
  std::unique_ptr<nn::Model> model;
  try {
    model = std::make_unique<nn::Model>(c.spec, c.format);
  } catch (const Error& e) {
    fail_file(source, "its model spec does not build a model: ", e.what());
  }
  const auto expected = model->state();
  if (expected.size() != c.state.size())
    fail_file(source, "holds ", c.state.size(), " state arrays, its model has ", expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    const auto& [name, values] = c.state[i];
    if (name != expected[i].first)
      fail_file(source, "state array ", i, " is '", name, "', the model expects '",
                expected[i].first, "'");
    if (values.size() != expected[i].second->size())
      fail_file(source, "state array '", name, "' has ", shape_of(values.size()),
                ", the model expects ", shape_of(expected[i].second->size()));
    for (const float v : values)
      if (!std::isfinite(v)) fail_file(source, "state array '", name, "' holds NaN or infinity");
  }
  if (c.optimizer.name.empty()) {
    if (!c.optimizer.arrays.empty() || !c.optimizer.options.empty())
      fail_file(source, "optimizer state without an optimizer name");
  } else {
    std::unique_ptr<nn::Optimizer> optimizer;
    try {
      optimizer = make_optimizer(c.optimizer.name, c.optimizer.options, model->parameters());
    } catch (const Error& e) {
      fail_file(source, "bad optimizer: ", e.what());
    }
    const auto arrays = optimizer->state();
    if (arrays.size() != c.optimizer.arrays.size())
      fail_file(source, "holds ", c.optimizer.arrays.size(), " ", c.optimizer.name,
                " state arrays, the model needs ", arrays.size());
    for (size_t i = 0; i < arrays.size(); ++i) {
      if (arrays[i]->size() != c.optimizer.arrays[i].size())
        fail_file(source, c.optimizer.name, " state array ", i, " has ",
                  shape_of(c.optimizer.arrays[i].size()), ", the model needs ",
                  shape_of(arrays[i]->size()));
      for (const float v : c.optimizer.arrays[i])
        if (!std::isfinite(v))
          fail_file(source, c.optimizer.name, " state array ", i, " holds NaN or infinity");
    }
    if (c.optimizer.steps < 0) fail_file(source, "negative optimizer step count");
  }
  if (c.progress.epochs_done < 0 || c.progress.batch_size < 0)
    fail_file(source, "negative epoch count or batch size");
  const train::EpochPosition& p = c.progress.position;
  if (p.step < 0 || p.samples < 0 || p.correct < 0 || p.correct > p.samples ||
      !std::isfinite(p.loss_sum) || p.loss_sum < 0 || !std::isfinite(p.seconds) || p.seconds < 0)
    fail_file(source, "corrupted: impossible position in the epoch (step ", p.step, ", ", p.samples,
              " samples, ", p.correct, " correct)");
}

std::string system_error(int error) { return std::strerror(error); }

// write(2) until everything is written.
bool write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------- public

Checkpoint make_checkpoint(nn::Model& model, nn::Optimizer* optimizer,
                           const data::Standardizer& standardizer, TrainingProgress progress) {
  Checkpoint c;
  c.spec = model.spec();
  c.format = model.format();
  c.standardizer = standardizer;
  for (const auto& [name, values] : model.state()) c.state.emplace_back(name, *values);
  if (optimizer) {
    c.optimizer.name = optimizer->name();
    c.optimizer.options = optimizer->options();
    c.optimizer.steps = optimizer->steps();
    for (const auto* a : optimizer->state()) c.optimizer.arrays.push_back(*a);
  }
  c.progress = std::move(progress);
  return c;
}

std::vector<char> to_bytes(const Checkpoint& c) {
  Writer content;
  content.string(c.spec.to_string());
  content.u32(c.format == nn::MemoryFormat::channels_last ? 1 : 0);
  std::ostringstream standardizer;
  if (c.standardizer.fitted()) c.standardizer.save(standardizer);
  content.string(standardizer.str());
  content.u64(c.state.size());
  for (const auto& [name, values] : c.state) {
    content.string(name);
    content.floats(values);
  }
  content.string(c.optimizer.name);
  content.u64(c.optimizer.options.size());
  for (const auto& [key, value] : c.optimizer.options) {
    content.string(key);
    content.f64(value);
  }
  content.i64(c.optimizer.steps);
  content.u64(c.optimizer.arrays.size());
  for (const auto& a : c.optimizer.arrays) content.floats(a);
  content.i64(c.progress.epochs_done);
  content.u64(c.progress.seed);
  content.i64(c.progress.batch_size);
  content.string(c.progress.application);
  const train::EpochPosition& position = c.progress.position;
  content.i64(position.step);
  content.f64(position.loss_sum);
  content.i64(position.correct);
  content.i64(position.samples);
  content.f64(position.seconds);

  Writer file;
  file.raw(kMagic, sizeof kMagic);
  file.u32(kCheckpointVersion);
  file.u64(content.bytes.size());
  file.raw(content.bytes.data(), content.bytes.size());
  file.u32(checksum(file.bytes.data(), file.bytes.size()));
  return std::move(file.bytes);
}

Checkpoint from_bytes(const std::vector<char>& bytes, const std::string& source) {
  const size_t size = bytes.size();
  if (size == 0) fail_file(source, "empty file (0 bytes)");
  const size_t magic_checked = std::min(size, sizeof kMagic);
  if (std::memcmp(bytes.data(), kMagic, magic_checked) != 0)
    fail_file(source, "not a normkit checkpoint (wrong magic number)");
  if (size < kHeaderSize + kChecksumSize)
    fail_file(source, "truncated: ", size, " bytes, shorter than a checkpoint's header");
  uint32_t version = 0;
  uint64_t content_size = 0;
  std::memcpy(&version, bytes.data() + sizeof kMagic, sizeof version);
  std::memcpy(&content_size, bytes.data() + sizeof kMagic + 4, sizeof content_size);
  if (version < 1 || version > kCheckpointVersion)
    fail_file(source, "unsupported checkpoint version ", version, " (this build reads versions 1 to ",
              kCheckpointVersion, ")");
  const size_t available = size - kHeaderSize - kChecksumSize;
  if (content_size > available)
    fail_file(source, "truncated: the header announces ", content_size, " bytes of content, the file holds ",
              available);
  if (content_size < available)
    fail_file(source, "corrupted: ", available - content_size,
              " unexpected bytes after the announced content");
  uint32_t stored = 0;
  std::memcpy(&stored, bytes.data() + kHeaderSize + content_size, sizeof stored);
  const uint32_t computed = checksum(bytes.data(), kHeaderSize + content_size);
  if (stored != computed) {
    std::ostringstream hex;
    hex << std::hex << "stored 0x" << stored << ", computed 0x" << computed;
    fail_file(source, "checksum mismatch (", hex.str(), "): the file is corrupted");
  }

  Reader in(bytes.data() + kHeaderSize, content_size, source);
  Checkpoint c;
  const std::string spec_text = in.string("model spec");
  try {
    c.spec = nn::ModelSpec::parse(spec_text);
  } catch (const Error& e) {
    fail_file(source, "its model spec does not parse: ", e.what());
  }
  const uint32_t format = in.u32("memory format");
  if (format > 1) fail_file(source, "unknown memory format ", format);
  c.format = format == 1 ? nn::MemoryFormat::channels_last : nn::MemoryFormat::channels_first;
  c.standardizer = read_standardizer(in.string("standardizer"), source);
  // A state record is at least a name length and a value count: 16 bytes.
  const uint64_t arrays = in.count(16, "state array count");
  for (uint64_t i = 0; i < arrays; ++i) {
    std::string name = in.string("state array name");
    c.state.emplace_back(std::move(name), in.floats("state array"));
  }
  c.optimizer.name = in.string("optimizer name");
  const uint64_t options = in.count(16, "optimizer option count");
  for (uint64_t i = 0; i < options; ++i) {
    std::string key = in.string("optimizer option name");
    const double value = in.f64("optimizer option value");
    if (!c.optimizer.options.emplace(std::move(key), value).second)
      fail_file(source, "corrupted: optimizer option given twice");
  }
  c.optimizer.steps = in.i64("optimizer steps");
  const uint64_t optimizer_arrays = in.count(8, "optimizer state count");
  for (uint64_t i = 0; i < optimizer_arrays; ++i) c.optimizer.arrays.push_back(in.floats("optimizer state"));
  c.progress.epochs_done = in.i64("epochs done");
  c.progress.seed = in.u64("seed");
  c.progress.batch_size = in.i64("batch size");
  c.progress.application = in.string("application data");
  if (version >= 2) {
    train::EpochPosition& position = c.progress.position;
    position.step = in.i64("epoch step");
    position.loss_sum = in.f64("epoch loss sum");
    position.correct = in.i64("epoch correct count");
    position.samples = in.i64("epoch sample count");
    position.seconds = in.f64("epoch seconds");
  }
  if (in.remaining() != 0)
    fail_file(source, "corrupted: ", in.remaining(), " bytes left over after the last field");
  validate(c, source);
  return c;
}

namespace {
std::filesystem::path directory_of(const std::filesystem::path& path) {
  return path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
}
// Hidden, next to the checkpoint (so the rename stays within one file system);
// mkstemp replaces the Xs.
std::string temporary_name(const std::filesystem::path& path) {
  std::string name = ".";  // (appended piece by piece: GCC 12 warns falsely about "." + string)
  name += path.filename().string();
  name += ".tmp-XXXXXX";
  return name;
}
}  // namespace

void remove_stale_temporaries(const std::filesystem::path& path) noexcept {
  try {
    const std::string pattern = temporary_name(path);
    const std::string prefix = pattern.substr(0, pattern.size() - 6);
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(directory_of(path), ec)) {
      const std::string file = entry.path().filename().string();
      if (file.size() == pattern.size() && file.starts_with(prefix) && entry.is_regular_file(ec))
        std::filesystem::remove(entry.path(), ec);
    }
  } catch (...) {  // best effort: a temporary that stays is harmless
  }
}

void save_checkpoint(const std::filesystem::path& path, const Checkpoint& checkpoint) {
  const std::vector<char> bytes = to_bytes(checkpoint);
  const std::string name = path.string();
  if (path.filename().empty()) fail_file(name, "not a file name");
  const std::filesystem::path directory = directory_of(path);
  remove_stale_temporaries(path);
  std::string temp = (directory / temporary_name(path)).string();
  const int fd = ::mkstemp(temp.data());
  if (fd < 0)
    fail_file(name, "cannot create a temporary file in '", directory.string(),
              "': ", system_error(errno), "; the previous checkpoint is unchanged");
  auto abandon = [&](const char* step) {
    const int error = errno;
    ::close(fd);
    ::unlink(temp.c_str());
    fail_file(name, step, " failed (", system_error(error), "); the previous checkpoint is unchanged");
  };
  if (!write_all(fd, bytes.data(), bytes.size())) abandon("writing the temporary file");
  if (::fchmod(fd, 0644) != 0) abandon("setting the temporary file's permissions");
  if (::fsync(fd) != 0) abandon("flushing the temporary file");
  if (::close(fd) != 0) {
    const int error = errno;
    ::unlink(temp.c_str());
    fail_file(name, "closing the temporary file failed (", system_error(error),
              "); the previous checkpoint is unchanged");
  }
  if (std::rename(temp.c_str(), name.c_str()) != 0) {
    const int error = errno;
    ::unlink(temp.c_str());
    fail_file(name, "renaming the temporary file over it failed (", system_error(error),
              "); the previous checkpoint is unchanged");
  }
  // Make the rename itself durable. Best effort: the new checkpoint is complete
  // and in place, so failing here would wrongly report that the save failed.
  if (const int dir = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY); dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

Checkpoint load_checkpoint(const std::filesystem::path& path) {
  const std::string name = path.string();
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) fail_file(name, "no such file");
  if (!std::filesystem::is_regular_file(status)) fail_file(name, "not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_file(name, "cannot open: ", system_error(errno));
  // The size is what the file system reports, not a field of the file; a
  // checkpoint has no business being larger than this.
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) fail_file(name, "cannot read its size: ", ec.message());
  if (size > (uint64_t{1} << 36)) fail_file(name, "too large to be a checkpoint (", size, " bytes)");
  std::vector<char> bytes(static_cast<size_t>(size));
  if (!in.read(bytes.data(), static_cast<std::streamsize>(bytes.size())))
    fail_file(name, "read failed after ", in.gcount(), " of ", size, " bytes");
  return from_bytes(bytes, name);
}

std::unique_ptr<nn::Model> build_model(const Checkpoint& checkpoint) {
  auto model = std::make_unique<nn::Model>(checkpoint.spec, checkpoint.format);
  const auto state = model->state();
  if (state.size() != checkpoint.state.size())
    engine::fail_invalid("build_model: the checkpoint's state does not match its model");
  for (size_t i = 0; i < state.size(); ++i) {
    if (state[i].first != checkpoint.state[i].first ||
        state[i].second->size() != checkpoint.state[i].second.size())
      engine::fail_invalid("build_model: state array '", checkpoint.state[i].first,
                           "' does not match the model");
  }
  for (size_t i = 0; i < state.size(); ++i) *state[i].second = checkpoint.state[i].second;
  return model;
}

std::unique_ptr<nn::Optimizer> build_optimizer(const Checkpoint& checkpoint, nn::Model& model) {
  if (checkpoint.optimizer.name.empty()) return nullptr;
  auto optimizer =
      make_optimizer(checkpoint.optimizer.name, checkpoint.optimizer.options, model.parameters());
  const auto arrays = optimizer->state();
  if (arrays.size() != checkpoint.optimizer.arrays.size())
    engine::fail_invalid("build_optimizer: the checkpoint's optimizer state does not match the model");
  for (size_t i = 0; i < arrays.size(); ++i)
    if (arrays[i]->size() != checkpoint.optimizer.arrays[i].size())
      engine::fail_invalid("build_optimizer: optimizer state array ", i, " does not match the model");
  for (size_t i = 0; i < arrays.size(); ++i) *arrays[i] = checkpoint.optimizer.arrays[i];
  optimizer->steps() = checkpoint.optimizer.steps;
  return optimizer;
}

std::unique_ptr<nn::Optimizer> make_optimizer(const std::string& name,
                                              const std::map<std::string, double>& options,
                                              const std::vector<nn::Parameter*>& parameters) {
  auto take = [&](const std::vector<std::pair<const char*, float*>>& known) {
    for (const auto& [key, value] : options) {
      const auto it = std::ranges::find(known, key, &std::pair<const char*, float*>::first);
      if (it == known.end()) engine::fail_invalid(name, ": unknown option '", key, "'");
      if (!std::isfinite(value))
        engine::fail_invalid(name, ": option '", key, "' is not finite");
      *it->second = static_cast<float>(value);
    }
  };
  if (name == "sgd") {
    nn::SgdOptions o;
    float nesterov = 0;
    take({{"lr", &o.lr}, {"momentum", &o.momentum}, {"weight_decay", &o.weight_decay},
          {"nesterov", &nesterov}});
    if (nesterov != 0 && nesterov != 1) engine::fail_invalid("sgd: nesterov must be 0 or 1");
    o.nesterov = nesterov != 0;
    return nn::make_sgd(o, parameters);
  }
  if (name == "adam") {
    nn::AdamOptions o;
    take({{"lr", &o.lr},
          {"beta1", &o.beta1},
          {"beta2", &o.beta2},
          {"eps", &o.eps},
          {"weight_decay", &o.weight_decay}});
    return nn::make_adam(o, parameters);
  }
  engine::fail_invalid("unknown optimizer '", name, "'; expected sgd or adam");
}

}  // namespace normkit::io
