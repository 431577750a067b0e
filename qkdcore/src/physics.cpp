#include "qkd/core/physics.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "fast_log.hpp"
#include "huge_pages.hpp"
#include "qkd/core/key_length.hpp"

namespace qkd::core {

namespace detail {

const LogTable& log_table() {
  static const LogTable table = [] {
    LogTable t;
    for (std::size_t i = 0; i < LogTable::kSize; ++i) {
      const double c = 1.0 / (1.0 + (static_cast<double>(i) + 0.5) / LogTable::kSize);
      t.inv_center[i] = c;
      // -log(c) of the rounded c, in extended precision where long double has it.
      t.neg_log[i] = static_cast<double>(-std::log(static_cast<long double>(c)));
    }
    return t;
  }();
  return table;
}

}  // namespace detail

SourceChoices source_choices(const ChannelParams& c, double z_basis_prob) {
  SourceChoices s;
  s.z_basis_prob = z_basis_prob;
  if (c.source == SourceKind::kWeakCoherent) {
    s.class_prob = {1.0 - c.prob_decoy - c.prob_vacuum, c.prob_decoy, c.prob_vacuum};
  }
  return s;
}

struct AlicePrf::Impl {
  EVP_CIPHER_CTX* ctx = nullptr;
  std::uint64_t cached_block = ~std::uint64_t{0};
  std::uint64_t bits = 0;
  std::uint64_t bases = 0;
  bool failed = false;
  // Extended layout (biased basis or decoys): 64 bits per pulse, 8 pulses per refill.
  bool extended = false;
  std::uint32_t z_threshold = 0;               // basis Z iff 24-bit uniform < this
  std::array<std::uint64_t, 2> class_threshold{};  // class 0 iff u32 < [0], 1 iff < [1]
  std::uint64_t cached_group = ~std::uint64_t{0};
  std::array<std::uint64_t, 8> words{};
  // at_many(): counter blocks in, PRF output out (cleansed after each call).
  std::vector<std::uint8_t> batch_in;
  std::vector<std::uint8_t> batch_out;
  ~Impl() {
    EVP_CIPHER_CTX_free(ctx);
    bits = 0;
    bases = 0;
    words.fill(0);
  }
  // Decodes one extended-layout word into a state.
  [[nodiscard]] AliceState extended_state(std::uint64_t w) const {
    const auto u24 = static_cast<std::uint32_t>((w >> 8) & 0xFFFFFF);
    const std::uint64_t u32 = w >> 32;
    AliceState s;
    s.bit = (w & 1U) != 0;
    s.basis = u24 >= z_threshold;  // false = Z
    // Class 0 iff u32 < [0], 1 iff [0] <= u32 < [1], else 2 ([0] <= [1]): counted without
    // branches (the class is random, a branch was mispredicted a third of the time).
    s.intensity = static_cast<std::uint8_t>(static_cast<unsigned>(u32 >= class_threshold[0]) +
                                            static_cast<unsigned>(u32 >= class_threshold[1]));
    return s;
  }
};

namespace {

std::uint64_t load_le64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  std::memcpy(&v, p, 8);
  if constexpr (std::endian::native == std::endian::big) {
    v = __builtin_bswap64(v);
  }
  return v;
}

void store_counter(std::uint8_t* block, std::uint64_t ctr, bool extended) {
  for (int b = 0; b < 8; ++b) {  // little-endian counter (merged into one store)
    block[b] = static_cast<std::uint8_t>(ctr >> (8 * b));
  }
  std::memset(block + 8, 0, 7);
  block[15] = extended ? 0x80 : 0x00;  // 0x80: counter domain of the extended layout
}

}  // namespace

void AlicePrf::at_many(std::span<const std::uint64_t> pulses, std::span<AliceState> out) {
  Impl& m = *impl_;
  if (pulses.empty()) {
    return;
  }
  // Distinct units: one AES block each, of 64 pulses (basic layout) or 2 pulses (extended
  // layout: pulse p's word is the half p & 1 of counter block p >> 1, since group g = p >> 3
  // spans counters 4g..4g+3 and word p & 7 sits in counter 4g + (p & 7) / 2). Only the
  // blocks holding a requested pulse are computed, not a whole group of four.
  const unsigned shift = m.extended ? 1 : 6;
  constexpr std::size_t unit_bytes = 16;
  // At most one unit per pulse: size for that, then fill only the distinct units.
  if (m.batch_in.size() < pulses.size() * unit_bytes) {
    m.batch_in.resize(pulses.size() * unit_bytes);
    m.batch_out.resize(pulses.size() * unit_bytes);
  }
  std::uint64_t last = ~std::uint64_t{0};
  std::size_t units = 0;
  for (const std::uint64_t p : pulses) {
    const std::uint64_t unit = p >> shift;
    if (unit != last) {
      store_counter(m.batch_in.data() + units * unit_bytes, unit, m.extended);
      ++units;
      last = unit;
    }
  }
  const std::size_t used = units * unit_bytes;
  int len = 0;
  if (m.failed ||
      EVP_EncryptUpdate(m.ctx, m.batch_out.data(), &len, m.batch_in.data(),
                        static_cast<int>(used)) != 1 ||
      static_cast<std::size_t>(len) != used) {
    std::abort();  // AES-ECB cannot fail unless libcrypto is broken
  }
  last = ~std::uint64_t{0};
  const std::uint8_t* o = m.batch_out.data() - unit_bytes;
  for (std::size_t i = 0; i < pulses.size(); ++i) {
    const std::uint64_t p = pulses[i];
    if ((p >> shift) != last) {
      o += unit_bytes;
      last = p >> shift;
    }
    if (m.extended) {
      out[i] = m.extended_state(load_le64(o + 8 * (p & 1)));
    } else {
      const unsigned s = static_cast<unsigned>(p & 63);
      out[i] = AliceState{((load_le64(o) >> s) & 1U) != 0, ((load_le64(o + 8) >> s) & 1U) != 0};
    }
  }
  OPENSSL_cleanse(m.batch_out.data(), used);
}

AlicePrf::AlicePrf(std::span<const std::uint8_t, 16> key) : AlicePrf(key, SourceChoices{}) {}

AlicePrf::AlicePrf(std::span<const std::uint8_t, 16> key, const SourceChoices& choices)
    : impl_(std::make_unique<Impl>()) {
  impl_->ctx = EVP_CIPHER_CTX_new();
  if (impl_->ctx == nullptr ||
      EVP_EncryptInit_ex(impl_->ctx, EVP_aes_128_ecb(), nullptr, key.data(), nullptr) != 1 ||
      EVP_CIPHER_CTX_set_padding(impl_->ctx, 0) != 1) {
    impl_->failed = true;  // at() then aborts: a broken libcrypto is not recoverable here
  }
  impl_->extended = choices.z_basis_prob != 0.5 || choices.class_prob[0] != 1.0;
  const double z = std::clamp(choices.z_basis_prob, 0.0, 1.0);
  impl_->z_threshold = static_cast<std::uint32_t>(std::llround(z * 16777216.0));
  const double c0 = std::clamp(choices.class_prob[0], 0.0, 1.0);
  const double c1 = std::clamp(c0 + choices.class_prob[1], 0.0, 1.0);
  impl_->class_threshold = {static_cast<std::uint64_t>(std::llround(c0 * 4294967296.0)),
                            static_cast<std::uint64_t>(std::llround(c1 * 4294967296.0))};
}

AlicePrf::~AlicePrf() = default;

AliceState AlicePrf::at(std::uint64_t pulse) {
  if (impl_->extended) {
    const std::uint64_t group = pulse >> 3;
    if (group != impl_->cached_group) {
      std::uint8_t in[64];
      std::uint8_t out[64];
      for (std::uint64_t j = 0; j < 4; ++j) {
        store_counter(in + 16 * j, group * 4 + j, true);
      }
      int len = 0;
      if (impl_->failed || EVP_EncryptUpdate(impl_->ctx, out, &len, in, 64) != 1 || len != 64) {
        std::abort();
      }
      for (std::size_t w = 0; w < 8; ++w) {
        impl_->words[w] = load_le64(out + 8 * w);
      }
      impl_->cached_group = group;
      OPENSSL_cleanse(out, sizeof(out));
    }
    return impl_->extended_state(impl_->words[pulse & 7]);
  }
  const std::uint64_t block = pulse >> 6;
  if (block != impl_->cached_block) {
    std::uint8_t in[16];
    std::uint8_t out[16];
    store_counter(in, block, false);
    int len = 0;
    if (impl_->failed || EVP_EncryptUpdate(impl_->ctx, out, &len, in, 16) != 1 || len != 16) {
      std::abort();  // AES-ECB on one block cannot fail unless libcrypto is broken
    }
    impl_->bits = load_le64(out);
    impl_->bases = load_le64(out + 8);
    impl_->cached_block = block;
    OPENSSL_cleanse(out, sizeof(out));
  }
  const unsigned s = static_cast<unsigned>(pulse & 63);
  return AliceState{((impl_->bits >> s) & 1U) != 0, ((impl_->bases >> s) & 1U) != 0};
}

double ChannelTheory::secret_fraction(double f) const {
  const double h = binary_entropy(qber);
  return std::max(0.0, 1.0 - f * h - h);
}

namespace {

constexpr int kMaxPhotons = 96;  // Poisson tail beyond this is < 1e-30 for mu <= 20

// P(n) of class k: Poisson(mu) for a weak coherent source, n = 1 for single photons.
std::vector<double> photon_law(const ChannelParams& p, double mu) {
  std::vector<double> pn(kMaxPhotons + 1, 0.0);
  if (p.source == SourceKind::kSinglePhoton) {
    pn[1] = 1.0;
    return pn;
  }
  double term = std::exp(-mu);
  for (int n = 0; n <= kMaxPhotons; ++n) {
    pn[static_cast<std::size_t>(n)] = term;
    term *= mu / (n + 1);
  }
  return pn;
}

struct Physics {
  double eta = 0.0;       // total transmittance (fiber, insertion loss, detector)
  double eta_bob = 0.0;   // Bob's side only (insertion loss, detector): what PNS Eve keeps
  double eta_line = 0.0;  // fiber + insertion loss
  double t = 0.0;         // PNS forwarding probability
  std::array<std::vector<double>, 3> pn;  // photon-number law per class
  std::array<std::vector<double>, 3> cn;  // click probability given n photons, per class
};

Physics physics_of(const ChannelParams& p) {
  Physics ph;
  const double fiber = p.fiber_cut ? 0.0 : std::pow(10.0, -p.loss_db_per_km * p.length_km / 10.0);
  const double insertion = std::pow(10.0, -p.insertion_loss_db / 10.0);
  ph.eta_bob = p.detector_efficiency * insertion;
  ph.eta = ph.eta_bob * fiber;
  ph.eta_line = fiber * insertion;
  const std::array<double, 3> mus{p.mu_signal, p.mu_decoy, p.mu_vacuum};
  for (std::size_t k = 0; k < 3; ++k) {
    ph.pn[k] = photon_law(p, mus[k]);
  }
  if (p.eve_photon_number_splitting && !p.fiber_cut) {
    // Eve keeps the signal class's photon-click probability: t * S = 1 - exp(-eta mu).
    double s = 0.0;
    for (int n = 2; n <= kMaxPhotons; ++n) {
      s += ph.pn[0][static_cast<std::size_t>(n)] * (1.0 - std::pow(1.0 - ph.eta_bob, n - 1));
    }
    const double target = p.source == SourceKind::kSinglePhoton
                              ? ph.eta
                              : -std::expm1(-ph.eta * p.mu_signal);
    ph.t = s > 0.0 ? std::min(1.0, target / s) : 0.0;
  }
  for (std::size_t k = 0; k < 3; ++k) {
    ph.cn[k].assign(kMaxPhotons + 1, 0.0);
    for (int n = 1; n <= kMaxPhotons; ++n) {
      double c = 0.0;
      if (p.eve_photon_number_splitting) {
        c = n >= 2 ? ph.t * (1.0 - std::pow(1.0 - ph.eta_bob, n - 1)) : 0.0;
      } else {
        c = -std::expm1(n * std::log1p(-std::min(ph.eta, 1.0 - 1e-16)));
        if (ph.eta >= 1.0) {
          c = 1.0;
        }
      }
      ph.cn[k][static_cast<std::size_t>(n)] = c;
    }
  }
  return ph;
}

}  // namespace

ChannelTheory channel_theory(const ChannelParams& p) {
  ChannelTheory t;
  const Physics ph = physics_of(p);
  t.transmittance = ph.eta;
  t.channel_transmittance = ph.eta_line;
  t.pns_forward = ph.t;
  const double y0 = p.dark_count_prob;
  const double f = p.eve_intercept_fraction;
  const double ed = p.misalignment;
  // An intercepted photon is in Eve's basis: with prob 1/2 Alice's (then only the
  // misalignment errs), with prob 1/2 the other one (then Bob's sifted result is random).
  // (1/2 whatever Eve's basis choice, averaged over Alice's two bases with equal weight;
  // a biased basis choice against a biased Eve gives each basis its own error rate.)
  const double photon_error = (1.0 - f) * ed + f * (0.5 * ed + 0.25);
  const std::array<double, 3> mus{p.mu_signal, p.mu_decoy, p.mu_vacuum};
  const std::array<double, 3> probs =
      p.source == SourceKind::kWeakCoherent
          ? std::array<double, 3>{1.0 - p.prob_decoy - p.prob_vacuum, p.prob_decoy, p.prob_vacuum}
          : std::array<double, 3>{1.0, 0.0, 0.0};
  double gain = 0.0;
  double clicks = 0.0;
  double errors = 0.0;
  for (std::size_t k = 0; k < 3; ++k) {
    ClassTheory& c = t.classes[k];
    c.mu = p.source == SourceKind::kSinglePhoton ? 1.0 : mus[k];
    c.prob = probs[k];
    double ck = 0.0;
    for (int n = 1; n <= kMaxPhotons; ++n) {
      ck += ph.pn[k][static_cast<std::size_t>(n)] * ph.cn[k][static_cast<std::size_t>(n)];
    }
    c.gain = 1.0 - (1.0 - y0) * (1.0 - ck);
    c.live_gain = c.gain;
    if (c.gain > 0.0) {
      c.photon_fraction = ck / c.gain;
      c.qber = (ck * photon_error + (1.0 - ck) * y0 * 0.5) / c.gain;
    }
    gain += c.prob * c.gain;
    clicks += c.prob * ck;
    errors += c.prob * c.gain * c.qber;
  }
  const double c1 = ph.cn[0][1];
  t.y1 = 1.0 - (1.0 - y0) * (1.0 - c1);
  t.e1 = t.y1 > 0.0 ? (c1 * photon_error + (1.0 - c1) * y0 * 0.5) / t.y1 : 0.0;
  t.gain = gain;
  t.live_gain = gain;
  if (gain <= 0.0) {
    return t;
  }
  t.photon_fraction = clicks / gain;
  t.qber = errors / gain;
  t.sifted_per_pulse = t.gain / 2.0;
  t.dead_pulses = pulses_in_ns(p.dead_time_ns, p.pulse_rate_hz);
  if (p.afterpulse_prob > 0.0) {
    t.afterpulse_window_pulses =
        std::max<std::uint64_t>(1, pulses_in_ns(p.afterpulse_window_ns, p.pulse_rate_hz));
  }
  if (t.dead_pulses == 0 && t.afterpulse_window_pulses == 0) {
    return t;  // an ideal detector: the figures above, untouched
  }
  // The detector as a renewal process (see the header): mean cycle length and the
  // probability that a cycle ends with an afterpulse.
  const double q = gain;
  const double d = static_cast<double>(t.dead_pulses);
  double cycle = d + 1.0 / q;
  double a = 0.0;
  if (t.afterpulse_window_pulses > 0) {
    const double w = static_cast<double>(t.afterpulse_window_pulses);
    // 1 - (1 - Q)^W, accurate for small Q too.
    const double some_in_w = q >= 1.0 ? 1.0 : -std::expm1(w * std::log1p(-q));
    const double s_sum = (1.0 - q) * some_in_w / q;
    cycle = d + (1.0 - p.afterpulse_prob * s_sum / w) / q;
    a = p.afterpulse_prob * some_in_w / (w * q);
  }
  t.afterpulse_fraction = a;
  t.gain = 1.0 / cycle;
  t.qber = (1.0 - a) * t.qber + a * 0.5;
  t.photon_fraction = (1.0 - a) * t.photon_fraction;
  t.sifted_per_pulse = t.gain / 2.0;
  for (ClassTheory& c : t.classes) {
    const double real = (1.0 - a) * c.live_gain / q;  // real clicks, relative
    const double all = real + a;
    c.gain = t.gain * all;
    if (!(all > 0.0)) {
      continue;  // a class that never clicks (e.g. true vacuum without dark counts)
    }
    c.qber = (real * c.qber + a * 0.5) / all;
    c.photon_fraction = real * c.photon_fraction / all;
  }
  return t;
}

std::uint64_t pulses_in_ns(double ns, double pulse_rate_hz) {
  const double x = ns * 1e-9 * pulse_rate_hz;
  if (!(x > 0.0)) {
    return 0;
  }
  const double r = std::round(x);
  return static_cast<std::uint64_t>(std::fabs(x - r) <= 1e-9 * std::max(1.0, r) ? r
                                                                              : std::ceil(x));
}

namespace {

// Alice's states are secret: a growing vector must not free its old buffer uncleansed.
void reserve_secret(std::vector<AliceState>& v, std::size_t n) {
  if (n <= v.capacity()) {
    return;
  }
  std::vector<AliceState> bigger;
  bigger.reserve(n);
  bigger.assign(v.begin(), v.end());
  if (!v.empty()) {
    OPENSSL_cleanse(v.data(), v.size() * sizeof(AliceState));
  }
  v.swap(bigger);
}

// Up to `max` candidate detections from pulse i on, each after a geometric gap (inverse
// CDF: floor(log(u) / log(1 - Q_max)), u from gap_rng only), into out; sets done at the end
// of the block. A function of its own so that the loop keeps its state in registers (in
// the body of run() it competed with the decision loop's). Returns the count.
std::size_t draw_candidates(Xoshiro256ss& rng, double inv_log1m, const detail::LogTable& log_tab,
                            std::uint64_t pulses, std::uint64_t& next, bool& done,
                            std::uint64_t* out, std::size_t max) {
  Xoshiro256ss gen = rng;
  std::uint64_t i = next;
  std::size_t count = 0;
  while (count < max) {
    // (geometric_gap: the same value as std::floor(std::log(u) * inv_log1m), cheaper.)
    const double gap = detail::geometric_gap(gen.uniform_open0(), inv_log1m, log_tab);
    // pulses - i < 2^61 and, past this test, gap < 2^61: signed conversions (one
    // instruction each; the unsigned ones branch on the top bit), same values.
    if (gap >= static_cast<double>(static_cast<std::int64_t>(pulses - i))) {
      done = true;
      break;
    }
    i += static_cast<std::uint64_t>(static_cast<std::int64_t>(gap));
    out[count++] = i;
    if (++i >= pulses) {
      done = true;
      break;
    }
  }
  rng = gen;
  next = i;
  return count;
}

// Inline: called once per detection; run() reserves room for every expected event, so the
// growth path is (almost) never taken.
inline void push_secret(std::vector<AliceState>& v, const AliceState& s) {
  if (v.size() == v.capacity()) [[unlikely]] {
    reserve_secret(v, v.capacity() * 2 + 64);
  }
  v.push_back(s);
}

// The photon number of a detected pulse of a class with photon-number CDF `cdf`: the
// first n with u < cdf[n] (kMaxPhotons if none). The cdf is non-decreasing, so over the
// first four entries that index is the count of entries <= u: counted without branches (n
// is random, a loop mispredicted its exit), the loop beyond. Always inlined: both decision
// loops keep their state in registers.
[[gnu::always_inline]] inline std::size_t photon_number(double u, const double* cdf) {
  static_assert(kMaxPhotons >= 4);
  std::size_t n = static_cast<std::size_t>(u >= cdf[0]) + static_cast<std::size_t>(u >= cdf[1]) +
                  static_cast<std::size_t>(u >= cdf[2]) + static_cast<std::size_t>(u >= cdf[3]);
  while (n >= 4 && n < kMaxPhotons && u >= cdf[n]) {
    ++n;
  }
  return n;
}

// A photon clicked: Eve's intercept-resend (with probability `eve`, measuring in Z with
// probability `eve_z`) and the misalignment act on the state Alice sent, and the event
// records what Bob measured. Basis false is Z.
[[gnu::always_inline]] inline void measure_photon(Xoshiro256ss& rng, double eve, double eve_z,
                                                  double misalign, AliceState s,
                                                  DetectionEvent& ev) {
  if (eve > 0.0 && rng.bernoulli(eve)) {
    const bool eve_basis = eve_z == 0.5 ? rng.bit() : !rng.bernoulli(eve_z);
    const bool eve_bit = (eve_basis == s.basis) ? s.bit : rng.bit();
    s.bit = eve_bit;
    s.basis = eve_basis;
  }
  if (rng.bernoulli(misalign)) {
    s.bit = !s.bit;
  }
  ev.bit = s.bit ? 1U : 0U;
  ev.basis = s.basis ? 1U : 0U;
}

// What the decision of a batch of candidates reads (tables) and updates (generator,
// truth), for decide_batch().
struct DecideTables {
  std::array<const double*, 3> cdf{};
  std::array<const double*, 3> click{};
  std::array<double, 3> accept{};
  bool single = false;
  double eve = 0.0;
  double eve_z = 0.5;
  double misalign = 0.0;
};

// The decision loop of ChannelSimulator::run() for a detector without dead time or
// afterpulses (the loop in run() handles those): the same code, in a function of its own
// so that the generator and the counters stay in registers. Appends the detected events
// (and, when `alice_states` is set, their states) in order.
void decide_batch(const DecideTables& t, std::span<const std::uint64_t> cand,
                  const AliceState* states, Xoshiro256ss& rng_io, SimulationTruth& truth_io,
                  std::vector<DetectionEvent>& out, std::vector<AliceState>* alice_states) {
  Xoshiro256ss rng = rng_io;
  SimulationTruth truth = truth_io;
  for (std::size_t j = 0; j < cand.size(); ++j) {
    bool photon = false;
    const AliceState s = states[j];
    std::size_t k = 0;
    if (t.single) {
      photon = rng.bernoulli(t.click[0][1]);
      truth.single_photon[0] += 1;
    } else {
      k = s.intensity;
      if (t.accept[k] < 1.0 && !rng.bernoulli(t.accept[k])) {
        continue;  // thinned
      }
      const std::size_t n = photon_number(rng.uniform(), t.cdf[k]);
      truth.single_photon[k] += n == 1 ? 1 : 0;
      photon = rng.bernoulli(t.click[k][n]);
    }
    truth.detections[k] += 1;
    DetectionEvent ev;
    ev.pulse = cand[j] & DetectionEvent::kMaxPulse;
    if (photon) {
      truth.photon_clicks[k] += 1;
      measure_photon(rng, t.eve, t.eve_z, t.misalign, s, ev);
    } else {
      ev.dark = 1U;
    }
    out.push_back(ev);
    if (alice_states != nullptr) {
      push_secret(*alice_states, states[j]);
    }
  }
  rng_io = rng;
  truth_io = truth;
}

}  // namespace

ChannelSimulator::ChannelSimulator(const ChannelParams& params, std::uint64_t seed)
    : params_(params),
      theory_(channel_theory(params)),
      gap_rng_(seed),
      rng_(seed ^ 0x6A09E667F3BCC909ULL) {
  const Physics ph = physics_of(params);
  double qmax = 0.0;
  classes_ = params.source == SourceKind::kWeakCoherent ? 3 : 1;
  for (int k = 0; k < classes_; ++k) {
    if (theory_.classes[static_cast<std::size_t>(k)].prob > 0.0) {
      qmax = std::max(qmax, theory_.classes[static_cast<std::size_t>(k)].live_gain);
    }
  }
  const double y0 = params.dark_count_prob;
  for (int k = 0; k < classes_; ++k) {
    const auto ks = static_cast<std::size_t>(k);
    ClassTable& tb = tables_[ks];
    const double q = theory_.classes[ks].live_gain;
    tb.accept = qmax > 0.0 ? q / qmax : 0.0;
    if (q <= 0.0) {
      continue;
    }
    tb.cdf.assign(kMaxPhotons + 1, 1.0);
    tb.click.assign(kMaxPhotons + 1, 0.0);
    double acc = 0.0;
    for (int n = 0; n <= kMaxPhotons; ++n) {
      const auto ns = static_cast<std::size_t>(n);
      const double c = ph.cn[ks][ns];
      const double yn = 1.0 - (1.0 - y0) * (1.0 - c);  // P(detection | n)
      acc += ph.pn[ks][ns] * yn;
      tb.cdf[ns] = std::min(1.0, acc / q);
      tb.click[ns] = yn > 0.0 ? c / yn : 0.0;
    }
    tb.cdf[kMaxPhotons] = 1.0;
  }
  log1m_qmax_ = std::log1p(-std::min(qmax, 1.0 - 1e-16));
  dead_pulses_ = theory_.dead_pulses;
  ap_window_ = theory_.afterpulse_window_pulses;
}

void ChannelSimulator::run(std::vector<DetectionEvent>& out, AlicePrf& prf,
                           std::uint64_t pulses, std::vector<AliceState>* alice_states) {
  pulses = std::min(pulses, DetectionEvent::kMaxPulse);
  if (theory_.live_gain <= 0.0 || pulses == 0 || !(log1m_qmax_ < 0.0)) {
    return;
  }
  const std::size_t old_capacity = out.capacity();
  out.reserve(out.size() +
              static_cast<std::size_t>(static_cast<double>(pulses) * theory_.gain * 1.01) + 64);
  if (out.capacity() != old_capacity) {
    detail::prefer_huge_pages(out.data() + out.size(),
                              (out.capacity() - out.size()) * sizeof(DetectionEvent));
  }
  if (alice_states != nullptr) {
    reserve_secret(*alice_states, alice_states->size() + (out.capacity() - out.size()));
  }
  // The generators and counters as locals (written back at the end): kept in registers, not reloaded
  // after every store into `out` (which the compiler must assume may alias them).
  Xoshiro256ss gap_rng = gap_rng_;
  Xoshiro256ss rng = rng_;
  SimulationTruth truth = truth_;
  const bool single = classes_ == 1 && params_.source == SourceKind::kSinglePhoton;
  const double eve = params_.eve_intercept_fraction;
  const double misalign = params_.misalignment;
  const double inv_log1m = 1.0 / log1m_qmax_;
  const detail::LogTable& log_tab = detail::log_table();
  // Candidates are drawn a batch at a time (gap_rng_ only), Alice's states for the whole
  // batch come from one AES call, then each candidate is decided in order (rng_ only): the
  // result does not depend on the batch size.
  constexpr std::size_t kBatch = 4096;
  std::vector<std::uint64_t> cand_buffer(kBatch);
  std::vector<AliceState> states(kBatch);
  std::uint64_t i = 0;  // next pulse not yet passed
  bool done = false;
  // Dead time and afterpulses (off: none of this draws a random number, so the result is
  // bit-identical to an ideal detector's). A candidate before live_from falls in the dead
  // time after a click; at most one afterpulse is pending (at pulse ap_at), and the next
  // click, whichever it is, replaces it.
  const bool gated = dead_pulses_ > 0 || ap_window_ > 0;
  const double p_ap = ap_window_ > 0 ? params_.afterpulse_prob : 0.0;
  std::uint64_t live_from = 0;
  bool ap_pending = false;
  std::uint64_t ap_at = 0;
  DecideTables decide;
  decide.single = single;
  decide.eve = eve;
  decide.eve_z = params_.eve_z_basis_prob;
  decide.misalign = misalign;
  static constexpr std::array<double, kMaxPhotons + 1> kNoTable{};  // classes never kept
  for (std::size_t k = 0; k < 3; ++k) {
    const ClassTable& tb = tables_[k];
    const bool has = tb.cdf.size() == kMaxPhotons + 1 && tb.click.size() == kMaxPhotons + 1;
    decide.cdf[k] = has ? tb.cdf.data() : kNoTable.data();
    decide.click[k] = has ? tb.click.data() : kNoTable.data();
    decide.accept[k] = tb.accept;
  }
  const auto on_click = [&](std::uint64_t pulse) {
    live_from = pulse + dead_pulses_ + 1;
    ap_pending = p_ap > 0.0 && rng.bernoulli(p_ap);
    if (ap_pending) {
      ap_at = live_from + (ap_window_ > 1 ? rng.below(ap_window_) : 0);
    }
  };
  // Emits the pending afterpulses at pulses <= limit (each one a click of its own).
  const auto afterpulses_up_to = [&](std::uint64_t limit) {
    while (ap_pending && ap_at <= limit) {
      const std::uint64_t at = ap_at;
      AliceState as{};
      if (classes_ > 1 || alice_states != nullptr) {
        as = prf.at(at);
      }
      const std::size_t k = classes_ > 1 ? as.intensity : 0;
      truth.afterpulses[k] += 1;
      DetectionEvent ev;
      ev.pulse = at & DetectionEvent::kMaxPulse;
      ev.dark = 1U;  // a false click: Bob's result is random
      out.push_back(ev);
      if (alice_states != nullptr) {
        push_secret(*alice_states, as);
      }
      as = AliceState{};
      on_click(at);
    }
  };
  while (!done) {
    const std::span<const std::uint64_t> cand(
        cand_buffer.data(),
        draw_candidates(gap_rng, inv_log1m, log_tab, pulses, i, done, cand_buffer.data(), kBatch));
    prf.at_many(cand, states);
    if (!gated) {
      decide_batch(decide, cand, states.data(), rng, truth, out, alice_states);
      continue;
    }
    // With dead time or afterpulses (decide_batch() is this loop without them: keep the
    // two the same).
    for (std::size_t j = 0; j < cand.size(); ++j) {
      if (gated) {
        afterpulses_up_to(cand[j]);
        if (cand[j] < live_from) {
          continue;  // the detector is blind (dead time)
        }
      }
      bool photon = false;
      const AliceState s = states[j];
      std::size_t k = 0;
      if (single) {
        // Ideal single-photon source: n = 1, a photon clicked with probability eta / Q.
        photon = rng.bernoulli(tables_[0].click[1]);
        truth.single_photon[0] += 1;
      } else {
        k = s.intensity;
        const ClassTable& tb = tables_[k];
        if (tb.accept < 1.0 && !rng.bernoulli(tb.accept)) {
          continue;  // thinned: this pulse of a dimmer class was not detected
        }
        // Photon number given the detection, then whether a photon (or only a dark count)
        // clicked.
        const std::size_t n = photon_number(rng.uniform(), tb.cdf.data());
        truth.single_photon[k] += n == 1 ? 1 : 0;
        photon = rng.bernoulli(tb.click[n]);
      }
      truth.detections[k] += 1;
      DetectionEvent ev;
      ev.pulse = cand[j] & DetectionEvent::kMaxPulse;
      if (photon) {
        truth.photon_clicks[k] += 1;
        measure_photon(rng, eve, params_.eve_z_basis_prob, misalign, s, ev);
      } else {
        ev.dark = 1U;
      }
      out.push_back(ev);
      if (alice_states != nullptr) {
        push_secret(*alice_states, states[j]);
      }
      if (gated) {
        on_click(cand[j]);
      }
    }
  }
  if (gated) {
    afterpulses_up_to(pulses - 1);
  }
  std::fill(states.begin(), states.end(), AliceState{});
  gap_rng_ = gap_rng;
  rng_ = rng;
  truth_ = truth;
}

}  // namespace qkd::core
