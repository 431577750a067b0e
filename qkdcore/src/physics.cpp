#include "qkd/core/physics.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qkd/core/key_length.hpp"

namespace qkd::core {

struct AlicePrf::Impl {
  EVP_CIPHER_CTX* ctx = nullptr;
  std::uint64_t cached_block = ~std::uint64_t{0};
  std::uint64_t bits = 0;
  std::uint64_t bases = 0;
  bool failed = false;
  ~Impl() {
    EVP_CIPHER_CTX_free(ctx);
    bits = 0;
    bases = 0;
  }
};

AlicePrf::AlicePrf(std::span<const std::uint8_t, 16> key) : impl_(std::make_unique<Impl>()) {
  impl_->ctx = EVP_CIPHER_CTX_new();
  if (impl_->ctx == nullptr ||
      EVP_EncryptInit_ex(impl_->ctx, EVP_aes_128_ecb(), nullptr, key.data(), nullptr) != 1 ||
      EVP_CIPHER_CTX_set_padding(impl_->ctx, 0) != 1) {
    impl_->failed = true;  // at() then aborts: a broken libcrypto is not recoverable here
  }
}

AlicePrf::~AlicePrf() = default;

AliceState AlicePrf::at(std::uint64_t pulse) {
  const std::uint64_t block = pulse >> 6;
  if (block != impl_->cached_block) {
    std::uint8_t in[16] = {};
    std::uint8_t out[16] = {};
    for (int b = 0; b < 8; ++b) {
      in[b] = static_cast<std::uint8_t>(block >> (8 * b));
    }
    int len = 0;
    if (impl_->failed || EVP_EncryptUpdate(impl_->ctx, out, &len, in, 16) != 1 || len != 16) {
      std::abort();  // AES-ECB on one block cannot fail unless libcrypto is broken
    }
    std::uint64_t bits = 0;
    std::uint64_t bases = 0;
    for (int b = 0; b < 8; ++b) {
      bits |= std::uint64_t{out[b]} << (8 * b);
      bases |= std::uint64_t{out[8 + b]} << (8 * b);
    }
    impl_->bits = bits;
    impl_->bases = bases;
    impl_->cached_block = block;
    std::memset(out, 0, sizeof(out));
  }
  const unsigned s = static_cast<unsigned>(pulse & 63);
  return AliceState{((impl_->bits >> s) & 1U) != 0, ((impl_->bases >> s) & 1U) != 0};
}

double ChannelTheory::secret_fraction(double f) const {
  const double h = binary_entropy(qber);
  return std::max(0.0, 1.0 - f * h - h);
}

ChannelTheory channel_theory(const ChannelParams& p) {
  ChannelTheory t;
  t.transmittance =
      p.detector_efficiency * std::pow(10.0, -p.loss_db_per_km * p.length_km / 10.0);
  const double eta = t.transmittance;
  const double y0 = p.dark_count_prob;
  t.gain = 1.0 - (1.0 - eta) * (1.0 - y0);
  if (t.gain <= 0.0) {
    return t;
  }
  t.photon_fraction = eta / t.gain;
  const double f = p.eve_intercept_fraction;
  const double ed = p.misalignment;
  // An intercepted photon is in Eve's basis: with prob 1/2 Alice's (then only the
  // misalignment errs), with prob 1/2 the other one (then Bob's sifted result is random).
  const double photon_error = (1.0 - f) * ed + f * (0.5 * ed + 0.25);
  t.qber = (eta * photon_error + (1.0 - eta) * y0 * 0.5) / t.gain;
  t.sifted_per_pulse = t.gain / 2.0;
  return t;
}

ChannelSimulator::ChannelSimulator(const ChannelParams& params, std::uint64_t seed)
    : params_(params), theory_(channel_theory(params)), rng_(seed) {
  log1m_gain_ = std::log1p(-std::min(theory_.gain, 1.0 - 1e-16));
}

void ChannelSimulator::run(std::vector<DetectionEvent>& out, AlicePrf& prf,
                           std::uint64_t pulses) {
  if (theory_.gain <= 0.0 || pulses == 0) {
    return;
  }
  out.reserve(out.size() +
              static_cast<std::size_t>(static_cast<double>(pulses) * theory_.gain * 1.01) + 64);
  const double remaining_limit = static_cast<double>(pulses);
  std::uint64_t i = 0;
  for (;;) {
    // Inverse CDF of the geometric distribution: number of undetected pulses before the
    // next detection.
    const double gap = std::floor(std::log(rng_.uniform_open0()) / log1m_gain_);
    if (gap >= remaining_limit - static_cast<double>(i)) {
      break;
    }
    i += static_cast<std::uint64_t>(gap);
    DetectionEvent ev;
    ev.pulse = i;
    if (rng_.bernoulli(theory_.photon_fraction)) {
      AliceState s = prf.at(i);
      if (params_.eve_intercept_fraction > 0.0 &&
          rng_.bernoulli(params_.eve_intercept_fraction)) {
        const bool eve_basis = rng_.bit();
        const bool eve_bit = (eve_basis == s.basis) ? s.bit : rng_.bit();
        s = AliceState{eve_bit, eve_basis};
      }
      if (rng_.bernoulli(params_.misalignment)) {
        s.bit = !s.bit;
      }
      ev.bit = s.bit;
      ev.basis = s.basis;
    } else {
      ev.dark = true;
    }
    out.push_back(ev);
    ++i;
    if (i >= pulses) {
      break;
    }
  }
}

}  // namespace qkd::core
