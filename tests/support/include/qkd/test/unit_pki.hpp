// A test PKI (examples/pki.sh: a CA, and certificates for alice-kme, bob-kme and mallory)
// for the KME's unit tests that run TLS in process: made once per test process, on first
// use, and removed when the tests are over. Header-only, like scoped_env.hpp; the including
// target defines QKD_TEST_SOURCE_DIR.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

#ifndef QKD_TEST_SOURCE_DIR
#error "QKD_TEST_SOURCE_DIR must be defined (project source dir)"
#endif

namespace qkd::test {

namespace detail {
inline bool& unit_pki_made() {
  static bool made = false;  // by this process: removed at the end
  return made;
}
}  // namespace detail

inline const std::filesystem::path& unit_pki_dir() {
  static const std::filesystem::path dir = [] {
    std::filesystem::path d = std::filesystem::temp_directory_path() /
                              ("qkd-kms-unit-pki-" + std::to_string(::getpid()));
    const std::string cmd = "bash '" + std::string(QKD_TEST_SOURCE_DIR) + "/examples/pki.sh' '" +
                            d.string() + "' alice-kme bob-kme mallory >/dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0) {
      ADD_FAILURE() << "pki.sh failed";
    }
    detail::unit_pki_made() = true;
    return d;
  }();
  return dir;
}

namespace detail {
class UnitPkiCleanup : public ::testing::Environment {
 public:
  void TearDown() override {
    if (unit_pki_made()) {
      std::error_code ec;
      std::filesystem::remove_all(unit_pki_dir(), ec);
    }
  }
};
inline const auto* const kUnitPkiCleanup =
    ::testing::AddGlobalTestEnvironment(new UnitPkiCleanup);
}  // namespace detail

}  // namespace qkd::test
