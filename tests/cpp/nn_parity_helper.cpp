// Test helper for tests/python/test_nn_torch_parity.py: runs a model given by
// the test (spec, weights, batch) through the engine and writes what PyTorch is
// compared against.
//
//   nn_parity_helper IN OUT
//
// Both files are a sequence of records "NAME COUNT\n" followed by COUNT
// little-endian float32 values; the record "spec" holds COUNT bytes of text.
// IN:  spec, format [0 channels-first | 1 channels-last],
//      sgd [lr, momentum, weight_decay, nesterov], steps [k],
//      x_shape [N, C, H, W] or [N, F], x (logical NCHW order), labels,
//      state.NAME for every parameter and buffer of the model ("3.weight").
// OUT: per step s (0-based; forward in train mode, cross-entropy, backward, one
//      SGD step): step<s>.logits, step<s>.loss, step<s>.grad.NAME; then
//      final.NAME (parameters and buffers after the last step) and eval.logits
//      (forward in eval mode after the last step).
// Exit status 0 on success; 1 with a message on stderr otherwise.
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "normkit/engine/nn.hpp"
#include "normkit/error.hpp"

namespace {

using normkit::nn::MemoryFormat;
using normkit::nn::Tensor;

static_assert(std::endian::native == std::endian::little, "records are little-endian float32");

struct Records {
  std::string spec;
  std::map<std::string, std::vector<float>> arrays;
};

Records read_records(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  Records r;
  std::string header;
  while (std::getline(in, header)) {
    std::istringstream words(header);
    std::string name;
    size_t count = 0;
    if (!(words >> name >> count)) throw std::runtime_error("bad record header '" + header + "'");
    if (name == "spec") {
      r.spec.resize(count);
      in.read(r.spec.data(), static_cast<std::streamsize>(count));
    } else {
      auto& values = r.arrays[name];
      values.resize(count);
      in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(count * sizeof(float)));
    }
    if (!in) throw std::runtime_error("truncated record " + name);
  }
  return r;
}

class Writer {
 public:
  explicit Writer(const std::string& path) : out_(path, std::ios::binary) {
    if (!out_) throw std::runtime_error("cannot write " + path);
  }
  void put(const std::string& name, const std::vector<float>& values) {
    out_ << name << ' ' << values.size() << '\n';
    out_.write(reinterpret_cast<const char*>(values.data()),
               static_cast<std::streamsize>(values.size() * sizeof(float)));
  }
  void close() {
    out_.close();
    if (!out_) throw std::runtime_error("write failed");
  }

 private:
  std::ofstream out_;
};

const std::vector<float>& need(const Records& r, const std::string& name) {
  const auto it = r.arrays.find(name);
  if (it == r.arrays.end()) throw std::runtime_error("missing record " + name);
  return it->second;
}

// Logical NCHW values into a tensor in `format`.
Tensor batch_tensor(const std::vector<int64_t>& shape, MemoryFormat format, const std::vector<float>& x) {
  Tensor t;
  if (shape.size() != 4) {
    t.reshape(shape, MemoryFormat::channels_first);
    t.data = x;
    return t;
  }
  t.reshape(shape, format);
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < H * W; ++p) {
        const int64_t at = format == MemoryFormat::channels_first ? (n * C + c) * H * W + p
                                                                  : (n * H * W + p) * C + c;
        t.data[at] = x[(n * C + c) * H * W + p];
      }
  return t;
}

int run(const std::string& in_path, const std::string& out_path) {
  const Records in = read_records(in_path);
  const auto spec = normkit::nn::ModelSpec::parse(in.spec);
  const MemoryFormat format = need(in, "format").at(0) != 0 ? MemoryFormat::channels_last
                                                            : MemoryFormat::channels_first;
  normkit::nn::Model model(spec, format);
  for (auto& [name, values] : model.state()) {
    const auto& given = need(in, "state." + name);
    if (given.size() != values->size())
      throw std::runtime_error("state." + name + ": " + std::to_string(given.size()) + " values for " +
                               std::to_string(values->size()));
    *values = given;
  }
  const auto& sgd_options = need(in, "sgd");
  normkit::nn::SgdOptions options;
  options.lr = sgd_options.at(0);
  options.momentum = sgd_options.at(1);
  options.weight_decay = sgd_options.at(2);
  options.nesterov = sgd_options.at(3) != 0;
  const auto parameters = model.parameters();
  auto sgd = normkit::nn::make_sgd(options, parameters);

  std::vector<int64_t> shape;
  for (const float d : need(in, "x_shape")) shape.push_back(static_cast<int64_t>(d));
  const Tensor x = batch_tensor(shape, format, need(in, "x"));
  std::vector<int32_t> labels;
  for (const float l : need(in, "labels")) labels.push_back(static_cast<int32_t>(l));

  // Parameter names in the order of model.parameters().
  std::vector<std::string> names;
  for (size_t i = 0; i < model.layers().size(); ++i)
    for (auto* p : model.layers()[i]->parameters()) names.push_back(std::to_string(i) + "." + p->name);

  Writer out(out_path);
  const int steps = static_cast<int>(need(in, "steps").at(0));
  Tensor dlogits;
  for (int s = 0; s < steps; ++s) {
    const std::string prefix = "step" + std::to_string(s) + ".";
    const Tensor& logits = model.forward(x, normkit::nn::Mode::train);
    out.put(prefix + "logits", logits.data);
    const auto loss = normkit::nn::softmax_cross_entropy(logits, labels.data(), &dlogits);
    out.put(prefix + "loss", {static_cast<float>(loss.loss)});
    model.zero_grad();
    model.backward(dlogits);
    for (size_t k = 0; k < parameters.size(); ++k) out.put(prefix + "grad." + names[k], parameters[k]->grad);
    sgd->step(parameters);
  }
  for (auto& [name, values] : model.state()) out.put("final." + name, *values);
  out.put("eval.logits", model.forward(x, normkit::nn::Mode::eval).data);
  out.close();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  try {
    return run(argv[1], argv[2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nn_parity_helper: %s\n", e.what());
    return 1;
  }
}
