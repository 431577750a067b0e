// The daemon's log: one line per event on stderr, filtered by log_level, as text
// ("<time> [<kme_id>] <level> <message>") or as JSON objects, one per line, for log
// collectors: {"time": "2026-11-24T06:50:01.123Z", "kme": "alice-kme", "level": "info",
// "thread": 1234, "message": "..."}. No key byte is ever passed to the log (docs/KMS.md).
#pragma once

#include <memory>
#include <string>

#include <spdlog/formatter.h>

#include "qkd/kms/config.hpp"

namespace qkd::kms {

// The formatter of log_format "json" (exposed for tests).
[[nodiscard]] std::unique_ptr<spdlog::formatter> make_json_log_formatter(std::string kme_id);

// Installs the default logger for `config` (log_level, log_format, kme_id).
void setup_logging(const Config& config);

}  // namespace qkd::kms
