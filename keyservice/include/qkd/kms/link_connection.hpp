// The control connection between two KMEs: one TLS 1.3 connection carrying framed messages
// tagged by channel (the session start, block commits and key-assignment notices on
// kControl, keep-alive pings on kPing; the BB84 engine's own messages go over a second
// connection, EngineChannel).
//
// Frame: channel (1 byte) | payload length (4 bytes, big-endian) | payload. Frames larger
// than kMaxFrameBytes, or of another channel, close the connection. Control frames go to a
// callback. All I/O runs on one strand of the link io_context; send() is safe from any
// thread. A ping every 5 s keeps the connection alive; 30 s without any frame closes it, and
// so do frames queued for sending beyond kMaxQueuedBytes.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <chrono>
#include <array>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "qkd/core/link.hpp"
#include "qkd/core/result.hpp"

namespace qkd::kms {

enum class Channel : std::uint8_t { kQuantum = 1, kClassical = 2, kControl = 3, kPing = 4 };

inline constexpr std::uint32_t kMaxFrameBytes = 64u << 20;

// What an engine connection (engine_channel.hpp) sends before its TLS handshake: the
// preamble, then the session's engine token.
inline constexpr std::array<std::uint8_t, 4> kEnginePreamble = {'Q', 'K', 'D', 'E'};
inline constexpr std::size_t kEngineTokenBytes = 16;
using EngineToken = std::array<std::uint8_t, kEngineTokenBytes>;

// A thread-safe message queue that can be closed (wakes all waiters with kClosed).
class MessageQueue {
 public:
  // The control protocol is lock-step: a handful of messages wait at most. A peer that
  // sends more than this many ahead of the runner is faulty.
  static constexpr std::size_t kMaxQueued = 64;
  // False (and the message dropped) when kMaxQueued messages already wait; a message
  // pushed after close() is dropped.
  [[nodiscard]] bool push(std::vector<std::uint8_t> msg);
  [[nodiscard]] qkd::core::Result<std::vector<std::uint8_t>> pop(std::chrono::milliseconds timeout);
  void close();
  [[nodiscard]] bool closed() const;

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::vector<std::uint8_t>> q_;
  bool closed_ = false;
};

class LinkConnection : public std::enable_shared_from_this<LinkConnection> {
 public:
  struct Impl;
  // Called on the connection's strand for every control frame, in arrival order. If it
  // returns false the connection is closed.
  using ControlHandler = std::function<bool(std::vector<std::uint8_t>)>;

  // Connects (TCP + TLS as client) and checks that the peer's CN is `peer_id`.
  [[nodiscard]] static qkd::core::Result<std::shared_ptr<LinkConnection>> connect(
      boost::asio::io_context& ioc, boost::asio::ssl::context& tls, const std::string& host,
      std::uint16_t port, const std::string& peer_id, std::chrono::milliseconds timeout);

  // Wraps an accepted, already handshaken server-side stream (used by LinkAcceptor).
  explicit LinkConnection(std::unique_ptr<Impl> impl);
  ~LinkConnection();

  // Starts reading. Control frames go to `on_control`; `on_close` runs once when the
  // connection closes (any thread; keep it short and non-blocking).
  void start(ControlHandler on_control, std::function<void()> on_close);
  // Frames queued for sending and not written yet, each counted with its bookkeeping
  // (kQueuedFrameOverhead): at most this many bytes, room for a frame of the largest size
  // beside what is being written. A peer that reads nothing (while its pings keep the
  // connection open) or too slowly would otherwise make the queue grow without end.
  static constexpr std::size_t kMaxQueuedBytes = 2 * std::size_t{kMaxFrameBytes};
  static constexpr std::size_t kQueuedFrameOverhead = 64;
  // Queues a frame for sending; fails if the connection is closed. A frame that would take
  // the queue past kMaxQueuedBytes closes the connection instead (logged): what the link
  // needs the peer to have (unacknowledged notices) stays in its outbox and is resent at
  // the next session.
  [[nodiscard]] qkd::core::Status send(Channel ch, std::vector<std::uint8_t> payload);
  void close();
  [[nodiscard]] bool closed() const;
  [[nodiscard]] const std::string& peer() const;

 private:
  std::unique_ptr<Impl> impl_;
};

// Accepts link connections on one port and tells the two kinds apart by their first bytes:
// a control connection starts with its TLS handshake (a TLS record, first byte 0x16); it
// gets the handshake here, is kept only if the peer's CN is `peer_id`, and goes to
// `on_connection`. An engine connection starts with kEnginePreamble and an EngineToken;
// once those are read its socket and token go to `on_engine`, which keeps the socket (to
// run the TLS handshake, EngineChannel::accept) or closes it. Anything else, or nothing
// within 10 s, is closed. At most kMaxUnidentified connections are held before they are
// told apart and their peer is known (others are closed at once). Callbacks run on the
// io_context.
class LinkAcceptor {
 public:
  static constexpr std::size_t kMaxUnidentified = 32;
  using OnConnection = std::function<void(std::shared_ptr<LinkConnection>)>;
  using OnEngineSocket = std::function<void(int fd, const EngineToken&)>;  // owns fd
  LinkAcceptor(boost::asio::io_context& ioc, std::shared_ptr<boost::asio::ssl::context> tls,
               std::string peer_id, OnConnection on_connection, OnEngineSocket on_engine);
  ~LinkAcceptor();
  [[nodiscard]] qkd::core::Result<std::uint16_t> listen(const std::string& host,
                                                        std::uint16_t port);
  void stop();

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace qkd::kms
