// Model specs (nn::ModelSpec::parse). An accepted spec reads back from its
// to_string() unchanged, and so does each of its --norm variants.
#include "fuzz_support.hpp"
#include "normkit/engine/nn.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace nn = normkit::nn;
  using normkit::fuzz::expect;
  const std::string text(reinterpret_cast<const char*>(data), size);
  nn::ModelSpec spec;
  if (!normkit::fuzz::accepted([&] { spec = nn::ModelSpec::parse(text); })) return 0;

  expect(nn::ModelSpec::parse(spec.to_string()) == spec, "parse(to_string(spec)) == spec",
         spec.to_string());
  for (const auto& norm : nn::ModelSpec::norm_kinds()) {
    nn::ModelSpec variant;
    if (!normkit::fuzz::accepted([&] { variant = spec.with_norm(norm); })) continue;
    expect(nn::ModelSpec::parse(variant.to_string()) == variant,
           "parse(to_string(with_norm(spec))) == with_norm(spec)", norm + ": " + variant.to_string());
  }
  return 0;
}
