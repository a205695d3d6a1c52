// Data loading: IDX and CSV files written into a scratch directory, good and
// bad, and the input standardizer. Every bad file must give a normkit::Error
// naming the file and the problem, fast, without allocating what a corrupt
// header claims.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <chrono>
#include <cstring>
#include <span>
#include <cmath>
#include <fstream>
#include <sstream>

#include "nn_test_support.hpp"
#include "normkit/engine/data.hpp"
#include "normkit/standardizer.hpp"

namespace {

using namespace nn_test;
using normkit::ErrorKind;
namespace data = normkit::data;

// ---------------------------------------------------------------- IDX files

std::string be32(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
          static_cast<char>(v)};
}

// magic (0, 0, type, rank), big-endian dims, then the payload.
std::string idx_bytes(const std::vector<uint32_t>& dims, const std::string& payload, char type = 0x08,
                      char zero = 0) {
  std::string out = {zero, 0, type, static_cast<char>(dims.size())};
  for (const auto d : dims) out += be32(d);
  return out + payload;
}

void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

void write_gzip(const std::filesystem::path& path, const std::string& bytes) {
  gzFile file = gzopen(path.string().c_str(), "wb");
  ASSERT_NE(file, nullptr);
  ASSERT_EQ(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(file), Z_OK);
}

// Three 2x3 images with pixel values i·7 and labels 0, 2, 1.
std::string good_images() {
  std::string pixels;
  for (int i = 0; i < 18; ++i) pixels += static_cast<char>(i * 7);
  return idx_bytes({3, 2, 3}, pixels);
}
std::string good_labels() { return idx_bytes({3}, std::string{0, 2, 1}); }

class IdxFiles : public ::testing::Test {
 protected:
  ScratchDir dir{"idx"};
  std::filesystem::path images = dir / "images", labels = dir / "labels";

  // Writes the pair and expects load_idx to fail naming `bad` and every part.
  ::testing::AssertionResult rejects(const std::string& image_bytes, const std::string& label_bytes,
                                     const std::filesystem::path& bad,
                                     std::initializer_list<std::string> parts, int32_t classes = 10) {
    write_file(images, image_bytes);
    write_file(labels, label_bytes);
    std::vector<std::string> all(parts);
    all.push_back(bad.string());
    try {
      data::load_idx(images, labels, classes);
    } catch (const normkit::Error& e) {
      if (e.kind() != ErrorKind::runtime) return ::testing::AssertionFailure() << "kind: " << e.what();
      for (const auto& part : all)
        if (std::string(e.what()).find(part) == std::string::npos)
          return ::testing::AssertionFailure() << "'" << e.what() << "' lacks '" << part << "'";
      return ::testing::AssertionSuccess();
    }
    return ::testing::AssertionFailure() << "loaded";
  }
};

TEST_F(IdxFiles, AGoodPairLoadsPlainAndGzipped) {
  for (const bool gz : {false, true}) {
    SCOPED_TRACE(gz ? "gzipped" : "plain");
    if (gz) {
      write_gzip(images, good_images());
      write_gzip(labels, good_labels());
    } else {
      write_file(images, good_images());
      write_file(labels, good_labels());
    }
    const auto set = data::load_idx(images, labels);
    EXPECT_EQ(set.count(), 3);
    EXPECT_EQ(set.sample_shape, (std::vector<int64_t>{1, 2, 3}));
    EXPECT_EQ(set.sample_size(), 6);
    EXPECT_EQ(set.labels, (std::vector<int32_t>{0, 2, 1}));
    EXPECT_EQ(set.num_classes, 10);
    ASSERT_EQ(set.features.size(), 18u);
    for (int i = 0; i < 18; ++i) EXPECT_FLOAT_EQ(set.features[i], static_cast<float>(i * 7) / 255.0f);
  }
}

// The loader reads a body in pieces of 4 MB: a body of several pieces (plain
// and gzipped) loads every value, across the pieces' edges, and one cut short
// in its last piece says how much it has.
TEST_F(IdxFiles, BodiesOfSeveralReadPiecesLoadWhole) {
  constexpr uint32_t kImages = 3, kRows = 1000, kCols = 1500;  // 4.5 MB
  const size_t values = size_t{kImages} * kRows * kCols;
  std::string pixels(values, '\0');
  for (size_t i = 0; i < values; ++i) pixels[i] = static_cast<char>((i * 131 + i / 4099) % 256);
  const std::string image_bytes = idx_bytes({kImages, kRows, kCols}, pixels);
  const std::string label_bytes = idx_bytes({kImages}, std::string{1, 0, 2});
  for (const bool gz : {false, true}) {
    SCOPED_TRACE(gz ? "gzipped" : "plain");
    if (gz)
      write_gzip(images, image_bytes);
    else
      write_file(images, image_bytes);
    write_file(labels, label_bytes);
    const auto set = data::load_idx(images, labels);
    EXPECT_EQ(set.labels, (std::vector<int32_t>{1, 0, 2}));
    ASSERT_EQ(set.features.size(), values);
    size_t wrong = 0;
    for (size_t i = 0; i < values; ++i)
      wrong += set.features[i] !=
               static_cast<float>(static_cast<unsigned char>(pixels[i])) / 255.0f;
    EXPECT_EQ(wrong, 0u);
  }
  EXPECT_TRUE(rejects(image_bytes.substr(0, image_bytes.size() - 1), label_bytes, images,
                      {"truncated", "promises " + std::to_string(values) + " data bytes",
                       "has " + std::to_string(values - 1)}));
}

// Only the chosen rows are converted, and they are the whole set's rows: images
// of 1 MB, so rows cross the loader's 4 MB read pieces.
TEST_F(IdxFiles, ChosenRowsAreThoseOfTheWholeSet) {
  constexpr uint32_t kImages = 7, kSide = 1000;
  const size_t per_image = size_t{kSide} * kSide, values = kImages * per_image;
  std::string pixels(values, '\0');
  for (size_t i = 0; i < values; ++i) pixels[i] = static_cast<char>((i * 131 + i / 4099) % 256);
  write_gzip(images, idx_bytes({kImages, kSide, kSide}, pixels));
  write_file(labels, idx_bytes({kImages}, std::string{3, 1, 4, 1, 5, 9, 2}));
  const auto whole = data::load_idx(images, labels);
  for (const std::vector<int64_t>& rows :
       std::vector<std::vector<int64_t>>{{}, {0}, {6}, {1, 3, 4}, {0, 1, 2, 3, 4, 5, 6}, {2, 5}}) {
    SCOPED_TRACE(::testing::PrintToString(rows));
    const auto set = data::load_idx(images, labels, 10, [&](const data::Dataset& given) {
      EXPECT_EQ(given.labels, whole.labels);
      EXPECT_EQ(given.num_classes, 10);
      EXPECT_TRUE(given.features.empty());
      return rows;
    });
    ASSERT_EQ(set.count(), static_cast<int64_t>(rows.size()));
    EXPECT_EQ(set.sample_shape, whole.sample_shape);
    ASSERT_EQ(set.features.size(), rows.size() * per_image);
    for (size_t k = 0; k < rows.size(); ++k) {
      EXPECT_EQ(set.labels[k], whole.labels[static_cast<size_t>(rows[k])]);
      EXPECT_TRUE(std::equal(set.features.begin() + static_cast<std::ptrdiff_t>(k * per_image),
                             set.features.begin() + static_cast<std::ptrdiff_t>((k + 1) * per_image),
                             whole.features.begin() + rows[k] * static_cast<std::ptrdiff_t>(per_image)));
    }
  }
  for (const std::vector<int64_t>& bad : std::vector<std::vector<int64_t>>{{3, 1}, {2, 2}, {-1}, {7}})
    EXPECT_TRUE(throws_error([&] { data::load_idx(images, labels, 10, [&](const data::Dataset&) { return bad; }); },
                             ErrorKind::invalid_argument, {"strictly increasing", "[0, 7)"}));
}

TEST_F(IdxFiles, CorruptCompressedFilesAreRejected) {
  // A gzip stream cut short, and one whose deflate data are garbage.
  write_gzip(images, good_images());
  write_file(labels, good_labels());
  std::ifstream in(images, std::ios::binary);
  const std::string gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  EXPECT_TRUE(rejects(gz.substr(0, gz.size() / 2), good_labels(), images, {"truncated"}));
  std::string garbage = gz.substr(0, 10) + std::string(40, '\xff');
  EXPECT_TRUE(rejects(garbage, good_labels(), images, {"corrupt compressed data"}));
}

TEST_F(IdxFiles, TheStandardDirectoryLayoutLoads) {
  write_gzip(dir / "train-images-idx3-ubyte.gz", good_images());
  write_file(dir / "train-labels-idx1-ubyte", good_labels());
  EXPECT_EQ(data::load_mnist_directory(dir.path(), data::Split::train).count(), 3);
  EXPECT_TRUE(throws_error([&] { data::load_mnist_directory(dir.path(), data::Split::test); },
                           ErrorKind::runtime, {"missing t10k-", "-idx", "-ubyte[.gz]"}));
  EXPECT_TRUE(throws_error([&] { data::load_mnist_directory(dir / "nope", data::Split::test); },
                           ErrorKind::runtime, {"not a directory"}));
}

TEST_F(IdxFiles, BadHeadersAreRejected) {
  EXPECT_TRUE(rejects(idx_bytes({3, 2, 3}, std::string(18, '\0'), 0x08, 1), good_labels(), images,
                      {"bad magic"}));
  EXPECT_TRUE(rejects(idx_bytes({3, 2, 3}, std::string(72, '\0'), 0x0D), good_labels(), images,
                      {"element type 0xd", "unsigned bytes"}));
  EXPECT_TRUE(rejects(good_labels(), good_labels(), images, {"3 dimensions, got 1"}));
  EXPECT_TRUE(rejects(good_images(), good_images(), labels, {"1 dimensions, got 3"}));
  EXPECT_TRUE(rejects(good_images().substr(0, 9), good_labels(), images, {"truncated", "header"}));
  EXPECT_TRUE(rejects(good_images().substr(0, 2), good_labels(), images, {"truncated", "header"}));
  EXPECT_TRUE(rejects(good_images(), "", labels, {"truncated", "header"}));
  EXPECT_TRUE(rejects(idx_bytes({3, 0, 3}, ""), good_labels(), images, {"dimension is 0"}));
}

TEST_F(IdxFiles, SizesThatDoNotMatchTheFileAreRejected) {
  EXPECT_TRUE(rejects(good_images().substr(0, good_images().size() - 1), good_labels(), images,
                      {"truncated", "promises 18 data bytes", "has 17"}));
  EXPECT_TRUE(rejects(good_images(), good_labels().substr(0, 10), labels, {"truncated"}));
  EXPECT_TRUE(rejects(good_images() + "x", good_labels(), images, {"longer than its header"}));
  EXPECT_TRUE(rejects(good_images(), good_labels() + std::string(4, '\0'), labels, {"longer"}));
  EXPECT_TRUE(rejects(good_images(), idx_bytes({4}, std::string{0, 1, 2, 3}), labels,
                      {"4 labels for 3 images"}));
}

TEST_F(IdxFiles, LabelsOutOfRangeAreRejected) {
  EXPECT_TRUE(rejects(good_images(), idx_bytes({3}, std::string{0, 10, 1}), labels,
                      {"label 10 at index 1", "[0, 10)"}));
  // A file of the wrong length says so before any label is judged.
  EXPECT_TRUE(rejects(good_images(), idx_bytes({3}, std::string{0, 10, 1}) + "x", labels,
                      {"longer than its header"}));
  EXPECT_TRUE(rejects(good_images(), good_labels(), labels, {"label 2", "[0, 2)"}, 2));
  EXPECT_TRUE(throws_error([&] { data::load_idx(images, labels, 0); }, ErrorKind::invalid_argument,
                           {"num_classes"}));
}

long peak_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

TEST_F(IdxFiles, AbsurdDimensionsFailFastWithoutAllocating) {
  // More than 2^32 values: rejected by the header check.
  EXPECT_TRUE(rejects(idx_bytes({3, 65536, 65536}, ""), good_labels(), images, {"2^32", "corrupt"}));
  // 4·10^9 values (under the cap) claimed by a file of a few bytes, with labels
  // for all 1000 images: the reader must find the truncation without first
  // allocating 4 GB.
  const long before = peak_rss_kib();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(rejects(idx_bytes({1000, 2000, 2000}, std::string(100, '\1')),
                      idx_bytes({1000}, std::string(1000, '\0')), images, {"truncated", "4000000000"}));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 2.0);
  EXPECT_LT(peak_rss_kib() - before, 64 * 1024) << "peak memory grew by more than 64 MiB";
}

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NORMKIT_TEST_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define NORMKIT_TEST_ASAN 1
#endif

// Nor does the reader reserve what a lying header claims (only what the file
// holds): in a child process whose address space may grow by 128 MB at most,
// a 256 KB file claiming 4·10^9 pixels, or 10^8 labels, plain or gzipped,
// gives the truncation error, not an out-of-memory one.
TEST_F(IdxFiles, ALyingHeaderReservesNoAddressSpace) {
#ifdef NORMKIT_TEST_ASAN
  GTEST_SKIP() << "AddressSanitizer's shadow memory needs its own address space";
#else
  for (int kind = 0; kind < 5; ++kind) {
    // The fifth: a gzipped file cut short, whose last bytes claim 4 GB.
    const bool gz = kind >= 2, images_lie = kind % 2 == 0, cut = kind == 4;
    SCOPED_TRACE(std::string(cut ? "cut " : "") + (gz ? "gzipped " : "plain ") +
                 (images_lie ? "images" : "labels"));
    auto write = [&](const std::filesystem::path& path, const std::string& bytes) {
      if (gz)
        write_gzip(path, bytes);
      else
        write_file(path, bytes);
    };
    // 256 KB that do not compress: deflate's largest expansion (1032:1) would
    // allow 264 MB of them.
    std::string noise(256 << 10, '\0');
    uint32_t state = 12345;
    for (char& c : noise) c = static_cast<char>((state = state * 1664525u + 1013904223u) >> 24);
    if (cut) {
      write(images, idx_bytes({1000, 2000, 2000}, noise));
      std::ifstream in(images, std::ios::binary);
      std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      in.close();
      write_file(images, bytes.substr(0, bytes.size() - 1000) + "\xff\xff\xff\xff");
      write(labels, idx_bytes({1000}, std::string(1000, '\0')));
    } else if (images_lie) {  // 1000 good labels
      write(images, idx_bytes({1000, 2000, 2000}, noise));
      write(labels, idx_bytes({1000}, std::string(1000, '\0')));
    } else {
      write(images, idx_bytes({100000000, 2, 2}, noise));
      write(labels, idx_bytes({100000000}, noise));
    }
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      long pages = 0;
      if (!(std::ifstream("/proc/self/statm") >> pages) || pages <= 0) _exit(5);
      const rlim_t page = static_cast<rlim_t>(sysconf(_SC_PAGESIZE));
      const rlim_t limit = static_cast<rlim_t>(pages) * page + (rlim_t{128} << 20);
      const rlimit address_space{limit, limit};
      if (setrlimit(RLIMIT_AS, &address_space) != 0) _exit(3);
      try {
        data::load_idx(images, labels);
      } catch (const normkit::Error& e) {
        const std::string what = e.what();
        const bool named = what.find("truncated") != std::string::npos ||
                           (cut && what.find("corrupt compressed data") != std::string::npos);
        _exit(named ? 0 : 2);
      } catch (const std::bad_alloc&) {
        _exit(1);
      }
      _exit(4);
    }
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status));
    if (WEXITSTATUS(status) == 5) GTEST_SKIP() << "no /proc/self/statm to measure the address space";
    EXPECT_EQ(WEXITSTATUS(status), 0) << "1: out of memory, 2: another error, 3: setrlimit failed";
  }
#endif
}

TEST(IdxFashionMnist, TheInstalledTestSplitLoads) {
  const std::filesystem::path dir = data::kFashionMnistDirectory;
  if (!std::filesystem::exists(dir / "t10k-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "Fashion-MNIST is not installed at " << dir;
  const auto set = data::load_mnist_directory(dir, data::Split::test);
  EXPECT_EQ(set.count(), 10000);
  EXPECT_EQ(set.sample_shape, (std::vector<int64_t>{1, 28, 28}));
  std::vector<int64_t> per_class(10);
  for (const auto label : set.labels) ++per_class.at(label);
  for (const auto n : per_class) EXPECT_EQ(n, 1000);
  for (const float v : set.features) ASSERT_TRUE(v >= 0.0f && v <= 1.0f);
}

// ---------------------------------------------------------------- CSV files

class CsvFiles : public ::testing::Test {
 protected:
  ScratchDir dir{"csv"};
  std::filesystem::path path = dir / "table.csv";

  data::Dataset load(const std::string& text, const data::CsvOptions& options = {}) {
    write_file(path, text);
    return data::load_csv(path, options);
  }
  ::testing::AssertionResult rejects(const std::string& text, std::initializer_list<std::string> parts,
                                     const data::CsvOptions& options = {}) {
    write_file(path, text);
    std::vector<std::string> all(parts);
    all.push_back(path.string());
    try {
      data::load_csv(path, options);
    } catch (const normkit::Error& e) {
      for (const auto& part : all)
        if (std::string(e.what()).find(part) == std::string::npos)
          return ::testing::AssertionFailure() << "'" << e.what() << "' lacks '" << part << "'";
      return ::testing::AssertionSuccess();
    }
    return ::testing::AssertionFailure() << "loaded";
  }
};

TEST_F(CsvFiles, HeaderIsDetectedAndValuesParse) {
  for (const std::string header : {"", "a,b,label\n", "x1, x2 ,y\r\n"}) {
    SCOPED_TRACE(header);
    const auto set = load(header + "1.5,-2,1\n\n 3e2 ,+4,0\r\n0.25,5,2\n");
    EXPECT_EQ(set.count(), 3);
    EXPECT_EQ(set.sample_shape, (std::vector<int64_t>{2}));
    EXPECT_EQ(set.features, (std::vector<float>{1.5f, -2, 300, 4, 0.25f, 5}));
    EXPECT_EQ(set.labels, (std::vector<int32_t>{1, 0, 2}));
    EXPECT_EQ(set.num_classes, 3);  // inferred: max + 1
    EXPECT_TRUE(set.class_names.empty());
  }
  data::CsvOptions first;
  first.label_column = "first";
  first.num_classes = 5;
  first.delimiter = ';';
  const auto set = load("label;f\n4;0.5\n1.0;7\n", first);
  EXPECT_EQ(set.labels, (std::vector<int32_t>{4, 1}));
  EXPECT_EQ(set.features, (std::vector<float>{0.5f, 7}));
  EXPECT_EQ(set.num_classes, 5);
}

TEST_F(CsvFiles, ScikitLearnHeaderNamesTheClassesAndCountsTheRows) {
  // sklearn/datasets/data/*.csv: n_samples, n_features, then the class names;
  // its field count (here 5) need not be the rows' (here 4).
  const auto set = load("3,3,low,high\n1,2,3,1\n4,5,6,0\n7,8,9,1\n");
  EXPECT_EQ(set.count(), 3);
  EXPECT_EQ(set.sample_shape, (std::vector<int64_t>{3}));
  EXPECT_EQ(set.labels, (std::vector<int32_t>{1, 0, 1}));
  EXPECT_EQ(set.class_names, (std::vector<std::string>{"low", "high"}));
  EXPECT_EQ(set.num_classes, 2);
  // iris.csv's header has as many fields as its rows.
  EXPECT_EQ(load("2,4,a,b,c\n1,2,3,4,2\n1,2,3,4,0\n").class_names, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(rejects("3,2,a,b\n1,2,0\n3,4,1\n", {"the header says 3 samples, the file has 2 rows"}));
  EXPECT_TRUE(rejects("2,2,a\n1,2,0\n3,4,1\n", {":3:", "label 1 has no class name"}));
  // A table whose first rows end in class names is data, not such a header.
  const auto named = load("1,2,cat\n3,4,dog\n");
  EXPECT_EQ(named.count(), 2);
  EXPECT_EQ(named.class_names, (std::vector<std::string>{"cat", "dog"}));
}

TEST_F(CsvFiles, HeaderOptionOverridesDetection) {
  data::CsvOptions no;
  no.header = data::CsvHeader::no;
  EXPECT_TRUE(rejects("a,b,label\n1,2,0\n", {":1:", "column 1: 'a' is not a number"}, no));
  data::CsvOptions yes;
  yes.header = data::CsvHeader::yes;
  const auto set = load("1,2,3\n4,5,0\n6,7,1\n", yes);  // a header of numbers
  EXPECT_EQ(set.count(), 2);
  EXPECT_EQ(set.features, (std::vector<float>{4, 5, 6, 7}));
  EXPECT_TRUE(rejects("a,b,c\n", {"no data rows (only the header line)"}, yes));
}

TEST_F(CsvFiles, LabelColumnsCountFromOneOrGoByName) {
  const std::string text = "w,species,h\n1,0,2\n3,1,4\n";
  for (const std::string column : {"2", "species"}) {
    SCOPED_TRACE(column);
    data::CsvOptions options;
    options.label_column = column;
    const auto set = load(text, options);
    EXPECT_EQ(set.labels, (std::vector<int32_t>{0, 1}));
    EXPECT_EQ(set.features, (std::vector<float>{1, 2, 3, 4}));
  }
  for (const std::string bad : {"0", "-1", "-2", "1.5"}) {
    data::CsvOptions options;
    options.label_column = bad;
    write_file(path, text);
    EXPECT_TRUE(throws_error([&] { data::load_csv(path, options); }, ErrorKind::invalid_argument,
                             {"label column '" + bad + "'", "counted from 1"}))
        << bad;
  }
  data::CsvOptions four;
  four.label_column = "4";
  EXPECT_TRUE(rejects(text, {"label column 4 does not exist", "3 columns, counted from 1"}, four));
  data::CsvOptions named;
  named.label_column = "kind";
  EXPECT_TRUE(rejects(text, {"no column named 'kind'", "w, species, h"}, named));
  EXPECT_TRUE(rejects("1,0,2\n", {"'kind' is not a column number", "no header line"}, named));
}

TEST_F(CsvFiles, StringLabelsAreMappedInSortedOrder) {
  const auto set = load("x,y,kind\n1,2,versicolor\n3,4,setosa\n5,6,\"virginica\"\n7,8,setosa\n");
  EXPECT_EQ(set.class_names, (std::vector<std::string>{"setosa", "versicolor", "virginica"}));
  EXPECT_EQ(set.labels, (std::vector<int32_t>{1, 0, 2, 0}));
  EXPECT_EQ(set.num_classes, 3);
  // A test table maps its names with the training table's classes.
  data::CsvOptions train_classes;
  train_classes.class_names = set.class_names;
  EXPECT_EQ(load("1,2,virginica\n3,4,setosa\n", train_classes).labels, (std::vector<int32_t>{2, 0}));
  EXPECT_TRUE(rejects("1,2,setosa\n3,4,rose\n", {":2:", "class 'rose' is not one of the classes",
                                                   "setosa, versicolor, virginica"},
                      train_classes));
  EXPECT_TRUE(rejects("1,2,0\n3,4,cat\n", {"class indices (line 1: 0) and class names (line 2: 'cat')"}));
}

TEST_F(CsvFiles, DelimitersAndQuotes) {
  data::CsvOptions tab;
  tab.delimiter = '\t';
  EXPECT_EQ(load("a\tb\n1.5\t1\n2\t0\n", tab).features, (std::vector<float>{1.5f, 2}));
  const auto quoted = load("\"a,1\",\"b \"\"q\"\"\",label\n\"1\",2,\"x, y\"\n3,4,z\n");
  EXPECT_EQ(quoted.features, (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(quoted.class_names, (std::vector<std::string>{"x, y", "z"}));
  EXPECT_TRUE(rejects("1,\"2,0\n", {":1:", "quoted field is not closed"}));
  // Semicolon data read with the default comma: one column, named in the error.
  EXPECT_TRUE(rejects("1;2;0\n3;4;1\n", {":1:", "need at least one feature and a label column, got 1 column"}));
}

TEST_F(CsvFiles, BadTablesAreRejectedWithLineColumnAndText) {
  EXPECT_TRUE(rejects("a,b,c\n1,2,0\n1,2\n", {":3:", "expected 3 columns", "got 2"}));
  EXPECT_TRUE(rejects("1,2,0\n1,2,0,4\n", {":2:", "expected 3 columns (as line 1), got 4"}));
  // A short row after full ones (the reader reuses its fields), after a longer
  // one, and after a quoted one.
  EXPECT_TRUE(rejects("1,2,0\n1,2,0\n1,2,0\n1,2\n", {":4:", "expected 3 columns", "got 2"}));
  EXPECT_TRUE(rejects("1,2,0\n1,2,0\n1\n", {":3:", "expected 3 columns", "got 1"}));
  EXPECT_TRUE(rejects("\"1\",2,0\n1,2\n", {":2:", "expected 3 columns", "got 2"}));
  EXPECT_TRUE(rejects("1,2,0\n1,abc,0\n", {":2:", "column 2: 'abc' is not a number"}));
  EXPECT_TRUE(rejects("u,v,w\n1,2,0\n1,abc,0\n", {":3:", "column 2 (v): 'abc' is not a number"}));
  EXPECT_TRUE(rejects("1,2,0\n1,,0\n", {":2:", "column 2: the field is empty"}));
  EXPECT_TRUE(rejects("1,2,1.5\n", {":1:", "label 1.5", "not a class index"}));
  EXPECT_TRUE(rejects("1,2,-1\n", {":1:", "column 3", "label -1"}));
  EXPECT_TRUE(rejects("1,2,nan\n", {":1:", "label nan"}));
  data::CsvOptions three;
  three.num_classes = 3;
  EXPECT_TRUE(rejects("1,2,0\n1,2,3\n", {":2:", "label 3 is out of range [0, 3)"}, three));
  EXPECT_TRUE(rejects("1,nan,0\n", {":1:", "column 2: 'nan' is not a finite number"}));
  EXPECT_TRUE(rejects("1,2,0\ninf,2,0\n", {":2:", "column 1: 'inf' is not a finite number"}));
  // Finite as a double, infinite as the float feature (make fuzz found it).
  EXPECT_TRUE(rejects("1,2,0\n1,-1e39,0\n", {":2:", "column 2: '-1e39' is beyond a float's range"}));
  EXPECT_TRUE(rejects("a,b,c\n", {"no data rows"}));
  EXPECT_TRUE(rejects("", {"no data rows"}));
  EXPECT_TRUE(rejects("1\n2\n", {"at least one feature"}));
  EXPECT_TRUE(throws_error([&] { data::load_csv(dir / "missing.csv"); }, ErrorKind::runtime,
                           {"missing.csv", "cannot open"}));
}

// ---------------------------------------------------------------- standardizer

TEST(Standardizer, FitAndPartialFitOnChunksAgree) {
  const int64_t rows = 257, features = 5;
  auto x = normal_values(rows * features, 1, 3.0f, 1000.0f);  // a large mean, as BN's tests
  data::Standardizer whole;
  whole.fit(x, features);
  data::Standardizer chunks;
  for (int64_t first = 0; first < rows; first += 40) {
    const int64_t n = std::min<int64_t>(40, rows - first);
    chunks.partial_fit(std::span<const float>(x).subspan(first * features, n * features), features);
  }
  ASSERT_EQ(chunks.features(), features);
  for (int64_t f = 0; f < features; ++f) {
    double sum = 0, sum2 = 0;
    for (int64_t r = 0; r < rows; ++r) sum += x[r * features + f];
    const double mean = sum / rows;
    for (int64_t r = 0; r < rows; ++r) sum2 += (x[r * features + f] - mean) * (x[r * features + f] - mean);
    const double sd = std::sqrt(sum2 / rows);  // population std, as scikit-learn
    EXPECT_NEAR(whole.mean()[f], mean, 1e-4);
    EXPECT_NEAR(whole.scale()[f], sd, 1e-5 * sd);
    EXPECT_NEAR(chunks.mean()[f], whole.mean()[f], 1e-4);
    EXPECT_NEAR(chunks.scale()[f], whole.scale()[f], 1e-5 * sd);
    EXPECT_EQ(chunks.moments()[f].count, rows);
  }
  // fit starts over.
  chunks.fit(std::span<const float>(x).first(10 * features), features);
  EXPECT_EQ(chunks.moments()[0].count, 10);
}

TEST(Standardizer, TransformAndInverseRoundTripAndConstantFeaturesMapToZero) {
  const int64_t rows = 50, features = 3;
  auto x = normal_values(rows * features, 2, 2.0f, -5.0f);
  for (int64_t r = 0; r < rows; ++r) x[r * features + 1] = 7.5f;  // zero variance
  data::Standardizer s;
  s.fit(x, features);
  EXPECT_EQ(s.scale()[1], 1.0f);
  auto y = x;
  s.transform(y);
  for (int64_t f = 0; f < features; ++f) {
    double sum = 0, sum2 = 0;
    for (int64_t r = 0; r < rows; ++r) sum += y[r * features + f], sum2 += double{y[r * features + f]} * y[r * features + f];
    EXPECT_NEAR(sum / rows, 0.0, 1e-5);
    EXPECT_NEAR(sum2 / rows, f == 1 ? 0.0 : 1.0, 1e-4);
  }
  for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(y[r * features + 1], 0.0f);
  s.inverse_transform(y);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], 1e-5 * (1 + std::abs(x[i])));
}

TEST(Standardizer, BadArgumentsAreRejectedAndLeaveTheFitAlone) {
  data::Standardizer s;
  std::vector<float> row = {1, 2, 3};
  EXPECT_TRUE(throws_error([&] { s.transform(row); }, ErrorKind::invalid_argument, {"not fitted"}));
  s.fit(std::vector<float>{1, 2, 3, 4, 5, 6}, 3);
  const auto mean = s.mean();
  std::vector<float> bad = {1, NAN, 3};
  EXPECT_TRUE(throws_error([&] { s.partial_fit(bad, 3); }, ErrorKind::runtime, {"feature 1", "NaN"}));
  EXPECT_TRUE(throws_error([&] { s.fit(bad, 3); }, ErrorKind::runtime, {"feature 1"}));
  EXPECT_EQ(s.mean(), mean);
  EXPECT_EQ(s.moments()[0].count, 2);
  EXPECT_TRUE(throws_error([&] { s.partial_fit(std::vector<float>{1, 2}, 2); },
                           ErrorKind::invalid_argument, {"fitted on 3 features, got 2"}));
  std::vector<float> partial = {1, 2, 3, 4};
  EXPECT_TRUE(throws_error([&] { s.transform(partial); }, ErrorKind::invalid_argument, {"whole rows"}));
  // NaN or infinity is refused before anything is written (docs/nan-and-inf.md).
  std::vector<float> rows = {1, 2, 3, 4, -INFINITY, 6};
  const auto before = rows;
  EXPECT_TRUE(throws_error([&] { s.transform(rows); }, ErrorKind::runtime, {"NaN or infinity at row 1, feature 1"}));
  EXPECT_TRUE(throws_error([&] { s.inverse_transform(rows); }, ErrorKind::runtime, {"row 1, feature 1"}));
  EXPECT_EQ(rows, before);
  EXPECT_TRUE(throws_error([&] { s.fit(partial, 0); }, ErrorKind::invalid_argument, {"features must be >= 1"}));
}

TEST(Standardizer, SaveLoadRoundTripAndCorruptStreams) {
  data::Standardizer s;
  s.fit(normal_values(40, 3, 2.0f, 1.0f), 4);
  std::stringstream stream;
  s.save(stream);
  const std::string bytes = stream.str();
  std::istringstream in(bytes);
  const auto loaded = data::Standardizer::load(in);
  ASSERT_EQ(loaded.features(), 4);
  for (int64_t f = 0; f < 4; ++f) {
    EXPECT_EQ(loaded.moments()[f].count, s.moments()[f].count);
    EXPECT_EQ(loaded.moments()[f].mean, s.moments()[f].mean);
    EXPECT_EQ(loaded.moments()[f].m2, s.moments()[f].m2);
  }
  auto load = [](const std::string& b) {
    std::istringstream i(b);
    return data::Standardizer::load(i);
  };
  std::string wrong = bytes;
  wrong[0] = 'X';
  EXPECT_TRUE(throws_error([&] { load(wrong); }, ErrorKind::runtime, {"bad magic"}));
  EXPECT_TRUE(throws_error([&] { load(bytes.substr(0, 5)); }, ErrorKind::runtime, {"bad magic"}));
  EXPECT_TRUE(throws_error([&] { load(bytes.substr(0, 12)); }, ErrorKind::runtime, {"feature count"}));
  EXPECT_TRUE(throws_error([&] { load(bytes.substr(0, bytes.size() - 1)); }, ErrorKind::runtime, {"truncated"}));
  std::string negative = bytes;
  const double m2 = -1;
  std::memcpy(negative.data() + 16 + 16, &m2, sizeof m2);  // feature 0's M2
  EXPECT_TRUE(throws_error([&] { load(negative); }, ErrorKind::runtime, {"feature 0", "invalid statistics"}));
  std::string zero_count = bytes;
  const double zero = 0;
  std::memcpy(zero_count.data() + 16 + 24, &zero, sizeof zero);  // feature 1's count
  EXPECT_TRUE(throws_error([&] { load(zero_count); }, ErrorKind::runtime, {"feature 1"}));

  // A count of 2^26 features (1.5 GB of statistics) followed by nothing must
  // fail at the truncation, not allocate first.
  std::string huge = bytes.substr(0, 8);
  const uint64_t n = uint64_t{1} << 26;
  huge.append(reinterpret_cast<const char*>(&n), sizeof n);
  const long before = peak_rss_kib();
  EXPECT_TRUE(throws_error([&] { load(huge); }, ErrorKind::runtime, {"truncated"}));
  EXPECT_LT(peak_rss_kib() - before, 64 * 1024) << "peak memory grew by more than 64 MiB";
  const uint64_t too_many = (uint64_t{1} << 26) + 1;
  std::memcpy(huge.data() + 8, &too_many, sizeof too_many);
  EXPECT_TRUE(throws_error([&] { load(huge); }, ErrorKind::runtime, {"feature count"}));
}

TEST(Standardizer, VarianceAndSamplesSeenFollowTheFit) {
  data::Standardizer s;
  EXPECT_EQ(s.samples_seen(), 0);
  EXPECT_TRUE(s.variance().empty());
  // Feature 0: 1, 2, 3, 4 (mean 2.5, population variance 1.25); feature 1: constant.
  s.partial_fit(std::vector<float>{1, 7, 2, 7}, 2);
  EXPECT_EQ(s.samples_seen(), 2);
  s.partial_fit(std::vector<float>{3, 7, 4, 7}, 2);
  EXPECT_EQ(s.samples_seen(), 4);
  EXPECT_EQ(s.variance(), (std::vector<float>{1.25f, 0.0f}));
  EXPECT_EQ(s.scale(), (std::vector<float>{std::sqrt(1.25f), 1.0f}));  // zero variance: scale 1
  const int64_t rows = 333, features = 3;
  const auto x = normal_values(rows * features, 21, 4.0f, -300.0f);
  s.fit(x, features);
  EXPECT_EQ(s.samples_seen(), rows);
  for (int64_t f = 0; f < features; ++f) {
    double sum = 0, sum2 = 0;
    for (int64_t r = 0; r < rows; ++r) sum += x[r * features + f];
    for (int64_t r = 0; r < rows; ++r) sum2 += std::pow(x[r * features + f] - sum / rows, 2);
    EXPECT_NEAR(s.variance()[f], sum2 / rows, 1e-5 * sum2 / rows);
  }
  EXPECT_TRUE(throws_error([&] { s.partial_fit(std::vector<float>{1, NAN, 3}, 3); },
                           ErrorKind::runtime, {"NaN"}));
  EXPECT_EQ(s.samples_seen(), rows);  // a rejected chunk is not counted
}

}  // namespace
