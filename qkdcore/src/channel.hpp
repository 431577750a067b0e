// Framing and authentication of the link's messages (internal).
//
// Classical frame:  u8 version=3 | u8 type | u64 block_id | u64 sequence | [nonce] | payload | [tag]
// Sequence numbers count every frame sent in one direction over the channel's life,
// starting at 0; the receiver accepts only the next one, which rejects replays, drops and
// reordering. The first frame of each direction (Alice's first Params, Bob's first
// ParamsAck or Abort) carries a 16-byte nonce from the sender's DRBG and is always tagged
// the same way, whatever the settings: a 128-bit Wegman-Carter tag under a hello key,
// HKDF(PSK, nonce_A) for Alice's, HKDF(PSK, nonce_A || nonce_B) for Bob's. So the first
// Params (which carries every authentication setting) can always be read, and a settings
// mismatch is refused by name (kRejected) instead of failing as a bad tag. Later frames
// (ProtocolParams::auth / auth_every_message; both ends must agree):
//
// Wegman-Carter tags: tag = trunc_t(poly_hash(H_dir, data)) XOR pad, with poly_hash
// polynomial evaluation over GF(2^128) (gf128.hpp; (n+1)/2^t-almost XOR-universal for
// n-block data, truncated to t = auth_tag_bits), H_dir the direction's 128-bit hash key and
// pad t fresh one-time-pad bits never used again. Each direction has its own hash key and
// pad pool, so both ends consume the same bits in the same order. A pool is a stack: pads
// are taken from its top; after privacy amplification both ends push the block's
// repayment on top (settle()), so the bootstrap material at the bottom is touched only when
// repayments fell short (aborted blocks) and QKD output authenticates everything from the
// second block on.
//
//  * Transcript mode (default, auth_every_message = false, wire: tags only on checkpoint
//    and Abort frames). Each direction's frames after the first are absorbed, as sent /
//    as received, into a running poly_hash of the concatenation of (u64 length || frame
//    without tag); a checkpoint frame carries the tag of that concatenation up to and
//    including itself (one pad), after which the accumulation restarts. Which frames are
//    checkpoints is fixed by the protocol (both ends pass `checkpoint`); an Abort frame is
//    always one. Per settled block: VerifyResult (B->A), Amplify (A->B), BlockDone (B->A);
//    per aborted block one Checkpoint frame each way. Frames between checkpoints are used
//    unverified; the security argument (docs/VALIDATION.md, "Authentication"):
//      - no end accepts a key before it has verified the peer's whole transcript AND holds
//        an authenticated statement that the peer verified its own: Bob accepts after
//        verifying Amplify (which Alice sends only after verifying VerifyResult, the end of
//        Bob's transcript); Alice accepts after verifying BlockDone (sent only after Bob
//        verified Amplify). A key is therefore derived only from a run whose two
//        transcripts are, but for probability (n+1)/2^t per checkpoint, what was sent;
//      - what a tampered run discloses before the failing checkpoint (Cascade parities of
//        ranges an attacker chose, sample bits) concerns only that block's raw key, which
//        is then discarded; nothing of the hash keys leaks (tags are padded with fresh
//        bits, and no tag is sent over unverified data other than one's own sent frames);
//      - earlier checkpoints (after sifting, after estimation) would only make detection
//        earlier; they cost a tag each and add no security, since no decision before the
//        end commits anything secret. A tampered block may surface as kProtocol (a
//        garbled frame fails to parse) before the checkpoint would have caught it; it
//        fails either way and never yields key.
//  * Per-message mode (auth_every_message = true, the earlier scheme): every frame after
//    the first carries a tag over itself (one pad each).
//
//   Bootstrap, per session (one AuthChannel pair = one session): after the two hello
//   frames everything is keyed by HKDF(PSK, nonce_A || nonce_B): both hash keys and both
//   initial pools (auth_pool_bits each). Fresh nonces make the bootstrap pads new for every
//   session, so restarting endpoints (what the KME does after a fatal error) never reuses a
//   pad.
//   HONEST NOTE: HKDF-expanded material is only computationally secure. A 32-byte PSK
//   cannot hold the pad a session starts with, so this is a bootstrap: the PSK-derived
//   keys authenticate the first block of a session (and any block after a run of aborts
//   that drained the repaid pads); the first settled block refreshes the hash keys from QKD
//   output and refills the pools, after which authentication is information-theoretic given
//   the QKD key is. An attacker must therefore break HKDF-SHA256 during the first block to
//   forge a message ("everlasting" security: breaking it later reveals nothing).
//   Early abort: if Alice gives up before she has verified Bob's first frame, her Abort
//   frame uses a second hello pad; Bob accepts that key for an Abort only.
//   Cost: t bits per tag; settle() takes the pad deficit of both pools (back to
//   auth_pool_bits) and, every auth_key_refresh_blocks settled blocks (and at the first),
//   2 x 128 bits of new hash keys from the front of the block's key.
//
// HMAC (auth = hmac): every frame after the first carries HMAC-SHA256(direction key, frame)
// with direction keys HKDF(PSK, nonce_A || nonce_B), derived after the hello frames like
// the Wegman-Carter session keys, so a frame of one session never verifies in another
// (sequence numbers restart at 0 with every session). Computationally secure only, costs
// no key; for comparison.
//
// Quantum frame (not authenticated: it models photons, which carry no MAC):
//   u8 version=1 | u8 type=kDetections | u64 block_id | u32 chunk_index | u8 last |
//   u32 count | count x (varint pulse_delta, u8 state)
// state bit 0 = bit, bit 1 = basis, bit 2 = dark; pulse_delta is the distance from the
// previous event's pulse + 1 (from 0 for the first event of the block).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "crypto.hpp"
#include "gf128.hpp"
#include "qkd/core/link.hpp"

namespace qkd::core::detail {

inline constexpr std::uint8_t kWireVersion = 1;           // quantum frames
inline constexpr std::uint8_t kWireVersionClassical = 3;  // classical frames (all modes)
inline constexpr std::size_t kHelloTagBytes = 16;          // tag of each direction's frame 0
inline constexpr std::size_t kHeaderBytes = 1 + 1 + 8 + 8;
inline constexpr std::size_t kNonceBytes = 16;
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
  kCheckpoint = 16,    // either way, transcript mode: closes an aborted block's transcript
};
[[nodiscard]] const char* msg_type_name(MsgType t);

struct MacKeys {
  SecureBytes alice_to_bob;
  SecureBytes bob_to_alice;
};
// HMAC mode keys of the session whose hello frames carried nonce_a and nonce_b:
// HKDF(PSK, nonce_A || nonce_B), one key per direction. Fails if the PSK is shorter than
// 16 bytes (kInvalidArgument) or HKDF fails.
[[nodiscard]] Result<MacKeys> derive_mac_keys(std::span<const std::uint8_t> psk,
                                              std::span<const std::uint8_t> nonce_a,
                                              std::span<const std::uint8_t> nonce_b);

// The authentication settings both ends must share (from ProtocolParams).
struct AuthSettings {
  AuthMode mode = AuthMode::kWegmanCarter;
  std::uint32_t tag_bits = 128;            // 64 or 128
  std::uint32_t pool_bits = 1U << 16;      // per direction: initial pad pool and refill level
  std::uint32_t refresh_blocks = 16;       // hash keys renewed every this many settled blocks
  bool every_message = false;              // Wegman-Carter: tag every frame (else transcript)
  [[nodiscard]] std::size_t tag_bytes() const {
    return mode == AuthMode::kHmac ? kMacBytes : tag_bits / 8;
  }
  [[nodiscard]] bool transcript() const {
    return mode == AuthMode::kWegmanCarter && !every_message;
  }
};
[[nodiscard]] AuthSettings auth_settings(const ProtocolParams& p);

enum class AuthRole : std::uint8_t { kAlice, kBob };

// The error a drained one-time-pad pool gives (ErrorCode::kAuthentication, message starting
// with this): a long run of aborted blocks used up the pads the last settled block repaid
// and the bootstrap reserve. The endpoints are then unusable: start a new session.
inline constexpr std::string_view kPadExhausted = "authentication pad exhausted";
// Tags a block may need per direction in transcript mode, its Abort frame included:
// Alice->Bob Amplify (or Checkpoint) + Abort; Bob->Alice VerifyResult + BlockDone (or
// Checkpoint) + Abort.
inline constexpr std::uint32_t kBlockTagsAliceToBob = 2;
inline constexpr std::uint32_t kBlockTagsBobToAlice = 3;
// Per-message mode: the tags of a block's fixed frames, per direction, its Abort included
// (Alice->Bob Params, SiftMatch, Sample, CascadeStart, Verify, Amplify; Bob->Alice ParamsAck,
// SiftBases, SampleReply, Cascade's done, VerifyResult, BlockDone). Cascade's round trips,
// a tag each way per request, come on top: ~100-200 per block, up to kMaxCascadeRequests,
// more than a pool may hold. So in this mode a frame other than an Abort never takes a
// pool's last tag: a block that runs out stops with a kPadExhausted error naming the pool
// size, and the peer hears of it through the Abort (instead of waiting for the timeout).
inline constexpr std::uint32_t kBlockTagsPerMessage = 7;

struct Frame {
  MsgType type = MsgType::kAbort;
  std::uint64_t block_id = 0;
  std::vector<std::uint8_t> payload;
};

class AuthChannel {
 public:
  // Fails if the PSK is shorter than 16 bytes (kInvalidArgument), the settings are invalid,
  // or the DRBG / HKDF fail.
  [[nodiscard]] static Result<std::unique_ptr<AuthChannel>> create(
      MessageTransport& transport, AuthRole role, std::span<const std::uint8_t> psk,
      const AuthSettings& settings);
  ~AuthChannel();
  AuthChannel(const AuthChannel&) = delete;
  AuthChannel& operator=(const AuthChannel&) = delete;

  // Fails with kAuthentication when the send pool holds fewer than tag_bits (aborted
  // blocks used up the repaid pads and the bootstrap reserve: start a new session), and in
  // per-message mode when a frame other than an Abort would take its last tag
  // (kBlockTagsPerMessage).
  // `checkpoint` (transcript mode only; ignored otherwise): tag the transcript so far.
  [[nodiscard]] Status send(MsgType type, std::uint64_t block_id,
                            std::span<const std::uint8_t> payload, bool checkpoint = false);
  // Receives the next frame and checks, in this order: size, tag (kAuthentication),
  // version and sequence (kProtocol), then, if a peer kAbort arrived, fails with kRejected
  // and the peer's reason; then block id (if given) and type (kProtocol). Under
  // Wegman-Carter the pad of a tagged frame is consumed whatever the outcome. In transcript
  // mode only checkpoint frames (`checkpoint`, same value as the sender's) and Abort frames
  // are verified; the others are absorbed into the transcript unverified.
  [[nodiscard]] Result<Frame> receive(std::chrono::milliseconds timeout, MsgType expected,
                                      std::optional<std::uint64_t> block_id,
                                      bool checkpoint = false);
  // Best effort: tells the peer why this end gives up (errors are ignored).
  void send_abort(std::uint64_t block_id, const std::string& reason);

  // Wegman-Carter key accounting, called by both ends at the same point of a finished
  // block with the same privacy-amplified key: refills both pads pools (Alice->Bob first)
  // to pool_bits from the front of `key`, then, when due and affordable, replaces both hash
  // keys (Alice->Bob first, 16 bytes each). Returns the number of bytes taken (the caller
  // drops them from the key). HMAC: 0.
  [[nodiscard]] std::size_t settle(std::span<const std::uint8_t> key);

  // Before a block (both ends, same pool state, same answer): fails with kAuthentication
  // and a kPadExhausted message when a pool cannot pay the tags of one more block
  // (kBlockTags*; per-message mode: those of its fixed frames), so that a long run of
  // aborts stops cleanly between blocks instead of in the middle of one. Always ok under
  // HMAC and before the session keys exist (the first block runs on the full bootstrap
  // pools).
  [[nodiscard]] Status check_block_reserve() const;
  // Pad bits in the Alice->Bob and Bob->Alice pools (0 under HMAC).
  [[nodiscard]] std::array<std::uint64_t, 2> pool_bits_left() const {
    return {8 * std::uint64_t{ab_.pool.size()}, 8 * std::uint64_t{ba_.pool.size()}};
  }

  // Introspection for tests and accounting.
  [[nodiscard]] const AuthSettings& settings() const { return settings_; }
  [[nodiscard]] std::size_t send_pool_bytes() const;
  [[nodiscard]] std::size_t recv_pool_bytes() const;
  [[nodiscard]] std::uint64_t hash_key_refreshes() const { return refreshes_; }
  // Pad bytes taken from the pools so far (both directions; sent and verified frames).
  [[nodiscard]] std::uint64_t pad_bytes_used() const { return pad_bytes_used_; }

 private:
  struct Direction {
    SecureBytes hash_key;  // 16 bytes
    SecureBytes pool;      // pads, used as a stack from the end
  };
  AuthChannel(MessageTransport& t, AuthRole role, const AuthSettings& s);
  Status derive_hello_a(std::span<const std::uint8_t> nonce_a);
  Status derive_hello_b(std::span<const std::uint8_t> nonce_a,
                        std::span<const std::uint8_t> nonce_b);
  Status derive_session(std::span<const std::uint8_t> nonce_a,
                        std::span<const std::uint8_t> nonce_b);
  // The tag of a frame after the first (sending: this end's next frame; receiving: the
  // peer's), `tagged` telling whether it carries one in transcript mode. Consumes the pad.
  // Returns an empty tag for an untagged transcript frame.
  Result<std::vector<std::uint8_t>> tag_for(bool sending, bool tagged,
                                            std::span<const std::uint8_t> body);
  std::string settings_label() const;

  MessageTransport& t_;
  AuthRole role_;
  AuthSettings settings_;
  SecureBytes psk_;
  // HMAC
  SecureBytes hmac_send_;
  SecureBytes hmac_recv_;
  // Wegman-Carter
  std::array<std::uint8_t, kNonceBytes> nonce_{};       // this end's
  std::array<std::uint8_t, kNonceBytes> peer_nonce_{};
  SecureBytes hello_a_;   // H (16) | pad of Alice's frame 0 | pad of her early Abort
  SecureBytes hello_b_;   // H (16) | pad of Bob's frame 0
  bool session_ = false;  // session keys derived (and, for Alice, Bob's frame 0 verified)
  Direction ab_;          // Alice -> Bob
  Direction ba_;          // Bob -> Alice
  PolyHasher ab_transcript_;  // transcript mode: Alice->Bob frames since the last checkpoint
  PolyHasher ba_transcript_;
  std::uint64_t since_refresh_ = 0;
  bool refreshed_ = false;
  std::uint64_t refreshes_ = 0;
  std::uint64_t pad_bytes_used_ = 0;
  std::uint64_t send_seq_ = 0;
  std::uint64_t recv_seq_ = 0;
};

}  // namespace qkd::core::detail
