#include "protocol.hpp"

#include <openssl/crypto.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "bit_ops.hpp"
#include "qkd/core/random.hpp"

namespace qkd::core::detail {

namespace {

// Bits [d, d + count) of a bit vector's words (count <= 64), bits at or past `size` 0.
std::uint64_t read_bits(std::span<const std::uint64_t> words, std::size_t size, std::size_t d,
                        unsigned count) {
  if (count == 0 || d >= size) {
    return 0;
  }
  const std::size_t w = d >> 6;
  const unsigned sh = static_cast<unsigned>(d & 63);
  std::uint64_t v = words[w] >> sh;
  if (sh != 0 && w + 1 < words.size()) {
    v |= words[w + 1] << (64 - sh);
  }
  const std::size_t avail = std::min<std::size_t>(count, size - d);
  return avail >= 64 ? v : v & ((std::uint64_t{1} << avail) - 1);
}

// Bit i set iff bytes[i] != 0, for i < len <= 64: 8 bytes at a time, each byte's bits ORed
// into its low bit, and the 8 low bits gathered by one multiply (the partial products land
// on distinct bits, so nothing carries).
std::uint64_t nonzero_bytes(const std::uint8_t* bytes, unsigned len) {
  constexpr std::uint64_t kLow = 0x0101010101010101ULL;
  constexpr std::uint64_t kGather = 0x0102040810204080ULL;
  std::uint64_t out = 0;
  unsigned i = 0;
  for (; i + 8 <= len; i += 8) {
    std::uint64_t v = 0;
    for (unsigned b = 0; b < 8; ++b) {  // little-endian load, whatever the host order
      v |= std::uint64_t{bytes[i + b]} << (8 * b);
    }
    v |= v >> 4;
    v |= v >> 2;
    v |= v >> 1;
    out |= (((v & kLow) * kGather) >> 56) << i;
  }
  for (; i < len; ++i) {
    out |= std::uint64_t{bytes[i] != 0 ? 1U : 0U} << i;
  }
  return out;
}

}  // namespace

SourceInfo source_info(const ChannelParams& c) {
  SourceInfo s;
  s.source = c.source;
  if (c.source == SourceKind::kWeakCoherent) {
    s.mu = {c.mu_signal, c.mu_decoy, c.mu_vacuum};
    s.prob = {1.0 - c.prob_decoy - c.prob_vacuum, c.prob_decoy, c.prob_vacuum};
  }
  return s;
}

bool plausible(const SourceInfo& s) {
  if (s.source != SourceKind::kSinglePhoton && s.source != SourceKind::kWeakCoherent) {
    return false;
  }
  double sum = 0.0;
  for (std::size_t k = 0; k < 3; ++k) {
    if (!std::isfinite(s.mu[k]) || s.mu[k] < 0.0 || s.mu[k] > 20.0 || !std::isfinite(s.prob[k]) ||
        s.prob[k] < 0.0 || s.prob[k] > 1.0) {
      return false;
    }
    sum += s.prob[k];
  }
  return std::fabs(sum - 1.0) < 1e-9 && s.prob[0] > 0.0;
}

void write_params(Writer& w, const ProtocolParams& p, double pulse_rate_hz,
                  const SourceInfo& source) {
  w.u64(p.pulses_per_block);
  w.f64(p.sample_fraction);
  w.f64(p.qber_abort);
  w.u32(p.cascade_passes);
  w.u32(p.verify_hash_bits);
  w.f64(p.safety_margin);
  w.f64(pulse_rate_hz);
  w.f64(p.z_basis_prob);
  w.u8(static_cast<std::uint8_t>(p.key_bound));
  w.f64(p.epsilon_sec);
  w.f64(p.epsilon_cor);
  w.f64(p.confidence_sd);
  w.u8(static_cast<std::uint8_t>(source.source));
  for (std::size_t k = 0; k < 3; ++k) {
    w.f64(source.mu[k]);
    w.f64(source.prob[k]);
  }
  // Added with transcript authentication and the Cascade variants.
  w.u8(static_cast<std::uint8_t>(p.cascade_variant));
  w.u8(static_cast<std::uint8_t>(p.auth));
  w.u32(p.auth_tag_bits);
  w.u8(p.auth_every_message ? 1 : 0);
  w.u32(p.auth_pool_bits);
  w.u32(p.auth_key_refresh_blocks);
  // Added with BICONF and the eps_cor verification tag.
  w.u32(p.cascade_biconf_rounds);
}

bool read_params(Reader& r, ProtocolParams& p, double& pulse_rate_hz, SourceInfo& source) {
  std::uint8_t bound = 0;
  std::uint8_t kind = 0;
  if (!(r.u64(p.pulses_per_block) && r.f64(p.sample_fraction) && r.f64(p.qber_abort) &&
        r.u32(p.cascade_passes) && r.u32(p.verify_hash_bits) && r.f64(p.safety_margin) &&
        r.f64(pulse_rate_hz) && r.f64(p.z_basis_prob) && r.u8(bound) && r.f64(p.epsilon_sec) &&
        r.f64(p.epsilon_cor) && r.f64(p.confidence_sd) && r.u8(kind))) {
    return false;
  }
  if (bound > static_cast<std::uint8_t>(KeyBound::kSlutsky98) || kind > 1) {
    return false;
  }
  p.key_bound = static_cast<KeyBound>(bound);
  source.source = static_cast<SourceKind>(kind);
  for (std::size_t k = 0; k < 3; ++k) {
    if (!r.f64(source.mu[k]) || !r.f64(source.prob[k])) {
      return false;
    }
  }
  std::uint8_t variant = 0;
  std::uint8_t auth = 0;
  std::uint8_t every = 0;
  if (!r.u8(variant) || !r.u8(auth) || !r.u32(p.auth_tag_bits) || !r.u8(every) ||
      !r.u32(p.auth_pool_bits) || !r.u32(p.auth_key_refresh_blocks) ||
      variant > static_cast<std::uint8_t>(CascadeVariant::kModern) ||
      auth > static_cast<std::uint8_t>(AuthMode::kHmac) || every > 1) {
    return false;
  }
  p.cascade_variant = static_cast<CascadeVariant>(variant);
  p.auth = static_cast<AuthMode>(auth);
  p.auth_every_message = every == 1;
  if (!r.u32(p.cascade_biconf_rounds)) {
    return false;
  }
  return r.done() && plausible(source);
}

bool read_params(Reader& r, ProtocolParams& p, double& pulse_rate_hz) {
  SourceInfo ignored;
  return read_params(r, p, pulse_rate_hz, ignored);
}

std::string params_mismatch(const ProtocolParams& mine, const ProtocolParams& theirs) {
  auto num = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.17g", v);
    return std::string(buf);
  };
  if (mine.pulses_per_block != theirs.pulses_per_block) {
    return "pulses_per_block " + std::to_string(theirs.pulses_per_block) + " != " +
           std::to_string(mine.pulses_per_block);
  }
  if (mine.sample_fraction != theirs.sample_fraction) {
    return "sample_fraction " + num(theirs.sample_fraction) + " != " + num(mine.sample_fraction);
  }
  if (mine.qber_abort != theirs.qber_abort) {
    return "qber_abort " + num(theirs.qber_abort) + " != " + num(mine.qber_abort);
  }
  if (mine.cascade_passes != theirs.cascade_passes) {
    return "cascade_passes " + std::to_string(theirs.cascade_passes) + " != " +
           std::to_string(mine.cascade_passes);
  }
  if (mine.verify_hash_bits != theirs.verify_hash_bits) {
    return "verify_hash_bits " + std::to_string(theirs.verify_hash_bits) + " != " +
           std::to_string(mine.verify_hash_bits);
  }
  if (mine.safety_margin != theirs.safety_margin) {
    return "safety_margin " + num(theirs.safety_margin) + " != " + num(mine.safety_margin);
  }
  if (mine.z_basis_prob != theirs.z_basis_prob) {
    return "z_basis_prob " + num(theirs.z_basis_prob) + " != " + num(mine.z_basis_prob);
  }
  if (mine.key_bound != theirs.key_bound) {
    return std::string("key_bound ") + key_bound_name(theirs.key_bound) + " != " +
           key_bound_name(mine.key_bound);
  }
  if (mine.epsilon_sec != theirs.epsilon_sec) {
    return "epsilon_sec " + num(theirs.epsilon_sec) + " != " + num(mine.epsilon_sec);
  }
  if (mine.epsilon_cor != theirs.epsilon_cor) {
    return "epsilon_cor " + num(theirs.epsilon_cor) + " != " + num(mine.epsilon_cor);
  }
  if (mine.confidence_sd != theirs.confidence_sd) {
    return "confidence_sd " + num(theirs.confidence_sd) + " != " + num(mine.confidence_sd);
  }
  if (mine.cascade_variant != theirs.cascade_variant) {
    return std::string("cascade_variant ") + cascade_variant_name(theirs.cascade_variant) +
           " != " + cascade_variant_name(mine.cascade_variant);
  }
  if (mine.cascade_biconf_rounds != theirs.cascade_biconf_rounds) {
    return "cascade_biconf_rounds " + std::to_string(theirs.cascade_biconf_rounds) + " != " +
           std::to_string(mine.cascade_biconf_rounds);
  }
  if (mine.auth != theirs.auth) {
    return std::string("auth ") + auth_mode_name(theirs.auth) + " != " + auth_mode_name(mine.auth);
  }
  if (mine.auth_tag_bits != theirs.auth_tag_bits) {
    return "auth_tag_bits " + std::to_string(theirs.auth_tag_bits) + " != " +
           std::to_string(mine.auth_tag_bits);
  }
  if (mine.auth_every_message != theirs.auth_every_message) {
    return std::string("auth_every_message ") + (theirs.auth_every_message ? "true" : "false") +
           " != " + (mine.auth_every_message ? "true" : "false");
  }
  if (mine.auth_pool_bits != theirs.auth_pool_bits) {
    return "auth_pool_bits " + std::to_string(theirs.auth_pool_bits) + " != " +
           std::to_string(mine.auth_pool_bits);
  }
  if (mine.auth_key_refresh_blocks != theirs.auth_key_refresh_blocks) {
    return "auth_key_refresh_blocks " + std::to_string(theirs.auth_key_refresh_blocks) + " != " +
           std::to_string(mine.auth_key_refresh_blocks);
  }
  return {};
}

void write_range_parities(Writer& w, std::span<const ParityQuery> queries) {
  w.reserve(5 + 9 * queries.size());
  w.u8(static_cast<std::uint8_t>(CascadeRequestKind::kRangeParities));
  w.u32(static_cast<std::uint32_t>(queries.size()));
  for (const ParityQuery& q : queries) {
    w.u8(static_cast<std::uint8_t>(q.pass));
    w.u32(q.start);
    w.u32(q.length);
  }
}

std::optional<std::string> estimation_abort(std::uint64_t sample_bits,
                                            std::uint64_t sample_errors,
                                            std::uint64_t reconciled_bits, double qber_abort,
                                            double confidence_sd) {
  if (sample_bits < kMinSampleBits) {
    return "too few sifted bits: " + std::to_string(sample_bits) +
           " sample bits cannot estimate the QBER (need " + std::to_string(kMinSampleBits) + ")";
  }
  if (reconciled_bits < kMinReconciledBits) {
    return "too few sifted bits: " + std::to_string(reconciled_bits) +
           " left to reconcile (need " + std::to_string(kMinReconciledBits) + ")";
  }
  const double qber = static_cast<double>(sample_errors) / static_cast<double>(sample_bits);
  const double upper = confidence_sd > 0.0
                           ? qber_upper_bound(sample_bits, sample_errors, confidence_sd)
                           : qber;
  if (upper > qber_abort) {
    char buf[128];
    if (confidence_sd > 0.0) {
      std::snprintf(buf, sizeof(buf), "QBER %.2f %% (upper bound %.2f %% at %.3g sd) above %.2f %%",
                    100.0 * qber, 100.0 * upper, confidence_sd, 100.0 * qber_abort);
    } else {
      std::snprintf(buf, sizeof(buf), "QBER %.2f %% above %.2f %%", 100.0 * qber,
                    100.0 * qber_abort);
    }
    return std::string(buf);
  }
  return std::nullopt;
}

std::optional<std::string> estimation_abort(const BlockStatistics& stats,
                                            std::uint64_t reconciled_bits,
                                            const ProtocolParams& p) {
  if (auto why = estimation_abort(stats.sample_bits, stats.sample_errors, reconciled_bits,
                                  p.qber_abort, p.confidence_sd)) {
    return why;
  }
  if (stats.z_basis_prob <= 0.5) {
    return std::nullopt;
  }
  // Biased: the key basis's error rate does not show an attack on that basis alone; the
  // X basis (the test set) must pass the same test (phase_error()).
  const PhaseErrorEstimate phase = phase_error(stats);
  if (stats.test_sifted[0] < kMinSampleBits) {
    return "too few X-basis bits: " + std::to_string(stats.test_sifted[0]) +
           " cannot estimate the phase error (need " + std::to_string(kMinSampleBits) + ")";
  }
  const double upper = p.confidence_sd > 0.0 ? phase.upper : phase.rate;
  if (upper > p.qber_abort) {
    char buf[160];
    std::snprintf(buf, sizeof(buf),
                  "X-basis error rate %.2f %% (upper bound %.2f %%) above %.2f %%: the key "
                  "basis's %.2f %% does not show it",
                  100.0 * phase.rate, 100.0 * upper, 100.0 * p.qber_abort,
                  100.0 * (stats.sample_bits > 0 ? static_cast<double>(stats.sample_errors) /
                                                       static_cast<double>(stats.sample_bits)
                                                 : 0.0));
    return std::string(buf);
  }
  return std::nullopt;
}

BitVector mandatory_disclosure(const SiftedInfo& info, bool biased) {
  // Word-wise (a branch per bit on its random class was mispredicted).
  const std::size_t n = info.basis.size();
  BitVector m(n);
  auto words = m.mutable_words();
  const auto basis = info.basis.words();
  const bool classes = !info.intensity.empty();
  for (std::size_t w = 0; w < words.size(); ++w) {
    const auto len = static_cast<unsigned>(std::min<std::size_t>(64, n - 64 * w));
    std::uint64_t v = biased ? basis[w] : 0;
    if (classes) {
      v |= nonzero_bytes(info.intensity.data() + 64 * w, len);
    }
    words[w] = v;
  }
  m.clear_tail();
  return m;
}

Result<BitVector> choose_disclosure(const SiftedInfo& info, bool biased,
                                    double sample_fraction) {
  BitVector mask = mandatory_disclosure(info, biased);
  const std::uint64_t n = mask.size();
  const std::uint64_t rest = n - mask.popcount();
  const auto k = static_cast<std::uint64_t>(
      std::llround(sample_fraction * static_cast<double>(rest)));
  auto sample = random_sample_mask(rest, k);
  if (!sample.ok()) {
    return sample.error();
  }
  add_sample(mask, *sample);
  return mask;
}

void add_sample(BitVector& mask, const BitVector& sample) {
  // The j-th bit of the sample decides the j-th position not yet in the mask: a word at a
  // time, the next popcount(free) sample bits deposited on the free positions.
  const std::size_t n = mask.size();
  auto words = mask.mutable_words();
  const auto sample_words = sample.words();
  std::size_t j = 0;
  for (std::size_t w = 0; w < words.size(); ++w) {
    const auto len = static_cast<unsigned>(std::min<std::size_t>(64, n - 64 * w));
    const std::uint64_t valid = len == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << len) - 1;
    const std::uint64_t free = ~words[w] & valid;
    const unsigned count = popcount64(free);
    words[w] |= deposit_bits(read_bits(sample_words, sample.size(), j, count), free);
    j += count;
  }
}

BlockStatistics gather_statistics(const SiftedInfo& info, const BitVector& mask,
                                  const BitVector& alice_disclosed,
                                  const BitVector& bob_disclosed, const ProtocolParams& p,
                                  const SourceInfo& source, std::uint64_t pulses,
                                  BlockResult& r) {
  BlockStatistics s;
  s.bound = p.key_bound;
  s.source = source.source;
  s.pulses = pulses;
  s.mu = source.mu;
  s.prob = source.prob;
  s.z_basis_prob = p.z_basis_prob;
  s.safety_margin = p.safety_margin;
  s.epsilon_sec = p.epsilon_sec;
  s.epsilon_cor = p.epsilon_cor;
  s.confidence_sd = p.confidence_sd;
  const bool biased = p.z_basis_prob > 0.5;
  std::array<std::uint64_t, 3> test_disclosed{};
  // Word by word with population counts (a loop per bit branched on the random class and
  // sample membership of each bit: mispredicted, and run at both ends). Per word: a mask
  // of each class, of the key-basis and test-basis bits, and the disagreements of the
  // disclosed bits moved from disclosure order to their positions (deposit).
  const std::size_t n = mask.size();
  const auto mask_words = mask.words();
  const auto basis_words = info.basis.words();
  const auto a_words = alice_disclosed.words();
  const auto b_words = bob_disclosed.words();
  const std::size_t disclosed_bits = std::min(alice_disclosed.size(), bob_disclosed.size());
  // Bits [d, d + count) of alice ^ bob (count <= 64), bits past the disclosed values 0.
  const auto disagreements = [&](std::size_t d, unsigned count) -> std::uint64_t {
    if (count == 0 || d >= disclosed_bits) {
      return 0;
    }
    const std::size_t w = d >> 6;
    const unsigned sh = static_cast<unsigned>(d & 63);
    std::uint64_t v = (a_words[w] ^ b_words[w]) >> sh;
    if (sh != 0 && w + 1 < a_words.size() && w + 1 < b_words.size()) {
      v |= (a_words[w + 1] ^ b_words[w + 1]) << (64 - sh);
    }
    const std::size_t avail = std::min<std::size_t>(count, disclosed_bits - d);
    return avail >= 64 ? v : v & ((std::uint64_t{1} << avail) - 1);
  };
  // The classes of 8 sifted bits (one byte each, 0..2) as two 8-bit planes: the low bit of
  // each byte gathered by one multiply (the partial products land on distinct bits).
  const auto planes8 = [](const std::uint8_t* bytes, std::uint64_t& lo, std::uint64_t& hi) {
    std::uint64_t v = 0;
    for (unsigned b = 0; b < 8; ++b) {  // little-endian load, whatever the host order
      v |= std::uint64_t{bytes[b]} << (8 * b);
    }
    constexpr std::uint64_t kLow = 0x0101010101010101ULL;
    constexpr std::uint64_t kGather = 0x0102040810204080ULL;
    lo = ((v & kLow) * kGather) >> 56;
    hi = (((v >> 1) & kLow) * kGather) >> 56;
  };
  const bool classes = !info.intensity.empty();
  std::size_t d = 0;  // disclosed values consumed so far
  std::array<std::uint64_t, 3> sifted{};
  std::array<std::uint64_t, 3> disclosed{};
  std::array<std::uint64_t, 3> errors{};
  for (std::size_t w = 0; w < mask_words.size(); ++w) {
    const std::size_t begin = 64 * w;
    const unsigned len = static_cast<unsigned>(std::min<std::size_t>(64, n - begin));
    const std::uint64_t valid = len == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << len) - 1;
    std::uint64_t c1 = 0;
    std::uint64_t c2 = 0;
    if (classes) {
      std::size_t i = 0;
      for (; i + 8 <= len; i += 8) {
        std::uint64_t lo = 0;
        std::uint64_t hi = 0;
        planes8(info.intensity.data() + begin + i, lo, hi);
        c1 |= (lo & ~hi) << i;
        c2 |= hi << i;  // class 2 = binary 10 (3 never occurs)
      }
      for (; i < len; ++i) {
        const std::uint8_t k = info.intensity[begin + i];
        c1 |= std::uint64_t{k == 1 ? 1U : 0U} << i;
        c2 |= std::uint64_t{k == 2 ? 1U : 0U} << i;
      }
    }
    const std::array<std::uint64_t, 3> cls{valid & ~(c1 | c2), c1, c2};
    const std::uint64_t x_basis = basis_words[w] & valid;
    const std::uint64_t key_basis = biased ? valid & ~x_basis : valid;
    const std::uint64_t test = biased ? x_basis : valid;
    const std::uint64_t m = mask_words[w] & valid;
    const unsigned count = popcount64(m);
    const std::uint64_t err = deposit_bits(disagreements(d, count), m);
    d += count;
    for (std::size_t k = 0; k < 3; ++k) {
      const std::uint64_t c = cls[k];
      sifted[k] += popcount64(c);
      s.key_basis_sifted[k] += popcount64(c & key_basis);
      s.test_sifted[k] += popcount64(c & test);
      disclosed[k] += popcount64(c & m);
      errors[k] += popcount64(c & err);
      test_disclosed[k] += popcount64(c & test & m);
      s.test_errors[k] += popcount64(c & test & err);
    }
    s.sample_bits += popcount64(cls[0] & key_basis & m);
    s.sample_errors += popcount64(cls[0] & key_basis & err);
    s.key_bits += popcount64(valid & ~m);
  }
  for (std::size_t k = 0; k < 3; ++k) {
    r.intensity[k].sifted += sifted[k];
    r.intensity[k].disclosed += disclosed[k];
    r.intensity[k].errors += errors[k];
  }
  // Unbiased: the signal class is only sampled; scale its test errors to the whole class.
  for (std::size_t k = 0; k < 3; ++k) {
    if (test_disclosed[k] > 0 && test_disclosed[k] < s.test_sifted[k]) {
      s.test_errors[k] = static_cast<std::uint64_t>(std::llround(
          static_cast<double>(s.test_errors[k]) * static_cast<double>(s.test_sifted[k]) /
          static_cast<double>(test_disclosed[k])));
    }
  }
  const double pz = p.z_basis_prob;
  const double q_sift = pz * pz + (1.0 - pz) * (1.0 - pz);
  for (std::size_t k = 0; k < 3; ++k) {
    const double expected = static_cast<double>(pulses) * source.prob[k] * q_sift;
    r.intensity[k].gain = expected > 0.0 ? static_cast<double>(r.intensity[k].sifted) / expected
                                         : 0.0;
  }
  r.sample_bits = mask.popcount();
  r.reconciled_bits = s.key_bits;
  r.qber = s.sample_bits > 0
               ? static_cast<double>(s.sample_errors) / static_cast<double>(s.sample_bits)
               : 0.0;
  r.qber_upper = qber_upper_bound(s.sample_bits, s.sample_errors, p.confidence_sd);
  r.key_bound = key_bound_name(p.key_bound);
  return s;
}

std::uint64_t final_key_length(BlockStatistics stats, std::uint64_t leaked_bits,
                               BlockResult& r) {
  stats.leaked_bits = leaked_bits;
  const KeyLengthResult k = block_key_length(stats);
  r.key_bound = k.bound;
  r.y1_lower = k.y1_lower;
  r.e1_upper = k.e1_upper;
  r.single_photon_bits_lower = k.single_photon_bits_lower;
  return k.bits;
}

Status close_aborted_block(AuthChannel& ch, std::uint64_t block,
                           std::chrono::milliseconds timeout) {
  if (!ch.settings().transcript()) {
    return ok_status();
  }
  if (Status s = ch.send(MsgType::kCheckpoint, block, {}, true); !s.ok()) {
    return s;
  }
  auto f = ch.receive(timeout, MsgType::kCheckpoint, block, true);
  if (!f.ok()) {
    return f.error();
  }
  if (!f->payload.empty()) {
    return malformed(MsgType::kCheckpoint);
  }
  return ok_status();
}

std::uint32_t cascade_passes(const ProtocolParams& p) {
  return p.cascade_passes != 0 ? p.cascade_passes : cascade_default_passes(p.cascade_variant);
}

Result<std::vector<std::uint8_t>> verification_tag(const BitVector& seed, const BitVector& key,
                                                   std::uint32_t t) {
  auto h = toeplitz_hash(seed, key, t);
  if (!h.ok()) {
    return h.error();
  }
  h->clear_tail();
  return h->to_bytes();
}

void pay_authentication(AuthChannel& ch, const SecureBytes& gross, std::uint64_t m,
                        BlockResult& r) {
  const std::size_t taken = ch.settle(gross.span());
  r.auth_bits_consumed = std::min<std::uint64_t>(8 * std::uint64_t{taken}, m);
  r.secret_bits = m - r.auth_bits_consumed;
  r.key = SecureBytes(gross.span().subspan(taken));
}

EndpointCore::EndpointCore(const ProtocolParams& p, AuthRole role,
                           std::span<const std::uint8_t> psk, MessageTransport& q,
                           MessageTransport& cl)
    : protocol(p), quantum(q) {
  auto ch = AuthChannel::create(cl, role, psk, auth_settings(p));
  if (!ch.ok()) {
    init_error_ = ch.error();
    return;
  }
  classical = std::move(ch).value();
}

Result<Frame> EndpointCore::recv(MsgType t, std::uint64_t block, bool checkpoint) {
  return classical->receive(protocol.message_timeout, t, block, checkpoint);
}

Result<Frame> EndpointCore::exchange(MsgType type, std::uint64_t block,
                                     std::span<const std::uint8_t> payload, MsgType expect,
                                     bool send_checkpoint, bool expect_checkpoint) {
  if (Status s = classical->send(type, block, payload, send_checkpoint); !s.ok()) {
    return s.error();
  }
  return recv(expect, block, expect_checkpoint);
}

Status EndpointCore::abort_block(BlockResult& r, std::uint64_t block, std::string reason) {
  r.aborted = true;
  r.abort_reason = std::move(reason);
  return close_aborted_block(*classical, block, protocol.message_timeout);
}

void EndpointCore::tell_peer(std::uint64_t block, const Error& e) {
  classical->send_abort(block, e.message);
}

Result<BlockResult> EndpointCore::run_block() {
  if (init_error_) {
    return *init_error_;
  }
  if (failed_) {
    return make_error(failed_->code, "endpoint unusable after an earlier error: " +
                                         failed_->message);
  }
  if (Status s = validate_settings(); !s.ok()) {
    return s.error();
  }
  if (Status s = classical->check_block_reserve(); !s.ok()) {
    failed_ = s.error();
    return s.error();
  }
  const auto start = std::chrono::steady_clock::now();
  BlockResult r;
  const std::uint64_t pads_before = classical->pad_bytes_used();
  bool fatal = true;
  Status st = run(r, fatal);
  if (!st.ok()) {
    if (fatal) {
      const ErrorCode c = st.error().code;
      if (c != ErrorCode::kRejected && c != ErrorCode::kClosed) {
        tell_peer(r.block_id, st.error());
      }
      failed_ = st.error();
    }
    return st.error();
  }
  r.auth_pad_bits_used = 8 * (classical->pad_bytes_used() - pads_before);
  r.auth_pool_bits_left = classical->pool_bits_left();
  if (r.aborted) {
    r.key.clear();
    r.secret_bits = 0;
    r.auth_bits_consumed = 0;
  }
  r.cpu_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

Result<BitVector> random_bits(std::size_t nbits) {
  std::vector<std::uint8_t> bytes((nbits + 7) / 8);
  if (Status s = random_bytes(bytes); !s.ok()) {
    return s.error();
  }
  return BitVector::from_bytes(bytes, nbits);
}

Result<BitVector> random_sample_mask(std::uint64_t n, std::uint64_t k) {
  std::array<std::uint8_t, 32> seed{};
  if (Status s = random_bytes(seed); !s.ok()) {
    return s.error();
  }
  Xoshiro256ss rng{std::span<const std::uint8_t, 32>(seed)};
  return random_sample_mask(rng, n, k);
}

BitVector random_sample_mask(Xoshiro256ss& rng, std::uint64_t n, std::uint64_t k) {
  BitVector mask(n);
  auto words = mask.mutable_words();
  std::uint64_t need = std::min(k, n);
  // Select pulse i with probability need / (n - i): without a branch on the (random)
  // outcome, the selection bits gathered a word at a time.
  std::uint64_t word = 0;
  std::uint64_t i = 0;
  for (; i < n && need > 0; ++i) {
    const std::uint64_t take = rng.below(n - i) < need ? 1U : 0U;
    word |= take << (i & 63);
    need -= take;
    if ((i & 63) == 63) {
      words[i >> 6] = word;
      word = 0;
    }
  }
  if ((i & 63) != 0) {
    words[i >> 6] = word;
  }
  return mask;
}

void split_by_mask(const BitVector& key, const BitVector& mask, BitVector& selected,
                   BitVector& rest) {
  selected.clear();
  rest.clear();
  const std::size_t k = mask.popcount();
  selected.reserve(k);
  rest.reserve(key.size() - k);
  selected.append_masked(key, mask, true);  // word-wise, not bit by bit
  rest.append_masked(key, mask, false);
}

std::vector<std::uint8_t> encode_detections(std::uint64_t block_id, std::uint32_t chunk,
                                            bool last, std::span<const DetectionEvent> ev,
                                            std::uint64_t first_pulse_base) {
  Writer w;
  w.reserve(kHeaderBytes + 10 + ev.size() * 5);
  w.u8(kWireVersion);
  w.u8(static_cast<std::uint8_t>(MsgType::kDetections));
  w.u64(block_id);
  w.u32(chunk);
  w.u8(last ? 1 : 0);
  w.u32(static_cast<std::uint32_t>(ev.size()));
  // The events are encoded into a small local buffer with plain stores (a varint of at
  // most 10 bytes and a state byte each) and appended to the frame a buffer at a time.
  // The buffer held Bob's arriving states: cleansed after.
  std::array<std::uint8_t, 4096> tmp;
  constexpr std::size_t kEventMax = 11;
  std::size_t pos = 0;
  std::uint64_t next = first_pulse_base;
  for (const DetectionEvent& e : ev) {
    if (pos > tmp.size() - kEventMax) {
      w.bytes(std::span<const std::uint8_t>(tmp.data(), pos));
      pos = 0;
    }
    std::uint64_t v = e.pulse - next;
    next = e.pulse + 1;
    if (v < (std::uint64_t{1} << 14)) {
      // One or two bytes, without a branch on which (random: a third of the gaps at
      // 10 km need two): both bytes are stored, the second is overwritten by the state
      // when the gap fits in one.
      const std::uint64_t two = v >= 0x80 ? 1 : 0;
      tmp[pos] = static_cast<std::uint8_t>((v & 0x7F) | (two << 7));
      tmp[pos + 1] = static_cast<std::uint8_t>(v >> 7);
      pos += 1 + two;
    } else {
      while (v >= 0x80) {
        tmp[pos++] = static_cast<std::uint8_t>((v & 0x7F) | 0x80);
        v >>= 7;
      }
      tmp[pos++] = static_cast<std::uint8_t>(v);
    }
    std::uint8_t state = 0;
    if (e.dark) {
      state = 4;
    } else {
      state = static_cast<std::uint8_t>((e.bit ? 1 : 0) | (e.basis ? 2 : 0));
    }
    tmp[pos++] = state;
  }
  w.bytes(std::span<const std::uint8_t>(tmp.data(), pos));
  OPENSSL_cleanse(tmp.data(), tmp.size());
  return w.take();
}

std::vector<std::uint8_t> encode_quantum_abort(std::uint64_t block_id) {
  Writer w;
  w.u8(kWireVersion);
  w.u8(static_cast<std::uint8_t>(MsgType::kAbort));
  w.u64(block_id);
  return w.take();
}

Result<DetectionChunk> decode_detections(std::span<const std::uint8_t> msg,
                                         std::uint64_t block_id, std::uint32_t chunk,
                                         std::uint64_t& next_pulse, std::uint64_t pulses) {
  Reader r(msg);
  std::uint8_t version = 0;
  std::uint8_t type = 0;
  std::uint64_t block = 0;
  std::uint32_t index = 0;
  std::uint8_t last = 0;
  std::uint32_t count = 0;
  if (!r.u8(version) || !r.u8(type) || !r.u64(block)) {
    return malformed(MsgType::kDetections);
  }
  if (version == kWireVersion && type == static_cast<std::uint8_t>(MsgType::kAbort) &&
      block == block_id && r.done()) {
    return make_error(ErrorCode::kRejected, "Alice aborted block " + std::to_string(block) +
                                                " during the quantum transmission");
  }
  if (!r.u32(index) || !r.u8(last) || !r.u32(count)) {
    return malformed(MsgType::kDetections);
  }
  if (version != kWireVersion || type != static_cast<std::uint8_t>(MsgType::kDetections) ||
      last > 1) {
    return malformed(MsgType::kDetections);
  }
  if (block != block_id || index != chunk) {
    return make_error(ErrorCode::kProtocol, "quantum frame for block " + std::to_string(block) +
                                                " chunk " + std::to_string(index) +
                                                " out of order");
  }
  if (count > kMaxEventsPerChunk || count > r.remaining() / 2) {
    return malformed(MsgType::kDetections);
  }
  // Alice sends ceil(events / kMaxEventsPerChunk) chunks, at least one, and events <= pulses:
  // no empty chunk but a lone last one, and no chunk index past pulses / kMaxEventsPerChunk.
  // Otherwise a stream of empty chunks would hold Bob in the quantum phase for ever (he
  // reads no classical frame there, so not even Alice's Abort).
  if (count == 0 && last == 0) {
    return make_error(ErrorCode::kProtocol,
                      "empty detection chunk " + std::to_string(chunk) + " that is not the last");
  }
  if (chunk > pulses / kMaxEventsPerChunk) {
    return make_error(ErrorCode::kProtocol, "detection chunk " + std::to_string(chunk) +
                                                " past the most a block of " +
                                                std::to_string(pulses) + " pulses needs");
  }
  DetectionChunk out;
  out.last = last == 1;
  out.events.resize(count);
  std::uint64_t next = next_pulse;
  for (std::uint32_t i = 0; i < count; ++i) {
    std::uint64_t delta = 0;
    std::uint8_t state = 0;
    if (!r.gap_and_state(delta, state) || state > 4) {
      return malformed(MsgType::kDetections);
    }
    if (delta >= pulses || next + delta >= pulses) {
      return make_error(ErrorCode::kProtocol, "detection event past the end of the block");
    }
    DetectionEvent e;  // built in a register, stored once
    const std::uint64_t pulse = next + delta;  // < pulses <= 2^32
    e.pulse = pulse & DetectionEvent::kMaxPulse;
    e.dark = state == 4 ? 1U : 0U;
    e.bit = state & 1U;
    e.basis = (state >> 1) & 1U;
    out.events[i] = e;
    next = pulse + 1;
  }
  if (!r.done()) {
    return malformed(MsgType::kDetections);
  }
  next_pulse = next;
  return out;
}

}  // namespace qkd::core::detail
