#pragma once
// The library's one error type. Every public function validates its arguments
// before it touches any state and throws normkit::Error naming the argument and
// the value; it never aborts or exits.
#include <stdexcept>
#include <string>

namespace normkit {

enum class ErrorKind {
  invalid_argument,  // the caller passed something wrong (Python: ValueError)
  runtime,           // the data or the environment is wrong (Python: RuntimeError)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace normkit
