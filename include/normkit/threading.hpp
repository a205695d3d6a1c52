#pragma once
// The number of threads normkit's kernels use. Results never depend on it:
// work is split into pieces whose boundaries depend only on the problem, and
// partial results are combined in a fixed order.
namespace normkit {

// n >= 1; throws normkit::Error otherwise. The default is OpenMP's maximum.
void set_num_threads(int n);
int num_threads() noexcept;

}  // namespace normkit
