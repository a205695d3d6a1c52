// `normkit lab`: the claims lab. An experiment is a declaration in
// experiments/NAME.json (claim, published result, arms, grid, seeds, tiers,
// what is recorded, the verdict's criterion); `lab run` expands it into runs
// and executes each as a child `normkit train --threads T`, J at a time;
// `lab report` (tools/lab/report.py) turns the runs into figures, report
// sections, verdicts, LAB.md and lab.html.
//
// OUT/NAME/experiment.json  the declaration as run (tier resolved)
// OUT/NAME/runs.jsonl       one record per finished run (its outcome; a run is
//                           finished only when its record is written)
// OUT/NAME/runs/ID/         the run: metrics.jsonl, steps.jsonl, run.json, train.log
// A run without a record (interrupted) is started again from scratch.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <deque>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli.hpp"

namespace normkit::cli {

namespace {

json read_json_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) runtime_error("cannot read '" + path.string() + "'");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    runtime_error(path.string() + ": not valid JSON: " + e.what());
  }
}

// The declarations in `dir`, by name.
std::map<std::string, json> load_experiments(const fs::path& dir) {
  std::map<std::string, json> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) runtime_error("no experiments directory '" + dir.string() + "'");
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".json") continue;
    json e = read_json_file(entry.path());
    const std::string name = entry.path().stem().string();
    if (!e.is_object() || e.value("name", "") != name)
      runtime_error(entry.path().string() + ": its \"name\" must be the file's name ('" + name + "')");
    for (const char* key : {"title", "claim", "published", "arms", "criterion", "analysis"})
      if (!e.contains(key))
        runtime_error(entry.path().string() + ": missing \"" + key + "\"");
    out[name] = std::move(e);
  }
  return out;
}

// The declaration with a tier applied: the tier's "seeds", "arms" (names to
// keep), "grid" (keys replaced), "train" (options merged) and "evaluate"
// (replaced; an arm's own stays) override the base.
json resolve_tier(const json& e, const std::string& tier, int seeds_override) {
  json r = e;
  r.erase("tiers");
  r["tier"] = tier;
  const json t = e.contains("tiers") ? e["tiers"].value(tier, json::object()) : json::object();
  if (t.contains("seeds")) r["seeds"] = t["seeds"];
  if (t.contains("train")) r["train"].update(t["train"]);
  if (t.contains("evaluate")) r["evaluate"] = t["evaluate"];
  // A tier's grid replaces those keys in the base grid and in every arm's own grid.
  if (t.contains("grid"))
    for (const auto& [key, values] : t["grid"].items()) {
      r["grid"][key] = values;
      for (auto& arm : r["arms"])
        if (arm.contains("grid") && arm["grid"].contains(key)) arm["grid"][key] = values;
    }
  if (t.contains("arms")) {
    json kept = json::array();
    for (const auto& arm : r["arms"])
      for (const auto& name : t["arms"])
        if (arm["name"] == name) kept.push_back(arm);
    r["arms"] = kept;
  }
  if (seeds_override > 0) r["seeds"] = seeds_override;
  if (!r.contains("seeds") || !r["seeds"].is_number_integer() || r["seeds"].get<int>() < 1)
    runtime_error("experiment " + e["name"].get<std::string>() + ": \"seeds\" must be a whole number >= 1");
  if (r["arms"].empty()) runtime_error("experiment " + e["name"].get<std::string>() + ": no arms in tier " + tier);
  return r;
}

struct RunSpec {
  std::string experiment, id, arm;
  json grid, train;  // the grid point; all train options of the run
  int seed = 1;
  fs::path dir;      // OUT/NAME/runs/ID
  // `normkit eval CHECKPOINT --json ...` after training (the declaration's
  // "evaluate" arguments), its output in the record's "evals"; empty: none.
  std::vector<std::string> evaluate;
};

std::string value_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_float()) return fmt::format("{:g}", v.get<double>());
  return v.dump();
}

// A file-name-safe run id: arm, grid values, seed.
std::string run_id(const std::string& arm, const json& point, int seed) {
  std::string id = arm;
  for (const auto& [key, value] : point.items()) id += "_" + key + value_text(value);
  id += "_s" + std::to_string(seed);
  for (char& c : id)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != '_') c = '-';
  return id;
}

// Every run of a resolved declaration: arms × grid points × seeds.
// An arm may have its own "grid" instead of the experiment's. Keys listed
// together in "zip" (e.g. [["batch_size", "lr"]]: a learning rate per batch
// size) advance together, as one axis; their lists must be equally long.
std::vector<json> grid_points(const json& grid, const json& zip, const std::string& experiment) {
  std::vector<json> points = {json::object()};
  std::set<std::string> done;
  for (const auto& [key, values] : grid.items()) {
    if (done.contains(key)) continue;
    std::vector<std::string> axis = {key};
    for (const auto& group : zip)
      if (std::find(group.begin(), group.end(), key) != group.end()) {
        axis.clear();
        for (const auto& k : group) axis.push_back(k.get<std::string>());
      }
    for (const auto& k : axis) {
      if (!grid.contains(k) || grid[k].size() != values.size())
        runtime_error("experiment " + experiment + ": the zipped grid keys " + json(axis).dump() +
                      " need lists of the same length");
      done.insert(k);
    }
    std::vector<json> next;
    for (const auto& p : points)
      for (size_t i = 0; i < values.size(); ++i) {
        json q = p;
        for (const auto& k : axis) q[k] = grid[k][i];
        next.push_back(q);
      }
    points = next;
  }
  return points;
}

std::vector<RunSpec> expand(const json& r, const fs::path& exp_dir) {
  // The options of `normkit train` by their JSON names (and an inline spec).
  std::set<std::string> options_known = {"model_spec"};
  const json defaults = to_json(RunOptions{});
  for (const auto& [key, value] : defaults.items()) options_known.insert(key);
  std::vector<RunSpec> runs;
  for (const auto& arm : r["arms"])
    for (const auto& point : grid_points(arm.contains("grid") ? arm["grid"] : r.value("grid", json::object()),
                                         r.value("zip", json::array()), r["name"].get<std::string>()))
      // An arm may run fewer seeds than the experiment (an expensive model).
      for (int seed = 1; seed <= std::min(r["seeds"].get<int>(), arm.value("seeds", 1 << 30)); ++seed) {
        RunSpec run;
        run.experiment = r["name"];
        run.arm = arm["name"];
        run.grid = point;
        run.seed = seed;
        run.train = r.value("train", json::object());
        run.train.update(arm.value("train", json::object()));
        // Variables: the seed, the grid point and the arm's "vars"; "${name}" in a
        // string option is replaced by its value (e.g. "mlp:depth=${depth}").
        json vars = arm.value("vars", json::object());
        vars.update(point);
        vars["seed"] = seed;
        for (const auto& [key, value] : point.items())
          if (options_known.contains(key)) run.train[key] = value;
        run.train["seed"] = seed;
        auto substitute = [&](std::string text) {
          for (const auto& [name, v] : vars.items())
            for (size_t at; (at = text.find("${" + name + "}")) != std::string::npos;)
              text.replace(at, name.size() + 3, value_text(v));
          if (text.find("${") != std::string::npos)
            runtime_error("experiment " + run.experiment + ", arm " + run.arm + ": '" + text +
                          "' names a variable that is neither a grid key, an arm var nor seed");
          return text;
        };
        for (auto& [key, value] : run.train.items())
          if (value.is_string()) value = substitute(value.get<std::string>());
        for (const auto& a : arm.value("evaluate", r.value("evaluate", json::array())))
          run.evaluate.push_back(substitute(a.is_string() ? a.get<std::string>() : value_text(a)));
        for (const auto& [key, value] : run.train.items())
          if (!options_known.contains(key))
            runtime_error("experiment " + run.experiment + ", arm " + run.arm + ": '" + key +
                          "' is not an option of normkit train");
        run.id = run_id(run.arm, point, seed);
        run.dir = exp_dir / "runs" / run.id;
        runs.push_back(run);
      }
  return runs;
}

// The child command line: every train option as its flag.
std::vector<std::string> train_command(const RunSpec& run, int threads) {
  std::error_code ec;
  std::vector<std::string> argv = {fs::read_symlink("/proc/self/exe", ec).string(), "train"};
  for (const auto& [key, value] : run.train.items()) {
    std::string flag = "--" + key;
    std::replace(flag.begin(), flag.end(), '_', '-');
    if (key == "model_spec") {  // an inline spec, written next to the run
      fs::create_directories(run.dir, ec);
      write_file_atomically(run.dir / "model.spec", value.get<std::string>() + "\n");
      argv.insert(argv.end(), {"--model", (run.dir / "model.spec").string()});
      continue;
    }
    if (value.is_boolean()) {
      if (value.get<bool>()) argv.push_back(flag);
      continue;
    }
    argv.insert(argv.end(), {flag, value_text(value)});
  }
  // A run the lab was interrupted in (SIGINT, SIGTERM) left a checkpoint of where
  // it stopped: it resumes there, with the same options.
  const bool resume = fs::exists(run.dir / "checkpoint.nkc", ec);
  argv.insert(argv.end(), {"--threads", std::to_string(threads), "--name", run.id, "--out",
                           run.dir.string(), resume ? "--resume" : "--overwrite"});
  return argv;
}

// The evaluation after training: `normkit eval CHECKPOINT --json` with the declared arguments.
std::vector<std::string> eval_command(const RunSpec& run, int threads) {
  std::error_code ec;
  std::vector<std::string> argv = {fs::read_symlink("/proc/self/exe", ec).string(), "eval",
                                   (run.dir / "checkpoint.nkc").string(), "--json", "--threads",
                                   std::to_string(threads)};
  argv.insert(argv.end(), run.evaluate.begin(), run.evaluate.end());
  return argv;
}

// The last non-empty line of a log, for a failure message.
std::string last_line(const fs::path& log) {
  std::ifstream in(log);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  return last.empty() ? "no output" : last;
}

// The ids recorded in runs.jsonl (a line cut by a crash is ignored).
std::set<std::string> finished_runs(const fs::path& records) {
  std::set<std::string> done;
  std::ifstream in(records);
  for (std::string line; std::getline(in, line);) {
    const json j = json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.contains("run")) done.insert(j["run"].get<std::string>());
  }
  return done;
}

std::string duration_text(double seconds) {
  if (seconds < 60) return fmt::format("{:.0f}s", seconds);
  if (seconds < 3600) return fmt::format("{}m{:02}s", static_cast<int>(seconds) / 60, static_cast<int>(seconds) % 60);
  return fmt::format("{}h{:02}m", static_cast<int>(seconds) / 3600, static_cast<int>(seconds) % 3600 / 60);
}

std::string report(const fs::path& out, const fs::path& experiments) {
  // normkit's own Python module, when built next to this executable
  // (<build>/python): the relatives' invariances are measured on its kernels.
  std::error_code ec;
  const fs::path package = fs::read_symlink("/proc/self/exe", ec).parent_path() / "python";
  if (!ec && fs::exists(package / "normkit" / "__init__.py", ec)) {
    const char* old = std::getenv("PYTHONPATH");
    const std::string path = package.string() + (old && *old ? ":" + std::string(old) : "");
    ::setenv("PYTHONPATH", path.c_str(), 1);
  }
  return run_python("lab/report.py", {"--lab", out.string(), "--experiments", experiments.string()},
                    out / ".report.log");
}

int command_lab_list(const fs::path& experiments) {
  const auto all = load_experiments(experiments);
  std::vector<std::pair<int, std::string>> order;
  for (const auto& [name, e] : all) order.emplace_back(e.value("number", 0), name);
  std::sort(order.begin(), order.end());
  fmt::print("{:>3}  {:<24} {:>6} {:>8} {:>6}  {}\n", "#", "name", "quick", "default", "full", "claim");
  for (const auto& [number, name] : order) {
    const json& e = all.at(name);
    std::string counts;
    for (const char* tier : {"quick", "default", "full"})
      counts += fmt::format(" {:>{}}", expand(resolve_tier(e, tier, 0), "x").size(),
                            std::string(tier) == "default" ? 8 : 6);
    fmt::print("{:>3}  {:<24}{}  {}\n", number, name, counts, e["title"].get<std::string>());
  }
  fmt::print("\n(runs per tier; `normkit lab run NAME --quick` for the smallest)\n");
  return 0;
}

int command_lab_run(const LabFlags& f) {
  if (f.quick && f.full) usage_error("--quick and --full exclude each other");
  const std::string tier = f.quick ? "quick" : f.full ? "full" : "default";
  const auto all = load_experiments(f.experiments);
  std::vector<std::string> names = f.names;
  if (names.size() == 1 && names[0] == "all") {
    names.clear();
    std::vector<std::pair<int, std::string>> order;
    for (const auto& [name, e] : all) order.emplace_back(e.value("number", 0), name);
    std::sort(order.begin(), order.end());
    for (const auto& [n, name] : order) names.push_back(name);
  }
  std::vector<RunSpec> pending;
  size_t total = 0, skipped = 0;
  for (const auto& name : names) {
    if (!all.contains(name)) {
      std::string known;
      for (const auto& [n, e] : all) known += (known.empty() ? "" : ", ") + n;
      usage_error("no experiment '" + name + "' (known: " + known + ", or all)");
    }
    json r = resolve_tier(all.at(name), tier, f.seeds);
    const fs::path dir = f.out / name;
    r["run_count"] = expand(r, dir).size();
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) runtime_error("cannot create '" + dir.string() + "': " + ec.message());
    // A directory holds one declaration's runs: a different tier, seed count
    // or a changed declaration would mix runs that are not comparable.
    if (fs::exists(dir / "experiment.json", ec)) {
      const json before = read_json_file(dir / "experiment.json");
      if (before != r)
        usage_error("'" + dir.string() + "' holds runs of a different declaration of " + name +
                    " (tier " + before.value("tier", "?") + ", " +
                    std::to_string(before.value("seeds", 0)) +
                    " seeds, or the file changed): use another --out, or delete it to start over");
    } else {
      write_file_atomically(dir / "experiment.json", r.dump(2) + "\n");
    }
    const auto done = finished_runs(dir / "runs.jsonl");
    for (auto& run : expand(r, dir)) {
      ++total;
      if (done.contains(run.id)) {
        ++skipped;
        continue;
      }
      pending.push_back(std::move(run));
    }
  }
  const int jobs = f.jobs > 0 ? f.jobs : std::max(1, static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)) / f.threads);
  fmt::print("normkit lab: {} ({} tier): {} runs, {} already done; {} at a time, {} thread{} each; "
             "output in {}\n",
             fmt::join(names, ", "), tier, total, skipped, jobs, f.threads, f.threads == 1 ? "" : "s",
             f.out.string());
  std::fflush(stdout);

  const bool tty = ::isatty(STDOUT_FILENO) == 1;
  std::deque<RunSpec> queue(pending.begin(), pending.end());
  // pid -> the run, when it started, and whether the pid is its evaluation (after training).
  struct Job {
    RunSpec run;
    std::chrono::steady_clock::time_point start;
    bool evaluating = false;
  };
  std::map<int, Job> running;
  const auto start = std::chrono::steady_clock::now();
  size_t finished = 0, diverged = 0, interrupted = 0;
  bool passed_on = false;  // a stop request was passed on to the runs
  std::vector<std::string> failures;
  // Ctrl-C or SIGTERM: no new runs; the running ones are stopped and saved.
  train::install_stop_handlers();
  while (!queue.empty() || !running.empty()) {
    while (failures.empty() && train::stop_signal() == 0 && !queue.empty() &&
           static_cast<int>(running.size()) < jobs) {
      RunSpec run = std::move(queue.front());
      queue.pop_front();
      std::error_code ec;
      // A half-written run is redone from scratch; an interrupted one resumes (train_command).
      if (!fs::exists(run.dir / "checkpoint.nkc", ec)) fs::remove_all(run.dir, ec);
      fs::create_directories(run.dir, ec);
      // Training finished but its evaluation was interrupted: only the evaluation is redone.
      if (!run.evaluate.empty() && fs::exists(run.dir / "run.json", ec) &&
          read_json_file(run.dir / "run.json").value("status", "") == "finished") {
        const int pid = spawn_process(eval_command(run, f.threads), run.dir / "eval.json", true);
        running.emplace(pid, Job{std::move(run), std::chrono::steady_clock::now(), true});
        continue;
      }
      const int pid = spawn_process(train_command(run, f.threads), run.dir / "train.log", true);
      running.emplace(pid, Job{std::move(run), std::chrono::steady_clock::now()});
    }
    if (running.empty()) break;
    // Waits for a run to end; a stop request (the runs have their own process
    // groups, so it reached only the lab) is passed on to every run once: each
    // finishes its step, saves where it stopped and exits with 128 + the signal.
    int wait_status = 0, pid = 0;
    while ((pid = ::waitpid(-1, &wait_status, WNOHANG)) == 0 || (pid < 0 && errno == EINTR)) {
      if (const int signal = train::stop_signal(); signal != 0 && !passed_on) {
        for (const auto& entry : running) ::kill(entry.first, signal);
        passed_on = true;
      }
      ::usleep(50000);
    }
    if (pid < 0) runtime_error(std::string("waiting for the runs: ") + std::strerror(errno));
    const auto it = running.find(pid);
    if (it == running.end()) continue;
    const Job job = it->second;
    const RunSpec& run = job.run;
    const double wall =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - job.start).count();
    running.erase(it);
    std::error_code ec;
    const fs::path outcome = run.dir / "run.json";
    const fs::path eval_out = run.dir / "eval.json";
    if (passed_on && (job.evaluating || (WIFEXITED(wait_status) &&
                                         WEXITSTATUS(wait_status) == 128 + train::stop_signal()))) {
      ++interrupted;  // saved where it stopped (or trained, not evaluated); the next `lab run` resumes it
      continue;
    }
    if (!fs::exists(outcome, ec) ||
        (job.evaluating && !(WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0))) {
      // Not an outcome of training (a usage error, a crash) or a failed
      // evaluation: the lab stops starting runs, and says what the run said.
      failures.push_back(fmt::format("{}/{}: {}", run.experiment, run.id,
                                     last_line(job.evaluating ? eval_out : run.dir / "train.log")));
      fmt::print("{}failed: {}\n", tty ? "\r\033[K" : "", failures.back());
      continue;
    }
    const json o = read_json_file(outcome);
    if (!job.evaluating && o["status"] == "finished" && !run.evaluate.empty()) {
      // The same job slot evaluates the checkpoint; the record waits for it.
      const int eval_pid = spawn_process(eval_command(run, f.threads), eval_out, true);
      running.emplace(eval_pid, Job{run, job.start, true});
      continue;
    }
    json record = {{"experiment", run.experiment},
                   {"run", run.id},
                   {"arm", run.arm},
                   {"grid", run.grid},
                   {"seed", run.seed},
                   {"status", o["status"]},
                   {"wall_seconds", wall},
                   {"train_seconds", o["seconds"]},
                   {"epochs_done", o["epochs_done"]},
                   {"steps_done", o["steps_done"]},
                   {"initial_loss", o["initial_loss"]},
                   {"divergence", o["divergence"]},
                   {"last", o["last"]},
                   {"dir", fs::relative(run.dir, f.out / run.experiment).string()}};
    if (job.evaluating) record["evals"] = read_json_file(eval_out).value("results", json::array());
    {
      // A line cut by a crash stays a line of its own (ignored when read).
      const fs::path path = f.out / run.experiment / "runs.jsonl";
      bool cut = false;
      if (std::ifstream last(path, std::ios::binary | std::ios::ate); last && last.tellg() > 0) {
        last.seekg(-1, std::ios::end);
        cut = last.get() != '\n';
      }
      std::ofstream records(path, std::ios::app);
      if (cut) records << '\n';
      records << record.dump() << '\n';
      records.flush();
      if (!records) runtime_error("cannot append to '" + (f.out / run.experiment / "runs.jsonl").string() + "'");
    }
    ++finished;
    const bool was_diverged = o["status"] == "diverged";
    diverged += was_diverged;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const size_t left = queue.size() + running.size();
    const double eta = elapsed / static_cast<double>(finished) * static_cast<double>(left);
    const std::string status =
        fmt::format("[{}/{}] {}/{} {:.1f}s{}  ({} diverged; ETA {})", skipped + finished, total,
                    run.experiment, run.id, wall, was_diverged ? " diverged" : "", diverged,
                    duration_text(eta));
    if (tty)
      fmt::print("\r\033[K{}", status.substr(0, 79));
    else
      fmt::print("{}\n", status);
    std::fflush(stdout);
  }
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("{}{} runs in {} ({} diverged, kept as results)\n", tty ? "\r\033[K" : "", finished,
             duration_text(elapsed), diverged);
  if (const int signal = train::stop_signal(); signal != 0)
    return report_interruption(signal, fmt::format("{} run{} stopped and saved, {} not started; run the "
                                                   "same command again to continue",
                                                   interrupted, interrupted == 1 ? "" : "s", queue.size()));
  if (!failures.empty()) {
    fmt::print(stderr, "normkit: error: {} run{} failed (the first: {}); the finished runs are kept: "
               "run the same command again to continue\n",
               failures.size(), failures.size() == 1 ? "" : "s", failures.front());
    return 1;
  }
  if (f.no_report) return 0;
  const std::string problem = report(f.out, f.experiments);
  if (!problem.empty()) runtime_error("the report failed: " + problem);
  fmt::print("report: {} and {}; per experiment: {}/NAME/report.md, figure.png, verdict.json\n",
             (f.out / "LAB.md").string(), (f.out / "lab.html").string(), f.out.string());
  return 0;
}

}  // namespace

CLI::App* add_lab_command(CLI::App& app, LabFlags& flags) {
  auto* lab = app.add_subcommand("lab", "the claims lab: experiments that test what is claimed for batch "
                                        "normalization, with figures and verdicts");
  lab->require_subcommand(1);
  flags.experiments = data_file("experiments");
  auto* list = lab->add_subcommand("list", "the experiments, their claims and their runs per tier");
  list->add_option("--experiments", flags.experiments, "the directory of declarations")->capture_default_str();
  auto* run = lab->add_subcommand("run", "run experiments (all their runs, several at once), then report");
  run->add_option("names", flags.names, "experiment names, or all")->required();
  run->add_flag("--quick", flags.quick, "the smallest tier (seconds; checks the pipeline, not the claim)");
  run->add_flag("--full", flags.full, "the largest tier");
  run->add_option("--seeds", flags.seeds, "seeds per configuration (default: the tier's)")
      ->check(CLI::Range(1, 1000));
  run->add_option("--jobs", flags.jobs, "runs at once (default: cores / --threads)")->check(CLI::Range(1, 256));
  run->add_option("--threads", flags.threads, "threads per run")->check(CLI::Range(1, 256))->capture_default_str();
  run->add_option("--out", flags.out, "the lab's directory (a run resumes what is there)")->capture_default_str();
  run->add_option("--experiments", flags.experiments, "the directory of declarations")->capture_default_str();
  run->add_flag("--no-report", flags.no_report, "only run; `normkit lab report` later");
  auto* report_cmd = lab->add_subcommand("report", "figures, report sections and verdicts of every experiment in DIR, "
                                                   "then DIR/LAB.md and DIR/lab.html");
  report_cmd->add_option("dir", flags.out, "the lab's directory")->required();
  report_cmd->add_option("--experiments", flags.experiments, "the directory of declarations")->capture_default_str();
  flags.list = list;
  flags.run = run;
  flags.report = report_cmd;
  return lab;
}

int command_lab(const LabFlags& flags) {
  if (*flags.list) return command_lab_list(flags.experiments);
  if (*flags.run) return command_lab_run(flags);
  std::error_code ec;
  if (!fs::is_directory(flags.out, ec)) runtime_error("no lab directory '" + flags.out.string() + "'");
  const std::string problem = report(flags.out, flags.experiments);
  if (!problem.empty()) runtime_error("the report failed: " + problem);
  fmt::print("report: {} and {}\n", (flags.out / "LAB.md").string(), (flags.out / "lab.html").string());
  return 0;
}

}  // namespace normkit::cli
