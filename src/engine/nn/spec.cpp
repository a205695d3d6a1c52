// The model spec: a small text format, its presets and its BN-free twin.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>
#include <map>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "nn/layers.hpp"
#include "normkit/engine/nn.hpp"
#include "support.hpp"

namespace normkit::nn {

namespace {

std::vector<std::string> split_statements(const std::string& text) {
  std::vector<std::string> out;
  std::string current;
  for (const char ch : text) {
    if (ch == ';' || ch == '\n') {
      out.push_back(current);
      current.clear();
    } else {
      current += ch;
    }
  }
  out.push_back(current);
  return out;
}

std::optional<double> parse_number(const std::string& s) {
  try {
    size_t used = 0;
    const double value = std::stod(s, &used);
    if (used != s.size() || !std::isfinite(value)) return std::nullopt;
    return value;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

bool is_norm(const ModelSpec::LayerSpec& layer) {
  const detail::LayerKind* kind = detail::find_layer_kind(layer.type);
  return kind && kind->is_norm;
}
bool has_bias_option(const ModelSpec::LayerSpec& layer) {
  const detail::LayerKind* kind = detail::find_layer_kind(layer.type);
  return kind && std::find(kind->options.begin(), kind->options.end(), "bias") != kind->options.end();
}

// A JSON spec as the text form:
//   {"input": [1, 28, 28],
//    "layers": ["conv 32 3 pad=1 bias=0", {"type": "batchnorm", "options": {"momentum": 0.1}}, ...]}
// where a layer is a line of the text format or an object {type, args, options}
// (docs/model-spec.md).
std::string text_of_json(const std::string& text) {
  using json = nlohmann::ordered_json;  // options in the order written
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    engine::fail_invalid("model spec: not valid JSON: ", e.what());
  }
  std::string out = "input";
  // Appended piece by piece: GCC 12 warns falsely about " " + string.
  auto word = [](const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); };
  auto add = [&](const json& v) {
    out += ' ';
    out += word(v);
  };
  // A residual block is {"type": "residual", "body": [layers], "shortcut": [layers]}.
  std::function<void(const json&)> add_layers = [&](const json& layers) {
    if (!layers.is_array())
      engine::fail_invalid("model spec: JSON: \"layers\", \"body\" and \"shortcut\" must be lists");
    for (const auto& layer : layers) {
      out += '\n';
      if (layer.is_string()) {
        out += layer.get<std::string>();
        continue;
      }
      out += layer.at("type").get<std::string>();
      for (const auto& a : layer.value("args", json::array())) add(a);
      const json options = layer.value("options", json::object());  // items() needs it to live
      for (const auto& [key, value] : options.items()) {
        out += ' ';
        out += key;
        out += '=';
        out += word(value);
      }
      if (layer.contains("body") || layer.contains("shortcut")) {
        add_layers(layer.value("body", json::array()));
        if (layer.contains("shortcut")) {
          out += "\nshortcut";
          add_layers(layer.at("shortcut"));
        }
        out += "\nend";
      }
    }
  };
  try {
    for (const auto& d : j.at("input")) add(d);
    add_layers(j.at("layers"));
  } catch (const json::exception& e) {
    engine::fail_invalid("model spec: JSON: expected {\"input\": [...], \"layers\": [...]}: ", e.what());
  }
  return out;
}

}  // namespace

ModelSpec ModelSpec::parse(const std::string& text_or_json) {
  const auto first = text_or_json.find_first_not_of(" \t\r\n");
  const std::string text = first != std::string::npos && text_or_json[first] == '{'
                               ? text_of_json(text_or_json)
                               : text_or_json;
  ModelSpec spec;
  int statement = 0;
  // The residual blocks open at this statement, innermost last.
  struct OpenBlock {
    LayerSpec* block;
    bool shortcut;  // statements go to its shortcut (else to its body)
    int statement;
  };
  std::vector<OpenBlock> open;
  for (std::string line : split_statements(text)) {
    ++statement;
    if (const auto hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    std::string type;
    if (!(words >> type)) continue;
    std::transform(type.begin(), type.end(), type.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    LayerSpec layer{type, {}, {}, {}, {}};
    for (std::string word; words >> word;) {
      if (const auto eq = word.find('='); eq != std::string::npos)
        layer.options[word.substr(0, eq)] = word.substr(eq + 1);
      else
        layer.args.push_back(word);
    }
    auto fail = [&](const auto&... parts) {
      engine::fail_invalid("model spec, statement ", statement, " ('", type, "'): ", parts...);
    };
    std::vector<LayerSpec>& target =
        open.empty() ? spec.layers : open.back().shortcut ? open.back().block->shortcut : open.back().block->body;
    if (type == "shortcut" || type == "end") {
      if (!layer.args.empty() || !layer.options.empty()) fail("takes no arguments or options");
      if (open.empty()) fail("'", type, "' outside a residual block");
      OpenBlock& block = open.back();
      if (type == "shortcut") {
        if (block.shortcut) fail("the block already has its shortcut");
        if (block.block->body.empty()) fail("the residual block has no layers before its shortcut");
        block.shortcut = true;
        continue;
      }
      if (block.block->body.empty()) fail("the residual block has no layers");
      if (block.shortcut && block.block->shortcut.empty())
        fail("the shortcut has no layers (leave 'shortcut' out for the identity)");
      open.pop_back();
      continue;
    }
    auto number = [&](const std::string& s) {
      const std::optional<double> value = parse_number(s);
      if (!value) fail("'", s, "' is not a number");
      return *value;
    };
    if (type == "input") {
      if (!open.empty()) fail("input inside a residual block");
      if (!spec.input_shape.empty()) fail("input given twice");
      if (layer.args.size() != 1 && layer.args.size() != 3)
        fail("input takes C, or C H W");
      for (const auto& a : layer.args) {
        const double v = number(a);
        // (the range first: converting a double beyond int64_t is undefined)
        if (v < 1 || v > 1e7 || v != std::floor(v)) fail("bad input size ", a);
        spec.input_shape.push_back(static_cast<int64_t>(v));
      }
      continue;
    }
    const detail::LayerKind* kind = detail::find_layer_kind(type);
    if (!kind) {
      std::string known = "input";
      for (const detail::LayerKind& k : detail::layer_kinds()) known += std::string(", ") + k.type;
      fail("unknown layer type; the layer types are ", known,
           " (with its 'shortcut' and 'end'; see docs/model-spec.md)");
    }
    if (layer.args.size() < kind->min_args || layer.args.size() > kind->max_args)
      fail("expected ", kind->min_args, kind->min_args == kind->max_args ? "" : "+",
           " arguments, got ", layer.args.size());
    // Sizes, strides, padding and the bias switch are whole numbers (the layers
    // would truncate "linear 10.5" to 10 while the spec still says 10.5).
    auto whole = [&](const std::string& s) {
      const double v = number(s);
      if (v != std::floor(v) || std::abs(v) > 1e9) fail("'", s, "' is not a whole number (up to 10^9)");
      return v;
    };
    for (const auto& a : layer.args) type == "dropout" ? number(a) : whole(a);
    for (const auto& [key, value] : layer.options) {
      if (std::find(kind->options.begin(), kind->options.end(), key) == kind->options.end()) {
        std::string known;
        for (const auto& o : kind->options) known += (known.empty() ? "" : ", ") + o + "=";
        fail("unknown option '", key, "' (", type, known.empty() ? " takes no options" : " takes " + known, ")");
      }
      if (key == "eps" || key == "momentum" || key == "rmax" || key == "dmax" || key == "noise") {
        number(value);
      } else if (const double v = whole(value);
                 (key == "bias" || key == "frozen" || key == "affine" || key == "track_running_stats") &&
                 v != 0 && v != 1) {
        fail(key, " must be 0 or 1, got ", value);
      } else if (key == "groups" && v < 1) {
        fail("groups must be >= 1, got ", value);
      }
    }
    target.push_back(std::move(layer));
    // The block's address is stable: until its 'end', statements go into it.
    if (type == "residual") open.push_back({&target.back(), false, statement});
  }
  if (!open.empty())
    engine::fail_invalid("model spec, statement ", open.back().statement,
                         " ('residual'): the block has no 'end'");
  if (spec.input_shape.empty()) engine::fail_invalid("model spec: missing 'input C [H W]'");
  if (spec.layers.empty()) engine::fail_invalid("model spec: no layers");
  return spec;
}

ModelSpec ModelSpec::preset(const std::string& name) {
  if (name == "mlp-paper")  // Ioffe & Szegedy 2015, section 4.1: 3 x 100 sigmoid units, BN before each sigmoid
    return parse(
        "input 1 28 28; flatten;"
        "linear 100 bias=0; batchnorm; sigmoid;"
        "linear 100 bias=0; batchnorm; sigmoid;"
        "linear 100 bias=0; batchnorm; sigmoid;"
        "linear 10");
  if (name == "cnn-small")
    return parse(
        "input 1 28 28;"
        "conv 32 3 pad=1 bias=0; batchnorm; relu; maxpool 2;"
        "conv 64 3 pad=1 bias=0; batchnorm; relu; maxpool 2;"
        "flatten; linear 128 bias=0; batchnorm; relu; linear 10");
  engine::fail_invalid("unknown model preset '", name, "'; expected mlp-paper or cnn-small");
}

ModelSpec ModelSpec::mlp(const std::string& options, const std::vector<int64_t>& input_shape,
                         int64_t classes) {
  std::map<std::string, std::string> o = {{"depth", "3"},  {"width", "100"},    {"act", "relu"},
                                          {"bn", "before"}, {"dropout", "0"}, {"input_bn", "0"}};
  std::string item;
  std::istringstream in(options);
  while (std::getline(in, item, ',')) {
    if (item.empty()) continue;
    const auto eq = item.find('=');
    const std::string key = item.substr(0, eq);
    if (eq == std::string::npos || !o.contains(key))
      engine::fail_invalid("mlp: expected key=value with keys depth, width, act, bn, dropout, input_bn; got '",
                           item, "'");
    o[key] = item.substr(eq + 1);
  }
  auto whole = [&](const std::string& key, double lo, double hi) {
    const std::optional<double> v = parse_number(o[key]);
    if (!v || *v != std::floor(*v) || *v < lo || *v > hi)
      engine::fail_invalid("mlp: ", key, " must be a whole number in [", lo, ", ", hi, "], got '", o[key], "'");
    return static_cast<int64_t>(*v);
  };
  const int64_t depth = whole("depth", 0, 1000), width = whole("width", 1, 1e6);
  const int64_t input_bn = whole("input_bn", 0, 1);
  const std::optional<double> dropout = parse_number(o["dropout"]);
  if (!dropout || *dropout < 0 || *dropout >= 1)
    engine::fail_invalid("mlp: dropout must be in [0, 1), got '", o["dropout"], "'");
  const std::string& act = o["act"];
  if (act != "relu" && act != "sigmoid" && act != "tanh")
    engine::fail_invalid("mlp: act must be relu, sigmoid or tanh, got '", act, "'");
  const std::string& bn = o["bn"];
  if (bn != "before" && bn != "after" && bn != "none")
    engine::fail_invalid("mlp: bn must be before, after (the activation) or none, got '", bn, "'");
  if (input_shape.empty() || classes < 2)
    engine::fail_invalid("mlp: needs the data's sample shape and at least 2 classes");
  std::ostringstream text;
  text << "input";
  for (const auto d : input_shape) text << ' ' << d;
  text << "; flatten;";
  if (input_bn) text << " batchnorm;";
  for (int64_t l = 0; l < depth; ++l) {
    // A bias before BN is redundant (BN's β takes its place); after the
    // activation it is not.
    if (bn == "before")
      text << " linear " << width << " bias=0; batchnorm; " << act << ";";
    else if (bn == "after")
      text << " linear " << width << "; " << act << "; batchnorm;";
    else
      text << " linear " << width << "; " << act << ";";
    if (*dropout > 0) text << " dropout " << o["dropout"] << ";";
  }
  text << " linear " << classes;
  return parse(text.str());
}

namespace {
void write_layers(std::ostringstream& out, const std::vector<ModelSpec::LayerSpec>& layers) {
  for (const auto& layer : layers) {
    out << "; " << layer.type;
    for (const auto& a : layer.args) out << ' ' << a;
    for (const auto& [key, value] : layer.options) out << ' ' << key << '=' << value;
    if (layer.type != "residual") continue;
    write_layers(out, layer.body);
    if (!layer.shortcut.empty()) {
      out << "; shortcut";
      write_layers(out, layer.shortcut);
    }
    out << "; end";
  }
}
}  // namespace

std::string ModelSpec::to_string() const {
  std::ostringstream out;
  out << "input";
  for (const auto d : input_shape) out << ' ' << d;
  write_layers(out, layers);
  return out.str();
}

namespace {
std::vector<ModelSpec::LayerSpec> without_norms(const std::vector<ModelSpec::LayerSpec>& layers) {
  std::vector<ModelSpec::LayerSpec> out;
  for (const auto& layer : layers) {
    if (is_norm(layer)) {
      if (!out.empty() && has_bias_option(out.back())) out.back().options.erase("bias");  // default: with bias
      continue;
    }
    out.push_back(layer);
    out.back().body = without_norms(layer.body);
    out.back().shortcut = without_norms(layer.shortcut);
  }
  return out;
}
}  // namespace

ModelSpec ModelSpec::without_batch_norm() const {
  ModelSpec out;
  out.input_shape = input_shape;
  out.layers = without_norms(layers);
  return out;
}

const std::vector<std::string>& ModelSpec::norm_kinds() {
  static const std::vector<std::string> kinds = {"batch", "none",  "frozen", "renorm",  "ghost",
                                                 "layer", "group", "instance", "noisy"};
  return kinds;
}

namespace {

// What with_norm needs to know about the activation at a point of the model:
// whether it is flat ([N, C]: instance norm has nothing to normalize there, one
// value per channel and sample) and its channels (for groupnorm's groups).
struct Activation {
  bool flat;
  int64_t channels;
};

std::vector<ModelSpec::LayerSpec> replace_norms(const std::vector<ModelSpec::LayerSpec>& layers,
                                                const std::string& norm, Activation& at) {
  static const std::map<std::string, std::string> layer_type = {
      {"frozen", "batchnorm"},      {"renorm", "batchrenorm"}, {"ghost", "ghostbatchnorm"},
      {"layer", "layernorm"},       {"group", "groupnorm"},    {"instance", "instancenorm"},
      {"noisy", "batchnorm"}};
  std::vector<ModelSpec::LayerSpec> out;
  for (const auto& layer : layers) {
    if (layer.type == "flatten" || layer.type == "linear") at.flat = true;
    if ((layer.type == "linear" || layer.type == "conv") && !layer.args.empty())
      at.channels = detail::int_arg(layer.args[0]);
    if (layer.type == "residual") {
      Activation shortcut_at = at;
      out.push_back(layer);
      out.back().body = replace_norms(layer.body, norm, at);  // the block's output is its body's
      out.back().shortcut = replace_norms(layer.shortcut, norm, shortcut_at);
      continue;
    }
    if (layer.type != "batchnorm") {
      out.push_back(layer);
      continue;
    }
    if (norm == "instance" && at.flat) {
      // Dropped, as --norm none would: the layer before it gets its bias back.
      if (!out.empty() && has_bias_option(out.back())) out.back().options.erase("bias");
      continue;
    }
    ModelSpec::LayerSpec replaced{layer_type.at(norm), {}, {}, {}, {}};
    const auto& allowed = detail::find_layer_kind(replaced.type)->options;
    for (const auto& [key, value] : layer.options)
      if (std::find(allowed.begin(), allowed.end(), key) != allowed.end()) replaced.options[key] = value;
    // (insert_or_assign, not operator=: GCC 12 warns falsely about assigning "1" here)
    if (norm == "frozen") replaced.options.insert_or_assign("frozen", std::string(1, '1'));
    if (norm == "noisy" && !replaced.options.contains("noise"))
      replaced.options.insert_or_assign("noise", std::string(1, '1'));
    // GroupNorm's usual 32 groups, or the most groups up to 32 that divide the
    // channels (mlp-paper's 100 features: 25 groups of 4). On flat features a
    // group of one channel has one value per sample and normalizes to β alone,
    // so groups there hold at least two channels.
    if (norm == "group" && at.channels > 0) {
      int64_t groups = std::max<int64_t>(1, std::min<int64_t>(32, at.flat ? at.channels / 2 : at.channels));
      while (at.channels % groups != 0) --groups;
      replaced.options.insert_or_assign("groups", std::to_string(groups));
    }
    out.push_back(std::move(replaced));
  }
  return out;
}

}  // namespace

ModelSpec ModelSpec::with_norm(const std::string& norm) const {
  if (norm == "none") return without_batch_norm();
  if (std::find(norm_kinds().begin(), norm_kinds().end(), norm) == norm_kinds().end())
    engine::fail_invalid("unknown normalization '", norm, "'; expected one of batch, none, frozen, renorm, "
                         "ghost, layer, group, instance, noisy");
  if (norm == "batch") return *this;
  ModelSpec out;
  out.input_shape = input_shape;
  Activation at{input_shape.size() == 1, input_shape.empty() ? 0 : input_shape[0]};
  out.layers = replace_norms(layers, norm, at);
  return out;
}

}  // namespace normkit::nn
