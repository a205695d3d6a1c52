#pragma once
// Building the messages of normkit::Error.
#include <sstream>
#include <string>

#include "normkit/error.hpp"

namespace normkit::detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

template <class... Parts>
[[noreturn]] void fail_invalid(const Parts&... parts) {
  throw Error(ErrorKind::invalid_argument, concat(parts...));
}

template <class... Parts>
[[noreturn]] void fail_runtime(const Parts&... parts) {
  throw Error(ErrorKind::runtime, concat(parts...));
}

}  // namespace normkit::detail
