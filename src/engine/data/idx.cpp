// IDX files (LeCun's MNIST format), gzipped or plain: zlib's gzread reads both.
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <fstream>
#include <memory>
#include <string>

#include "normkit/engine/data.hpp"
#include "support.hpp"

namespace normkit::data {

using engine::fail_runtime;

namespace {

// Beyond any real IDX data set; a header claiming more is corrupt.
constexpr uint64_t kMaxValues = uint64_t{1} << 32;

struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

class IdxReader {
 public:
  explicit IdxReader(const std::filesystem::path& path) : path_(path.string()) {
    if (!std::filesystem::exists(path)) fail_runtime(path_, ": no such file");
    file_.reset(gzopen(path_.c_str(), "rb"));
    if (!file_) fail_runtime(path_, ": cannot open");
    // zlib reads 8 KB at a time by default: Fashion-MNIST's training images took
    // 3,780 reads, and loading them 0.35-0.54 s; with 256 KB, 129 and 0.20-0.25 s.
    gzbuffer(file_.get(), 1u << 18);
  }

  // Reads up to `size` bytes; returns how many arrived.
  size_t read(void* out, size_t size) {
    size_t done = 0;
    while (done < size) {
      const unsigned chunk = static_cast<unsigned>(std::min<size_t>(size - done, 1u << 30));
      const int got = gzread(file_.get(), static_cast<char*>(out) + done, chunk);
      if (got < 0) {
        int code = 0;
        const char* message = gzerror(file_.get(), &code);
        fail_runtime(path_, ": corrupt compressed data (", message ? message : "zlib error", ")");
      }
      if (got == 0) break;
      done += static_cast<size_t>(got);
    }
    return done;
  }

  // The header: magic (0, 0, type, rank) then rank big-endian uint32 sizes.
  std::vector<uint64_t> header(int expected_rank, const char* what) {
    std::array<unsigned char, 4> magic{};
    if (read(magic.data(), 4) != 4) fail_runtime(path_, ": truncated before the IDX header ends");
    if (magic[0] != 0 || magic[1] != 0)
      fail_runtime(path_, ": not an IDX file (bad magic number)");
    if (magic[2] != 0x08)
      fail_runtime(path_, ": unsupported IDX element type 0x", std::hex, int{magic[2]},
                   " (only unsigned bytes, 0x08)");
    if (magic[3] != expected_rank)
      fail_runtime(path_, ": expected an IDX ", what, " file with ", expected_rank,
                   " dimensions, got ", int{magic[3]});
    std::vector<uint64_t> dims(expected_rank);
    uint64_t total = 1;
    for (auto& dim : dims) {
      std::array<unsigned char, 4> b{};
      if (read(b.data(), 4) != 4) fail_runtime(path_, ": truncated before the IDX header ends");
      dim = (uint64_t{b[0]} << 24) | (uint64_t{b[1]} << 16) | (uint64_t{b[2]} << 8) | b[3];
      if (dim == 0) fail_runtime(path_, ": a dimension is 0");
      total *= dim;
      if (total > kMaxValues)
        fail_runtime(path_, ": dimensions claim more than 2^32 values; the header is corrupt");
    }
    return dims;
  }

  // Exactly `count` bytes and then the end of the file, handed to
  // consume(const unsigned char*, size_t) in pieces of at most 4 MB as they
  // arrive: no copy of the whole body is kept, and what the caller builds
  // grows with the data that actually arrives, not with what the header claims.
  template <class Consume>
  void body(uint64_t count, Consume&& consume) {
    constexpr size_t kStep = size_t{1} << 22;
    std::vector<unsigned char> piece(static_cast<size_t>(std::min<uint64_t>(kStep, count)));
    uint64_t done = 0;
    while (done < count) {
      const size_t want = static_cast<size_t>(std::min<uint64_t>(kStep, count - done));
      const size_t got = read(piece.data(), want);
      if (got < want)
        fail_runtime(path_, ": truncated: the header promises ", count, " data bytes, the file has ",
                     done + got);
      consume(piece.data(), want);
      done += want;
    }
    unsigned char extra = 0;
    if (read(&extra, 1) != 0)
      fail_runtime(path_, ": the file is longer than its header says (", count,
                   " data bytes); dimensions do not match the file size");
  }

  // How many of `count` data bytes to make room for before reading them, so
  // that the data are written once into their final place: no more than the
  // file holds, its size when plain, or when gzipped the size its trailer
  // records (modulo 2^32, as gzip keeps it: a bigger or multi-member file gets
  // too little room and grows as it is read). A header that lies costs no
  // memory it claims; a corrupt trailer at most a hint the system may refuse
  // (engine::reserve_hint).
  uint64_t room(uint64_t count) const {
    std::error_code ec;
    const uint64_t size = std::filesystem::file_size(path_, ec);
    if (ec) return 0;
    if (gzdirect(file_.get())) return std::min(count, size);
    std::ifstream in(path_, std::ios::binary);
    std::array<unsigned char, 4> isize{};
    if (size < 18 || !in.seekg(-4, std::ios::end) ||
        !in.read(reinterpret_cast<char*>(isize.data()), 4))
      return 0;
    const uint64_t inflated = uint64_t{isize[0]} | uint64_t{isize[1]} << 8 |
                              uint64_t{isize[2]} << 16 | uint64_t{isize[3]} << 24;
    // A cut-short file's last bytes are no trailer: deflate's largest
    // expansion (1032:1) bounds what they can claim.
    return std::min({count, inflated, size * 1032});
  }

 private:
  std::string path_;
  GzFile file_;
};

// classes.txt (one name per line), or Fashion-MNIST's names for a directory
// named like it, or none.
std::vector<std::string> directory_class_names(const std::filesystem::path& directory,
                                               int32_t num_classes) {
  const auto file = directory / "classes.txt";
  if (std::filesystem::exists(file)) {
    std::ifstream in(file);
    std::vector<std::string> names;
    for (std::string line; std::getline(in, line);) {
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      if (!line.empty()) names.push_back(line);
    }
    if (in.bad() || static_cast<int32_t>(names.size()) != num_classes)
      fail_runtime(file.string(), ": expected ", num_classes, " class names, one per line, got ",
                   names.size());
    return names;
  }
  auto path = std::filesystem::absolute(directory).lexically_normal();
  if (path.filename().empty()) path = path.parent_path();  // "dir/"
  std::string name = path.filename().string();
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  if (name.find("fashion") != std::string::npos && num_classes == 10) return fashion_mnist_classes();
  return {};
}

}  // namespace

int64_t Dataset::sample_size() const noexcept {
  int64_t size = 1;
  for (const auto dim : sample_shape) size *= dim;
  return size;
}

Dataset load_idx(const std::filesystem::path& images, const std::filesystem::path& labels,
                 int32_t num_classes, const RowChoice& rows) {
  if (num_classes < 1 || num_classes > 256)
    engine::fail_invalid("num_classes must be in [1, 256] for IDX labels, got ", num_classes);
  IdxReader image_file(images);
  const auto image_dims = image_file.header(3, "image");
  IdxReader label_file(labels);
  const auto label_dims = label_file.header(1, "label");
  if (label_dims[0] != image_dims[0])
    fail_runtime(labels.string(), ": ", label_dims[0], " labels for ", image_dims[0], " images in ",
                 images.string());

  Dataset set;
  set.num_classes = num_classes;
  engine::reserve_hint(set.labels, label_file.room(label_dims[0]));
  label_file.body(label_dims[0], [&](const unsigned char* bytes, size_t n) {
    set.labels.insert(set.labels.end(), bytes, bytes + n);
  });
  // After the whole file is read: a file of the wrong length says so first.
  for (size_t i = 0; i < set.labels.size(); ++i)
    if (set.labels[i] >= num_classes)
      fail_runtime(labels.string(), ": label ", set.labels[i], " at index ", i,
                   " is out of range [0, ", num_classes, ")");
  const uint64_t pixels_per_image = image_dims[1] * image_dims[2];
  const uint64_t values = image_dims[0] * pixels_per_image;
  set.sample_shape = {1, static_cast<int64_t>(image_dims[1]), static_cast<int64_t>(image_dims[2])};
  std::vector<int64_t> kept;
  if (rows) {
    kept = rows(set);
    for (size_t i = 0; i < kept.size(); ++i)
      if (kept[i] < 0 || kept[i] >= set.count() || (i > 0 && kept[i] <= kept[i - 1]))
        engine::fail_invalid("load_idx: the rows to keep must be strictly increasing indices in [0, ",
                             set.count(), "), got ", kept[i], " at position ", i);
    for (size_t i = 0; i < kept.size(); ++i) set.labels[i] = set.labels[static_cast<size_t>(kept[i])];
    set.labels.resize(kept.size());
    set.labels.shrink_to_fit();
  }
  const uint64_t wanted = rows ? kept.size() * pixels_per_image : values;
  engine::reserve_hint(set.features, image_file.room(wanted));
  // The file's pixels arrive in pieces; `at` is the index of the next one, and
  // the next kept row's pixels are copied as their part of a piece goes by.
  uint64_t at = 0;
  size_t next = 0;
  image_file.body(values, [&](const unsigned char* pixels, size_t n) {
    const uint64_t end = at + n;
    while (at < end) {
      uint64_t stop = end;
      if (rows) {
        if (next == kept.size()) break;
        const uint64_t first = static_cast<uint64_t>(kept[next]) * pixels_per_image;
        if (first >= end) break;
        at = std::max(at, first);
        stop = std::min(end, first + pixels_per_image);
        if (stop == first + pixels_per_image) ++next;
      }
      const size_t old = set.features.size(), count = static_cast<size_t>(stop - at);
      set.features.resize(old + count);
      float* const out = set.features.data() + old;
      const unsigned char* const in = pixels + (at - (end - n));
      for (size_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i]) / 255.0f;
      at = stop;
    }
    at = end;
  });
  return set;
}

Dataset load_mnist_directory(const std::filesystem::path& directory, Split split,
                             const RowChoice& rows) {
  if (!std::filesystem::is_directory(directory))
    fail_runtime(directory.string(), ": not a directory (expected the MNIST/Fashion-MNIST files)");
  const std::string prefix = split == Split::train ? "train" : "t10k";
  auto find = [&](const std::string& stem) {
    for (const char* suffix : {".gz", ""}) {
      const auto path = directory / (prefix + stem + suffix);
      if (std::filesystem::exists(path)) return path;
    }
    fail_runtime(directory.string(), ": missing ", prefix + stem, "[.gz]");
  };
  Dataset set = load_idx(find("-images-idx3-ubyte"), find("-labels-idx1-ubyte"), 10, rows);
  set.class_names = directory_class_names(directory, set.num_classes);
  return set;
}

const std::vector<std::string>& fashion_mnist_classes() {
  static const std::vector<std::string> names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                 "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

}  // namespace normkit::data
