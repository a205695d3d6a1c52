// The standardizer's saved form (Standardizer::load; the checkpoint embeds it).
// An accepted one has finite statistics and positive scales, saves to the bytes
// it was loaded from, and transforms a row.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "fuzz_support.hpp"
#include "normkit/standardizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using normkit::data::Standardizer;
  using normkit::fuzz::expect;
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  Standardizer standardizer;
  if (!normkit::fuzz::accepted([&] { standardizer = Standardizer::load(in); })) return 0;

  expect(standardizer.fitted(), "a loaded standardizer is fitted");
  // In double, as kept and saved (float data sees them rounded: a standard
  // deviation above 3.4e38 is an infinite scale there, and maps rows to 0).
  const auto mean = standardizer.mean<double>(), scale = standardizer.scale<double>(),
             variance = standardizer.variance<double>();
  for (size_t f = 0; f < mean.size(); ++f) {
    expect(std::isfinite(mean[f]), "the mean is finite", std::to_string(mean[f]));
    expect(std::isfinite(scale[f]) && scale[f] > 0, "the scale is finite and positive",
           std::to_string(scale[f]));
    expect(std::isfinite(variance[f]) && variance[f] >= 0, "the variance is finite and >= 0",
           std::to_string(variance[f]));
  }
  std::ostringstream out, again;
  standardizer.save(out);
  std::istringstream saved(out.str());
  Standardizer::load(saved).save(again);
  expect(again.str() == out.str(), "save(load(save(s))) == save(s)");
  expect(out.str() == std::string(reinterpret_cast<const char*>(data), out.str().size()),
         "save(load(bytes)) is what load read");

  // Float rows: no crash, whatever the range. A tiny scale (1e-38) takes a
  // finite row to ±inf, as IEEE division does, and inverse_transform refuses
  // such a row with its NaN/infinity error, which is the documented policy.
  std::vector<float> row(mean.size(), 1.0f);
  standardizer.transform(row);
  const bool finite = std::all_of(row.begin(), row.end(), [](float v) { return std::isfinite(v); });
  if (finite) standardizer.inverse_transform(row);
  else expect(!normkit::fuzz::accepted([&] { standardizer.inverse_transform(row); }),
              "inverse_transform refuses a non-finite row");
  return 0;
}
