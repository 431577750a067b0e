// The KME side of one QKD link: connection management, the BB84 block loop, the commit
// handshake and the key-assignment notices.
//
// Roles. The alice-role KME listens on link.listen, the bob-role KME connects to
// link.connect (reconnecting with backoff, 100 ms doubling up to 5 s). One connection at a
// time; a new authenticated connection from the peer replaces the old one.
//
// Connections. A session runs on two TLS 1.3 connections to the same port: the control
// connection (LinkConnection, JSON messages below, I/O on the link I/O thread) and, opened
// by bob once he has the decision, the engine connection (EngineChannel) that carries only
// the BB84 engine's quantum and classical messages and on which only the runner thread does
// I/O. Alice's acceptor tells them apart by their first bytes; she keeps an engine
// connection only while a session start waits for one. Either closing ends the session.
//
// Session start (control channel, JSON messages). Alice sends hello{epoch, blocks}; Bob
// answers state{epoch, blocks, pending, digest, digest_pending, applied, next_seq}; Alice
// decides and sends
// decision{mode, epoch, commit_pending}:
//   - resume when both hold the same epoch and the same number of committed blocks, or
//     Bob holds as pending exactly the one block Alice committed last (commit_pending),
//     and Bob's pool digest (KeyStore::pool_digest, a SHA-256 chain over the epoch and the
//     blocks; with commit_pending the one his pending block leads to) equals Alice's. A
//     store that has no digest yet (written by an earlier version) is not compared until
//     its next epoch; when Alice has one, a state without Bob's is a reset; and neither end has applied a notice numbered at or above the other
//     end's next notice number (else that end's store lost writes and would assign bytes
//     the peer has already assigned);
//   - reset otherwise (e.g. a KME restarted): both forget their pools and start a new epoch.
// Then each side resends the notices the peer has not acknowledged.
//
// Block loop. Alice sends start{block} and both run one BB84 block. Bob keeps his result as
// *pending* and sends ready{block, bytes} (bytes = 0 if the block aborted or failed).
// Alice commits only when her block succeeded and Bob's ready matches (same block, same
// length), then sends commit{block}; Bob commits his pending block on that message. So a
// block enters the pool on both ends or on neither: if the link drops between Alice's
// commit and Bob's, the next session start resolves Bob's pending block (resume with
// commit_pending). A block in flight when the link drops is discarded on both sides, and
// the next session starts BB84 afresh (new endpoints, new seeds).
//
// Notices. Every enc_keys allocation produces notice{seq, keys:[{id, dir, off, len, master,
// slaves}]} queued in an outbox in allocation order; the peer applies notices in order
// (ignoring seq numbers it has applied) and answers ack{seq}. Unacknowledged notices are
// resent after a resume; they are dropped on a reset (the peer lost the pool they refer to).
// A notice holding an assignment no honest peer can send (detail::check_assignment) closes
// the session unacked; one naming SAEs or a key size this KME's configuration does not have
// keeps only its place in the pool (its bytes dropped, no key kept), logged as an error; a
// notice the store does not take counts as applied only once it has.
//
// Fetch reports. Both ends announce in hello/state ("fetched": true) that they take
// fetched{pairs: [{master, slave, n}]}: keys of the receiver's master SAEs that slaves
// fetched at the sender (admission control gives the pair's tokens back).
//
// Key age (keys.max_age_s > 0): a thread calls KeyStore::expire every quarter of the max
// age (100 ms to 1 s). A KME discards the expired bytes of its own direction and tells the
// peer in the notice stream (an entry {id: "", dir, off, len, discard: true}, in order with
// the assignments), so both ends drop exactly the same bytes whatever their clocks say.
//
// The alice-role KME pauses the block loop while both directions of the pool hold at least
// keys.max_key_count keys of keys.key_size.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "qkd/core/result.hpp"
#include "qkd/kms/api.hpp"
#include "qkd/kms/config.hpp"
#include "qkd/kms/key_store.hpp"

namespace qkd::kms {

class LinkService {
 public:
  // `ioc` runs the link I/O (on another thread); `tls` is this KME's context for the
  // link's role (server for alice, client for bob).
  LinkService(const Config& config, KeyStore& store, boost::asio::io_context& ioc,
              std::shared_ptr<boost::asio::ssl::context> tls);
  ~LinkService();
  LinkService(const LinkService&) = delete;
  LinkService& operator=(const LinkService&) = delete;

  // Alice: binds link.listen and returns the bound port. Bob: returns 0. Then starts the
  // runner thread.
  [[nodiscard]] qkd::core::Result<std::uint16_t> start();
  // Closes the connection and joins the runner thread. Idempotent.
  void stop();

  [[nodiscard]] LinkStats stats() const;

  // Fetch reports, for admission control's pair budgets (admission.hpp): `n` keys of `bits`
  // bits in all that master SAE `master`, at the peer KME, had assigned to slave SAE `slave`
  // were fetched here. Sent to the peer in batches by the acker thread; best effort
  // (dropped while the link is down, and never sent to a peer that did not announce it
  // takes them).
  void report_fetched(const std::string& master, const std::string& slave, std::uint64_t n,
                      std::uint64_t bits);
  // Receives the peer's fetch reports (on the link's I/O thread). Set before start(). `bits`
  // is 0 from a peer of a version that did not report it.
  using FetchListener = std::function<void(const std::string& master, const std::string& slave,
                                           std::uint64_t n, std::uint64_t bits)>;
  void set_fetch_listener(FetchListener listener);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

namespace detail {
// One key assignment of a notice as the peer sends it (JSON: id, dir, off, len, master,
// slaves, discard); throws on a malformed one: a field missing or of another type, a number
// negative, fractional or out of its range, a direction other than 0 or 1.
[[nodiscard]] KeyAssignment assignment_from_json(const nlohmann::json& j);
// What a peer's assignment is to this KME with `config`'s SAEs and key sizes:
// - kClose: no honest peer KME sends it, whatever the configurations: a discard of expired
//   bytes (no key_ID) naming SAEs; a key_ID that is not a UUID; no slave, or one named twice.
// - kBytesOnly: its master is not one of link.peer_saes, a slave not one of saes, or its
//   length outside keys.min_key_size..max_key_size. An honest peer sends that when both
//   configurations changed while it was queued (notices are resent after a restart), so it
//   is not refused (refused, it would come back at every session and hold up all later
//   notices): its bytes are dropped here as the peer used them, and no key is kept.
//   A prepared key's withdrawal (a discard with a key_ID) is at worst this.
// - kOk. `why` says what is wrong otherwise.
struct AssignmentCheck {
  enum Verdict { kOk, kBytesOnly, kClose } verdict = kOk;
  std::string why;
};
[[nodiscard]] AssignmentCheck check_assignment(const KeyAssignment& a, const Config& config);
}  // namespace detail

}  // namespace qkd::kms
