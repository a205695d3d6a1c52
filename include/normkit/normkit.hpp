#pragma once
// normkit: normalization layers for CPUs, exact against PyTorch and deterministic.
#include "normkit/batch_norm.hpp"
#include "normkit/error.hpp"
#include "normkit/group_norm.hpp"
#include "normkit/moments.hpp"
#include "normkit/tensor.hpp"
#include "normkit/threading.hpp"
#include "normkit/version.hpp"
