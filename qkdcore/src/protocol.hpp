// Pieces of the BB84 block protocol shared by both endpoints (internal).
//
// One block, message by message (C = classical, authenticated; Q = quantum transport):
//   C A->B Params          the ProtocolParams fields that must match, and pulse_rate_hz
//   C B->A ParamsAck       accepted, or refused with the mismatching field
//   Q A->B Detections...   chunks of detection events (pulse, arriving state or dark)
//   C B->A SiftBases       detection count + Bob's bases, aligned with the events
//   C A->B SiftMatch       mask of the events whose bases matched
//   C A->B Sample          mask of the sifted bits disclosed + Alice's values there
//   C B->A SampleReply     Bob's values there
//         (both ends now hold the same QBER estimate and take the same abort decision)
//   C A->B CascadeStart    n, first block size, passes, variant, shuffle seed, BICONF rounds
//   C B->A CascadeRequest  block parities of a pass | range parities |
//                          done(+corrected, +BICONF parities)
//   C A->B CascadeReply    parities              (repeated until done; BICONF rounds are
//                          the last passes)
//   C A->B Verify          Toeplitz seed + Alice's t-bit tag, t = verify_tag_bits()
//   C B->A VerifyResult    match or not          (mismatch: both abort the block)  [ckpt]
//   C A->B Amplify         output length m + Toeplitz seed                         [ckpt]
//   C B->A BlockDone                                                               [ckpt]
// [ckpt]: transcript checkpoints (channel.hpp). An aborted block instead ends with one
// Checkpoint frame each way (close_aborted_block).
#pragma once

#include <array>
#include <memory>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "channel.hpp"
#include "qkd/core/bit_vector.hpp"
#include "qkd/core/cascade.hpp"
#include "qkd/core/key_length.hpp"
#include "qkd/core/link.hpp"
#include "qkd/core/physics.hpp"
#include "qkd/core/toeplitz.hpp"
#include "wire.hpp"

namespace qkd::core::detail {

// Fewer disclosed sample bits than this cannot estimate a QBER: the block aborts.
inline constexpr std::uint64_t kMinSampleBits = 32;
// Fewer bits than this left to reconcile: the block aborts.
inline constexpr std::uint64_t kMinReconciledBits = 128;
// Upper bound on Cascade requests per block: a guard against a misbehaving peer, and
// against the long run a tampered (not yet verified) CascadeStart or reply would cause
// under transcript authentication. Honest blocks need ~50-250 round trips.
inline constexpr std::uint64_t kMaxCascadeRequests = 5'000;
// Upper bound on the summed range lengths of one range-parity request, in multiples of the
// key length n (Alice refuses a request above it). An honest request's ranges are
// sub-blocks of distinct blocks of one pass, hence disjoint: at most n bits in all (the
// link tests measure at most n/2 + 1). Without it one request of n full-key ranges cost
// Alice O(n^2 / 64) word operations (seconds at n = 4e5), 5,000 times per block.
inline constexpr std::uint64_t kMaxCascadeRequestBits = 2;

enum class CascadeRequestKind : std::uint8_t { kBlockParities = 0, kRangeParities = 1, kDone = 2 };
// A kRangeParities request: its kind, the number of queries, then each (pass, start, length).
void write_range_parities(Writer& w, std::span<const ParityQuery> queries);

// Alice's source settings as announced in Params (public device settings Bob needs for
// the decoy-state estimation).
struct SourceInfo {
  SourceKind source = SourceKind::kSinglePhoton;
  std::array<double, 3> mu{1.0, 0.0, 0.0};
  std::array<double, 3> prob{1.0, 0.0, 0.0};
  [[nodiscard]] bool decoys() const { return source == SourceKind::kWeakCoherent; }
};
[[nodiscard]] SourceInfo source_info(const ChannelParams& c);
// Refuses nonsense from the wire (non-finite, negative, probabilities not summing to 1).
[[nodiscard]] bool plausible(const SourceInfo& s);

void write_params(Writer& w, const ProtocolParams& p, double pulse_rate_hz,
                  const SourceInfo& source = {});
// Parses Params; on success fills `p` (the fields that travel), `pulse_rate_hz` and the
// source settings.
[[nodiscard]] bool read_params(Reader& r, ProtocolParams& p, double& pulse_rate_hz,
                               SourceInfo& source);
[[nodiscard]] bool read_params(Reader& r, ProtocolParams& p, double& pulse_rate_hz);
// Empty if the travelling fields agree; otherwise names the first that differs.
[[nodiscard]] std::string params_mismatch(const ProtocolParams& mine,
                                          const ProtocolParams& theirs);

// The abort decision after QBER estimation; both ends call it with the same numbers. The
// block aborts when the QBER's upper confidence bound (confidence_sd standard deviations)
// is above qber_abort.
[[nodiscard]] std::optional<std::string> estimation_abort(std::uint64_t sample_bits,
                                                          std::uint64_t sample_errors,
                                                          std::uint64_t reconciled_bits,
                                                          double qber_abort,
                                                          double confidence_sd = 0.0);

// The same decision from a block's statistics (sample_bits, sample_errors) and settings.
[[nodiscard]] std::optional<std::string> estimation_abort(const BlockStatistics& stats,
                                                          std::uint64_t reconciled_bits,
                                                          const ProtocolParams& p);
// Abort reason of a block whose verification tags differ.
inline constexpr std::string_view kVerificationMismatch =
    "verification hash mismatch after Cascade (residual errors)";

// What both ends know of each sifted bit besides its value: the basis (false = Z) and
// Alice's intensity class (announced in SiftMatch for a decoy source).
struct SiftedInfo {
  BitVector basis;
  std::vector<std::uint8_t> intensity;
};
// Sifted bits that are always disclosed: every decoy or vacuum-class bit and, with a
// biased basis choice, every X-basis bit.
[[nodiscard]] BitVector mandatory_disclosure(const SiftedInfo& info, bool biased);
// Alice's disclosure mask: the mandatory bits plus a random sample_fraction of the rest.
[[nodiscard]] Result<BitVector> choose_disclosure(const SiftedInfo& info, bool biased,
                                                  double sample_fraction);
// Sets the j-th clear position of `mask` iff bit j of `sample` is set (sample bits past
// its size count as clear): how choose_disclosure adds its random sample.
void add_sample(BitVector& mask, const BitVector& sample);
// The block's statistics (see BlockStatistics) from the disclosure mask and both ends'
// values of the disclosed bits (in mask order); fills r.intensity and r.qber.
[[nodiscard]] BlockStatistics gather_statistics(const SiftedInfo& info, const BitVector& mask,
                                                const BitVector& alice_disclosed,
                                                const BitVector& bob_disclosed,
                                                const ProtocolParams& p,
                                                const SourceInfo& source,
                                                std::uint64_t pulses, BlockResult& r);
// The key length of the block and the estimates it rests on, recorded in r.
[[nodiscard]] std::uint64_t final_key_length(BlockStatistics stats, std::uint64_t leaked_bits,
                                             BlockResult& r);

// Transcript mode: an aborted block (QBER, verification) ends with one Checkpoint frame
// each way (each end sends, then receives), so that tampering during the block is caught
// in it (kAuthentication) rather than at the next block. Nothing in per-message / HMAC mode.
[[nodiscard]] Status close_aborted_block(AuthChannel& ch, std::uint64_t block,
                                         std::chrono::milliseconds timeout);
// Passes Cascade runs with: cascade_passes, or the variant's default when 0.
[[nodiscard]] std::uint32_t cascade_passes(const ProtocolParams& p);

// The verification tag: the t-bit Toeplitz hash of `key` under `seed` (key.size() + t - 1
// public random bits), as ceil(t / 8) bytes, unused high bits of the last byte zero. For
// keys x != y and a uniformly random seed, Pr[tag(x) = tag(y)] = 2^-t exactly (T(x ^ y) is
// uniform for a random Toeplitz T and x ^ y != 0), whatever the key length. Fails like
// toeplitz_hash (bad seed size, t == 0).
[[nodiscard]] Result<std::vector<std::uint8_t>> verification_tag(const BitVector& seed,
                                                                 const BitVector& key,
                                                                 std::uint32_t t);

// After the block's last message: pays the authentication key from the front of the
// privacy-amplified key `gross` (m bits) through ch.settle() and puts the rest in r.key,
// r.secret_bits (net) and r.auth_bits_consumed. Both ends call it at the same point.
void pay_authentication(AuthChannel& ch, const SecureBytes& gross, std::uint64_t m,
                        BlockResult& r);

// nbits from OpenSSL's DRBG.
[[nodiscard]] Result<BitVector> random_bits(std::size_t nbits);
// A mask of exactly k set bits among n, chosen uniformly (selection sampling driven by a
// generator seeded from the DRBG).
[[nodiscard]] Result<BitVector> random_sample_mask(std::uint64_t n, std::uint64_t k);
// The same from a given generator (the draws after seeding it from the DRBG).
[[nodiscard]] BitVector random_sample_mask(Xoshiro256ss& rng, std::uint64_t n, std::uint64_t k);

// Splits `key` by `mask` (same size): bits under the mask to `selected`, others to `rest`.
void split_by_mask(const BitVector& key, const BitVector& mask, BitVector& selected,
                   BitVector& rest);

// Quantum frames (see channel.hpp for the layout).
[[nodiscard]] std::vector<std::uint8_t> encode_detections(std::uint64_t block_id,
                                                          std::uint32_t chunk, bool last,
                                                          std::span<const DetectionEvent> ev,
                                                          std::uint64_t first_pulse_base);
struct DetectionChunk {
  bool last = false;
  std::vector<DetectionEvent> events;
};
// `next_pulse` is the smallest pulse index the chunk may start at (updated on success);
// events must be strictly increasing and below `pulses`. A chunk must hold events unless it
// is the last, and its index must not pass pulses / kMaxEventsPerChunk (kProtocol).
[[nodiscard]] Result<DetectionChunk> decode_detections(std::span<const std::uint8_t> msg,
                                                       std::uint64_t block_id,
                                                       std::uint32_t chunk,
                                                       std::uint64_t& next_pulse,
                                                       std::uint64_t pulses);

// The frame Alice sends on the quantum transport when she gives up on a block, so that a
// Bob still waiting for detections stops at once (unauthenticated, like the photons: an
// attacker on the quantum channel can stop a block anyway).
[[nodiscard]] std::vector<std::uint8_t> encode_quantum_abort(std::uint64_t block_id);

// What both endpoints hold and do around a block; AliceEndpoint::Impl and
// BobEndpoint::Impl derive from it and supply run() (their half of the block protocol).
class EndpointCore {
 public:
  EndpointCore(const ProtocolParams& p, AuthRole role, std::span<const std::uint8_t> psk,
               MessageTransport& quantum, MessageTransport& classical);
  virtual ~EndpointCore() = default;
  EndpointCore(const EndpointCore&) = delete;
  EndpointCore& operator=(const EndpointCore&) = delete;

  // One block: refuses after a failed construction or an earlier fatal error; validates
  // the settings; fails with kPadExhausted (both ends alike, nothing sent) when the pads
  // cannot pay one more block; runs run(); after a fatal error tells the peer (unless the
  // error came from it or the pipe is gone) and refuses later blocks; fills the
  // accounting fields both roles share (pads used, pools left, CPU time) and drops the key
  // of an aborted block.
  [[nodiscard]] Result<BlockResult> run_block();

 protected:
  // Receives a classical message of the given type for this block.
  [[nodiscard]] Result<Frame> recv(MsgType t, std::uint64_t block, bool checkpoint = false);
  // Sends `type` with `payload`, then receives the peer's `expect` (checkpoint flags as in
  // AuthChannel::send / receive).
  [[nodiscard]] Result<Frame> exchange(MsgType type, std::uint64_t block,
                                       std::span<const std::uint8_t> payload, MsgType expect,
                                       bool send_checkpoint = false,
                                       bool expect_checkpoint = false);
  // Ends the block as aborted (both ends call it at the same point of the protocol):
  // records the reason and closes the block's transcript (close_aborted_block).
  [[nodiscard]] Status abort_block(BlockResult& r, std::uint64_t block, std::string reason);
  // The role's half of one block: fills `r` or fails, setting `fatal` = false when the
  // channel state survives the error (it starts true).
  [[nodiscard]] virtual Status run(BlockResult& r, bool& fatal) = 0;
  // Settings checked before every block (Alice adds her ChannelParams).
  [[nodiscard]] virtual Status validate_settings() const { return validate(protocol); }
  // After a fatal error of this end: best-effort notice to the peer (a classical Abort;
  // Alice also stops the quantum transmission).
  virtual void tell_peer(std::uint64_t block, const Error& e);

  ProtocolParams protocol;
  MessageTransport& quantum;
  std::unique_ptr<AuthChannel> classical;

 private:
  std::optional<Error> init_error_;
  std::optional<Error> failed_;  // set by a fatal error; the endpoint refuses further blocks
};

[[nodiscard]] inline Error malformed(MsgType t) {
  return make_error(ErrorCode::kProtocol, std::string("malformed ") + msg_type_name(t) +
                                              " message");
}

}  // namespace qkd::core::detail
