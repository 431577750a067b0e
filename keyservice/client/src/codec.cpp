// URL parsing, strict base64, percent-encoding, the ETSI 014 JSON reply decoders and the
// small helpers declared at the end of client.hpp.
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include <charconv>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>

#include "internal.hpp"
#include "qkd/etsi/client_detail.hpp"

namespace qkd::etsi {

using qkd::core::make_error;
using qkd::core::SecureBytes;

namespace internal {

OSSL_LIB_CTX* private_libctx() {
  // A magic static: thread-safe, made once. If loading the default provider fails the
  // context is useless; report nullptr (callers raise kInternal).
  static OSSL_LIB_CTX* const ctx = []() -> OSSL_LIB_CTX* {
    OSSL_LIB_CTX* c = OSSL_LIB_CTX_new();
    if (c == nullptr) {
      return nullptr;
    }
    if (OSSL_PROVIDER_load(c, "default") == nullptr) {
      OSSL_LIB_CTX_free(c);
      return nullptr;
    }
    return c;
  }();
  return ctx;
}

namespace {

// One error as a short phrase: its reason, and its data when it has some.
std::string error_text(unsigned long code, const char* data, int flags) {
  // A system error's reason is its errno, which OpenSSL 3.0 may have no text for: the
  // system's words, not the packed number.
  const char* reason = ERR_reason_error_string(code);
  std::string one = reason != nullptr       ? std::string(reason)
                    : ERR_SYSTEM_ERROR(code) ? std::generic_category().message(
                                                  static_cast<int>(ERR_GET_REASON(code)))
                                            : "openssl error " + std::to_string(code);
  if (data != nullptr && (flags & ERR_TXT_STRING) != 0 && *data != '\0') {
    one += " (";
    one += data;
    one += ")";
  }
  return one;
}

}  // namespace

ErrorMark::ErrorMark() { set(); }

ErrorMark::~ErrorMark() {
  if (!popped_) {
    ERR_pop_to_mark();
  }
}

void ErrorMark::set() {
  popped_ = false;
  was_empty_ = ERR_peek_error() == 0;
  // On an empty queue OpenSSL 3.0 sets no mark, and ERR_pop_to_mark() pops the whole
  // queue: every entry is then ours.
  ERR_set_mark();
  int flags = 0;
  top_code_ = ERR_peek_last_error_all(&top_file_, &top_line_, nullptr, &top_data_, &flags);
}

bool ErrorMark::any() const {
  if (was_empty_) {
    return ERR_peek_error() != 0;
  }
  const char* file = nullptr;
  int line = 0;
  const char* data = nullptr;
  int flags = 0;
  const unsigned long code = ERR_peek_last_error_all(&file, &line, nullptr, &data, &flags);
  // An empty queue has nothing of ours (libssl's handshake clears the whole queue).
  return code != 0 &&
         (code != top_code_ || file != top_file_ || line != top_line_ || data != top_data_);
}

unsigned long ErrorMark::first() const {
  if (was_empty_) {
    return ERR_peek_error();
  }
  return any() ? ERR_peek_last_error() : 0;
}

void ErrorMark::reset() {
  ERR_pop_to_mark();
  set();
}

std::string ErrorMark::pop() {
  std::string out;
  const auto add = [&out](const std::string& one) {
    if (out.find(one) == std::string::npos) {
      if (!out.empty()) {
        out += "; ";
      }
      out += one;
    }
  };
  const char* data = nullptr;
  int flags = 0;
  if (was_empty_) {
    unsigned long code = 0;
    while ((code = ERR_peek_error_data(&data, &flags)) != 0) {
      add(error_text(code, data, flags));
      ERR_get_error();
    }
  } else if (any()) {
    const unsigned long code = ERR_peek_last_error_data(&data, &flags);
    add(error_text(code, data, flags));
  }
  if (!popped_) {
    ERR_pop_to_mark();
    popped_ = true;
  }
  return out;
}

int ssl_error_since(const SSL* ssl, int rc, const ErrorMark& mark) {
  // SSL_get_error()'s order of checks (OpenSSL 3.0), with the queue read through `mark`.
  if (rc > 0) {
    return SSL_ERROR_NONE;
  }
  if (const unsigned long e = mark.first(); e != 0) {
    return ERR_GET_LIB(e) == ERR_LIB_SYS ? SSL_ERROR_SYSCALL : SSL_ERROR_SSL;
  }
  // What the BIO waits for, `first` tried first (the direction libssl was going); 0: none.
  const auto retry = [](BIO* bio, int first) {
    const int second = first == SSL_ERROR_WANT_READ ? SSL_ERROR_WANT_WRITE : SSL_ERROR_WANT_READ;
    for (const int want : {first, second}) {
      if (want == SSL_ERROR_WANT_READ ? BIO_should_read(bio) : BIO_should_write(bio)) {
        return want;
      }
    }
    return 0;
  };
  if (SSL_want_read(ssl)) {
    if (const int want = retry(SSL_get_rbio(ssl), SSL_ERROR_WANT_READ); want != 0) {
      return want;
    }
  }
  if (SSL_want_write(ssl)) {
    if (const int want = retry(SSL_get_wbio(ssl), SSL_ERROR_WANT_WRITE); want != 0) {
      return want;
    }
  }
  if ((SSL_get_shutdown(ssl) & SSL_RECEIVED_SHUTDOWN) != 0) {
    return SSL_ERROR_ZERO_RETURN;
  }
  return SSL_ERROR_SYSCALL;
}

}  // namespace internal

namespace detail {

namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

bool valid_dns_name(std::string_view host) {
  if (host.empty() || host.size() > 253) {
    return false;
  }
  std::size_t label = 0;
  for (std::size_t i = 0; i < host.size(); ++i) {
    const char c = host[i];
    if (c == '.') {
      if (label == 0) {
        return false;
      }
      label = 0;
      continue;
    }
    if (!(is_alpha(c) || is_digit(c) || c == '-' || c == '_')) {
      return false;
    }
    if (++label > 63) {
      return false;
    }
  }
  return label != 0;
}

bool valid_ipv4(std::string_view s) {
  int parts = 0;
  std::size_t i = 0;
  while (i <= s.size()) {
    std::size_t j = i;
    while (j < s.size() && is_digit(s[j])) {
      ++j;
    }
    if (j == i || j - i > 3) {
      return false;
    }
    unsigned v = 0;
    std::from_chars(s.data() + i, s.data() + j, v);
    if (v > 255 || (j - i > 1 && s[i] == '0')) {
      return false;
    }
    ++parts;
    if (j == s.size()) {
      break;
    }
    if (s[j] != '.') {
      return false;
    }
    i = j + 1;
    if (i == s.size()) {
      return false;
    }
  }
  return parts == 4;
}

bool all_digits(std::string_view s) {
  if (s.empty()) {
    return false;
  }
  for (char c : s) {
    if (!is_digit(c)) {
      return false;
    }
  }
  return true;
}

}  // namespace

std::string Url::authority() const {
  const bool v6 = host.find(':') != std::string::npos;
  std::string out = v6 ? "[" + host + "]" : host;
  if (port != 443) {
    out += ":" + std::to_string(port);
  }
  return out;
}

Result<Url> parse_url(std::string_view url) {
  const auto bad = [&](std::string_view why) {
    return make_error(ErrorCode::kInvalidArgument,
                      "invalid KME URL \"" + std::string(url.substr(0, 200)) + "\": " +
                          std::string(why));
  };
  constexpr std::string_view kScheme = "https://";
  if (url.size() > 2048) {
    return bad("too long");
  }
  for (char c : url) {
    if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) >= 0x7f) {
      return bad("contains a space or a non-ASCII character");
    }
  }
  if (url.size() < kScheme.size() || url.substr(0, kScheme.size()) != kScheme) {
    return bad("only https:// is supported");
  }
  std::string_view rest = url.substr(kScheme.size());
  if (rest.find_first_of("?#") != std::string_view::npos) {
    return bad("a query or fragment is not allowed");
  }
  const std::size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? std::string_view{} : rest.substr(slash);
  if (authority.find('@') != std::string_view::npos) {
    return bad("user information is not allowed");
  }
  Url out;
  std::string_view port_text;
  if (!authority.empty() && authority.front() == '[') {
    const std::size_t close = authority.find(']');
    if (close == std::string_view::npos) {
      return bad("unterminated IPv6 address");
    }
    out.host = std::string(authority.substr(1, close - 1));
    const std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') {
        return bad("junk after the IPv6 address");
      }
      port_text = after.substr(1);
      if (port_text.empty()) {
        return bad("empty port");
      }
    }
    if (out.host.empty() || out.host.find_first_not_of("0123456789abcdefABCDEF:.") !=
                                std::string::npos) {
      return bad("invalid IPv6 address");
    }
    out.host_is_ip = true;
  } else {
    const std::size_t colon = authority.find(':');
    out.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) {
      port_text = authority.substr(colon + 1);
      if (port_text.empty()) {
        return bad("empty port");
      }
    }
    if (out.host.empty()) {
      return bad("no host");
    }
    if (valid_ipv4(out.host)) {
      out.host_is_ip = true;
    } else if (all_digits(std::string_view(out.host).substr(0, 1)) &&
               out.host.find_first_not_of("0123456789.") == std::string::npos) {
      return bad("invalid IPv4 address");
    } else if (!valid_dns_name(out.host)) {
      return bad("invalid host name");
    }
  }
  if (!port_text.empty()) {
    if (!all_digits(port_text) || port_text.size() > 5) {
      return bad("invalid port");
    }
    unsigned port = 0;
    std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (port == 0 || port > 65535) {
      return bad("port out of range");
    }
    out.port = static_cast<std::uint16_t>(port);
  }
  while (!path.empty() && path.back() == '/') {
    path.remove_suffix(1);
  }
  out.path_prefix = std::string(path);
  out.text = std::string(url.substr(0, kScheme.size() + authority.size() + path.size()));
  return out;
}

namespace {

int b64_value(char c) {
  if (c >= 'A' && c <= 'Z') {
    return c - 'A';
  }
  if (c >= 'a' && c <= 'z') {
    return c - 'a' + 26;
  }
  if (c >= '0' && c <= '9') {
    return c - '0' + 52;
  }
  if (c == '+') {
    return 62;
  }
  if (c == '/') {
    return 63;
  }
  return -1;
}

}  // namespace

Result<SecureBytes> base64_decode_strict(std::string_view text) {
  const auto bad = [](std::string_view why) {
    return make_error(ErrorCode::kProtocol, "invalid base64: " + std::string(why));
  };
  if (text.size() % 4 != 0) {
    return bad("length is not a multiple of 4");
  }
  if (text.size() > static_cast<std::size_t>(std::numeric_limits<int>::max() / 2)) {
    return bad("too long");
  }
  if (text.empty()) {
    return SecureBytes{};
  }
  std::size_t pad = 0;
  if (text.back() == '=') {
    pad = text[text.size() - 2] == '=' ? 2 : 1;
  }
  for (std::size_t i = 0; i < text.size() - pad; ++i) {
    if (b64_value(text[i]) < 0) {
      return bad("character outside the alphabet");
    }
  }
  // Canonical form: the bits that padding leaves over must be zero.
  if (pad == 1 && (b64_value(text[text.size() - 2]) & 0x03) != 0) {
    return bad("non-zero padding bits");
  }
  if (pad == 2 && (b64_value(text[text.size() - 3]) & 0x0f) != 0) {
    return bad("non-zero padding bits");
  }
  SecureBytes out(text.size() / 4 * 3);
  const int n = EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(text.data()),
                                static_cast<int>(text.size()));
  if (n < 0 || static_cast<std::size_t>(n) != out.size()) {
    return bad("rejected by the decoder");
  }
  out.resize(out.size() - pad);
  return out;
}

std::string percent_encode(std::string_view text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (is_alpha(c) || is_digit(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      out += c;
    } else {
      const auto b = static_cast<unsigned char>(c);
      out += '%';
      out += kHex[b >> 4];
      out += kHex[b & 0x0f];
    }
  }
  return out;
}

namespace {

using nlohmann::json;

Error bad_reply(std::string why) {
  return make_error(ErrorCode::kProtocol, std::move(why));
}

}  // namespace

namespace {

constexpr std::size_t kNone = std::string_view::npos;

// The index of the quote closing the JSON string that opens at text[open], or kNone.
std::size_t string_end(std::string_view text, std::size_t open) {
  for (std::size_t i = open + 1; i < text.size(); ++i) {
    if (text[i] == '\\') {
      ++i;
    } else if (text[i] == '"') {
      return i;
    }
  }
  return kNone;
}

std::size_t skip_ws(std::string_view text, std::size_t i) {
  while (i < text.size() &&
         (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r')) {
    ++i;
  }
  return i;
}

constexpr std::size_t kBadJson = kNone - 1;

// Decodes the escapes of a JSON string's contents into `out` (at least text.size() bytes;
// nullptr: only checks): the decoded length; kNone for contents beyond ASCII (a byte >=
// 0x80, a \u escape above U+007F), kBadJson for contents no JSON string has (a raw control
// character, a bad escape), wherever they are.
std::size_t unescape_ascii(std::string_view text, std::uint8_t* out) {
  std::size_t n = 0;
  bool ascii = true;
  const auto put = [&](unsigned c) {
    ascii = ascii && c < 0x80;
    if (out != nullptr && ascii) {
      out[n] = static_cast<std::uint8_t>(c);
    }
    ++n;
  };
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20) {
      return kBadJson;
    }
    if (c != '\\') {
      put(c);
      continue;
    }
    if (++i == text.size()) {
      return kBadJson;
    }
    switch (text[i]) {
      case '"': case '\\': case '/': put(static_cast<unsigned char>(text[i])); break;
      case 'b': put('\b'); break;
      case 'f': put('\f'); break;
      case 'n': put('\n'); break;
      case 'r': put('\r'); break;
      case 't': put('\t'); break;
      case 'u': {
        if (text.size() - i <= 4) {
          return kBadJson;
        }
        unsigned code = 0;
        for (std::size_t k = 1; k <= 4; ++k) {
          const int d = OPENSSL_hexchar2int(static_cast<unsigned char>(text[i + k]));
          if (d < 0) {
            return kBadJson;
          }
          code = code * 16 + static_cast<unsigned>(d);
        }
        put(code);
        i += 4;
        break;
      }
      default:
        return kBadJson;
    }
  }
  return ascii ? n : kNone;
}

// Whether a member name's contents, escapes decoded, are "key".
bool names_key(std::string_view name) {
  std::uint8_t decoded[3 * 6];  // "key" with every character escaped is 18 long
  if (name.size() > sizeof decoded) {
    return false;
  }
  const std::size_t n = unescape_ascii(name, decoded);
  return n == 3 && decoded[0] == 'k' && decoded[1] == 'e' && decoded[2] == 'y';
}

}  // namespace

ScrubbedKeys scrub_key_values(std::string_view body) {
  ScrubbedKeys out;
  out.json.reserve(body.size());
  std::size_t i = 0;
  while (i < body.size()) {
    if (body[i] != '"') {
      out.json += body[i++];
      continue;
    }
    const std::size_t close = string_end(body, i);
    const std::string_view text =
        close == kNone ? std::string_view{} : body.substr(i + 1, close - i - 1);
    if (close == kNone || unescape_ascii(text, nullptr) == kBadJson) {
      // Not JSON from here on. What follows may hold a key (a body cut short, a member
      // name the parser would refuse before its value): the parser gets an unterminated
      // string instead, which it refuses as it would the rest.
      out.json += '"';
      break;
    }
    const std::size_t colon = skip_ws(body, close + 1);
    const bool is_key_name = colon < body.size() && body[colon] == ':' && names_key(text);
    if (!is_key_name) {
      out.json.append(body.substr(i, close + 1 - i));
      i = close + 1;
      continue;
    }
    const std::size_t value = skip_ws(body, colon + 1);
    out.json.append(body.substr(i, value - i));  // the name, ':' and the blanks around it
    i = value;
    if (value == body.size() || body[value] != '"') {
      continue;
    }
    const std::size_t value_close = string_end(body, value);
    if (value_close == kNone) {
      continue;
    }
    const std::string_view value_text = body.substr(value + 1, value_close - value - 1);
    SecureBytes decoded(value_text.size());
    const std::size_t n = unescape_ascii(value_text, decoded.data());
    if (n == kNone || n == kBadJson) {
      continue;  // copied as it is on the next turn, or the end of the text as above
    }
    decoded.resize(n);
    out.json += "\"#" + std::to_string(out.values.size()) + '"';
    out.values.push_back(std::move(decoded));
    i = value_close + 1;
  }
  return out;
}

long scrubbed_index(std::string_view text, std::size_t count) {
  if (text.size() < 2 || text.size() > 12 || text[0] != '#') {
    return -1;
  }
  long index = 0;
  const auto [end, ec] = std::from_chars(text.data() + 1, text.data() + text.size(), index);
  if (ec != std::errc{} || end != text.data() + text.size() || index < 0 ||
      static_cast<std::size_t>(index) >= count) {
    return -1;
  }
  return index;
}

Result<std::vector<Key>> parse_key_container(std::string& body, std::size_t expected,
                                             std::size_t key_bytes) {
  const ScrubbedKeys scrubbed = scrub_key_values(body);
  OPENSSL_cleanse(body.data(), body.size());
  const json doc = json::parse(scrubbed.json, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    return bad_reply("key container is not valid JSON");
  }
  if (!doc.is_object()) {
    return bad_reply("key container is not a JSON object");
  }
  const auto keys = doc.find("keys");
  if (keys == doc.end() || !keys->is_array()) {
    return bad_reply("key container has no \"keys\" array");
  }
  if (keys->size() != expected) {
    return bad_reply("asked for " + std::to_string(expected) + " key(s), got " +
                     std::to_string(keys->size()));
  }
  std::vector<Key> out;
  out.reserve(expected);
  std::set<std::string> seen;
  for (const auto& entry : *keys) {
    if (!entry.is_object()) {
      return bad_reply("a key entry is not an object");
    }
    const auto id = entry.find("key_ID");
    const auto key = entry.find("key");
    if (id == entry.end() || !id->is_string() || key == entry.end() || !key->is_string()) {
      return bad_reply("a key entry lacks the string fields key_ID and key");
    }
    Key k;
    k.key_id = id->get<std::string>();
    if (k.key_id.empty() || k.key_id.size() > 128) {
      return bad_reply("a key_ID is empty or longer than 128 characters");
    }
    if (!seen.insert(k.key_id).second) {
      return bad_reply("key_ID " + k.key_id + " appears twice");
    }
    // A value left in place is no base64, and fails as such.
    const std::string& text = key->get_ref<const std::string&>();
    const long index = scrubbed_index(text, scrubbed.values.size());
    const std::string_view value =
        index < 0 ? std::string_view(text)
                  : std::string_view(reinterpret_cast<const char*>(scrubbed.values[index].data()),
                                     scrubbed.values[index].size());
    auto decoded = base64_decode_strict(value);
    if (!decoded.ok()) {
      return bad_reply("key " + k.key_id + ": " + decoded.error().message);
    }
    k.key = std::move(decoded).value();
    if (key_bytes != 0 && k.key.size() != key_bytes) {
      return bad_reply("key " + k.key_id + " has " + std::to_string(k.key.size()) +
                       " bytes, expected " + std::to_string(key_bytes));
    }
    if (k.key.empty()) {
      return bad_reply("key " + k.key_id + " is empty");
    }
    out.push_back(std::move(k));
  }
  return out;
}

Result<StatusInfo> parse_status(const std::string& body) {
  const json doc = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return bad_reply("status is not a JSON object");
  }
  StatusInfo s;
  const std::pair<const char*, std::string*> strings[] = {
      {"source_KME_ID", &s.source_kme_id},
      {"target_KME_ID", &s.target_kme_id},
      {"master_SAE_ID", &s.master_sae_id},
      {"slave_SAE_ID", &s.slave_sae_id}};
  for (const auto& [name, field] : strings) {
    const auto it = doc.find(name);
    if (it == doc.end() || !it->is_string()) {
      return bad_reply(std::string("status lacks the string field ") + name);
    }
    *field = it->get<std::string>();
  }
  const std::pair<const char*, std::int64_t*> ints[] = {
      {"key_size", &s.key_size},
      {"stored_key_count", &s.stored_key_count},
      {"max_key_count", &s.max_key_count},
      {"max_key_per_request", &s.max_key_per_request},
      {"max_key_size", &s.max_key_size},
      {"min_key_size", &s.min_key_size},
      {"max_SAE_ID_count", &s.max_sae_id_count}};
  for (const auto& [name, field] : ints) {
    const auto it = doc.find(name);
    if (it == doc.end() || !it->is_number_integer()) {
      return bad_reply(std::string("status lacks the integer field ") + name);
    }
    if (it->is_number_unsigned() &&
        it->get<std::uint64_t>() >
            static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return bad_reply(std::string("status field out of range: ") + name);
    }
    *field = it->get<std::int64_t>();
  }
  const auto ext = doc.find("status_extension");
  if (ext != doc.end()) {
    if (!ext->is_object()) {
      return bad_reply("status_extension is not an object");
    }
    s.status_extension_json = ext->dump();
  }
  return s;
}

std::string parse_error_message(const std::string& body) {
  const json doc = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return "";
  }
  const auto it = doc.find("message");
  if (it == doc.end() || !it->is_string()) {
    return "";
  }
  std::string out;
  for (char c : it->get_ref<const std::string&>()) {
    if (out.size() >= 200) {
      out += "...";
      break;
    }
    const auto b = static_cast<unsigned char>(c);
    out += (b >= 0x20 && b < 0x7f) ? c : '?';
  }
  return out;
}

}  // namespace detail

int rejected_http_status(const Error& error) {
  // Made by Client: "key service <url> answered HTTP <status>...". See client.cpp.
  if (error.code != ErrorCode::kRejected) {
    return 0;
  }
  constexpr std::string_view kTag = " answered HTTP ";
  const std::size_t at = error.message.find(kTag);
  if (at == std::string::npos) {
    return 0;
  }
  int status = 0;
  const char* first = error.message.data() + at + kTag.size();
  const char* last = error.message.data() + error.message.size();
  const auto [ptr, ec] = std::from_chars(first, last, status);
  if (ec != std::errc{} || ptr - first != 3) {
    return 0;
  }
  return status;
}

Result<std::string> certificate_common_name(const std::string& cert_file) {
  internal::ErrorMark mark;
  const auto fail = [&](std::string why) {
    const std::string ossl = mark.pop();
    return make_error(ErrorCode::kInvalidArgument,
                      "cannot read the certificate " + cert_file + ": " +
                          (ossl.empty() ? why : why + " (" + ossl + ")"));
  };
  OSSL_LIB_CTX* libctx = internal::private_libctx();
  if (libctx == nullptr) {
    return fail("no private OpenSSL library context");
  }
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_file(cert_file.c_str(), "r"), BIO_free);
  if (!bio) {
    return fail("cannot open the file");
  }
  std::unique_ptr<X509, decltype(&X509_free)> cert(X509_new_ex(libctx, nullptr), X509_free);
  X509* raw = cert.get();
  if (raw == nullptr || PEM_read_bio_X509(bio.get(), &raw, nullptr, nullptr) == nullptr) {
    return fail("no PEM certificate");
  }
  const X509_NAME* subject = X509_get_subject_name(raw);
  const int index = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  if (index < 0) {
    return fail("the subject has no CN");
  }
  const ASN1_STRING* value = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, index));
  unsigned char* utf8 = nullptr;
  const int len = ASN1_STRING_to_UTF8(&utf8, value);
  if (len < 0) {
    return fail("the CN is not a string");
  }
  std::string cn(reinterpret_cast<char*>(utf8), static_cast<std::size_t>(len));
  OPENSSL_free(utf8);
  return cn;
}

qkd::core::Status random_bytes(std::span<std::uint8_t> out) {
  internal::ErrorMark mark;
  OSSL_LIB_CTX* libctx = internal::private_libctx();
  if (libctx == nullptr || RAND_bytes_ex(libctx, out.data(), out.size(), 0) != 1) {
    const std::string ossl = mark.pop();
    return make_error(ErrorCode::kInternal, "random generator failed: " + ossl);
  }
  return qkd::core::ok_status();
}

}  // namespace qkd::etsi
