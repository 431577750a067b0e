// Strict JSON config parsing: every error names the file and the field.
#include "qkd/kms/config.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/ip/address.hpp>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "qkd/kms/key_store.hpp"
#include "qkd/kms/tls.hpp"
#include "qkd/kms/util.hpp"

namespace qkd::kms {

using json = nlohmann::json;
using qkd::core::ErrorCode;
using qkd::core::make_error;
using qkd::core::Result;

std::string HostPort::to_string() const {
  if (host.find(':') != std::string::npos) {
    return fmt::format("[{}]:{}", host, port);
  }
  return fmt::format("{}:{}", host, port);
}

namespace {

// Thrown only inside this file and caught in parse_config (the edge).
struct ConfigError {
  std::string field;
  std::string what;
};

[[noreturn]] void fail(const std::string& field, std::string what) {
  throw ConfigError{field, std::move(what)};
}

// A rule of qkdcore's validate(), whose message starts with the field it is about
// ("epsilon_cor must be in ..."): named in the same form as every other error
// ("link.protocol.epsilon_cor: must be in ...").
[[noreturn]] void fail_engine_rule(const std::string& section, const std::string& message) {
  const auto space = message.find(' ');
  const std::string_view first = std::string_view(message).substr(0, space);
  if (space != std::string::npos && !first.empty() &&
      std::all_of(first.begin(), first.end(), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
      })) {
    fail(section + "." + std::string(first), message.substr(space + 1));
  }
  fail(section, message);
}

std::string join(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

// A KME or SAE ID: matched against certificate CNs (at most 64 bytes, X.509's upper bound)
// and written into every log line (no control characters, which could split or forge
// one). The JSON parser has refused ill-formed UTF-8 already (RFC 3629: no overlong form,
// surrogate or code point past U+10FFFF). Spaces, quotes and backslashes are fine ("bob 3").
void check_id(const std::string& field, std::string_view id) {
  constexpr std::size_t kMaxIdBytes = 64;
  if (id.empty()) {
    fail(field, "must not be empty");
  }
  if (id.size() > kMaxIdBytes) {
    fail(field, fmt::format("is {} bytes, more than {} (the longest certificate CN)", id.size(),
                            kMaxIdBytes));
  }
  for (std::size_t i = 0; i < id.size(); ++i) {
    const auto c = static_cast<unsigned char>(id[i]);
    if (c < 0x20 || c == 0x7f) {
      fail(field, fmt::format("holds a control character (0x{:02x}) at byte {}", c, i));
    }
  }
}

// Reads one JSON object, remembering which keys were read, and rejects the others.
class ObjectReader {
 public:
  ObjectReader(const json& j, std::string path) : j_(j), path_(std::move(path)) {
    if (!j_.is_object()) {
      fail(path_.empty() ? "(top level)" : path_, "expected an object");
    }
  }

  [[nodiscard]] bool has(const std::string& key) {
    known_.insert(key);
    return j_.contains(key);
  }
  const json& get(const std::string& key) {
    known_.insert(key);
    if (!j_.contains(key)) {
      fail(field(key), "missing");
    }
    return j_.at(key);
  }
  [[nodiscard]] std::string field(const std::string& key) const { return join(path_, key); }

  std::string string(const std::string& key) {
    const json& v = get(key);
    if (!v.is_string()) {
      fail(field(key), "expected a string");
    }
    auto s = v.get<std::string>();
    if (s.empty()) {
      fail(field(key), "must not be empty");
    }
    return s;
  }

  // `hi_name`: how the documentation writes `hi` ("2^32"), added to the message.
  std::uint64_t unsigned_int(const std::string& key, std::uint64_t lo, std::uint64_t hi,
                             std::string_view hi_name = {}) {
    const json& v = get(key);
    if (!v.is_number_integer() ||
        (v.is_number_integer() && !v.is_number_unsigned() && v.get<std::int64_t>() < 0)) {
      fail(field(key), "expected a non-negative integer");
    }
    const auto n = v.get<std::uint64_t>();
    if (n < lo || n > hi) {
      fail(field(key), hi_name.empty()
                           ? fmt::format("must be between {} and {}", lo, hi)
                           : fmt::format("must be between {} and {} ({})", lo, hi, hi_name));
    }
    return n;
  }

  double number(const std::string& key, double lo, double hi) {
    const json& v = get(key);
    if (!v.is_number()) {
      fail(field(key), "expected a number");
    }
    const auto d = v.get<double>();
    if (!(d >= lo && d <= hi)) {
      fail(field(key), fmt::format("must be between {} and {}", lo, hi));
    }
    return d;
  }

  bool boolean(const std::string& key) {
    const json& v = get(key);
    if (!v.is_boolean()) {
      fail(field(key), "expected true or false");
    }
    return v.get<bool>();
  }

  // A KME or SAE ID (check_id).
  std::string id(const std::string& key) {
    const json& v = get(key);
    if (!v.is_string()) {
      fail(field(key), "expected a string");
    }
    auto s = v.get<std::string>();
    check_id(field(key), s);
    return s;
  }

  // A non-empty list of distinct IDs; an error names the entry ("saes[2]").
  std::vector<std::string> id_list(const std::string& key) {
    const json& v = get(key);
    if (!v.is_array() || v.empty()) {
      fail(field(key), "expected a non-empty array of strings");
    }
    std::vector<std::string> out;
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (!v[i].is_string()) {
        fail(fmt::format("{}[{}]", field(key), i), "expected a string");
      }
      auto s = v[i].get<std::string>();
      check_id(fmt::format("{}[{}]", field(key), i), s);
      if (std::find(out.begin(), out.end(), s) != out.end()) {
        fail(fmt::format("{}[{}]", field(key), i), fmt::format("duplicate \"{}\"", s));
      }
      out.push_back(std::move(s));
    }
    return out;
  }

  // Optional fields: `out` keeps its default when `key` is absent; otherwise the value is
  // checked exactly as by unsigned_int / number / boolean (same messages).
  template <typename T>
  void optional_uint(const std::string& key, T& out, std::uint64_t lo, std::uint64_t hi) {
    if (has(key)) {
      out = static_cast<T>(unsigned_int(key, lo, hi));
    }
  }
  void optional_number(const std::string& key, double& out, double lo, double hi) {
    if (has(key)) {
      out = number(key, lo, hi);
    }
  }
  void optional_boolean(const std::string& key, bool& out) {
    if (has(key)) {
      out = boolean(key);
    }
  }

  // Call last: any key not read is unknown.
  void finish() const {
    for (const auto& [k, _] : j_.items()) {
      if (!known_.contains(k)) {
        fail(field(k), "unknown key");
      }
    }
  }

 private:
  const json& j_;
  std::string path_;
  std::set<std::string> known_;
};

HostPort parse_host_port(const std::string& field, const std::string& s) {
  const auto colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == s.size()) {
    fail(field, "expected \"host:port\"");
  }
  std::string host = s.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  const std::string port_text = s.substr(colon + 1);
  unsigned port = 0;
  auto [ptr, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc{} || ptr != port_text.data() + port_text.size() || port > 65535) {
    fail(field, "port must be a number from 0 to 65535");
  }
  return HostPort{host, static_cast<std::uint16_t>(port)};
}

// A listen address: the listener binds an IP address as given (asio::ip::make_address,
// https_server.cpp), it does not resolve a name.
HostPort parse_listen(const std::string& field, const std::string& s) {
  HostPort hp = parse_host_port(field, s);
  boost::system::error_code ec;
  (void)boost::asio::ip::make_address(hp.host, ec);
  if (ec) {
    fail(field, fmt::format("\"{}\" is not an IP address: a listener needs an IPv4 or IPv6 "
                            "address (e.g. 127.0.0.1, 0.0.0.0, [::1]), not a name",
                            hp.host));
  }
  return hp;
}

std::filesystem::path resolve(const std::filesystem::path& base, const std::string& p) {
  std::filesystem::path path(p);
  return path.is_absolute() ? path : base / path;
}

// An open file descriptor, closed however this ends.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) {
      ::close(fd);
    }
  }
};

// A file that can be opened for reading and is not a directory (which opens, but reads as
// nothing); an error gives the system's reason.
void check_readable(const std::string& field, const std::filesystem::path& p, bool check) {
  if (!check) {
    return;
  }
  const Fd f{::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK)};
  if (f.fd < 0) {
    fail(field, fmt::format("cannot read {}: {}", p.string(), std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(f.fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    fail(field, fmt::format("{} is a directory", p.string()));
  }
}

// The folder of the store's database must let this user create files in it (the database,
// SQLite's -wal and -shm): checked with access(2), the store itself is not opened.
void check_store_folder(const std::string& field, const std::filesystem::path& db) {
  const std::filesystem::path dir = db.has_parent_path() ? db.parent_path() : ".";
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    fail(field, fmt::format("folder {}: {}", dir.string(), std::strerror(errno)));
  }
  if (!S_ISDIR(st.st_mode)) {
    fail(field, fmt::format("folder {}: {}", dir.string(), std::strerror(ENOTDIR)));
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    fail(field, fmt::format("folder {}: {} (the KME creates {} and its -wal and -shm files there)",
                            dir.string(), std::strerror(errno), db.filename().string()));
  }
}

qkd::core::SecureBytes parse_psk_hex(const std::string& field, std::string_view hex) {
  auto bytes = hex_decode(hex);
  if (!bytes) {
    fail(field, "expected an even number of hexadecimal digits");
  }
  if (bytes->size() < 32) {
    fail(field, fmt::format("must be at least 32 bytes (64 hex digits), got {}", bytes->size()));
  }
  return std::move(*bytes);
}

KeysConfig parse_keys(ObjectReader& top) {
  KeysConfig k;
  if (!top.has("keys")) {
    return k;
  }
  ObjectReader r(top.get("keys"), "keys");
  constexpr std::uint64_t kMaxBits = 1u << 20;
  auto bits = [&](const char* name, std::uint32_t& out) {
    if (r.has(name)) {
      out = static_cast<std::uint32_t>(r.unsigned_int(name, 8, kMaxBits));
      if (out % 8 != 0) {
        fail(r.field(name), "must be a multiple of 8");
      }
    }
  };
  bits("key_size", k.key_size);
  bits("min_key_size", k.min_key_size);
  bits("max_key_size", k.max_key_size);
  r.optional_uint("max_key_per_request", k.max_key_per_request, 1, 100000);
  r.optional_uint("max_key_count", k.max_key_count, 1, 1'000'000'000);
  r.optional_uint("dec_wait_ms", k.dec_wait_ms, 0, 600'000);
  // Room for the peer's prepared keys of one size (store.prepared_keys, at most 4096) and
  // two requests: a lower cap would drop keys before any SAE could fetch them.
  const std::uint64_t unfetched_floor = 4096 + 2 * std::uint64_t{k.max_key_per_request};
  if (r.has("max_unfetched_per_pair")) {
    r.optional_uint("max_unfetched_per_pair", k.max_unfetched_per_pair, 0, 100'000'000);
    if (k.max_unfetched_per_pair != 0 && k.max_unfetched_per_pair < unfetched_floor) {
      fail(r.field("max_unfetched_per_pair"),
           fmt::format("must be 0 or at least {} (4096 prepared keys + 2 x "
                       "keys.max_key_per_request)",
                       unfetched_floor));
    }
  } else {
    k.max_unfetched_per_pair = std::max<std::uint64_t>(k.max_unfetched_per_pair, unfetched_floor);
  }
  // keys.max_age_s: 0 = keys never expire; else 1 s .. 1 year.
  if (r.has("max_age_s")) {
    k.max_age_s = static_cast<std::uint32_t>(r.unsigned_int("max_age_s", 0, 31'536'000));
  }
  r.finish();
  if (k.min_key_size > k.max_key_size) {
    fail("keys.min_key_size", "must not exceed keys.max_key_size");
  }
  if (k.key_size < k.min_key_size || k.key_size > k.max_key_size) {
    fail("keys.key_size", "must lie between keys.min_key_size and keys.max_key_size");
  }
  return k;
}

qkd::core::ChannelParams parse_channel(ObjectReader& link) {
  qkd::core::ChannelParams c;
  if (!link.has("channel")) {
    return c;
  }
  ObjectReader r(link.get("channel"), "link.channel");
  r.optional_number("length_km", c.length_km, 0, 1000);
  r.optional_number("loss_db_per_km", c.loss_db_per_km, 0, 10);
  r.optional_number("detector_efficiency", c.detector_efficiency, 0, 1);
  r.optional_number("dark_count_prob", c.dark_count_prob, 0, 1);
  r.optional_number("misalignment", c.misalignment, 0, 0.5);
  r.optional_number("eve_intercept_fraction", c.eve_intercept_fraction, 0, 1);
  r.optional_number("eve_z_basis_prob", c.eve_z_basis_prob, 0, 1);
  r.optional_number("pulse_rate_hz", c.pulse_rate_hz, 1, 1e12);
  if (r.has("source")) {
    const std::string src = r.string("source");
    if (src == "single_photon") {
      c.source = qkd::core::SourceKind::kSinglePhoton;
    } else if (src == "weak_coherent") {
      c.source = qkd::core::SourceKind::kWeakCoherent;
    } else {
      fail(r.field("source"), "must be \"single_photon\" or \"weak_coherent\"");
    }
  }
  r.optional_number("mu_signal", c.mu_signal, 0, 20);
  r.optional_number("mu_decoy", c.mu_decoy, 0, 20);
  r.optional_number("mu_vacuum", c.mu_vacuum, 0, 20);
  r.optional_number("prob_decoy", c.prob_decoy, 0, 1);
  r.optional_number("prob_vacuum", c.prob_vacuum, 0, 1);
  r.optional_number("insertion_loss_db", c.insertion_loss_db, 0, 200);
  r.optional_boolean("fiber_cut", c.fiber_cut);
  r.optional_boolean("eve_photon_number_splitting", c.eve_photon_number_splitting);
  r.optional_number("dead_time_ns", c.dead_time_ns, 0, 1e9);
  r.optional_number("afterpulse_prob", c.afterpulse_prob, 0, 0.5);
  r.optional_number("afterpulse_window_ns", c.afterpulse_window_ns, 0, 1e9);
  r.finish();
  if (c.detector_efficiency <= 0) {
    fail("link.channel.detector_efficiency", "must be greater than 0");
  }
  // Cross-field rules, named here with the full path (qkdcore's validate() repeats them).
  if (c.mu_signal <= 0) {
    fail("link.channel.mu_signal", "must be greater than 0");
  }
  if (c.mu_decoy >= c.mu_signal) {
    fail("link.channel.mu_decoy", "must be less than link.channel.mu_signal");
  }
  if (c.mu_vacuum > 0 && c.mu_vacuum >= c.mu_decoy) {
    fail("link.channel.mu_vacuum", "must be less than link.channel.mu_decoy");
  }
  if (c.prob_decoy + c.prob_vacuum >= 1) {
    fail("link.channel.prob_vacuum",
         "link.channel.prob_decoy + link.channel.prob_vacuum must be less than 1");
  }
  if (c.source == qkd::core::SourceKind::kSinglePhoton && (c.prob_decoy > 0 || c.prob_vacuum > 0)) {
    fail(c.prob_decoy > 0 ? "link.channel.prob_decoy" : "link.channel.prob_vacuum",
         "decoy pulses need link.channel.source = \"weak_coherent\"");
  }
  return c;
}

qkd::core::ProtocolParams parse_protocol(ObjectReader& link) {
  qkd::core::ProtocolParams p;
  if (!link.has("protocol")) {
    return p;
  }
  ObjectReader r(link.get("protocol"), "link.protocol");
  if (r.has("pulses_per_block")) {  // qkdcore's bounds (validate())
    p.pulses_per_block = r.unsigned_int("pulses_per_block", 1000, std::uint64_t{1} << 32, "2^32");
  }
  r.optional_number("sample_fraction", p.sample_fraction, 0.001, 0.9);
  r.optional_number("qber_abort", p.qber_abort, 0.0, 0.5);
  // 0 = the Cascade variant's own number of passes.
  r.optional_uint("cascade_passes", p.cascade_passes, 0, 16);
  // 0 = ceil(log2(1 / epsilon_cor)); otherwise at least that (checked by validate()).
  r.optional_uint("verify_hash_bits", p.verify_hash_bits, 0, 256);
  r.optional_uint("cascade_biconf_rounds", p.cascade_biconf_rounds, 0, 64);
  r.optional_number("safety_margin", p.safety_margin, 0.0, 0.9);
  r.optional_number("z_basis_prob", p.z_basis_prob, 0.5, 0.99);
  r.optional_number("epsilon_sec", p.epsilon_sec, 0.0, 0.5);
  if (r.has("epsilon_sec") && p.epsilon_sec <= 0) {
    fail(r.field("epsilon_sec"), "must be greater than 0");
  }
  r.optional_number("epsilon_cor", p.epsilon_cor, 0.0, 0.5);
  if (r.has("epsilon_cor") && p.epsilon_cor <= 0) {
    fail(r.field("epsilon_cor"), "must be greater than 0");
  }
  r.optional_number("confidence_sd", p.confidence_sd, 0.0, 50.0);
  if (r.has("cascade_variant")) {
    auto v = qkd::core::parse_cascade_variant(r.string("cascade_variant"));
    if (!v) {
      fail(r.field("cascade_variant"), "must be one of original, yan, modern");
    }
    p.cascade_variant = *v;
  }
  if (r.has("key_bound")) {
    auto b = qkd::core::parse_key_bound(r.string("key_bound"));
    if (!b) {
      fail(r.field("key_bound"),
           "must be one of asymptotic, decoy, finite, finite-decoy, bbbss92, slutsky98");
    }
    p.key_bound = *b;
  }
  if (r.has("auth")) {
    auto a = qkd::core::parse_auth_mode(r.string("auth"));
    if (!a) {
      fail(r.field("auth"), "must be \"wegman-carter\" or \"hmac\"");
    }
    p.auth = *a;
  }
  r.optional_uint("auth_tag_bits", p.auth_tag_bits, 64, 128);
  if (p.auth_tag_bits != 64 && p.auth_tag_bits != 128) {
    fail(r.field("auth_tag_bits"), "must be 64 or 128");
  }
  r.optional_uint("auth_pool_bits", p.auth_pool_bits, 1024, 1U << 24);
  if (p.auth_pool_bits % 8 != 0) {
    fail(r.field("auth_pool_bits"), "must be a multiple of 8");
  }
  r.optional_uint("auth_key_refresh_blocks", p.auth_key_refresh_blocks, 1, 1'000'000);
  r.optional_boolean("auth_every_message", p.auth_every_message);
  if (r.has("message_timeout_ms")) {
    p.message_timeout =
        std::chrono::milliseconds(r.unsigned_int("message_timeout_ms", 100, 600'000));
  }
  r.finish();
  return p;
}

LinkConfig parse_link(ObjectReader& top, const std::filesystem::path& base, bool check_files) {
  ObjectReader r(top.get("link"), "link");
  LinkConfig l;
  l.peer_kme_id = r.id("peer_kme_id");
  l.peer_saes = r.id_list("peer_saes");
  const std::string role = r.string("role");
  if (role == "alice") {
    l.role = LinkRole::kAlice;
  } else if (role == "bob") {
    l.role = LinkRole::kBob;
  } else {
    fail(r.field("role"), "must be \"alice\" or \"bob\"");
  }
  const bool has_listen = r.has("listen");
  const bool has_connect = r.has("connect");
  if (l.role == LinkRole::kAlice) {
    if (has_connect) {
      fail(r.field("connect"), "not allowed with role \"alice\" (use link.listen)");
    }
    l.listen = parse_listen(r.field("listen"), r.string("listen"));
  } else {
    if (has_listen) {
      fail(r.field("listen"), "not allowed with role \"bob\" (use link.connect)");
    }
    l.connect = parse_host_port(r.field("connect"), r.string("connect"));
    if (l.connect.port == 0) {
      fail(r.field("connect"), "port 0 is not a valid destination");
    }
  }
  const bool has_hex = r.has("psk_hex");
  const bool has_file = r.has("psk_file");
  if (has_hex == has_file) {
    fail(r.field("psk_hex"), "give exactly one of link.psk_hex and link.psk_file");
  }
  if (has_hex) {
    l.psk = parse_psk_hex(r.field("psk_hex"), r.string("psk_hex"));
    l.psk_in_config = true;
  } else {
    const auto path = resolve(base, r.string("psk_file"));
    // A regular file of a few bytes: a device or a pipe named by mistake (/dev/zero) must
    // get an error, not a read that never ends.
    constexpr std::size_t kMaxPskFileBytes = 4096;
    // Checked and read through one descriptor (the file checked is the file read), into a
    // buffer cleansed however this ends.
    const Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK)};
    const int fd = f.fd;
    if (fd < 0) {
      fail(r.field("psk_file"), fmt::format("cannot read {}: {}", path.string(),
                                            std::strerror(errno)));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      fail(r.field("psk_file"), fmt::format("{} is not a readable regular file", path.string()));
    }
    // A secret as the store's node key is: refused when others may read it.
    if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
      fail(r.field("psk_file"),
           fmt::format("{} must be accessible by its owner only (chmod 600), its mode is {:o}",
                       path.string(), st.st_mode & 0777u));
    }
    qkd::core::SecureBytes text(kMaxPskFileBytes + 1);
    std::size_t got = 0;
    for (;;) {
      const ssize_t n = ::read(fd, text.data() + got, text.size() - got);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n < 0) {
        fail(r.field("psk_file"), fmt::format("cannot read {}: {}", path.string(),
                                              std::strerror(errno)));
      }
      got += static_cast<std::size_t>(n);
      if (n == 0 || got == text.size()) {
        break;
      }
    }
    if (got > kMaxPskFileBytes) {
      fail(r.field("psk_file"),
           fmt::format("{} is longer than {} bytes (a hex key is 64 digits)", path.string(),
                       kMaxPskFileBytes));
    }
    while (got > 0 && std::isspace(text.data()[got - 1])) {
      --got;
    }
    l.psk = parse_psk_hex(r.field("psk_file"),
                          std::string_view(reinterpret_cast<const char*>(text.data()), got));
  }
  (void)check_files;
  r.optional_uint("notice_delay_ms", l.notice_delay_ms, 0, 60'000);
  r.optional_uint("engine_nice", l.engine_nice, 0, 19);
  l.channel = parse_channel(r);
  l.protocol = parse_protocol(r);
  r.finish();
  return l;
}

// --- admission control and metrics (qkd-kms operations) ---

AdmissionConfig parse_admission(ObjectReader& top, const KeysConfig& keys) {
  AdmissionConfig a;
  if (!top.has("admission")) {
    return a;
  }
  ObjectReader r(top.get("admission"), "admission");
  constexpr std::uint64_t kMaxKeys = 1'000'000'000;
  r.optional_uint("sae_keys_per_s", a.sae_keys_per_s, 0, kMaxKeys);
  r.optional_uint("sae_burst", a.sae_burst, 0, kMaxKeys);
  r.optional_uint("pair_keys_per_window", a.pair_keys_per_window, 0, kMaxKeys);
  r.optional_number("pair_window_s", a.pair_window_s, 0.001, 86400);
  r.optional_uint("sae_waiting_dec_keys", a.sae_waiting_dec_keys, 0, 1000);  // connections
  r.finish();
  // A request of max_key_per_request keys must fit in a full bucket, or it could never pass.
  if (a.sae_keys_per_s > 0 && a.sae_burst < keys.max_key_per_request) {
    fail("admission.sae_burst",
         fmt::format("must be at least keys.max_key_per_request ({}) while "
                     "admission.sae_keys_per_s is not 0",
                     keys.max_key_per_request));
  }
  if (a.pair_keys_per_window > 0 && a.pair_keys_per_window < keys.max_key_per_request) {
    fail("admission.pair_keys_per_window",
         fmt::format("must be 0 (off) or at least keys.max_key_per_request ({})",
                     keys.max_key_per_request));
  }
  return a;
}

// The plain-HTTP metrics listener has no authentication: only a loopback address.
void require_loopback(const std::string& field, const std::string& host) {
  in_addr v4{};
  in6_addr v6{};
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) {
    if ((ntohl(v4.s_addr) >> 24) == 127) {
      return;
    }
  } else if (::inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) {
      return;
    }
  }
  fail(field, fmt::format("\"{}\" is not a numeric loopback address (127.0.0.0/8 or ::1); "
                          "the plain metrics listener has no authentication",
                          host));
}

MetricsConfig parse_metrics(ObjectReader& top) {
  MetricsConfig m;
  if (!top.has("metrics")) {
    return m;
  }
  ObjectReader r(top.get("metrics"), "metrics");
  if (r.has("listen")) {
    m.listen = parse_host_port(r.field("listen"), r.string("listen"));
    require_loopback(r.field("listen"), m.listen.host);
    m.plain_listener = true;
  }
  r.finish();
  return m;
}

Config parse_or_throw(std::string_view text, const std::filesystem::path& base, bool check_files) {
  json j;
  // A member named twice is an error: the parser would keep the last one without a word.
  // The parser's message never quotes the text (it may be link.psk_hex).
  if (auto bad = parse_json_unique(text, j)) {
    fail(bad->repeated ? bad->path : "(JSON)", bad->message);
  }
  ObjectReader top(j, "");
  Config c;
  c.kme_id = top.id("kme_id");
  {
    ObjectReader a(top.get("api"), "api");
    c.api.listen = parse_listen(a.field("listen"), a.string("listen"));
    c.api.cert = resolve(base, a.string("cert"));
    c.api.key = resolve(base, a.string("key"));
    c.api.ca = resolve(base, a.string("ca"));
    check_readable("api.cert", c.api.cert, check_files);
    check_readable("api.key", c.api.key, check_files);
    check_readable("api.ca", c.api.ca, check_files);
    if (check_files) {  // each a PEM file of its kind, and the key the certificate's
      if (auto bad = check_tls_files(c.api)) {
        fail(bad->field, bad->message);
      }
      // ... whose CN is kme_id and which verifies against api.ca
      if (auto bad = check_kme_certificate(c.api, c.kme_id)) {
        fail(bad->field, bad->message);
      }
    }
    a.finish();
  }
  c.saes = top.id_list("saes");
  c.keys = parse_keys(top);
  c.link = parse_link(top, base, check_files);
  if (top.has("store")) {
    ObjectReader r(top.get("store"), "store");
    c.store.enabled = true;
    c.store.path = resolve(base, r.string("path"));
    c.store.node_key_file = resolve(base, r.string("node_key_file"));
    if (check_files) {
      check_store_folder(r.field("path"), c.store.path);
      if (auto k = read_node_key_file(c.store.node_key_file.string()); !k.ok()) {
        fail(r.field("node_key_file"), k.error().message);
      }
    }
    if (r.has("synchronous")) {
      const std::string sync = r.string("synchronous");
      if (sync != "full" && sync != "normal") {
        fail(r.field("synchronous"), "must be \"full\" or \"normal\"");
      }
      c.store.synchronous_full = sync == "full";
    }
    r.optional_uint("prepared_keys", c.store.prepared_keys, 0, 4096);
    r.finish();
  }
  c.admission = parse_admission(top, c.keys);
  c.metrics = parse_metrics(top);
  if (top.has("log_level")) {
    static const std::vector<std::string> kLevels = {"trace", "debug",    "info", "warn",
                                                     "error", "critical", "off"};
    c.log_level = top.string("log_level");
    if (std::find(kLevels.begin(), kLevels.end(), c.log_level) == kLevels.end()) {
      fail("log_level", "must be one of trace, debug, info, warn, error, critical, off");
    }
  }
  if (top.has("log_format")) {
    c.log_format = top.string("log_format");
    if (c.log_format != "text" && c.log_format != "json") {
      fail("log_format", "must be \"text\" or \"json\"");
    }
  }
  top.optional_boolean("lock_memory", c.lock_memory);
  top.finish();
  for (std::size_t i = 0; i < c.link.peer_saes.size(); ++i) {
    if (std::find(c.saes.begin(), c.saes.end(), c.link.peer_saes[i]) != c.saes.end()) {
      fail(fmt::format("link.peer_saes[{}]", i), "an SAE cannot be served by both KMEs");
    }
  }
  if (auto st = qkd::core::validate(c.link.channel); !st.ok()) {
    fail_engine_rule("link.channel", st.error().message);
  }
  if (auto st = qkd::core::validate(c.link.protocol); !st.ok()) {
    fail_engine_rule("link.protocol", st.error().message);
  }
  if (c.link.peer_kme_id == c.kme_id) {
    fail("link.peer_kme_id", "must differ from kme_id");
  }
  return c;
}

}  // namespace

Result<Config> parse_config(std::string_view text, std::string_view source_name,
                            const std::filesystem::path& base_dir, bool check_files) {
  try {
    Config c = parse_or_throw(text, base_dir, check_files);
    c.source = std::string(source_name);
    return c;
  } catch (const ConfigError& e) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("{}: {}: {}", source_name, e.field, e.what));
  } catch (const std::exception& e) {
    return make_error(ErrorCode::kInvalidArgument, fmt::format("{}: {}", source_name, e.what()));
  }
}

Result<Config> load_config(const std::filesystem::path& file) {
  auto refused = [&](std::string_view what, int err) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("{}: {}: {}", file.string(), what, std::strerror(err)));
  };
  const Fd f{::open(file.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) {
    return refused("cannot open config file", errno);
  }
  // A directory opens, and reads as nothing (or EISDIR): say so, not "a JSON error at line 1".
  struct stat st {};
  if (::fstat(f.fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    return make_error(ErrorCode::kInvalidArgument,
                      fmt::format("{}: is a directory, not a config file", file.string()));
  }
  std::string text;
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(f.fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      return refused("cannot read config file", errno);
    }
    if (n == 0) {
      break;
    }
    text.append(buf, static_cast<std::size_t>(n));
  }
  const auto base = file.has_parent_path() ? file.parent_path() : std::filesystem::path(".");
  auto config = parse_config(text, file.string(), base, true);
  // The link's PSK in a file others may read is as public as that file (psk_file must be
  // owner-only): allowed, since a demo's file is, but said.
  if (config.ok() && config->link.psk_in_config && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    config->warnings.push_back(fmt::format(
        "{}: link.psk_hex: the file is readable by others (mode {:04o}); keep it owner-only "
        "(chmod 600) or name an owner-only link.psk_file",
        file.string(), st.st_mode & 07777));
  }
  return config;
}

}  // namespace qkd::kms
