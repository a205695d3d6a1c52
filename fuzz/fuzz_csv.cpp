// CSV tables (data::load_csv). The first three bytes pick the options (the
// delimiter, the label column, the number of classes); the rest is the file.
// An accepted table is consistent: one label per row in [0, classes), a row of
// finite features per label.
#include <cmath>

#include "fuzz_support.hpp"
#include "normkit/engine/data.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace nd = normkit::data;
  using normkit::fuzz::expect;
  if (size < 3) return 0;
  nd::CsvOptions options;
  options.delimiter = ",;\t "[data[0] % 4];
  options.label_column = data[1] % 8 - 1;  // -1 (the last) to 6
  options.num_classes = data[2] % 12;      // 0 (inferred) to 11
  const auto path = normkit::fuzz::write_scratch_file(
      "table.csv", std::string_view(reinterpret_cast<const char*>(data) + 3, size - 3));
  nd::Dataset set;
  if (!normkit::fuzz::accepted([&] { set = nd::load_csv(path, options); })) return 0;

  expect(set.count() > 0, "an accepted table has rows");
  expect(set.sample_shape.size() == 1 && set.sample_shape[0] >= 1, "one or more features");
  expect(static_cast<int64_t>(set.features.size()) == set.count() * set.sample_size(),
         "a row of features per label");
  expect(set.num_classes >= 1, "at least one class");
  for (const auto label : set.labels) expect(label >= 0 && label < set.num_classes, "labels in range");
  for (const auto v : set.features) expect(std::isfinite(v), "features are finite");
  return 0;
}
