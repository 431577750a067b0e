#include "qkd/kms/logging.hpp"

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <ctime>
#include <nlohmann/json.hpp>
#include <string_view>
#include <utility>

namespace qkd::kms {

namespace {

class JsonLogFormatter final : public spdlog::formatter {
 public:
  explicit JsonLogFormatter(std::string kme_id) : kme_id_(std::move(kme_id)) {}

  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    using namespace std::chrono;
    const auto ms = duration_cast<milliseconds>(msg.time.time_since_epoch()).count() % 1000;
    const std::time_t tt = system_clock::to_time_t(msg.time);
    std::tm utc{};
    ::gmtime_r(&tt, &utc);
    const std::string time = fmt::format("{:%Y-%m-%dT%H:%M:%S}.{:03d}Z", utc, ms);
    const auto level = spdlog::level::to_string_view(msg.level);
    const nlohmann::json j = {
        {"time", time},
        {"kme", kme_id_},
        {"level", std::string_view(level.data(), level.size())},
        {"thread", msg.thread_id},
        {"message", std::string_view(msg.payload.data(), msg.payload.size())}};
    // Invalid UTF-8 (e.g. a peer's name) is replaced, never a reason to drop the line.
    const std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    dest.append(line.data(), line.data() + line.size());
    dest.push_back('\n');
  }

  [[nodiscard]] std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonLogFormatter>(kme_id_);
  }

 private:
  std::string kme_id_;
};

}  // namespace

std::unique_ptr<spdlog::formatter> make_json_log_formatter(std::string kme_id) {
  return std::make_unique<JsonLogFormatter>(std::move(kme_id));
}

void setup_logging(const Config& config) {
  auto logger = spdlog::stderr_color_mt("qkd-kms");
  if (config.log_format == "json") {
    logger->set_formatter(make_json_log_formatter(config.kme_id));
  } else {
    logger->set_pattern(fmt::format("%Y-%m-%dT%H:%M:%S.%e [{}] %^%l%$ %v", config.kme_id));
  }
  logger->set_level(spdlog::level::from_str(config.log_level));
  spdlog::set_default_logger(logger);
  spdlog::flush_on(spdlog::level::info);
}

}  // namespace qkd::kms
