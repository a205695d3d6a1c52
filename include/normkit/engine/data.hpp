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
#include <functional>
#include <string>
#include <vector>

namespace normkit::data {

struct Dataset {
  std::vector<int64_t> sample_shape;  // e.g. {1, 28, 28}; {features} for tables
  std::vector<float> features;        // count × product(sample_shape), row-major
  std::vector<int32_t> labels;        // count values in [0, num_classes)
  int32_t num_classes = 0;
  // The name of class i when the data names its classes (CSV string labels, a
  // scikit-learn header, Fashion-MNIST); empty otherwise.
  std::vector<std::string> class_names;

  int64_t count() const noexcept { return static_cast<int64_t>(labels.size()); }
  int64_t sample_size() const noexcept;
};

// The rows of a data set to keep, chosen from its labels before any sample is
// converted: `set` holds the labels and num_classes, no features. Returns
// indices into the file's rows, strictly increasing. A run that trains on a
// subset (--per-class, a validation split) then never holds the whole set.
using RowChoice = std::function<std::vector<int64_t>(const Dataset& set)>;

// An IDX image file (unsigned bytes, magic 0x00000803, 3 dimensions) and its
// label file (0x00000801, 1 dimension); pixels are scaled to [0, 1]. With
// `rows`, only those rows (every image is still read and checked).
Dataset load_idx(const std::filesystem::path& images, const std::filesystem::path& labels,
                 int32_t num_classes = 10, const RowChoice& rows = {});

// Fashion-MNIST (or MNIST) from a directory holding the four standard files,
// gzipped or not: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]. The class
// names are the lines of the directory's classes.txt when it has one, else
// Fashion-MNIST's ten (fashion_mnist_classes()) when the directory's name
// contains "fashion", else none.
enum class Split { train, test };
Dataset load_mnist_directory(const std::filesystem::path& directory, Split split,
                             const RowChoice& rows = {});
inline const char* kFashionMnistDirectory = "/usr/share/datasets/fashion-mnist";
const std::vector<std::string>& fashion_mnist_classes();  // "T-shirt/top", "Trouser", ...

// A CSV table: one row per line, every column a feature (a finite number)
// except the label column, which holds a class index (a whole number >= 0) or
// a class name. Names are mapped to indices in sorted order (or by
// class_names, when given); a column of numbers and names together is an error.
// Fields may be quoted ("a,b"; "" is a quote). Columns are counted from 1, in
// options and messages alike.
//
// The first line is a header when `header` says so; `detect` takes it for one
// when one of its fields is not a number where the next line's is, or when it
// is scikit-learn's header ("n_samples,n_features,class names...", as in
// sklearn/datasets/data/wine_data.csv): then its names are the class names of
// the numeric labels and the row count is checked against n_samples.
enum class CsvHeader { detect, yes, no };
struct CsvOptions {
  // "last", "first", a column number counted from 1, a column's name in the
  // header, or "none": every column is a feature and the labels are -1
  // (unknown; rows to predict).
  std::string label_column = "last";
  CsvHeader header = CsvHeader::detect;
  char delimiter = ',';
  int32_t num_classes = 0;  // 0: infer (max index + 1, or the number of names)
  // The classes of a table that must use another's (a test table: its training
  // table's): names are mapped by it, and an unknown name is an error.
  std::vector<std::string> class_names;
};
Dataset load_csv(const std::filesystem::path& path, const CsvOptions& options = {});

}  // namespace normkit::data
