#include "normkit/engine/shift.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "support.hpp"

namespace normkit::data {

using engine::fail_invalid;

namespace {

struct Name {
  Shift::Kind kind;
  const char* text;
};
constexpr Name kNames[] = {{Shift::Kind::none, "none"},
                           {Shift::Kind::noise, "noise"},
                           {Shift::Kind::contrast, "contrast"},
                           {Shift::Kind::brightness, "brightness"},
                           {Shift::Kind::salt_pepper, "saltpepper"}};

// splitmix64: the sample's own stream, from (seed, sample index) only.
struct Stream {
  uint64_t state;
  uint64_t next() {
    const uint64_t z = engine::splitmix64(state);
    state += engine::kSplitmix64Increment;
    return z;
  }
  double uniform() { return engine::unit_uniform(next()); }  // [0, 1)
  // Box-Muller with our own draws (std::normal_distribution's are not the same
  // on every standard library).
  double normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

// Clipped to [0, 1], rounded to an 8-bit level, scaled to [0, max] as the
// loaders scale a byte (level / 255.0f: the IDX loader's value, to the bit).
float pixel(double v, float max_value) {
  const float level = static_cast<float>(std::round(std::clamp(v, 0.0, 1.0) * 255.0));
  return max_value == 255.0f ? level : level / 255.0f * max_value;
}

}  // namespace

Shift Shift::parse(const std::string& text) {
  const auto colon = text.find(':');
  const std::string name = text.substr(0, colon);
  Shift s;
  const Name* found = nullptr;
  for (const Name& n : kNames)
    if (name == n.text) found = &n;
  if (!found)
    fail_invalid("shift '", text, "': expected none, noise:S, contrast:C, brightness:B or saltpepper:P");
  s.kind = found->kind;
  if (s.kind == Kind::none) {
    if (colon != std::string::npos) fail_invalid("shift '", text, "': none takes no severity");
    return s;
  }
  const std::string value = colon == std::string::npos ? "" : text.substr(colon + 1);
  char* end = nullptr;
  s.severity = value.empty() ? NAN : std::strtod(value.c_str(), &end);
  if (value.empty() || end != value.c_str() + value.size() || !std::isfinite(s.severity))
    fail_invalid("shift '", text, "': expected ", name, ":NUMBER (the severity)");
  const bool ok = s.kind == Kind::noise        ? s.severity >= 0
                  : s.kind == Kind::contrast   ? s.severity > 0
                  : s.kind == Kind::brightness ? std::abs(s.severity) <= 1
                                               : s.severity >= 0 && s.severity <= 1;
  if (!ok)
    fail_invalid("shift '", text, "': the severity must be ",
                 s.kind == Kind::noise        ? ">= 0 (the noise's standard deviation)"
                 : s.kind == Kind::contrast   ? "> 0 (the contrast factor)"
                 : s.kind == Kind::brightness ? "in [-1, 1] (added to every pixel)"
                                              : "in [0, 1] (the fraction of pixels)");
  return s;
}

std::string Shift::to_string() const {
  for (const Name& n : kNames)
    if (n.kind == kind) {
      if (kind == Kind::none) return n.text;
      char number[32];
      std::snprintf(number, sizeof number, "%g", severity);
      return std::string(n.text) + ":" + number;
    }
  return "none";
}

void apply_shift(Dataset& set, const Shift& shift, uint64_t seed, float max_value) {
  if (set.sample_shape.size() != 3)
    fail_invalid("input shifts apply to images ([C, H, W] samples), not to samples of ",
                 set.sample_shape.size(), " dimension(s)");
  if (!(max_value > 0)) fail_invalid("apply_shift: max_value must be positive, got ", max_value);
  if (shift.kind == Shift::Kind::none) return;
  const int64_t n = set.sample_size();
  const double scale = max_value;
  for (int64_t i = 0; i < set.count(); ++i) {
    float* x = set.features.data() + i * n;
    Stream rng{seed ^ (0x5b1f7ull + static_cast<uint64_t>(i) * 0xd1b54a32d192ed03ull)};
    // Each pixel as its 8-bit level over 255, so raw bytes and [0, 1] pixels
    // shift to the same levels (also where a result falls halfway between two).
    auto level = [&](int64_t j) { return std::round(std::clamp(x[j] / scale, 0.0, 1.0) * 255.0) / 255.0; };
    double mean = 0;
    if (shift.kind == Shift::Kind::contrast) {
      for (int64_t j = 0; j < n; ++j) mean += level(j);
      mean /= static_cast<double>(n);
    }
    for (int64_t j = 0; j < n; ++j) {
      const double v = level(j);
      double out = v;
      switch (shift.kind) {
        case Shift::Kind::noise: out = v + shift.severity * rng.normal(); break;
        case Shift::Kind::contrast: out = (v - mean) * shift.severity + mean; break;
        case Shift::Kind::brightness: out = v + shift.severity; break;
        case Shift::Kind::salt_pepper:
          // Two draws per pixel whatever the outcome, so pixel j's fate does not
          // depend on the pixels before it.
          if (const double u = rng.uniform(), w = rng.uniform(); u < shift.severity) out = w < 0.5 ? 0.0 : 1.0;
          break;
        case Shift::Kind::none: break;
      }
      x[j] = pixel(out, max_value);
    }
  }
}

}  // namespace normkit::data
