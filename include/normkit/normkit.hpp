#pragma once
// normkit: normalization layers for CPUs, exact against PyTorch and deterministic.
#include "normkit/batch_norm.hpp"
#include "normkit/bn_variants.hpp"
#include "normkit/batch_norm_fused.hpp"
#include "normkit/error.hpp"
#include "normkit/fold.hpp"
#include "normkit/layer_norm.hpp"
#include "normkit/group_norm.hpp"
#include "normkit/moments.hpp"
#include "normkit/standardizer.hpp"
#include "normkit/tensor.hpp"
#include "normkit/threading.hpp"
#include "normkit/version.hpp"
