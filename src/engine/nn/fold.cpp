// Folding a model's batchnorm layers into the linear/conv layers before them
// (normkit/engine/nn_fold.hpp). The model is walked once, building the folded layer
// list with its values; the folded Model is then built from that spec and
// filled by parameter and buffer name, so it holds exactly what a checkpoint of
// it would.
#include "normkit/engine/nn_fold.hpp"

#include <map>
#include <string>

#include "normkit/fold.hpp"
#include "support.hpp"

namespace normkit::nn {

namespace {

struct PendingLayer {
  ModelSpec::LayerSpec spec;
  size_t original;
  std::map<std::string, std::vector<float>> values;  // parameters and buffers by name
};

std::map<std::string, std::vector<float>> values_of(Layer& layer) {
  std::map<std::string, std::vector<float>> out;
  for (auto* p : layer.parameters()) out[p->name] = p->value;
  for (auto& b : layer.buffers()) out[b.name] = *b.values;
  return out;
}

bool takes_folding(const ModelSpec::LayerSpec& spec) {
  return spec.type == "linear" || spec.type == "conv";
}

const std::vector<float>& value(const std::map<std::string, std::vector<float>>& values,
                                const std::string& name, size_t layer) {
  const auto it = values.find(name);
  if (it == values.end())
    engine::fail_runtime("fold: layer ", layer, " has no '", name, "'");
  return it->second;
}

// Folds batchnorm `bn` (its spec and values) into `target` in place.
void fold_into(PendingLayer& target, const ModelSpec::LayerSpec& bn_spec,
               const std::map<std::string, std::vector<float>>& bn, size_t bn_index) {
  const auto eps_option = bn_spec.options.find("eps");
  const double eps = eps_option == bn_spec.options.end() ? 1e-5 : std::stod(eps_option->second);
  const auto& mean = value(bn, "running_mean", bn_index);
  std::vector<float>& weight = target.values.at("weight");
  const auto bias = target.values.find("bias");
  std::vector<float> folded_bias(mean.size());
  try {
    fold_batch_norm<float>(weight,
                           bias == target.values.end() ? std::span<const float>() : bias->second,
                           value(bn, "weight", bn_index), value(bn, "bias", bn_index), mean,
                           value(bn, "running_var", bn_index), eps, weight, folded_bias);
  } catch (const Error& e) {
    // The model's own values cannot be folded: a problem of the data, not of the call.
    throw Error(ErrorKind::runtime, engine::concat("fold: batchnorm ", bn_index, " into layer ",
                                                            target.original, ": ", e.what()));
  }
  target.values["bias"] = std::move(folded_bias);
  target.spec.options.insert_or_assign("bias", std::string("1"));
}

}  // namespace

FoldResult fold_batch_norms(Model& model) {
  const ModelSpec& spec = model.spec();
  FoldResult result;
  std::vector<PendingLayer> pending;
  for (size_t i = 0; i < spec.layers.size(); ++i) {
    const auto& layer_spec = spec.layers[i];
    auto values = values_of(*model.layers()[i]);
    // Batch renorm and ghost BN infer exactly as BN does (running statistics,
    // γ, β), so they fold the same way; so does a frozen BN.
    if (layer_spec.type == "batchnorm" || layer_spec.type == "batchrenorm" ||
        layer_spec.type == "ghostbatchnorm") {
      if (!pending.empty() && takes_folding(pending.back().spec)) {
        fold_into(pending.back(), layer_spec, values, i);
        result.folded.push_back({i, pending.back().original, pending.size() - 1});
        continue;
      }
      result.kept.push_back({i, pending.size(), i == 0 ? "input" : spec.layers[i - 1].type});
    }
    pending.push_back({layer_spec, i, std::move(values)});
  }

  ModelSpec folded_spec;
  folded_spec.input_shape = spec.input_shape;
  for (const auto& p : pending) folded_spec.layers.push_back(p.spec);
  result.model = std::make_unique<Model>(folded_spec, model.format());
  for (size_t j = 0; j < pending.size(); ++j) {
    Layer& layer = *result.model->layers()[j];
    auto fill = [&](const std::string& name, std::vector<float>& target) {
      const auto& source = value(pending[j].values, name, pending[j].original);
      if (source.size() != target.size())
        engine::fail_runtime("fold: '", name, "' of layer ", pending[j].original, " has ",
                                      source.size(), " values, the folded layer ", target.size());
      target = source;
    };
    for (auto* p : layer.parameters()) fill(p->name, p->value);
    for (auto& b : layer.buffers()) fill(b.name, *b.values);
  }
  return result;
}

}  // namespace normkit::nn

namespace normkit::io {

FoldedCheckpoint fold_checkpoint(const Checkpoint& checkpoint) {
  const auto model = build_model(checkpoint);
  nn::FoldResult folded = nn::fold_batch_norms(*model);
  return {make_checkpoint(*folded.model, nullptr, checkpoint.standardizer, checkpoint.progress),
          std::move(folded.folded), std::move(folded.kept)};
}

}  // namespace normkit::io
