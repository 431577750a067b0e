#include "qkd/test/etsi_helpers.hpp"

#include <openssl/evp.h>

#include <nlohmann/json.hpp>

namespace qkd::test {

using json = nlohmann::json;

KeyBytes b64decode(const std::string& text) {
  if (text.size() % 4 != 0) {
    return {};
  }
  KeyBytes out(text.size() / 4 * 3 + 1);
  const int n = EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(text.data()),
                                static_cast<int>(text.size()));
  if (n < 0) {
    return {};
  }
  std::size_t len = static_cast<std::size_t>(n);
  if (!text.empty() && text.back() == '=') --len;
  if (text.size() > 1 && text[text.size() - 2] == '=') --len;
  out.resize(len);
  return out;
}

std::vector<std::pair<std::string, KeyBytes>> key_list(const HttpResponse& r) {
  std::vector<std::pair<std::string, KeyBytes>> out;
  const json j = r.json();
  if (j.is_discarded() || !j.is_object() || !j.contains("keys") || !j.at("keys").is_array()) {
    return out;
  }
  for (const auto& k : j.at("keys")) {
    if (!k.is_object() || !k.contains("key_ID") || !k.contains("key") ||
        !k.at("key_ID").is_string() || !k.at("key").is_string()) {
      return {};
    }
    out.emplace_back(k.at("key_ID").get<std::string>(), b64decode(k.at("key").get<std::string>()));
  }
  return out;
}

std::vector<std::string> key_ids(const HttpResponse& r) {
  std::vector<std::string> out;
  for (auto& [id, key] : key_list(r)) {
    out.push_back(std::move(id));
  }
  return out;
}

std::map<std::string, KeyBytes> key_map(const HttpResponse& r) {
  std::map<std::string, KeyBytes> out;
  for (auto& [id, key] : key_list(r)) {
    out[id] = std::move(key);
  }
  return out;
}

std::string message_of(const HttpResponse& r) {
  const json j = r.json();
  if (j.is_discarded() || !j.is_object()) {
    return std::string("<not JSON: ") + r.body + ">";
  }
  return j.value("message", "");
}

std::string dec_body(const std::vector<std::string>& ids) {
  json arr = json::array();
  for (const auto& id : ids) {
    arr.push_back({{"key_ID", id}});
  }
  return json{{"key_IDs", arr}}.dump();
}

}  // namespace qkd::test
