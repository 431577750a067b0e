// An environment variable set for one scope (header-only: unit tests use it without the
// harness library). Processes started meanwhile inherit it.
#pragma once

#include <cstdlib>
#include <string>

namespace qkd::test {

class ScopedEnv {
 public:
  ScopedEnv(std::string name, const std::string& value) : name_(std::move(name)) {
    ::setenv(name_.c_str(), value.c_str(), 1);
  }
  ~ScopedEnv() { ::unsetenv(name_.c_str()); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
};

}  // namespace qkd::test
