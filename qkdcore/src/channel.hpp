// Framing and authentication of the link's messages (internal).
//
// Classical frame:  u8 version | u8 type | u64 block_id | u64 sequence | payload | tag
// where tag = HMAC-SHA256(direction key, everything before it). The two direction keys are
// derived from the pre-shared secret with HKDF-SHA256 (distinct labels for Alice->Bob and
// Bob->Alice), so a message reflected back to its sender does not verify. Sequence numbers
// count every frame sent in one direction over the endpoint's life, starting at 0; the
// receiver accepts only the next one, which rejects replays, drops and reordering.
//
// SECURITY NOTE: HMAC-SHA256 with a long-lived key is computationally secure only.
// Information-theoretic authentication (Wegman-Carter: an epsilon-almost strongly
// universal hash with one-time-pad encrypted tags, keyed from the PSK and then from the
// link's own key) comes in a later issue; it replaces MacKeys/AuthChannel's tag function
// and charges its key consumption to BlockResult.
//
// Quantum frame (not authenticated: it models photons, which carry no MAC):
//   u8 version | u8 type=kDetections | u64 block_id | u32 chunk_index | u8 last |
//   u32 count | count x (varint pulse_delta, u8 state)
// state bit 0 = bit, bit 1 = basis, bit 2 = dark; pulse_delta is the distance from the
// previous event's pulse + 1 (from 0 for the first event of the block).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "crypto.hpp"
#include "qkd/core/link.hpp"

namespace qkd::core::detail {

inline constexpr std::uint8_t kWireVersion = 1;
inline constexpr std::size_t kHeaderBytes = 1 + 1 + 8 + 8;
// Largest message either side accepts (a sifting message for 1e8 detections is 12.5 MB).
inline constexpr std::size_t kMaxMessageBytes = std::size_t{64} << 20;
inline constexpr std::uint32_t kMaxEventsPerChunk = 1U << 18;  // < 3 MB per quantum frame

enum class MsgType : std::uint8_t {
  kParams = 1,         // A->B: block parameters
  kParamsAck = 2,      // B->A: accepted / refused (+ reason)
  kDetections = 3,     // A->B on the quantum transport
  kSiftBases = 4,      // B->A: detection count + Bob's bases
  kSiftMatch = 5,      // A->B: basis match mask
  kSample = 6,         // A->B: sample mask + Alice's sample bits
  kSampleReply = 7,    // B->A: Bob's sample bits
  kCascadeStart = 8,   // A->B: n, first block size, passes, shuffle seed
  kCascadeRequest = 9, // B->A: block parities / range parities / done
  kCascadeReply = 10,  // A->B: parities
  kVerify = 11,        // A->B: hash seed + Alice's tag
  kVerifyResult = 12,  // B->A: match or not
  kAmplify = 13,       // A->B: output length + Toeplitz seed
  kBlockDone = 14,     // B->A: block finished
  kAbort = 15,         // either way: the sender gave up on the block (+ reason)
};
[[nodiscard]] const char* msg_type_name(MsgType t);

struct MacKeys {
  SecureBytes alice_to_bob;
  SecureBytes bob_to_alice;
};
// Fails if the PSK is shorter than 16 bytes (kInvalidArgument) or HKDF fails.
[[nodiscard]] Result<MacKeys> derive_mac_keys(std::span<const std::uint8_t> psk);

struct Frame {
  MsgType type = MsgType::kAbort;
  std::uint64_t block_id = 0;
  std::vector<std::uint8_t> payload;
};

class AuthChannel {
 public:
  AuthChannel(MessageTransport& transport, SecureBytes send_key, SecureBytes recv_key)
      : t_(transport), send_key_(std::move(send_key)), recv_key_(std::move(recv_key)) {}

  [[nodiscard]] Status send(MsgType type, std::uint64_t block_id,
                            std::span<const std::uint8_t> payload);
  // Receives the next frame and checks, in this order: size, MAC (kAuthentication),
  // version and sequence (kProtocol), then, if a peer kAbort arrived, fails with kRejected
  // and the peer's reason; then block id (if given) and type (kProtocol).
  [[nodiscard]] Result<Frame> receive(std::chrono::milliseconds timeout, MsgType expected,
                                      std::optional<std::uint64_t> block_id);
  // Best effort: tells the peer why this end gives up (errors are ignored).
  void send_abort(std::uint64_t block_id, const std::string& reason);

 private:
  MessageTransport& t_;
  SecureBytes send_key_;
  SecureBytes recv_key_;
  std::uint64_t send_seq_ = 0;
  std::uint64_t recv_seq_ = 0;
};

}  // namespace qkd::core::detail
