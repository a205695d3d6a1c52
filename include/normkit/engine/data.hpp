#pragma once
// Data sets for training (the engine's loaders): IDX files (MNIST,
// Fashion-MNIST; gzipped or not) and CSV tables. The input standardizer is in
// the kernel library: normkit/standardizer.hpp.
//
// Loaders never trust a file: magic numbers, dimensions, sizes and labels are
// checked, memory grows only as data actually arrives (a header that claims
// 10^12 values cannot make it allocate them), and every problem is a
// normkit::Error naming the file and what is wrong with it.
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace normkit::data {

struct Dataset {
  std::vector<int64_t> sample_shape;  // e.g. {1, 28, 28}; {features} for tables
  std::vector<float> features;        // count × product(sample_shape), row-major
  std::vector<int32_t> labels;        // count values in [0, num_classes)
  int32_t num_classes = 0;

  int64_t count() const noexcept { return static_cast<int64_t>(labels.size()); }
  int64_t sample_size() const noexcept;
};

// An IDX image file (unsigned bytes, magic 0x00000803, 3 dimensions) and its
// label file (0x00000801, 1 dimension); pixels are scaled to [0, 1].
Dataset load_idx(const std::filesystem::path& images, const std::filesystem::path& labels,
                 int32_t num_classes = 10);

// Fashion-MNIST (or MNIST) from a directory holding the four standard files,
// gzipped or not: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].
enum class Split { train, test };
Dataset load_mnist_directory(const std::filesystem::path& directory, Split split);
inline const char* kFashionMnistDirectory = "/usr/share/datasets/fashion-mnist";

// A CSV table of numbers: every column a feature except the label column
// (an integer class in [0, num_classes); num_classes = 0 infers max + 1).
// A first line that does not parse as numbers is taken as a header.
struct CsvOptions {
  int label_column = -1;  // -1: the last column
  int32_t num_classes = 0;
  char delimiter = ',';
};
Dataset load_csv(const std::filesystem::path& path, const CsvOptions& options = {});

}  // namespace normkit::data
