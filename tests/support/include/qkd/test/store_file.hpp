// A durable key store's file as tests need to reach into it (header-only; the includer links
// SQLite and OpenSSL's libcrypto): a value sealed or opened as the store does, a file
// rewritten as format 2 left it (counters, waiting assignments, notices and commit times in
// the clear), and the meta tag rewritten after a test edited the counters.
// Used by tests/kms and fuzz/store_file_fuzz.cpp; the format is in
// keyservice/src/sqlite_key_store.cpp.
#pragma once

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <sqlite3.h>

#include <cctype>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace qkd::test {

// AES-256-GCM under `key` as the store seals a value: nonce(12) || ciphertext || tag(16),
// `aad` as additional data, a random nonce. Opening returns nullopt when the value does not
// authenticate.
inline std::optional<std::vector<std::uint8_t>> store_gcm(bool seal,
                                                          std::span<const std::uint8_t> key,
                                                          const std::string& aad,
                                                          std::span<const std::uint8_t> in) {
  std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)> c(EVP_CIPHER_CTX_new(),
                                                                    &EVP_CIPHER_CTX_free);
  const auto* a = reinterpret_cast<const unsigned char*>(aad.data());
  const int alen = static_cast<int>(aad.size());
  int len = 0;
  if (key.size() != 32 || !c) {
    return std::nullopt;
  }
  if (seal) {
    std::vector<std::uint8_t> out(12 + in.size() + 16);
    if (RAND_bytes(out.data(), 12) != 1 ||
        EVP_EncryptInit_ex(c.get(), EVP_aes_256_gcm(), nullptr, key.data(), out.data()) != 1 ||
        EVP_EncryptUpdate(c.get(), nullptr, &len, a, alen) != 1 ||
        EVP_EncryptUpdate(c.get(), out.data() + 12, &len, in.data(),
                          static_cast<int>(in.size())) != 1 ||
        EVP_EncryptFinal_ex(c.get(), out.data() + 12 + len, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_GET_TAG, 16, out.data() + 12 + in.size()) != 1) {
      return std::nullopt;
    }
    return out;
  }
  if (in.size() < 28) {
    return std::nullopt;
  }
  std::vector<std::uint8_t> out(in.size() - 28);
  std::vector<std::uint8_t> tag(in.end() - 16, in.end());
  if (EVP_DecryptInit_ex(c.get(), EVP_aes_256_gcm(), nullptr, key.data(), in.data()) != 1 ||
      EVP_DecryptUpdate(c.get(), nullptr, &len, a, alen) != 1 ||
      EVP_DecryptUpdate(c.get(), out.data(), &len, in.data() + 12,
                        static_cast<int>(out.size())) != 1 ||
      EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_SET_TAG, 16, tag.data()) != 1 ||
      EVP_DecryptFinal_ex(c.get(), out.data() + len, &len) != 1) {
    return std::nullopt;
  }
  return out;
}

// A node key file's key (64 hex digits, as the KME reads it); empty if it is not one.
inline std::vector<std::uint8_t> node_key_from_hex(const std::string& text) {
  std::vector<std::uint8_t> key;
  auto digit = [](char ch) {
    return std::isdigit(static_cast<unsigned char>(ch)) ? ch - '0'
                                                        : std::tolower(ch) - 'a' + 10;
  };
  for (std::size_t i = 0; i + 1 < text.size() && std::isxdigit(static_cast<unsigned char>(text[i])) &&
                          std::isxdigit(static_cast<unsigned char>(text[i + 1]));
       i += 2) {
    key.push_back(static_cast<std::uint8_t>(digit(text[i]) << 4 | digit(text[i + 1])));
  }
  return key.size() == 32 ? key : std::vector<std::uint8_t>{};
}

// Rewrites the closed store file `db` (format 3, sealed under `node_key`) as format 2 left
// it: the key check sealed without the format, no meta tag, the tag columns NULL. Returns
// what failed, empty on success.
inline std::string down_to_format_2(const std::string& db, std::span<const std::uint8_t> node_key) {
  sqlite3* h = nullptr;
  if (sqlite3_open(db.c_str(), &h) != SQLITE_OK) {
    sqlite3_close(h);
    return "cannot open " + db;
  }
  std::string error;
  sqlite3_stmt* st = nullptr;
  std::optional<std::vector<std::uint8_t>> check;
  if (sqlite3_prepare_v2(h, "SELECT value FROM meta WHERE name = 'key_check'", -1, &st,
                         nullptr) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW) {
    const auto* b = static_cast<const std::uint8_t*>(sqlite3_column_blob(st, 0));
    const std::span<const std::uint8_t> sealed(
        b, static_cast<std::size_t>(sqlite3_column_bytes(st, 0)));
    if (auto text = store_gcm(false, node_key, "qkd-kms/key-check/3", sealed)) {
      check = store_gcm(true, node_key, "qkd-kms/key-check", *text);
    }
  }
  sqlite3_finalize(st);
  st = nullptr;
  if (!check) {
    error = "no key check of format 3 under this node key in " + db;
  } else if (sqlite3_prepare_v2(h, "UPDATE meta SET value = ? WHERE name = 'key_check'", -1,
                                &st, nullptr) != SQLITE_OK ||
             sqlite3_bind_blob(st, 1, check->data(), static_cast<int>(check->size()),
                               SQLITE_TRANSIENT) != SQLITE_OK ||
             sqlite3_step(st) != SQLITE_DONE ||
             sqlite3_exec(h,
                          "UPDATE meta SET value = 2 WHERE name = 'format';"
                          "DELETE FROM meta WHERE name = 'meta_tag';"
                          "UPDATE waiting SET tag = NULL; UPDATE outbox SET tag = NULL;"
                          "UPDATE settled SET tag = NULL;",
                          nullptr, nullptr, nullptr) != SQLITE_OK) {
    error = std::string("cannot rewrite ") + db + ": " + sqlite3_errmsg(h);
  }
  sqlite3_finalize(st);
  sqlite3_close(h);
  return error;
}

// Rewrites the meta tag of the closed store file `db` (format 3) over its meta rows as they
// are now, as the store does in each transaction that changes one (meta_aad() in
// sqlite_key_store.cpp: each row but the tag, in name order, as ";" hex(name) ":" type ":"
// hex(value)): a test that edits the counters (a diverged or restored file, consistent in
// itself) then has a file that opens. Returns what failed, empty on success.
inline std::string retag_meta(const std::string& db, std::span<const std::uint8_t> node_key) {
  sqlite3* h = nullptr;
  if (sqlite3_open(db.c_str(), &h) != SQLITE_OK) {
    sqlite3_close(h);
    return "cannot open " + db;
  }
  std::string aad = "qkd-kms/meta";
  auto hex = [&aad](const void* p, int n) {
    static constexpr char kDigits[] = "0123456789abcdef";
    const auto* b = static_cast<const std::uint8_t*>(p);
    for (int i = 0; i < n; ++i) {
      aad += kDigits[b[i] >> 4];
      aad += kDigits[b[i] & 15];
    }
  };
  sqlite3_stmt* st = nullptr;
  std::string error;
  if (sqlite3_prepare_v2(h, "SELECT name, value FROM meta WHERE name != 'meta_tag' ORDER BY name",
                         -1, &st, nullptr) != SQLITE_OK) {
    error = std::string("cannot read the meta rows of ") + db + ": " + sqlite3_errmsg(h);
  }
  while (error.empty() && sqlite3_step(st) == SQLITE_ROW) {
    aad += ';';
    const void* name = sqlite3_column_blob(st, 0);
    hex(name, sqlite3_column_bytes(st, 0));
    aad += ':' + std::to_string(sqlite3_column_type(st, 1)) + ':';
    const void* value = sqlite3_column_blob(st, 1);
    hex(value, sqlite3_column_bytes(st, 1));
  }
  sqlite3_finalize(st);
  st = nullptr;
  const auto tag = store_gcm(true, node_key, aad, {});
  if (error.empty() &&
      (!tag ||
       sqlite3_prepare_v2(h, "UPDATE meta SET value = ? WHERE name = 'meta_tag'", -1, &st,
                          nullptr) != SQLITE_OK ||
       sqlite3_bind_blob(st, 1, tag->data(), static_cast<int>(tag->size()), SQLITE_TRANSIENT) !=
           SQLITE_OK ||
       sqlite3_step(st) != SQLITE_DONE || sqlite3_changes(h) != 1)) {
    error = std::string("cannot rewrite the meta tag of ") + db + ": " + sqlite3_errmsg(h);
  }
  sqlite3_finalize(st);
  sqlite3_close(h);
  return error;
}

}  // namespace qkd::test
