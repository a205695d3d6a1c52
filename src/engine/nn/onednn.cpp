#include "nn/onednn.hpp"

#include <vector>

namespace normkit::nn::detail {

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::memory thread_scratchpad(const dnnl::memory::desc& desc) {
  thread_local std::vector<char> bytes;
  if (bytes.size() < desc.get_size()) bytes.resize(desc.get_size());
  return dnnl::memory(desc, cpu_engine(), bytes.data());
}

}  // namespace normkit::nn::detail
