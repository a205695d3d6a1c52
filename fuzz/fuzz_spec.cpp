// Model specs (nn::ModelSpec::parse). An accepted spec reads back from its
// to_string() unchanged, and so does each of its --norm variants; its sizes are
// computed without overflow (or refused), and a model it builds agrees with
// them and trains a step (fuzz_model.hpp).
#include "fuzz_model.hpp"

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
  if (!normkit::fuzz::accepted([&] { spec.size(); })) return 0;
  if (spec.size().training_bytes(2) > normkit::fuzz::kModelBudget) return 0;
  for (const auto format : {nn::MemoryFormat::channels_first, nn::MemoryFormat::channels_last}) {
    std::unique_ptr<nn::Model> model;
    if (normkit::fuzz::accepted([&] { model = std::make_unique<nn::Model>(spec, format); }))
      normkit::fuzz::exercise_model(*model);
  }
  return 0;
}
