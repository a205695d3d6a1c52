#pragma once
// Shared by the fuzz targets (fuzz_*.cpp). Each target defines
// LLVMFuzzerTestOneInput; it is linked either with libFuzzer (clang,
// `make fuzz`) or with replay_main.cpp (any compiler: the ctest that replays
// the seed corpus and every crash ever found).
//
// The contract every target checks: a parser given any bytes either returns a
// value that passes the target's properties or throws normkit::Error. Any
// other exception escapes (libFuzzer reports it, the replay test fails); a
// broken property aborts with a message.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "normkit/error.hpp"

namespace normkit::fuzz {

[[noreturn]] inline void property_failed(const char* what, const std::string& detail = {}) {
  std::fprintf(stderr, "fuzz property broken: %s%s%s\n", what, detail.empty() ? "" : ": ",
               detail.c_str());
  std::abort();
}
inline void expect(bool holds, const char* what, const std::string& detail = {}) {
  if (!holds) property_failed(what, detail);
}

// Runs `parse`; true when it succeeded, false when it threw normkit::Error.
template <class F>
bool accepted(F&& parse) {
  try {
    parse();
    return true;
  } catch (const Error&) {
    return false;
  }
}

// A directory of this process's own for the loaders that read files (several
// fuzzers may run at once); removed at exit. The path is never destroyed: a
// static path would be destroyed before the atexit handler (registered while
// the static was being made) runs, and the directory was left behind.
inline const std::filesystem::path& scratch_directory() {
  static const std::filesystem::path* const directory = [] {
    const auto* path = new std::filesystem::path(std::filesystem::temp_directory_path() /
                                                 ("normkit-fuzz-" + std::to_string(::getpid())));
    std::filesystem::create_directories(*path);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_directory(), ec);
    });
    return path;
  }();
  return *directory;
}

inline std::filesystem::path write_scratch_file(const std::string& name, std::string_view bytes) {
  const auto path = scratch_directory() / name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) property_failed("writing a scratch file failed", path.string());
  return path;
}

}  // namespace normkit::fuzz
