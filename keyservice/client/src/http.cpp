// A strict, bounded parser for one HTTP/1.1 response (the KME's reply).
#include <openssl/crypto.h>

#include <algorithm>
#include <charconv>
#include <cstring>

#include "qkd/etsi/client_detail.hpp"

namespace qkd::etsi::detail {

namespace {

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) { return lower(x) == lower(y); });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

bool is_token_char(char c) {
  const auto b = static_cast<unsigned char>(c);
  if (b <= 0x20 || b >= 0x7f) {
    return false;
  }
  return std::string_view("()<>@,;:\\\"/[]?={}").find(c) == std::string_view::npos;
}

// Does a comma-separated header value contain `token` (case-insensitive)?
bool has_token(std::string_view value, std::string_view token) {
  while (!value.empty()) {
    const std::size_t comma = value.find(',');
    if (iequals(trim(value.substr(0, comma)), token)) {
      return true;
    }
    if (comma == std::string_view::npos) {
      break;
    }
    value.remove_prefix(comma + 1);
  }
  return false;
}

// buf_ and body_ hold the body (keys in base64). std::string's own growth frees the old
// buffer as it is, and its erase leaves the bytes it moved past the new end: these three
// keep every byte that leaves a string's use cleansed.
void cleanse_all(std::string& s) {
  s.resize(s.capacity());  // no reallocation; the bytes past size() become reachable
  OPENSSL_cleanse(s.data(), s.size());
}

void append_cleansed(std::string& s, std::string_view more) {
  if (more.size() > s.capacity() - s.size()) {
    std::string grown;
    grown.reserve(std::max(2 * s.capacity(), s.size() + more.size()));
    grown.append(s);
    cleanse_all(s);
    s.swap(grown);  // the old buffer, cleansed, goes with `grown`
  }
  s.append(more);
}

void erase_front(std::string& s, std::size_t n) {
  const std::size_t left = s.size() - n;
  std::memmove(s.data(), s.data() + n, left);
  OPENSSL_cleanse(s.data() + left, n);
  s.resize(left);
}

}  // namespace

ResponseParser::~ResponseParser() {
  cleanse_all(buf_);
  cleanse_all(body_);
}

ResponseParser::State ResponseParser::fail(std::string message) {
  error_ = std::move(message);
  state_ = State::kError;
  return state_;
}

ResponseParser::State ResponseParser::feed(std::span<const std::uint8_t> data) {
  if (state_ != State::kNeedMore) {
    if (!data.empty() && state_ == State::kDone) {
      return fail("bytes after the end of the response");
    }
    return state_;
  }
  if (!data.empty()) {
    received_any_ = true;
  }
  append_cleansed(buf_, std::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
  return advance();
}

ResponseParser::State ResponseParser::feed_eof() {
  if (state_ != State::kNeedMore) {
    return state_;
  }
  keep_alive_ = false;
  if (phase_ == Phase::kBodyUntilEof) {
    phase_ = Phase::kDone;
    state_ = State::kDone;
    return state_;
  }
  return fail(received_any_ ? "connection closed in the middle of the response"
                            : "connection closed before any response");
}

ResponseParser::State ResponseParser::parse_headers(std::string_view head) {
  // Status line: HTTP/1.x SP 3DIGIT SP reason
  std::size_t eol = head.find("\r\n");
  const std::string_view status_line = head.substr(0, eol);
  if (status_line.size() < 12 || status_line.substr(0, 7) != "HTTP/1." ||
      (status_line[7] != '0' && status_line[7] != '1') || status_line[8] != ' ' ||
      (status_line.size() > 12 && status_line[12] != ' ')) {
    return fail("malformed status line");
  }
  const bool http10 = status_line[7] == '0';
  int status = 0;
  const auto [ptr, ec] = std::from_chars(status_line.data() + 9, status_line.data() + 12, status);
  if (ec != std::errc{} || ptr != status_line.data() + 12 || status < 100 || status > 599) {
    return fail("malformed status code");
  }
  status_ = status;
  keep_alive_ = !http10;
  bool have_length = false;
  bool chunked = false;
  std::size_t length = 0;
  std::string_view rest = eol == std::string_view::npos ? std::string_view{} : head.substr(eol + 2);
  while (!rest.empty()) {
    eol = rest.find("\r\n");
    const std::string_view line = rest.substr(0, eol);
    rest = eol == std::string_view::npos ? std::string_view{} : rest.substr(eol + 2);
    if (line.empty()) {
      continue;
    }
    const std::size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0) {
      return fail("malformed header line");
    }
    const std::string_view name = line.substr(0, colon);
    if (!std::all_of(name.begin(), name.end(), is_token_char)) {
      return fail("malformed header name");
    }
    const std::string_view value = trim(line.substr(colon + 1));
    for (char c : value) {
      const auto b = static_cast<unsigned char>(c);
      if ((b < 0x20 && c != '\t') || b == 0x7f) {
        return fail("control character in a header value");
      }
    }
    if (iequals(name, "content-length")) {
      std::size_t v = 0;
      const auto [p, e] = std::from_chars(value.data(), value.data() + value.size(), v);
      if (value.empty() || e != std::errc{} || p != value.data() + value.size()) {
        return fail("malformed Content-Length");
      }
      if (have_length && v != length) {
        return fail("conflicting Content-Length headers");
      }
      have_length = true;
      length = v;
    } else if (iequals(name, "transfer-encoding")) {
      if (!iequals(value, "chunked")) {
        return fail("unsupported Transfer-Encoding: only chunked");
      }
      chunked = true;
    } else if (iequals(name, "connection")) {
      if (has_token(value, "close")) {
        keep_alive_ = false;
      } else if (has_token(value, "keep-alive")) {
        keep_alive_ = true;
      }
    }
  }
  if (chunked && have_length) {
    return fail("both Content-Length and chunked");
  }
  if (status_ < 200) {
    return fail("unexpected informational response");  // we never send Expect: 100-continue
  }
  if (status_ == 204 || status_ == 304) {
    phase_ = Phase::kDone;
  } else if (chunked) {
    phase_ = Phase::kChunkSize;
  } else if (have_length) {
    if (length > kMaxBodyBytes) {
      return fail("body larger than " + std::to_string(kMaxBodyBytes) + " bytes");
    }
    remaining_ = length;
    phase_ = length == 0 ? Phase::kDone : Phase::kBodyLength;
  } else {
    keep_alive_ = false;
    phase_ = Phase::kBodyUntilEof;
  }
  return State::kNeedMore;
}

bool ResponseParser::take_remaining() {
  const std::size_t take = std::min(remaining_, buf_.size());
  append_cleansed(body_, std::string_view(buf_).substr(0, take));
  erase_front(buf_, take);
  remaining_ -= take;
  return remaining_ == 0;
}

ResponseParser::State ResponseParser::advance() {
  for (;;) {
    switch (phase_) {
      case Phase::kHeaders: {
        const std::size_t end = buf_.find("\r\n\r\n");
        if (end == std::string::npos) {
          if (buf_.size() > kMaxHeaderBytes) {
            return fail("response headers too large");
          }
          return State::kNeedMore;
        }
        if (end + 4 > kMaxHeaderBytes) {
          return fail("response headers too large");
        }
        if (parse_headers(std::string_view(buf_).substr(0, end)) == State::kError) {
          return state_;
        }
        erase_front(buf_, end + 4);
        break;
      }
      case Phase::kBodyLength: {
        if (!take_remaining()) {
          return State::kNeedMore;
        }
        phase_ = Phase::kDone;
        break;
      }
      case Phase::kBodyUntilEof: {
        if (body_.size() + buf_.size() > kMaxBodyBytes) {
          return fail("body larger than " + std::to_string(kMaxBodyBytes) + " bytes");
        }
        append_cleansed(body_, buf_);
        erase_front(buf_, buf_.size());
        return State::kNeedMore;
      }
      case Phase::kChunkSize: {
        const std::size_t eol = buf_.find("\r\n");
        if (eol == std::string::npos) {
          if (buf_.size() > 1024) {
            return fail("chunk size line too long");
          }
          return State::kNeedMore;
        }
        std::string_view line = std::string_view(buf_).substr(0, eol);
        line = line.substr(0, line.find(';'));  // drop chunk extensions
        line = trim(line);
        std::size_t size = 0;
        const auto [p, e] = std::from_chars(line.data(), line.data() + line.size(), size, 16);
        if (line.empty() || line.size() > 8 || e != std::errc{} || p != line.data() + line.size()) {
          return fail("malformed chunk size");
        }
        erase_front(buf_, eol + 2);
        if (size == 0) {
          phase_ = Phase::kTrailers;
        } else {
          if (body_.size() + size > kMaxBodyBytes) {
            return fail("body larger than " + std::to_string(kMaxBodyBytes) + " bytes");
          }
          remaining_ = size;
          phase_ = Phase::kChunkData;
        }
        break;
      }
      case Phase::kChunkData: {
        if (!take_remaining()) {
          return State::kNeedMore;
        }
        phase_ = Phase::kChunkDataEnd;
        break;
      }
      case Phase::kChunkDataEnd: {
        if (buf_.size() < 2) {
          return State::kNeedMore;
        }
        if (buf_.compare(0, 2, "\r\n") != 0) {
          return fail("chunk not followed by CRLF");
        }
        erase_front(buf_, 2);
        phase_ = Phase::kChunkSize;
        break;
      }
      case Phase::kTrailers: {
        const std::size_t eol = buf_.find("\r\n");
        if (eol == std::string::npos) {
          if (buf_.size() > kMaxHeaderBytes) {
            return fail("trailers too large");
          }
          return State::kNeedMore;
        }
        erase_front(buf_, eol + 2);
        if (eol == 0) {
          phase_ = Phase::kDone;
        }
        break;
      }
      case Phase::kDone: {
        if (!buf_.empty()) {
          return fail("bytes after the end of the response");
        }
        state_ = State::kDone;
        return state_;
      }
    }
  }
}

}  // namespace qkd::etsi::detail
