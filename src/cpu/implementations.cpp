// Every fast path of every op, in the order the dispatcher tries them
// (core/dispatch.hpp): the first entry whose decline() accepts the problem
// runs; when all decline, and for double data, the reference (src/ref/) does.
// The forms: planes = channels-first with contiguous inner runs, rows =
// contiguous channels (docs/design.md, glossary). A new fast path is one entry
// here (src/cpu/README.md has the recipe).
#include "cpu/implementations.hpp"

namespace normkit::kernels {

// batch_norm_forward_training, _forward_apply, _forward_inference, _backward,
// _moments, and the variants built on them (bn_variants.hpp).
std::span<const bn::Impl> bn::implementations() {
  static const bn::Impl list[] = {bn::kPlanes, bn::kRows};
  return list;
}

// batch_norm_relu_* and batch_norm_add_relu_*.
std::span<const bn_fused::Impl> bn_fused::implementations() {
  static const bn_fused::Impl list[] = {bn_fused::kPlanes, bn_fused::kRows};
  return list;
}

// group_norm_* and instance_norm_* (but instance_norm_forward_inference, which
// is batch norm's).
std::span<const gn::Impl> gn::implementations() {
  static const gn::Impl list[] = {gn::kPlanes, gn::kRows};
  return list;
}

// layer_norm_* and rms_norm_*.
std::span<const ln::Impl> ln::implementations() {
  static const ln::Impl list[] = {ln::kRows};
  return list;
}

}  // namespace normkit::kernels
