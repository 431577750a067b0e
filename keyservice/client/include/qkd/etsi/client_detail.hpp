// Internals of the ETSI 014 client, exposed for unit tests and fuzzers only: URL parsing,
// strict base64, percent-encoding, the HTTP/1.1 response parser and the JSON reply
// decoders. Not a stable API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qkd/core/result.hpp"
#include "qkd/core/secure_bytes.hpp"
#include "qkd/etsi/client.hpp"

namespace qkd::etsi::detail {

// "https://host[:port][/prefix]". host: a DNS name, an IPv4 address or "[IPv6]".
// Only https; no userinfo, query or fragment. The port defaults to 443.
struct Url {
  std::string host;         // without brackets
  std::uint16_t port = 443;
  std::string path_prefix;  // "" or "/prefix" (no trailing slash)
  bool host_is_ip = false;
  std::string text;         // the URL as given, trailing '/' removed, for messages
  [[nodiscard]] std::string authority() const;  // Host header value
};
[[nodiscard]] Result<Url> parse_url(std::string_view url);

// RFC 4648 base64 (standard alphabet) with padding required, no whitespace, and the unused
// bits of the last quantum zero (so that each byte string has exactly one encoding).
[[nodiscard]] Result<qkd::core::SecureBytes> base64_decode_strict(std::string_view text);

// Percent-encodes one path segment or query value (RFC 3986 unreserved stays as it is).
[[nodiscard]] std::string percent_encode(std::string_view text);

// Tests only: `hook` (nullptr: none, the default) runs each time a call has made a new
// connection to its KME, TLS handshake done, before the call checks its deadline again and
// sends its request; a test lets the deadline pass there. Set it while no call runs.
void set_new_connection_hook(void (*hook)());

// Tests only: `hook` (nullptr: none, the default) runs at the start of each call, while the
// call holds its client's connection pool lock (to take a kept-alive connection); a test
// forks then. Set it while no call runs.
void set_pool_locked_hook(void (*hook)());

// Incremental parser for one HTTP/1.1 response. Bodies framed by Content-Length, by
// chunked transfer-coding, or (only when neither is present) by the end of the connection.
// Bounded: headers at most kMaxHeaderBytes, body at most kMaxBodyBytes.
class ResponseParser {
 public:
  static constexpr std::size_t kMaxHeaderBytes = 16 * 1024;
  static constexpr std::size_t kMaxBodyBytes = 1024 * 1024;
  enum class State { kNeedMore, kDone, kError };

  ResponseParser() = default;
  ResponseParser(const ResponseParser&) = delete;
  ResponseParser& operator=(const ResponseParser&) = delete;
  ~ResponseParser();

  // Feeds bytes received; bytes after the end of this response are an error (we never
  // pipeline). Returns the new state.
  State feed(std::span<const std::uint8_t> data);
  // The peer closed the connection.
  State feed_eof();

  [[nodiscard]] State state() const { return state_; }
  [[nodiscard]] const std::string& error() const { return error_; }
  [[nodiscard]] int status() const { return status_; }
  [[nodiscard]] bool keep_alive() const { return keep_alive_; }
  [[nodiscard]] std::string& body() { return body_; }
  [[nodiscard]] bool received_anything() const { return received_any_; }

 private:
  enum class Phase { kHeaders, kBodyLength, kBodyUntilEof, kChunkSize, kChunkData,
                     kChunkDataEnd, kTrailers, kDone };
  State fail(std::string message);
  // Moves up to remaining_ buffered bytes into the body; true once none remain.
  bool take_remaining();
  State advance();
  State parse_headers(std::string_view head);

  State state_ = State::kNeedMore;
  Phase phase_ = Phase::kHeaders;
  std::string buf_;  // unconsumed input
  std::string body_;
  std::string error_;
  int status_ = 0;
  bool keep_alive_ = true;
  bool received_any_ = false;
  std::size_t remaining_ = 0;  // body or chunk bytes still expected
};

// A key container with the text of every string value of a member named "key" (at any
// depth) moved out into `values` and replaced by "#<index into values>", so that a JSON
// parser, whose own token buffers are freed uncleansed, never sees a key. `values` hold the
// texts with their JSON escapes decoded. A value that is not ASCII (a raw byte >= 0x80 or
// a \u escape above U+007F) is left in place: it cannot be base64, and the parser judges
// it as it would have. Where the body stops being JSON (an unterminated string, a "key"
// value with a bad escape or a raw control character), the text ends with an unterminated
// string instead of the rest. So the scrubbed text is valid JSON exactly when `body` is,
// and, the values put back, it parses to the same document.
struct ScrubbedKeys {
  std::string json;
  std::vector<qkd::core::SecureBytes> values;
};
[[nodiscard]] ScrubbedKeys scrub_key_values(std::string_view body);
// The index that a scrubbed value's placeholder names, or -1 when `text` is no placeholder.
[[nodiscard]] long scrubbed_index(std::string_view text, std::size_t count);

// Decoders of 200 reply bodies. `expected` is the number of keys asked for; key_IDs must
// be non-empty and distinct; each key must decode to `key_bytes` bytes when key_bytes != 0.
[[nodiscard]] Result<std::vector<Key>> parse_key_container(std::string& body,
                                                           std::size_t expected,
                                                           std::size_t key_bytes);
[[nodiscard]] Result<StatusInfo> parse_status(const std::string& body);
// The "message" of an ETSI Error body, sanitised (printable ASCII, at most 200 chars), or "".
[[nodiscard]] std::string parse_error_message(const std::string& body);

}  // namespace qkd::etsi::detail
