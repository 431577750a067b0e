// One KME: configuration, key store, link service, ETSI 014 service and its HTTPS server,
// and the threads that run them.
#pragma once

#include <cstdint>
#include <memory>

#include "qkd/core/result.hpp"
#include "qkd/kms/config.hpp"

namespace qkd::kms {

struct BoundPorts {
  std::uint16_t api_port = 0;
  std::uint16_t link_port = 0;  // 0 for the bob-role KME (it does not listen)
  std::uint16_t metrics_port = 0;  // the plain-HTTP metrics listener, 0 if not configured
};

// qkd-kms --convert-store: opens the configured store (`store` section), converting a file
// of an earlier store format to the current one, and closes it. An error names the field.
[[nodiscard]] qkd::core::Status convert_store(const Config& config);

class Kme {
 public:
  [[nodiscard]] static qkd::core::Result<std::unique_ptr<Kme>> create(Config config);
  ~Kme();
  Kme(const Kme&) = delete;
  Kme& operator=(const Kme&) = delete;

  // Binds both listeners and starts all threads.
  [[nodiscard]] qkd::core::Result<BoundPorts> start();
  // Blocks until SIGINT or SIGTERM (installed by start()) or stop().
  void wait();
  // Graceful shutdown: stop accepting, close the link, let handlers finish, join. Idempotent.
  void stop();

 private:
  Kme();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qkd::kms
