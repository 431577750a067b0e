// kms_load: a load generator for qkd-kms. Starts two real KMEs on loopback (the test
// harness, as the integration tests do), fills a large pool, then drives keep-alive mutual
// TLS connections: enc_keys at alice-kme (SAE alice) and the matching dec_keys at bob-kme
// (SAE bob), checking that both ends return the same bytes. Prints Markdown tables:
//   - closed loop at 1, 8, 64 connections: key deliveries/s (a delivery = one key handed
//     out by enc_keys and the same key by dec_keys) and request latency p50/p99/p999;
//   - open loop at a fixed request rate (default 1,000 requests/s over 8 connections),
//     latency measured from each request's scheduled time (no coordinated omission);
//   - baseline on the same connections: GET /health (TLS + HTTP + routing, no key), closed
//     loop, and after the open loop the same schedule with GET /health at both KMEs.
// With and without the durable key store (store = SQLite, WAL, group commit).
//
//   kms_load [--seconds S] [--number N[,N...]] [--rate R] [--keys K]
//            [--store memory|durable|both] [--conns C[,C...]] [--open-loop yes|no]
//            [--engine-nice N] [--synchronous full|normal] [--prepared-keys N]
//            [--pool-limit K] [--pulses P]
// The closed-loop rows and the open-loop row each get their own pair of KMEs. --keys: the
// pool to fill before the runs (default: enough for them). --pool-limit: keys.max_key_count
// of both KMEs; default for the closed-loop rows 2,000,000 (they spend more than a pool
// holds: the links go on producing at full speed), for the open-loop row the pool it fills:
// the links then only top it up as the run spends keys, as a deployed link at its limit
// does, instead of their simulated engines and link I/O taking the CPUs from the API.
// --number with a list: one closed-loop row per value at each connection count. --conns 0:
// no closed-loop rows. --engine-nice: link.engine_nice of both KMEs, default the KME's own;
// --synchronous: store.synchronous of both durable KMEs, default not written = full;
// --prepared-keys: store.prepared_keys of both durable KMEs, default not written = 32;
// --pulses: link.protocol.pulses_per_block of both KMEs, default the harness's)
// With the durable store, the open-loop row is followed by both stores' own transaction
// times in the same window (their /metrics histogram, scraped before and after); at full
// also by the disk's floor at the same schedule (disk_floor(), measured afterwards) and
// the ratio of the KME's p99 to it.
#include <fcntl.h>
#include <fmt/format.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <filesystem>
#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <map>
#include <memory>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "qkd/test/kme_network.hpp"

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

// One keep-alive mutual-TLS connection to a KME.
class Conn {
 public:
  Conn(const std::string& host, std::uint16_t port, const qkd::test::TlsIdentity& id)
      : ctx_(asio::ssl::context::tls_client) {
    // The identity goes into the context before the stream (SSL_new copies it).
    ctx_.load_verify_file(id.ca_file);
    ctx_.set_verify_mode(asio::ssl::verify_peer);
    ctx_.use_certificate_chain_file(id.cert_file);
    ctx_.use_private_key_file(id.key_file, asio::ssl::context::pem);
    stream_.emplace(ioc_, ctx_);
    SSL_set_tlsext_host_name(stream_->native_handle(), host.c_str());
    tcp::resolver resolver(ioc_);
    beast::get_lowest_layer(*stream_).connect(resolver.resolve(host, std::to_string(port)));
    beast::get_lowest_layer(*stream_).socket().set_option(tcp::no_delay(true));
    stream_->handshake(asio::ssl::stream_base::client);
    host_ = host;
  }

  // Returns the status; the body in `body`.
  unsigned request(http::verb method, const std::string& target, const std::string& req_body,
                   std::string& body) {
    http::request<http::string_body> req{method, target, 11};
    req.set(http::field::host, host_);
    if (method == http::verb::post) {
      req.set(http::field::content_type, "application/json");
      req.body() = req_body;
    }
    req.keep_alive(true);
    req.prepare_payload();
    http::write(*stream_, req);
    http::response<http::string_body> res;
    http::read(*stream_, buffer_, res);
    body = std::move(res.body());
    return res.result_int();
  }

 private:
  asio::io_context ioc_;
  asio::ssl::context ctx_;
  std::optional<beast::ssl_stream<beast::tcp_stream>> stream_;
  beast::flat_buffer buffer_;
  std::string host_;
};

struct Lat {
  std::vector<double> us;
  void add(Clock::duration d) { us.push_back(std::chrono::duration<double, std::micro>(d).count()); }
  double pct(double p) {
    if (us.empty()) {
      return 0;
    }
    std::sort(us.begin(), us.end());
    const auto i = static_cast<std::size_t>(p * static_cast<double>(us.size() - 1));
    return us[i];
  }
};

struct Result {
  std::uint64_t deliveries = 0;
  std::uint64_t requests = 0;
  std::uint64_t errors = 0;
  double seconds = 0;
  Lat lat;
  Lat enc, dec;  // the open loop's requests by route (lat holds both)
};

// One enc_keys at alice + the matching dec_keys at bob; returns keys matched (0 on error).
std::uint64_t one_round(Conn& a, Conn& b, unsigned number, Lat& lat, std::string& err) {
  std::string body;
  auto t0 = Clock::now();
  unsigned st = a.request(http::verb::get,
                          fmt::format("/api/v1/keys/bob/enc_keys?number={}", number), "", body);
  lat.add(Clock::now() - t0);
  if (st != 200) {
    err = fmt::format("enc_keys {}: {}", st, body);
    return 0;
  }
  const json enc = json::parse(body);
  json ids = json::array();
  for (const auto& k : enc.at("keys")) {
    ids.push_back({{"key_ID", k.at("key_ID")}});
  }
  const std::string dec_req = json{{"key_IDs", ids}}.dump();
  t0 = Clock::now();
  st = b.request(http::verb::post, "/api/v1/keys/alice/dec_keys", dec_req, body);
  lat.add(Clock::now() - t0);
  if (st != 200) {
    err = fmt::format("dec_keys {}: {}", st, body);
    return 0;
  }
  const json dec = json::parse(body);
  std::uint64_t matched = 0;
  for (std::size_t i = 0; i < enc.at("keys").size() && i < dec.at("keys").size(); ++i) {
    if (enc["keys"][i]["key"] == dec["keys"][i]["key"] &&
        enc["keys"][i]["key_ID"] == dec["keys"][i]["key_ID"]) {
      ++matched;
    }
  }
  if (matched != enc.at("keys").size()) {
    err = "enc and dec keys differ";
  }
  return matched;
}

Result closed_loop(const qkd::test::KmeNetwork& net, int conns, unsigned number, double seconds,
                   bool health_only) {
  Result total;
  std::mutex mu;
  std::atomic<bool> go{false};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  std::atomic<int> ready{0};
  for (int c = 0; c < conns; ++c) {
    threads.emplace_back([&]() {
      Conn a(net.alice().host, net.alice().api_port, net.sae("alice"));
      Conn b(net.bob().host, net.bob().api_port, net.sae("bob"));
      Result r;
      ++ready;
      while (!go.load()) {
        std::this_thread::yield();
      }
      std::string err;
      while (!stop.load()) {
        if (health_only) {
          std::string body;
          const auto t0 = Clock::now();
          const unsigned st = a.request(http::verb::get, "/health", "", body);
          r.lat.add(Clock::now() - t0);
          ++r.requests;
          r.errors += st != 200;
          continue;
        }
        const std::uint64_t m = one_round(a, b, number, r.lat, err);
        r.requests += 2;
        r.deliveries += m;
        if (m == 0 || !err.empty()) {
          ++r.errors;
          if (r.errors == 1) {
            std::fprintf(stderr, "error: %s\n", err.c_str());
          }
          err.clear();
        }
      }
      std::lock_guard lock(mu);
      total.deliveries += r.deliveries;
      total.requests += r.requests;
      total.errors += r.errors;
      total.lat.us.insert(total.lat.us.end(), r.lat.us.begin(), r.lat.us.end());
    });
  }
  while (ready.load() < conns) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const auto t0 = Clock::now();
  go = true;
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : threads) {
    t.join();
  }
  total.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return total;
}

// Open loop: `rate` requests/s in total (enc + dec pairs) spread over `conns` connections;
// latency from the scheduled start of each request. `health_only`: GET /health at alice
// and then at bob in place of enc_keys and dec_keys (as many connections, opened afresh, and
// the same schedule; no key): what TLS, HTTP and this machine's scheduling cost a request
// whatever the store does.
Result open_loop(const qkd::test::KmeNetwork& net, int conns, double rate, double seconds,
                 bool health_only = false) {
  Result total;
  std::mutex mu;
  std::vector<std::thread> threads;
  const double pairs_per_conn = rate / 2.0 / conns;
  const auto interval = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(1.0 / pairs_per_conn));
  const auto start = Clock::now() + std::chrono::milliseconds(200);
  const auto end = start + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(seconds));
  for (int c = 0; c < conns; ++c) {
    threads.emplace_back([&, c]() {
      Conn a(net.alice().host, net.alice().api_port, net.sae("alice"));
      Conn b(net.bob().host, net.bob().api_port, net.sae("bob"));
      Result r;
      auto next = start + interval * c / conns;
      std::string err;
      while (next < end) {
        std::this_thread::sleep_until(next);
        std::string body;
        unsigned st = a.request(http::verb::get,
                                health_only ? "/health" : "/api/v1/keys/bob/enc_keys", "", body);
        const auto enc_time = Clock::now() - next;
        r.lat.add(enc_time);
        r.enc.add(enc_time);
        const auto t1 = Clock::now();
        if (health_only) {
          const unsigned st_b = b.request(http::verb::get, "/health", "", body);
          const auto b_time = Clock::now() - t1;
          r.lat.add(b_time);
          r.dec.add(b_time);
          st = st == 200 ? st_b : st;
        } else if (st == 200) {
          const json enc = json::parse(body);
          const std::string dec_req =
              json{{"key_IDs", {{{"key_ID", enc["keys"][0]["key_ID"]}}}}}.dump();
          st = b.request(http::verb::post, "/api/v1/keys/alice/dec_keys", dec_req, body);
          const auto dec_time = Clock::now() - t1;
          r.lat.add(dec_time);
          r.dec.add(dec_time);
          r.deliveries += st == 200;
        }
        r.errors += st != 200;
        r.requests += 2;
        next += interval;
      }
      std::lock_guard lock(mu);
      total.deliveries += r.deliveries;
      total.requests += r.requests;
      total.errors += r.errors;
      total.lat.us.insert(total.lat.us.end(), r.lat.us.begin(), r.lat.us.end());
      total.enc.us.insert(total.enc.us.end(), r.enc.us.begin(), r.enc.us.end());
      total.dec.us.insert(total.dec.us.end(), r.dec.us.begin(), r.dec.us.end());
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  total.seconds = seconds;
  return total;
}

// The durable store's transaction times of one KME, from its /metrics
// (qkd_kms_store_commit_duration_seconds, `writes` = "requests" or "link"; with `writes`
// = "sync", qkd_kms_store_sync_duration_seconds): cumulative counts by upper bound, +Inf
// last; empty if the scrape failed.
using Buckets = std::vector<std::pair<double, double>>;

Buckets commit_buckets(const qkd::test::KmeInfo& kme, const qkd::test::TlsIdentity& sae,
                       const std::string& writes) {
  std::string body;
  try {
    Conn c(kme.host, kme.api_port, sae);
    if (c.request(http::verb::get, "/metrics", "", body) != 200) {
      return {};
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "scraping %s: %s\n", kme.kme_id.c_str(), e.what());
    return {};
  }
  Buckets out;
  const std::string prefix =
      writes == "sync"
          ? std::string("qkd_kms_store_sync_duration_seconds_bucket{le=\"")
          : "qkd_kms_store_commit_duration_seconds_bucket{writes=\"" + writes + "\",le=\"";
  std::istringstream in(body);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(prefix, 0) != 0) {
      continue;
    }
    const auto end = line.find('"', prefix.size());
    const std::string le = line.substr(prefix.size(), end - prefix.size());
    out.emplace_back(le == "+Inf" ? INFINITY : std::stod(le),
                     std::stod(line.substr(line.rfind(' ') + 1)));
  }
  return out;
}

// The q-quantile of the transactions counted between `before` and `after` (both KMEs
// summed: each list holds alice's buckets, then bob's), interpolated linearly within its
// bucket as Prometheus' histogram_quantile does. 0 when there is none (or a scrape failed:
// then `count_out` is -1).
double commit_quantile(const Buckets& before, const Buckets& after, double q,
                       double* count_out = nullptr) {
  if (before.empty() || before.size() != after.size()) {
    if (count_out != nullptr) {
      *count_out = -1;
    }
    return 0;
  }
  std::map<double, double> delta;  // cumulative, by bound
  for (const auto& [le, n] : after) {
    delta[le] += n;
  }
  for (const auto& [le, n] : before) {
    delta[le] -= n;
  }
  const double total = delta.empty() ? 0 : delta.rbegin()->second;
  if (count_out != nullptr) {
    *count_out = total;
  }
  if (total <= 0) {
    return 0;
  }
  const double rank = q * total;
  double lower = 0;
  double below = 0;
  for (const auto& [le, n] : delta) {
    if (n >= rank) {
      if (std::isinf(le)) {
        return lower;  // above the last bound: its bound is all a histogram knows
      }
      return lower + (le - lower) * (n > below ? (rank - below) / (n - below) : 0);
    }
    lower = le;
    below = n;
  }
  return lower;
}

// A floor under a durable request at this rate, measured beside the KMEs after their run:
// `files` writers (one per KME that writes, each rate / 2 requests/s, offset by half an
// interval as the KMEs' requests are), each handing every request that has arrived by the
// time it is free to `sink->commit(first, end)` at once (group commit, as the KME's store
// does); latency from each request's scheduled time to the end of its commit. A sink is made
// per writer by `make_sink(dir, index)` (a unique_ptr), all of them before the schedule
// starts; commit() returns false (and reports) on failure.
template <typename MakeSink>
Lat floor_at_schedule(const std::filesystem::path& dir, double rate, double seconds, int files,
                      MakeSink make_sink) {
  Lat total;
  std::mutex mu;
  std::vector<std::thread> threads;
  std::vector<decltype(make_sink(dir, 0))> sinks;
  for (int f = 0; f < files; ++f) {
    sinks.push_back(make_sink(dir, f));
  }
  const auto interval =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(2.0 / rate));
  const auto start = Clock::now() + std::chrono::milliseconds(100);
  const auto n = static_cast<std::size_t>(seconds * rate / 2);
  for (int f = 0; f < files; ++f) {
    threads.emplace_back([&, f]() {
      auto& sink = *sinks[static_cast<std::size_t>(f)];
      const auto due = [&](std::size_t i) { return start + interval * i + interval * f / 2; };
      Lat lat;
      std::size_t done = 0;
      bool ok = sink.ok();
      while (ok && done < n) {
        std::this_thread::sleep_until(due(done));
        const auto now = Clock::now();
        std::size_t arrived = done;
        while (arrived < n && due(arrived) <= now) {
          ++arrived;
        }
        ok = sink.commit(done, arrived);
        const auto committed = Clock::now();
        for (std::size_t i = done; i < arrived; ++i) {
          lat.add(committed - due(i));
        }
        done = arrived;
      }
      std::lock_guard lock(mu);
      total.us.insert(total.us.end(), lat.us.begin(), lat.us.end());
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  return total;
}

// The disk's floor: per request one 4 KiB write into a file on the store's disk (4 MiB,
// written and synced first, rewritten in place as a WAL between checkpoints), then one
// fdatasync for the group. No TLS, HTTP, SQLite or KME: what synchronous = full costs a
// request whatever the KME does.
class RawFileSink {
 public:
  RawFileSink(const std::filesystem::path& dir, int index)
      : path_((dir / fmt::format("disk-floor-{}.bin", index)).string()),
        fd_(::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600)),
        page_(4096, 'q') {
    bool good = fd_ >= 0;
    for (std::size_t i = 0; good && i < kPages; ++i) {
      good = write_page(i);
    }
    ok_ = good && ::fsync(fd_) == 0;
    if (!ok_) {
      report();
    }
  }
  RawFileSink(const RawFileSink&) = delete;
  RawFileSink& operator=(const RawFileSink&) = delete;
  ~RawFileSink() {
    if (fd_ >= 0) {
      ::close(fd_);
    }
    ::unlink(path_.c_str());
  }
  bool ok() const { return ok_; }
  bool commit(std::size_t first, std::size_t end) {
    bool good = true;
    for (std::size_t i = first; good && i < end; ++i) {
      good = write_page(i % kPages);
    }
    if (!good || ::fdatasync(fd_) != 0) {
      report();
      return false;
    }
    return true;
  }

 private:
  static constexpr std::size_t kPages = 1024;
  bool write_page(std::size_t i) {
    return ::pwrite(fd_, page_.data(), page_.size(), static_cast<off_t>(i * page_.size())) ==
           static_cast<ssize_t>(page_.size());
  }
  void report() const {
    std::fprintf(stderr, "disk floor: writing %s failed: %s\n", path_.c_str(),
                 std::strerror(errno));
  }
  std::string path_;
  int fd_;
  std::vector<char> page_;
  bool ok_ = false;
};

// SQLite's floor: per request what a dec_keys changes in the store, in a minimal database of
// the same kind (WAL, synchronous = FULL, secure_delete; no checkpoints during the run, the
// WAL grown beforehand and rewritten in place): the delivered key_ID's `assigned` row
// deleted, a `used_ids` row inserted; one transaction for the group. No TLS, HTTP or KME: what a SQLite commit costs on this disk at this schedule,
// beside the raw file's floor.
class SqliteSink {
 public:
  SqliteSink(const std::filesystem::path& dir, int index, std::size_t rows)
      : path_((dir / fmt::format("sqlite-floor-{}.db", index)).string()) {
    // The WAL is grown first to more pages than the run writes (a commit writes two or three;
    // four per request here, and at least 12,000: ~48 MiB), then started over, so that the
    // run's commits rewrite it in place, as a KME's do between its checkpoints, and never
    // extend the file. The statements are prepared after the schema is final.
    const std::size_t filler_pages = std::max<std::size_t>(12'000, 4 * rows);
    ok_ = sqlite3_open(path_.c_str(), &db_) == SQLITE_OK &&
          exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0;"
               "CREATE TABLE assigned(key_id TEXT PRIMARY KEY, master TEXT NOT NULL,"
               " slaves TEXT NOT NULL, off INTEGER NOT NULL) WITHOUT ROWID;"
               "CREATE TABLE used_ids(key_id TEXT NOT NULL, owners TEXT);"
               "CREATE TABLE filler(b BLOB);") &&
          exec(fmt::format("INSERT INTO filler WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
                           "SELECT i + 1 FROM n WHERE i < {}) SELECT zeroblob(4000) FROM n;"
                           "DROP TABLE filler; PRAGMA secure_delete=ON;",
                           filler_pages)
                   .c_str()) &&
          prepare("INSERT INTO assigned VALUES(?1, 'alice', '[\"bob\"]', ?2)", &insert_assigned_) &&
          prepare("DELETE FROM assigned WHERE key_id = ?1", &delete_assigned_) &&
          prepare("INSERT INTO used_ids VALUES(?1, '[\"alice\",\"bob\"]')", &insert_used_) &&
          exec("BEGIN");
    for (std::size_t i = 0; ok_ && i < rows; ++i) {
      ok_ = step(insert_assigned_, i, true);
    }
    ok_ = ok_ && exec("COMMIT") && exec("PRAGMA wal_checkpoint(RESTART)");
    if (!ok_) {
      report();
    }
  }
  SqliteSink(const SqliteSink&) = delete;
  SqliteSink& operator=(const SqliteSink&) = delete;
  ~SqliteSink() {
    for (sqlite3_stmt* st : {insert_assigned_, delete_assigned_, insert_used_}) {
      sqlite3_finalize(st);
    }
    sqlite3_close(db_);
    for (const char* suffix : {"", "-wal", "-shm"}) {
      ::unlink((path_ + suffix).c_str());
    }
  }
  bool ok() const { return ok_; }
  bool commit(std::size_t first, std::size_t end) {
    bool good = exec("BEGIN");
    for (std::size_t i = first; good && i < end; ++i) {
      good = step(delete_assigned_, i, false) && step(insert_used_, i, false);
    }
    if (!good || !exec("COMMIT")) {
      report();
      return false;
    }
    return true;
  }

 private:
  // A random-looking UUID-shaped key_ID for request i (the store's are random UUIDs).
  static std::string key_id(std::size_t i) {
    const std::uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ULL;
    return fmt::format("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", h >> 32, (h >> 16) & 0xffff,
                       h & 0xfff, (h >> 20) & 0xfff, i);
  }
  bool exec(const char* sql) {
    return sqlite3_exec(db_, sql, nullptr, nullptr, nullptr) == SQLITE_OK;
  }
  bool prepare(const char* sql, sqlite3_stmt** st) {
    return sqlite3_prepare_v2(db_, sql, -1, st, nullptr) == SQLITE_OK;
  }
  bool step(sqlite3_stmt* st, std::size_t i, bool with_offset) {
    const std::string id = key_id(i);
    sqlite3_bind_text(st, 1, id.c_str(), static_cast<int>(id.size()), SQLITE_TRANSIENT);
    if (with_offset) {
      sqlite3_bind_int64(st, 2, static_cast<sqlite3_int64>(i) * 32);
    }
    const bool done = sqlite3_step(st) == SQLITE_DONE;
    sqlite3_reset(st);
    return done;
  }
  void report() const {
    std::fprintf(stderr, "SQLite floor: %s: %s\n", path_.c_str(),
                 db_ != nullptr ? sqlite3_errmsg(db_) : "cannot open");
  }
  std::string path_;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* insert_assigned_ = nullptr;
  sqlite3_stmt* delete_assigned_ = nullptr;
  sqlite3_stmt* insert_used_ = nullptr;
  bool ok_ = false;
};

// "1,8,64" -> {1, 8, 64}; throws on a malformed list.
std::vector<unsigned> parse_list(const std::string& text) {
  std::vector<unsigned> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    out.push_back(static_cast<unsigned>(std::stoul(item)));
  }
  if (out.empty()) {
    throw std::invalid_argument("empty list: " + text);
  }
  return out;
}

// The closed-loop rows' pool limit unless --pool-limit says otherwise.
constexpr std::uint64_t kClosedLoopPoolLimit = 2'000'000;

// A Markdown table: `heading` (with the header rows), then `rows`; nothing if there are none.
void print_table(const char* heading, const std::vector<std::string>& rows) {
  if (rows.empty()) {
    return;
  }
  std::printf("%s", heading);
  for (const auto& line : rows) {
    std::printf("%s\n", line.c_str());
  }
}

int run(int argc, char** argv) {
  double seconds = 3;
  std::vector<unsigned> numbers{1};
  std::vector<unsigned> conn_counts{1, 8, 64};
  bool open = true;
  int engine_nice = -1;  // -1: the KME's default
  double rate = 1000;
  std::string store = "both";
  std::string synchronous;  // store.synchronous; empty: not written
  int prepared = -1;        // store.prepared_keys; -1: not written
  std::uint64_t keys = 0;  // pool to wait for; 0 = enough for every run at ~15,000/s
  std::uint64_t pool_limit = 0;  // keys.max_key_count; 0 = the pool waited for
  std::uint64_t pulses = 0;      // link.protocol.pulses_per_block; 0 = the harness's
  const auto usage = [](std::FILE* to) {
    std::fprintf(to,
                 "usage: kms_load [--seconds S] [--number N[,N...]] [--rate R] [--keys K] "
                 "[--store memory|durable|both] [--conns C[,C...]] [--open-loop yes|no] "
                 "[--engine-nice N] [--synchronous full|normal] [--prepared-keys N] "
                 "[--pool-limit K] [--pulses P]\n"
                 "  --seconds S      length of each row [s] (default 3)\n"
                 "  --number N,...   keys per enc_keys request, closed loop (default 1)\n"
                 "  --rate R         open-loop request rate [requests/s] (default 1000)\n"
                 "  --keys K         keys to have in the pool before the runs (default: enough)\n"
                 "  --store S        memory, durable or both (default both)\n"
                 "  --conns C,...    closed-loop connection counts (default 1,8,64; 0 = none)\n"
                 "  --open-loop Y    the open-loop row: yes (default) or no\n"
                 "  --engine-nice N  link.engine_nice of both KMEs (default: the KME's)\n"
                 "  --synchronous S  store.synchronous of both KMEs: full or normal\n"
                 "                   (default: not written, the KME's default full); with\n"
                 "                   full the open loop is followed by the disk's floor\n"
                 "                   (a 4 KiB write + fdatasync per request, no KME)\n"
                 "  --prepared-keys N store.prepared_keys of both durable KMEs (default: not\n"
                 "                   written, the KME's default 32; 0 = none)\n"
                 "  --pulses P       link.protocol.pulses_per_block of both KMEs (default 2,000,000)\n"
                 "  --pool-limit K   keys.max_key_count of both KMEs (default: 2,000,000 for\n"
                 "                   the closed-loop rows, the filled pool for the open loop,\n"
                 "                   whose links then only top it up)\n");
  };
  for (int i = 1; i < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "kms_load: %s needs a value\n", a.c_str());
      usage(stderr);
      return 2;
    }
    if (a == "--seconds") {
      seconds = std::stod(argv[i + 1]);
    } else if (a == "--number") {
      numbers = parse_list(argv[i + 1]);
    } else if (a == "--conns") {
      conn_counts = parse_list(argv[i + 1]);
      std::erase(conn_counts, 0u);
    } else if (a == "--open-loop") {
      open = std::string(argv[i + 1]) != "no";
    } else if (a == "--engine-nice") {
      engine_nice = std::stoi(argv[i + 1]);
    } else if (a == "--rate") {
      rate = std::stod(argv[i + 1]);
    } else if (a == "--keys") {
      keys = std::stoull(argv[i + 1]);
    } else if (a == "--store") {
      store = argv[i + 1];
    } else if (a == "--synchronous") {
      synchronous = argv[i + 1];
    } else if (a == "--prepared-keys") {
      prepared = std::stoi(argv[i + 1]);
    } else if (a == "--pool-limit") {
      pool_limit = std::stoull(argv[i + 1]);
    } else if (a == "--pulses") {
      pulses = std::stoull(argv[i + 1]);
    } else {
      std::fprintf(stderr, "kms_load: unknown option %s\n", a.c_str());
      usage(stderr);
      return 2;
    }
  }
  std::printf("| store | load | connections | keys/request | requests/s | key deliveries/s | "
              "p50 µs | p99 µs | p99.9 µs | errors |\n|---|---|---|---|---|---|---|---|---|---|\n");
  std::vector<std::string> by_route;    // the open-loop rows split by route
  std::vector<std::string> floor_rows;  // durable (full) open loop against the disk floor
  std::vector<std::string> commit_rows;  // durable open loop: the stores' own transactions
  for (const bool durable : {false, true}) {
    if ((durable && store == "memory") || (!durable && store == "durable")) {
      continue;
    }
    qkd::test::KmeNetworkOptions o;
    o.log_level = "warn";
    o.durable_store = durable;
    o.max_key_per_request = 128;
    o.length_km = 1;
    if (pulses != 0) {
      o.pulses_per_block = pulses;
    }
    o.customize = [engine_nice, durable, synchronous, prepared](json& a, json& b) {
      // The benchmark measures the server path, not the limiter.
      for (json* c : {&a, &b}) {
        (*c)["admission"] = {{"sae_keys_per_s", 0}, {"pair_keys_per_window", 0}};
        if (engine_nice >= 0) {
          (*c)["link"]["engine_nice"] = engine_nice;
        }
        if (durable && !synchronous.empty()) {
          (*c)["store"]["synchronous"] = synchronous;
        }
        if (durable && prepared >= 0) {
          (*c)["store"]["prepared_keys"] = prepared;
        }
      }
    };
    // A KME pair with `limit` as keys.max_key_count, holding `need` keys.
    const auto start_net = [&](std::uint64_t need, std::uint64_t limit)
        -> std::unique_ptr<qkd::test::KmeNetwork> {
      if (limit < need) {
        std::fprintf(stderr, "kms_load: pool limit %llu raised to the %llu keys to fill\n",
                     static_cast<unsigned long long>(limit),
                     static_cast<unsigned long long>(need));
      }
      o.max_key_count = std::max(limit, need);
      auto net = qkd::test::KmeNetwork::start(o);
      if (!net.ok()) {
        std::fprintf(stderr, "cannot start the KMEs: %s\n", net.error().message.c_str());
        return nullptr;
      }
      const auto t0 = Clock::now();
      if (auto s = (*net)->wait_for_keys(need, std::chrono::minutes(10)); !s.ok()) {
        std::fprintf(stderr, "pool not filled: %s\n", s.error().message.c_str());
        return nullptr;
      }
      std::fprintf(stderr, "%s: %llu keys ready after %.1f s (pool limit %llu)\n",
                   durable ? "durable" : "memory", static_cast<unsigned long long>(need),
                   std::chrono::duration<double>(Clock::now() - t0).count(),
                   static_cast<unsigned long long>(o.max_key_count));
      return std::move(net.value());
    };
    const std::string st_name =
        !durable ? "memory" : synchronous.empty() ? "durable" : "durable (" + synchronous + ")";
    const char* st = st_name.c_str();
    auto row = [&](const char* load, int conns, unsigned n, Result r) {
      std::printf("| %s | %s | %d | %u | %.0f | %.0f | %.0f | %.0f | %.0f | %llu |\n", st, load,
                  conns, n, static_cast<double>(r.requests) / r.seconds,
                  static_cast<double>(r.deliveries) / r.seconds, r.lat.pct(0.5), r.lat.pct(0.99),
                  r.lat.pct(0.999), static_cast<unsigned long long>(r.errors));
      std::fflush(stdout);
    };
    if (!conn_counts.empty()) {
      // The closed-loop rows spend more than a pool holds: the links go on producing.
      const unsigned number = *std::max_element(numbers.begin(), numbers.end());
      const auto need =
          keys != 0 ? keys : static_cast<std::uint64_t>(seconds * 15'000 * 4 * number);
      auto net = start_net(need, pool_limit != 0 ? pool_limit : kClosedLoopPoolLimit);
      if (!net) {
        return 1;
      }
      for (const unsigned uc : conn_counts) {
        const int c = static_cast<int>(uc);
        row("GET /health (baseline)", c, 0, closed_loop(*net, c, 0, seconds / 2, true));
        for (const unsigned n : numbers) {
          row("enc+dec, closed loop", c, n, closed_loop(*net, c, n, seconds, false));
        }
      }
    }
    if (open) {
      // A fresh pair whose pool holds the whole run (`rate` counts enc_keys and dec_keys
      // requests: rate / 2 keys per second), the links only topping it up meanwhile.
      const auto need =
          keys != 0 ? keys : static_cast<std::uint64_t>(rate * seconds / 2) + 2'000;
      auto net = start_net(need, pool_limit != 0 ? pool_limit : need);
      if (!net) {
        return 1;
      }
      // Both KMEs' transaction histograms, `writes` = requests, link, then their syncs
      // (alice's, then bob's buckets in each), scraped right before and after the open loop.
      auto scrape = [&] {
        std::array<Buckets, 3> out;
        for (int k = 0; k < 3; ++k) {
          const std::string writes = k == 0 ? "requests" : k == 1 ? "link" : "sync";
          Buckets a = commit_buckets(net->alice(), net->sae("alice"), writes);
          Buckets b = commit_buckets(net->bob(), net->sae("bob"), writes);
          if (a.empty() || b.empty()) {
            continue;  // left empty: n/a
          }
          a.insert(a.end(), b.begin(), b.end());
          out[k] = std::move(a);
        }
        return out;
      };
      const auto before = durable ? scrape() : std::array<Buckets, 3>{};
      const auto t_before = Clock::now();
      Result r = open_loop(*net, 8, rate, seconds);
      const auto after = durable ? scrape() : std::array<Buckets, 3>{};
      const double window = std::chrono::duration<double>(Clock::now() - t_before).count();
      const std::string load = fmt::format("enc+dec, open loop {:.0f} req/s", rate);
      if (durable) {
        double n = 0;
        double n_link = 0;
        double n_sync = 0;
        const double p50 = commit_quantile(before[0], after[0], 0.5, &n);
        const double p99 = commit_quantile(before[0], after[0], 0.99);
        const double link_p99 = commit_quantile(before[1], after[1], 0.99, &n_link);
        const double sync_p99 = commit_quantile(before[2], after[2], 0.99, &n_sync);
        if (n < 0 || n_link < 0 || n_sync < 0) {
          commit_rows.push_back(fmt::format(
              "| {} | {} | n/a (a /metrics scrape failed) |||||||||", st, load));
        } else {
          commit_rows.push_back(fmt::format(
              "| {} | {} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} "
              "| {:.2f} |",
              st, load, n / window, p50 * 1e6, p99 * 1e6, n_link / window, link_p99 * 1e6,
              n_sync / window, sync_p99 * 1e6, r.lat.pct(0.99),
              p99 > 0 ? r.lat.pct(0.99) / (p99 * 1e6) : 0.0));
        }
      }
      if (durable && (synchronous.empty() || synchronous == "full")) {
        const int files = prepared == 0 ? 2 : 1;
        Lat f = floor_at_schedule(net->dir(), rate, seconds, files,
                                  [](const std::filesystem::path& d, int i) {
                                    return std::make_unique<RawFileSink>(d, i);
                                  });
        const auto rows = static_cast<std::size_t>(seconds * rate / 2);
        Lat q = floor_at_schedule(net->dir(), rate, seconds, files,
                                  [rows](const std::filesystem::path& d, int i) {
                                    return std::make_unique<SqliteSink>(d, i, rows);
                                  });
        floor_rows.push_back(fmt::format(
            "| {} | {} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | "
            "{:.0f} | {:.2f} |",
            load, files == 2 ? "enc_keys and dec_keys" : "dec_keys only", r.lat.pct(0.5),
            r.lat.pct(0.99), r.lat.pct(0.999), f.pct(0.5), f.pct(0.99), f.pct(0.999),
            q.pct(0.5), q.pct(0.99), q.pct(0.999),
            f.pct(0.99) > 0 ? r.lat.pct(0.99) / f.pct(0.99) : 0.0));
      }
      by_route.push_back(
          fmt::format("| {} | {} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} |", st, load,
                      r.enc.pct(0.5), r.enc.pct(0.99), r.enc.pct(0.999), r.dec.pct(0.5),
                      r.dec.pct(0.99), r.dec.pct(0.999)));
      row(load.c_str(), 8, 1, std::move(r));
      // The same schedule without keys, right after, on the same KMEs: the API's own floor.
      Result h = open_loop(*net, 8, rate, seconds, true);
      const std::string h_load = fmt::format("GET /health at both, open loop {:.0f} req/s", rate);
      by_route.push_back(fmt::format("| {} | {} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | {:.0f} | "
                                     "{:.0f} |",
                                     st, h_load, h.enc.pct(0.5), h.enc.pct(0.99),
                                     h.enc.pct(0.999), h.dec.pct(0.5), h.dec.pct(0.99),
                                     h.dec.pct(0.999)));
      row(h_load.c_str(), 8, 0, std::move(h));
    }
  }
  print_table("\nOpen loop by route (enc_keys latency from its scheduled time; dec_keys from "
              "the end of its enc_keys, sent at once; in the GET /health rows, alice's "
              "/health in the enc_keys columns and bob's in the dec_keys columns):\n\n"
              "| store | load | enc_keys p50 µs | "
              "p99 µs | p99.9 µs | dec_keys p50 µs | p99 µs | p99.9 µs |\n"
              "|---|---|---|---|---|---|---|---|\n",
              by_route);
  print_table("\nDurable open loop against the stores' own transactions in the same window "
              "(both KMEs' qkd_kms_store_commit_duration_seconds from /metrics, scraped "
              "right before and after; quantiles interpolated within buckets of 0.25 ms "
              "between 0.5 and 3 ms; a transaction is a write into the page cache, and with "
              "full the syncs of the WAL (qkd_kms_store_sync_duration_seconds) follow them "
              "outside the write lock; a request waits for at least one transaction, and "
              "with full for a sync unless it is a dec_keys whose keys' notice is synced):\n\n"
              "| store | load | request transactions/s | p50 µs | p99 µs | "
              "link transactions/s | p99 µs | syncs/s | sync p99 µs | request p99 µs | "
              "request p99 / request transaction p99 |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n",
              commit_rows);
  print_table("\nDurable (full) open loop against the disk's and SQLite's floors, measured "
              "right after it at the same schedule, one writer per KME that writes (with "
              "prepared keys enc_keys does not write), no KME: disk = per request one 4 KiB "
              "write + group-committed fdatasync; SQLite = per request a dec_keys' row "
              "changes in a minimal WAL database (synchronous = FULL), group-committed:\n\n"
              "| load | requests that write | KME p50 µs | p99 µs | p99.9 µs | disk p50 µs | "
              "p99 µs | p99.9 µs | SQLite p50 µs | p99 µs | p99.9 µs | KME p99 / disk p99 |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|\n",
              floor_rows);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kms_load: %s\n", e.what());
    return 1;
  }
}
