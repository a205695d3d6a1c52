#pragma once
// Data sets for training: IDX files (MNIST, Fashion-MNIST; gzipped or not),
// CSV tables, and the input standardizer x' = (x - μ) / σ.
//
// Loaders never trust a file: magic numbers, dimensions, sizes and labels are
// checked, memory grows only as data actually arrives (a header that claims
// 10^12 values cannot make it allocate them), and every problem is a
// normkit::Error naming the file and what is wrong with it.
#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <span>
#include <string>
#include <vector>

#include "normkit/moments.hpp"

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

// Per-feature standardization, fitted on training data only and kept with the
// model: x' = (x - mean) / std, with the biased (population) std as
// scikit-learn's StandardScaler and Keras' Normalization use. A feature with
// zero variance gets scale 1, so it maps to 0 instead of NaN.
class Standardizer {
 public:
  // Statistics over rows × features, merged with what was seen before
  // (fit = reset + partial_fit). Non-finite values are an error.
  void fit(std::span<const float> x, int64_t features);
  void partial_fit(std::span<const float> x, int64_t features);

  void transform(std::span<float> x) const;          // in place
  void inverse_transform(std::span<float> x) const;  // in place

  bool fitted() const noexcept { return !moments_.empty(); }
  int64_t features() const noexcept { return static_cast<int64_t>(moments_.size()); }
  std::vector<float> mean() const;
  std::vector<float> scale() const;  // std, or 1 for zero-variance features
  // The biased (population) variance, 0 for zero-variance features; and the
  // rows fitted since the last fit (0 when unfitted).
  std::vector<float> variance() const;
  int64_t samples_seen() const noexcept;

  void save(std::ostream& out) const;
  static Standardizer load(std::istream& in);  // throws normkit::Error on a bad stream
  static Standardizer from_moments(std::vector<Moments> moments);
  const std::vector<Moments>& moments() const noexcept { return moments_; }

 private:
  void check_rows(std::span<const float> x) const;
  std::vector<Moments> moments_;
};

}  // namespace normkit::data
