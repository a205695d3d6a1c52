#include "nn/onednn.hpp"

namespace normkit::nn::detail {

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

}  // namespace normkit::nn::detail
