#pragma once
// Shifted copies of an image data set, for testing robustness to a change of
// the input distribution (and adapting batch-norm statistics to it): additive
// Gaussian noise, contrast, brightness, salt-and-pepper noise, each at a
// severity, drawn reproducibly from a seed.
//
// Pixels live in [0, max] (max = 1 for the IDX loader's scaling, 255 for raw
// bytes) and are taken as 8-bit levels (an IDX image's bytes: other values are
// rounded to the nearest level first). Every shift is computed on pixels
// scaled to [0, 1], then clipped to
// [0, 1] and rounded to the nearest multiple of 1/255 — what an 8-bit image can
// hold — so a shifted set written as IDX files (`normkit shift`) and the same
// shift applied on the fly (`normkit eval --shift`) give the same pixels.
//   noise:S       x + S·z, z ~ N(0, 1) per pixel (S >= 0; ImageNet-C's Gaussian noise)
//   contrast:C    (x − m)·C + m, m the image's mean (C > 0; < 1 lowers the contrast; ImageNet-C's)
//   brightness:B  x + B (−1 <= B <= 1)
//   saltpepper:P  each pixel, with probability P, becomes 0 or 1 (even odds) (0 <= P <= 1)
//   none          unchanged
// The draws of sample i depend only on (seed, i), never on threads or on the
// other samples.
#include <cstdint>
#include <string>

#include "normkit/engine/data.hpp"

namespace normkit::data {

struct Shift {
  enum class Kind { none, noise, contrast, brightness, salt_pepper };
  Kind kind = Kind::none;
  double severity = 0;

  // "noise:0.2", "contrast:0.5", "brightness:0.2", "saltpepper:0.05", "none";
  // normkit::Error (invalid argument) naming the text for anything else.
  static Shift parse(const std::string& text);
  std::string to_string() const;  // parse(to_string()) == *this
  bool operator==(const Shift&) const = default;
};

// Applies `shift` to every sample of an image set (sample shape [C, H, W])
// whose pixels lie in [0, max_value]. normkit::Error (invalid argument) for a
// table (CSV features are not pixels) or a non-positive max_value.
void apply_shift(Dataset& set, const Shift& shift, uint64_t seed, float max_value = 1.0f);

}  // namespace normkit::data
