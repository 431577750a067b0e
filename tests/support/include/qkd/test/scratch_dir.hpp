// A fresh folder under the temporary directory (TMPDIR, else /tmp) for one test, removed
// with everything in it when the object goes, also when an assertion ends the test early.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

namespace qkd::test {

class ScratchDir {
 public:
  // `prefix` names the folder (qkd-<prefix>-XXXXXX) so that one left by a killed test says
  // which test made it.
  explicit ScratchDir(std::string_view prefix) {
    std::string templ =
        (std::filesystem::temp_directory_path() / ("qkd-" + std::string(prefix) + "-XXXXXX"))
            .string();
    if (::mkdtemp(templ.data()) == nullptr) {
      throw std::runtime_error("mkdtemp " + templ + " failed");
    }
    path_ = templ;
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  [[nodiscard]] const std::filesystem::path& path() const { return path_; }
  [[nodiscard]] std::filesystem::path operator/(std::string_view name) const {
    return path_ / name;
  }

 private:
  std::filesystem::path path_;
};

}  // namespace qkd::test
