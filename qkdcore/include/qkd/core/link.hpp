// The public face of the BB84 engine: the two link endpoints and what they need.
//
// This header is the contract between qkdcore and its users (keyservice's link runner,
// qkd-sim, the tests). qkdcore knows no sockets: endpoints talk through two abstract
// message transports, one for the quantum channel and one for the classical channel.
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

#include "qkd/core/cascade.hpp"
#include "qkd/core/result.hpp"
#include "qkd/core/secure_bytes.hpp"

namespace qkd::core {

// A bidirectional, ordered, reliable message pipe (one message in = one message out).
// Implementations: an in-process queue pair (make_memory_transport_pair) and, in
// keyservice, a tagged stream over the TCP connection between two KMEs.
class MessageTransport {
 public:
  virtual ~MessageTransport() = default;
  // Fails when the pipe is closed.
  [[nodiscard]] virtual Status send(std::vector<std::uint8_t> message) = 0;
  // Waits at most `timeout`; fails with ErrorCode::kTimeout or kClosed.
  [[nodiscard]] virtual Result<std::vector<std::uint8_t>> receive(
      std::chrono::milliseconds timeout) = 0;
  // Wakes any blocked receive() with kClosed, on both ends.
  virtual void close() = 0;
};

// Two connected in-process transports (what one sends, the other receives).
struct TransportPair {
  std::unique_ptr<MessageTransport> a;
  std::unique_ptr<MessageTransport> b;
};
[[nodiscard]] TransportPair make_memory_transport_pair();

// Physics of the simulated link. The quantum channel is simulated on Alice's side ("nature"
// between her source and Bob's detectors); Bob receives only detection events and measures
// them himself in a basis he chooses, so he learns only what a measurement gives.
//
// Sources: an ideal single-photon source (the default), or a weak coherent source (laser
// pulses, Poisson photon number) with up to three intensity classes chosen per pulse:
// signal (mean photon number mu_signal), weak decoy (mu_decoy) and vacuum (mu_vacuum,
// usually 0). Setting prob_decoy = prob_vacuum = 0 gives a weak coherent source without
// decoys. Alice announces her source settings in each block's first message (they are
// public device settings), so Bob can run the decoy-state estimation too.
enum class SourceKind : std::uint8_t { kSinglePhoton = 0, kWeakCoherent = 1 };

// The range of ChannelParams::pulse_rate_hz (validate()), also what Bob accepts in Params.
inline constexpr double kMinPulseRateHz = 1.0;
inline constexpr double kMaxPulseRateHz = 1e15;

struct ChannelParams {
  double length_km = 20.0;              // fiber length
  double loss_db_per_km = 0.2;          // fiber attenuation
  double detector_efficiency = 0.1;     // Bob's detector and optics, 0..1
  double dark_count_prob = 1e-6;        // dark-count probability per pulse (Y0)
  double misalignment = 0.01;           // optical error e_det, 0..0.5
  double eve_intercept_fraction = 0.0;  // intercept-resend on this fraction of pulses, 0..1
  // Source repetition rate, for rates per second: in [kMinPulseRateHz, kMaxPulseRateHz]
  // (validate(); Bob refuses a block announcing another), so that pulses / rate is a finite,
  // positive number of seconds.
  double pulse_rate_hz = 1e9;
  // --- added with the decoy-state physics (defaults keep the single-photon behaviour) ---
  SourceKind source = SourceKind::kSinglePhoton;
  double mu_signal = 0.5;               // mean photon number of signal pulses (weak coherent)
  double mu_decoy = 0.1;                // weak decoy, < mu_signal
  double mu_vacuum = 0.0;               // vacuum decoy, < mu_decoy (0 = true vacuum)
  double prob_decoy = 0.0;              // probability of a weak-decoy pulse
  double prob_vacuum = 0.0;             // probability of a vacuum pulse (signal: the rest)
  double insertion_loss_db = 0.0;       // extra loss (connectors, Bob's optics) [dB]
  bool fiber_cut = false;               // the fiber is cut: only dark counts reach Bob
  // Photon-number splitting: Eve measures the photon number of every pulse, blocks the
  // single-photon ones, keeps one photon of each multi-photon pulse and forwards the rest
  // over a lossless line, forwarding just enough of them that the signal gain is what Bob
  // expects. Adds no errors; only a decoy analysis reveals it.
  bool eve_photon_number_splitting = false;
  // Eve's probability of measuring an intercepted photon in Z (0..1; 0.5 = either basis at
  // random). 1 is the attack on efficient BB84 (z_basis_prob > 0.5): it leaves the Z
  // basis's error rate alone and shows only in X.
  double eve_z_basis_prob = 0.5;
  // --- added with the detector dead time and afterpulsing (defaults: off, results
  // bit-identical to before). Detector properties: they stay on Alice's simulated side. ---
  // After every click the detector is blind for ceil(dead_time_ns * 1e-9 * pulse_rate_hz)
  // pulses (non-paralyzable). 0 = no dead time.
  double dead_time_ns = 0.0;
  // Probability that a click (photon, dark count or afterpulse) causes an afterpulse: a
  // false click with a random result at a pulse drawn uniformly from the
  // afterpulse_window_ns that follows the dead time (unless another click comes first).
  double afterpulse_prob = 0.0;
  double afterpulse_window_ns = 100.0;  // afterpulse window after the dead time [ns]
};
[[nodiscard]] Status validate(const ChannelParams& p);  // names the bad field

// The security bound that turns a block's statistics into a key length. Every BlockResult
// names the one it used (key_bound_name()).
enum class KeyBound : std::uint8_t {
  kAsymptotic = 0,      // GLLP asymptotic (no decoys; = Shor-Preskill for single photons)
  kDecoyAsymptotic = 1, // vacuum + weak decoy (Ma, Qi, Zhao, Lo 2005), asymptotic
  kFiniteSingle = 2,    // finite key, Tomamichel, Lim, Gisin, Renner 2012 (single photons)
  kFiniteDecoy = 3,     // finite key, two decoys with Hoeffding bounds (Lim et al. 2014)
  kBennett92 = 4,       // BBBSS92 defense function with c standard deviations
  kSlutsky98 = 5,       // Slutsky et al. 1998 defense function with c standard deviations
};
[[nodiscard]] const char* key_bound_name(KeyBound b);
// Parses the short names "asymptotic", "decoy", "finite", "finite-decoy", "bbbss92",
// "slutsky98"; nullopt otherwise.
[[nodiscard]] std::optional<KeyBound> parse_key_bound(std::string_view name);

// How classical messages are authenticated (see ProtocolParams::auth).
enum class AuthMode : std::uint8_t {
  // Wegman-Carter: polynomial hash over GF(2^128), tag encrypted with one-time-pad bits that
  // each block repays from its own key (BlockResult::auth_bits_consumed). Bootstrapped per
  // session from the PSK with HKDF (computational only until the first block is settled).
  kWegmanCarter = 0,
  kHmac = 1,  // HMAC-SHA256 with keys derived from the PSK: computational only, no key cost
};
[[nodiscard]] const char* auth_mode_name(AuthMode m);
// "wegman-carter" (or "wc"), "hmac"; nullopt otherwise.
[[nodiscard]] std::optional<AuthMode> parse_auth_mode(std::string_view name);

// Protocol settings. Both ends must use the same values (Alice announces hers in each
// block's first message; Bob refuses a block whose settings differ from his).
struct ProtocolParams {
  std::uint64_t pulses_per_block = 2'000'000;  // pulses sent per block
  double sample_fraction = 0.1;                // sifted bits disclosed to estimate QBER
  double qber_abort = 0.11;                    // abort the block above this estimate
  // Cascade passes; 0 (the default since the Cascade variants) = the variant's own count
  // (cascade_default_passes: 4 original, 16 yan / modern).
  std::uint32_t cascade_passes = 0;
  // Verification tag length: 0 (the default) = follow epsilon_cor (verify_tag_bits());
  // otherwise at least that, at most 256.
  std::uint32_t verify_hash_bits = 0;
  double safety_margin = 0.05;                 // extra fraction of the reconciled length removed
  std::chrono::milliseconds message_timeout{10'000};  // per classical/quantum message
  // --- added with the decoy-state physics (defaults keep the earlier behaviour) ---
  // Probability that Alice and Bob each choose the Z basis (0.5 = standard BB84; near 1 =
  // efficient BB84: the key comes from Z, X serves to estimate the phase error).
  double z_basis_prob = 0.5;
  KeyBound key_bound = KeyBound::kAsymptotic;  // which security bound sets the key length
  double epsilon_sec = 1e-10;                  // secrecy parameter (finite-key bounds)
  // Correctness parameter: sets the verification tag length (verify_tag_bits: 1e-15 ->
  // 50 bits) and enters the finite-key bounds. In [2^-256, 0.5].
  double epsilon_cor = 1e-15;
  // c: standard deviations of confidence, for the QBER upper bound that decides the abort
  // and for the BBBSS92 and Slutsky98 defense functions (c = 5: about 1e-6 per block).
  double confidence_sd = 5.0;
  // --- added with Wegman-Carter authentication (both ends must agree; a mismatch shows as
  // an authentication error on the first message, since it changes the keys) ---
  AuthMode auth = AuthMode::kWegmanCarter;
  std::uint32_t auth_tag_bits = 128;          // 64 or 128 (forgery <= (n+1)/2^bits per message)
  std::uint32_t auth_pool_bits = 1U << 16;    // one-time-pad pool per direction (multiple of 8)
  std::uint32_t auth_key_refresh_blocks = 16; // hash keys renewed from QKD output this often
  // --- added with transcript authentication and the Cascade variants. Since then every
  // setting above (auth ones included) and these travel in the block's Params message: a
  // mismatch is refused with kRejected naming the field. ---
  // false (default): Wegman-Carter authenticates the transcript: each direction hashes all
  // its frames and one-time-pad tags are sent only at checkpoints (3 per settled block, 2
  // per aborted one). true: a tag on every frame (the earlier scheme, ~100-200 tags per
  // block). Ignored under HMAC (which tags every frame). See docs/VALIDATION.md.
  bool auth_every_message = false;
  // Cascade block schedule (cascade.hpp). kModern: f ~1.03-1.06 with 16 passes.
  CascadeVariant cascade_variant = CascadeVariant::kModern;
  // --- added with BICONF and the eps_cor verification tag (travel in Params too) ---
  // BICONF rounds after the Cascade passes (cascade.hpp): each discloses one parity of a
  // random half of the key, more when it finds an error. 0..64.
  std::uint32_t cascade_biconf_rounds = 4;
};
// Length t of the verification tag: ceil(log2(1 / epsilon_cor)), raised to
// verify_hash_bits when that is set (non-zero). The tag is a Toeplitz hash (a universal
// family: two different keys collide with probability exactly 2^-t whatever their length),
// so a block passes verification with differing keys with probability <= 2^-t <= epsilon_cor.
[[nodiscard]] std::uint32_t verify_tag_bits(const ProtocolParams& p);
[[nodiscard]] Status validate(const ProtocolParams& p);

// What one block produced. Both ends return the same numbers and identical key bytes
// (or both abort). `key` holds `secret_bits` bits, packed little-endian within bytes.
struct BlockResult {
  std::uint64_t block_id = 0;
  bool aborted = false;
  std::string abort_reason;           // empty unless aborted ("QBER 23.1 % above 11 %")
  std::uint64_t pulses = 0;           // pulses sent
  std::uint64_t detections = 0;       // raw key bits (detection events)
  std::uint64_t sifted_bits = 0;      // after basis sifting
  std::uint64_t sample_bits = 0;      // disclosed for QBER estimation
  double qber = 0.0;                  // estimate from the sample
  std::uint64_t reconciled_bits = 0;  // bits entering Cascade
  std::uint64_t leaked_bits = 0;      // Cascade parities + verification tag
  std::uint64_t cascade_errors_corrected = 0;
  std::uint64_t secret_bits = 0;      // length of `key`
  double simulated_seconds = 0.0;     // pulses / pulse_rate_hz
  double cpu_seconds = 0.0;           // wall time this end spent on the block
  SecureBytes key;
  // --- added with the decoy-state physics ---
  std::string key_bound;              // name of the bound that set secret_bits
  double qber_upper = 0.0;            // upper confidence bound of the QBER (the abort test)
  // Per intensity class (0 signal, 1 weak decoy, 2 vacuum; a single-photon source uses 0).
  struct IntensityStats {
    std::uint64_t sifted = 0;         // sifted detections of this class (both bases)
    std::uint64_t disclosed = 0;      // of which disclosed for estimation
    std::uint64_t errors = 0;         // errors among the disclosed
    double gain = 0.0;                // measured detections per pulse of this class
  };
  std::array<IntensityStats, 3> intensity{};
  // Decoy-state estimates (0 when not applicable): lower bound of the single-photon yield,
  // upper bound of the single-photon (phase) error rate, lower bound of the single-photon
  // bits in the reconciled key.
  double y1_lower = 0.0;
  double e1_upper = 0.0;
  double single_photon_bits_lower = 0.0;
  // --- added with Wegman-Carter authentication ---
  // Bits of the privacy-amplified key paid back to authentication (the one-time pads both
  // directions used since the last settled block, plus 256 bits of new hash keys every
  // auth_key_refresh_blocks blocks); secret_bits / key are what remains (the net key), so
  // secret_bits + auth_bits_consumed is the privacy-amplification output. 0 under HMAC and
  // for aborted blocks.
  std::uint64_t auth_bits_consumed = 0;
  // One-time-pad bits the block's messages used, both directions (same on both ends; what
  // the next settlement repays if this block yields too little key).
  std::uint64_t auth_pad_bits_used = 0;
  // --- added with BICONF, the eps_cor verification tag and pad repayment ---
  // Verification: tag length t (counted in leaked_bits) and the correctness it gives: a
  // block whose keys differ passes verification with probability <= 2^-t <= epsilon_cor.
  std::uint32_t verify_tag_bits = 0;
  double epsilon_cor = 0.0;
  // Of leaked_bits: the parities of the BICONF rounds (and of the bisections they caused).
  std::uint64_t biconf_parities = 0;
  // One-time-pad bits left in the Alice->Bob and Bob->Alice pools after the block (same
  // on both ends; auth_pool_bits each after a settled block whose key could repay them).
  std::array<std::uint64_t, 2> auth_pool_bits_left{};
};

// Alice: owns the source and the channel simulation; sends detection events on the
// quantum transport, then runs the classical post-processing with Bob.
class AliceEndpoint {
 public:
  AliceEndpoint(ChannelParams channel, ProtocolParams protocol,
                std::span<const std::uint8_t> psk,  // pre-shared authentication secret
                std::uint64_t seed,                 // deterministic for a given seed
                MessageTransport& quantum, MessageTransport& classical);
  ~AliceEndpoint();
  AliceEndpoint(const AliceEndpoint&) = delete;
  AliceEndpoint& operator=(const AliceEndpoint&) = delete;
  // Runs one block. A protocol abort (QBER too high) is a successful call whose result
  // has aborted = true; a transport failure or a failed MAC is an error.
  [[nodiscard]] Result<BlockResult> run_block();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class BobEndpoint {
 public:
  BobEndpoint(ProtocolParams protocol, std::span<const std::uint8_t> psk, std::uint64_t seed,
              MessageTransport& quantum, MessageTransport& classical);
  ~BobEndpoint();
  BobEndpoint(const BobEndpoint&) = delete;
  BobEndpoint& operator=(const BobEndpoint&) = delete;
  [[nodiscard]] Result<BlockResult> run_block();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qkd::core
