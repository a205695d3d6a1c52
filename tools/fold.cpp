// `normkit fold CHECKPOINT --out FOLDED.nkc`: the checkpoint's model with every
// batchnorm that directly follows a linear or conv layer folded into it
// (normkit/engine/nn_fold.hpp), for inference. The folded checkpoint keeps the run's
// standardizer and application data, so `normkit eval` finds the same test set.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <iostream>

#include "cli.hpp"
#include "normkit/engine/nn_fold.hpp"

namespace normkit::cli {

CLI::App* add_fold_command(CLI::App& app, FoldFlags& f) {
  auto* fold = app.add_subcommand(
      "fold", "fold each batchnorm that directly follows a linear or conv layer into that layer "
              "(inference: same outputs, fewer parameters) and save the result as a checkpoint");
  fold->add_option("checkpoint", f.checkpoint, "a checkpoint file (OUT/checkpoint.nkc)")->required();
  fold->add_option("--out", f.out, "the folded checkpoint to write")->required();
  fold->add_flag("--overwrite", f.overwrite, "replace --out if it exists");
  fold->add_flag("--json", f.json, "machine-readable output");
  return fold;
}

int command_fold(const FoldFlags& f) {
  std::error_code ec;
  const auto status = fs::status(f.out, ec);
  if (fs::is_directory(status)) usage_error("--out '" + f.out.string() + "' is a directory, not a file");
  if (fs::exists(status) && !f.overwrite)
    usage_error("'" + f.out.string() + "' already exists: pass --overwrite to replace it");

  const io::Checkpoint original = io::load_checkpoint(f.checkpoint);
  const auto model = io::build_model(original);
  io::FoldedCheckpoint folded = io::fold_checkpoint(original);
  const auto folded_model = io::build_model(folded.checkpoint);

  // The run description the CLI stores: say where the folded model came from.
  json folded_layers = json::array(), kept_layers = json::array();
  for (const auto& b : folded.folded)
    folded_layers.push_back({{"batchnorm", b.batchnorm}, {"into", b.into}, {"folded_index", b.folded_index}});
  for (const auto& k : folded.kept)
    kept_layers.push_back({{"batchnorm", k.batchnorm}, {"after", k.after}, {"folded_index", k.folded_index}});
  if (!original.progress.application.empty()) {
    try {
      json app = json::parse(original.progress.application);
      if (app.is_object()) {
        app["folded"] = {{"from", f.checkpoint.string()},
                         {"original_spec", original.spec.to_string()},
                         {"folded", folded_layers}};
        folded.checkpoint.progress.application = app.dump();
      }
    } catch (const json::exception&) {
      // Not the CLI's JSON: the application's own data is kept as it was.
    }
  }
  io::save_checkpoint(f.out, folded.checkpoint);

  const int64_t before = model->parameter_count(), after = folded_model->parameter_count();
  if (f.json) {
    const json out = {{"checkpoint", f.checkpoint.string()},
                      {"out", f.out.string()},
                      {"folded", folded_layers},
                      {"kept", kept_layers},
                      {"parameters_before", before},
                      {"parameters_after", after},
                      {"spec", folded.checkpoint.spec.to_string()}};
    std::cout << out.dump(2) << '\n';
    return 0;
  }
  const auto& layers = model->layers();
  fmt::print("normkit fold: {} -> {}\n", f.checkpoint.string(), f.out.string());
  for (const auto& b : folded.folded)
    fmt::print("folded layer {} {} into layer {} {}\n", b.batchnorm, layers[b.batchnorm]->describe(),
               b.into, layers[b.into]->describe());
  for (const auto& k : folded.kept)
    fmt::print("kept   layer {} {}: it follows {}, not a linear or conv layer\n", k.batchnorm,
               layers[k.batchnorm]->describe(), k.after);
  if (folded.folded.empty() && folded.kept.empty()) fmt::print("no batchnorm layers to fold\n");
  fmt::print("batchnorm layers folded: {}, kept: {}\n", folded.folded.size(), folded.kept.size());
  fmt::print("parameters: {} -> {} ({:+})\n", before, after, after - before);
  fmt::print("spec: {}\n", folded.checkpoint.spec.to_string());
  fmt::print("saved {}\n", f.out.string());
  return 0;
}

}  // namespace normkit::cli
