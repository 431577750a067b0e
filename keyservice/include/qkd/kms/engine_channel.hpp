// The BB84 engine's own connection to the peer KME.
//
// A link session runs two TLS 1.3 connections between the KMEs. The control connection
// (LinkConnection) carries the session start, the block commits and the key-assignment
// notices; its I/O runs on the link I/O thread. The engine connection (this class) carries
// only the engine's quantum and classical messages, and only the runner thread (the one
// running the BB84 engine) does I/O on it, through an io_context of its own that it runs
// while it sends or waits for a message. A block's Cascade takes hundreds of round trips;
// through the link I/O thread every message would wake two more threads on each side (the
// I/O thread to write it, the engine to read it), and on a busy host those wake-ups are
// most of the link's CPU.
//
// The bob end opens it once the session's decision has arrived: TCP to the peer's link
// port, kEnginePreamble and the session's engine token in clear (the token is random, made
// by alice for this session and sent to bob in the decision, over the authenticated control
// connection; alice's acceptor tells an engine connection from a control one by the first
// byte, a TLS record header being 0x16, and drops any whose token is not the one a session
// start waits for, so no stranger's connection ever reaches the runner), then TLS with the
// link's certificates and the same check of the peer's CN. Frames as on the control
// connection: channel (1 byte) | payload length (4 bytes, big-endian) | payload; a frame of
// another channel, or larger than kMaxFrameBytes, fails the connection.
//
// send() blocks until its frame is written: both ends must go on reading while large frames
// may be in flight (the BB84 engines always read what the other sends).
#pragma once

#include <boost/asio/ssl/context.hpp>
#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "qkd/core/link.hpp"
#include "qkd/core/result.hpp"
#include "qkd/kms/link_connection.hpp"

namespace qkd::kms {

// An owned file descriptor (closed when destroyed unless released).
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd();
  [[nodiscard]] int get() const { return fd_; }
  [[nodiscard]] bool valid() const { return fd_ >= 0; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_ = -1;
};

class EngineChannel : public std::enable_shared_from_this<EngineChannel> {
 public:
  struct Impl;

  // Not connected yet: connect() or accept() next, on the thread that will own it. close()
  // works from the start, so that a connect or accept in progress can be cut short.
  explicit EngineChannel(boost::asio::ssl::context& tls);
  ~EngineChannel();
  EngineChannel(const EngineChannel&) = delete;
  EngineChannel& operator=(const EngineChannel&) = delete;

  // Bob: connects to host:port, sends the preamble and `token`, runs the TLS handshake and
  // checks that the peer's CN is `peer_id`, all within `timeout`.
  [[nodiscard]] qkd::core::Status connect(const std::string& host, std::uint16_t port,
                                          const std::string& peer_id, const EngineToken& token,
                                          std::chrono::milliseconds timeout);
  // Alice: runs the TLS handshake on an accepted TCP connection whose preamble and token the
  // acceptor has read, and checks the peer's CN, within `timeout`.
  [[nodiscard]] qkd::core::Status accept(UniqueFd socket, const std::string& peer_id,
                                         std::chrono::milliseconds timeout);

  // The engine's view of one channel (kQuantum or kClassical). send() returns once the frame
  // is written to the socket (the peer may wait for it before it sends anything), at most
  // kWriteTimeout; receive() runs the connection until a frame of its channel arrives.
  // send() and receive() only on the thread that owns the channel (the runner); the
  // transport's close() closes the whole channel (as close() below).
  [[nodiscard]] std::unique_ptr<qkd::core::MessageTransport> transport(Channel ch);

  // Any thread: fails every operation from now on, the one in progress included (it
  // returns kClosed as soon as its thread runs the connection again, at once if it is
  // waiting in it).
  void close();
  [[nodiscard]] bool closed() const;

  static constexpr auto kWriteTimeout = std::chrono::seconds(30);

  // Complete frames received but not yet taken by receive(), per channel: at most
  // kMaxQueuedFrames and kMaxQueuedBytes of payload; a frame beyond either fails the
  // connection (kClosed, "... not read ..."), so that a peer that keeps sending on a channel
  // the engine is not reading cannot grow memory without end. What the protocol queues:
  // it is lock-step, so on one channel a peer sends at most two frames before it waits for
  // an answer (Alice's SiftMatch then Sample; an Abort), each at most kMaxFrameBytes; the
  // quantum chunks Alice streams are taken one per receive(), and the connection is read
  // only while the engine waits (one read completes at most 64 KiB or the rest of a frame),
  // so a handful of frames wait at a time.
  static constexpr std::size_t kMaxQueuedFrames = 64;
  static constexpr std::size_t kMaxQueuedBytes = 2 * std::size_t{kMaxFrameBytes};

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace qkd::kms
