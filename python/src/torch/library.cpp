// libnormkit_torch: normkit's ops registered with PyTorch's dispatcher as the
// `normkit` library (torch.ops.normkit.*), loaded by normkit.torch. Each family's
// file defines its ops (TORCH_LIBRARY_FRAGMENT) with a CPU kernel (normkit's) and an
// autograd kernel (autograd.hpp); Python adds the ONNX export and the modules.
#include <torch/library.h>

TORCH_LIBRARY(normkit, m) { static_cast<void>(m); }  // the ops: each family's fragment
