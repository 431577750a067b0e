// Throughput of the qkdcore stages. Run:
//   build-speed/bin/core_bench --benchmark_counters_tabular=true
// (docs/BENCHMARKS.md records the commands and results; bench/cascade_fer.cpp prints the
// Cascade efficiency / frame-error table over many blocks.)
// Rates are in input bits per second (Mbit/s = bytes_per_second / 1e6 * 8 is not used:
// the "bits/s" counter counts key bits).
#include <benchmark/benchmark.h>

#include <array>
#include <thread>
#include <optional>

#include "qkd/core/cascade.hpp"
#include "qkd/core/link.hpp"
#include "qkd/core/physics.hpp"
#include "qkd/core/random.hpp"
#include "qkd/core/key_length.hpp"
#include "qkd/core/toeplitz.hpp"
#include "legacy_cascade.hpp"
#include "toeplitz_internal.hpp"

namespace {

using namespace qkd::core;

BitVector random_vector(Xoshiro256ss& rng, std::size_t n) {
  BitVector v(n);
  for (auto& w : v.mutable_words()) {
    w = rng.next();
  }
  v.clear_tail();
  return v;
}

// Cascade on n-bit blocks at a QBER of range(1) per mille, local oracle (no transport):
// layout + Alice's responder + Bob's cascade_correct are timed, error generation is not.
// "bits/s" counts reconciled (sifted) bits; "f" = disclosed parities / (n h(QBER)).
// variant: 0..2 = CascadeVariant, 9 = the first qkdcore implementation (bench/legacy_*),
// run on the same blocks (same seeds) as the others.
void BM_Cascade(benchmark::State& state) {
  const auto n = static_cast<std::uint32_t>(state.range(0));
  const double q = static_cast<double>(state.range(1)) / 1000.0;
  const bool legacy = state.range(2) == 9;
  const auto variant = legacy ? CascadeVariant::kOriginal
                              : static_cast<CascadeVariant>(state.range(2));
  const std::uint32_t passes = cascade_default_passes(variant);
  const std::uint32_t k1 = cascade_first_block_size(q, n, variant);
  Xoshiro256ss rng(1);
  std::uint64_t leaked = 0;
  std::uint64_t failures = 0;
  for (auto _ : state) {
    state.PauseTiming();
    BitVector alice = random_vector(rng, n);
    BitVector bob = alice;
    for (std::uint32_t i = 0; i < n; ++i) {
      if (rng.bernoulli(q)) {
        bob.flip(i);
      }
    }
    std::array<std::uint8_t, 32> seed{};
    for (auto& b : seed) {
      b = static_cast<std::uint8_t>(rng.next());
    }
    state.ResumeTiming();
    const CascadeLayout layout(n, passes, k1, seed, variant);
    Result<CascadeStats> stats = CascadeStats{};
    if (legacy) {
      const qkd::bench_legacy::LegacyResponder responder(alice, layout);
      qkd::bench_legacy::LegacyOracle oracle(responder);
      stats = qkd::bench_legacy::legacy_cascade_correct(bob, layout, oracle);
    } else {
      const CascadeResponder responder(alice, layout);
      LocalParityOracle oracle(responder);
      stats = cascade_correct(bob, layout, oracle);
    }
    benchmark::DoNotOptimize(stats);
    leaked += stats->parities_disclosed;
    failures += bob == alice ? 0 : 1;
  }
  const double bits = static_cast<double>(n) * static_cast<double>(state.iterations());
  state.counters["bits/s"] = benchmark::Counter(bits, benchmark::Counter::kIsRate);
  state.counters["f"] = static_cast<double>(leaked) / (bits * binary_entropy(q));
  state.counters["residual_blocks"] = static_cast<double>(failures);
}
void cascade_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "qber_permille", "variant"});
  for (const int n : {10'000, 16'384, 65'536}) {
    for (const int q : {10, 20, 50}) {
      for (const int v : {9, 0, 1, 2}) {
        b->Args({n, q, v});
      }
    }
  }
}
BENCHMARK(BM_Cascade)->Apply(cascade_args)->Unit(benchmark::kMillisecond);

// Toeplitz hashing, n input bits -> m = n/2 output bits (the privacy-amplification shape).
// "bits/s" counts input bits. Before the timed loop each fixture checks its kernel against
// a reference: the naive O(n m) product for n <= 30,000, otherwise the Karatsuba path (or,
// for the Karatsuba rows, the FFT path: the two are independent algorithms, both checked
// against the naive product in the tests), plus three output bits against the defining sum.
//   hash        = toeplitz_hash (dispatches: Karatsuba below the crossover, FFT above)
//   fft         = the additive-FFT path forced, widest carry-less kernel (VPCLMULQDQ here)
//   fft_pclmul128 / fft_portable = the FFT path with the 128-bit / portable field multiply
//   karatsuba   = the transposed-Karatsuba path forced (the previous toeplitz_hash)
//   karatsuba_pclmul128 / karatsuba_portable, ntt_before (the first fast path), naive.
enum class ToeplitzKernel {
  kHash,
  kFft,
  kFft128,
  kFftPortable,
  kKaratsuba,
  kKaratsuba128,
  kKaratsubaPortable,
  kNtt,
  kNaive
};

Result<BitVector> run_toeplitz(ToeplitzKernel k, const BitVector& seed, const BitVector& x,
                               std::size_t m) {
  using detail::ClmulKernel;
  switch (k) {
    case ToeplitzKernel::kHash:
      return toeplitz_hash(seed, x, m);
    case ToeplitzKernel::kFft:
      return detail::toeplitz_hash_fft(seed, x, m, ClmulKernel::kBest);
    case ToeplitzKernel::kFft128:
      return detail::toeplitz_hash_fft(seed, x, m, ClmulKernel::kPclmul);
    case ToeplitzKernel::kFftPortable:
      return detail::toeplitz_hash_fft(seed, x, m, ClmulKernel::kPortable);
    case ToeplitzKernel::kKaratsuba:
      return detail::toeplitz_hash_clmul(seed, x, m, ClmulKernel::kBest);
    case ToeplitzKernel::kKaratsuba128:
      return detail::toeplitz_hash_clmul(seed, x, m, ClmulKernel::kPclmul);
    case ToeplitzKernel::kKaratsubaPortable:
      return detail::toeplitz_hash_clmul(seed, x, m, ClmulKernel::kPortable);
    case ToeplitzKernel::kNtt:
      return toeplitz_hash_ntt(seed, x, m);
    case ToeplitzKernel::kNaive:
      break;
  }
  return toeplitz_hash_naive(seed, x, m);
}

template <ToeplitzKernel K>
void BM_Toeplitz(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const std::size_t m = n / 2;
  Xoshiro256ss rng(2);
  const BitVector seed = random_vector(rng, n + m - 1);
  const BitVector x = random_vector(rng, n);
  {
    auto y = run_toeplitz(K, seed, x, m);
    bool equal = y.ok();
    if (equal && K != ToeplitzKernel::kNaive) {
      const bool karatsuba_row = K == ToeplitzKernel::kKaratsuba ||
                                 K == ToeplitzKernel::kKaratsuba128 ||
                                 K == ToeplitzKernel::kKaratsubaPortable;
      auto ref = n <= 30'000 ? toeplitz_hash_naive(seed, x, m)
                 : karatsuba_row
                     ? detail::toeplitz_hash_fft(seed, x, m, detail::ClmulKernel::kBest)
                     : detail::toeplitz_hash_clmul(seed, x, m, detail::ClmulKernel::kBest);
      equal = ref.ok() && *y == *ref;
    }
    for (std::size_t i : {std::size_t{0}, m / 2, m - 1}) {
      bool acc = false;
      for (std::size_t j = 0; j < n; ++j) {
        acc ^= seed.get(i + n - 1 - j) && x.get(j);
      }
      equal = equal && y->get(i) == acc;
    }
    if (!equal) {
      state.SkipWithError("Toeplitz kernel differs from the reference");
      return;
    }
    state.counters["bit_equal"] = 1;
    if (K == ToeplitzKernel::kHash) {
      state.counters["uses_fft"] = detail::toeplitz_uses_fft(n, m) ? 1 : 0;
    }
    if (K == ToeplitzKernel::kFft || K == ToeplitzKernel::kFft128 ||
        K == ToeplitzKernel::kFftPortable) {
      state.counters["log2_L"] = detail::toeplitz_fft_log_size(n, m);
    }
  }
  for (auto _ : state) {
    auto y = run_toeplitz(K, seed, x, m);
    benchmark::DoNotOptimize(y);
  }
  state.counters["bits/s"] = benchmark::Counter(
      static_cast<double>(n) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
void toeplitz_large_args(benchmark::internal::Benchmark* b) {
  for (const long long n : {100'000LL, 300'000LL, 1'000'000LL, 2'000'000LL, 4'000'000LL,
                            10'000'000LL, 20'000'000LL}) {
    b->Arg(n);
  }
}
BENCHMARK(BM_Toeplitz<ToeplitzKernel::kHash>)->Name("BM_Toeplitz/hash")->Arg(10'000)
    ->Arg(30'000)->Apply(toeplitz_large_args)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Toeplitz<ToeplitzKernel::kFft>)->Name("BM_Toeplitz/fft")->Arg(10'000)
    ->Arg(30'000)->Apply(toeplitz_large_args)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Toeplitz<ToeplitzKernel::kKaratsuba>)->Name("BM_Toeplitz/karatsuba")->Arg(10'000)
    ->Arg(30'000)->Apply(toeplitz_large_args)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Toeplitz<ToeplitzKernel::kFft128>)->Name("BM_Toeplitz/fft_pclmul128")
    ->Arg(1'000'000)->Arg(10'000'000)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Toeplitz<ToeplitzKernel::kKaratsuba128>)->Name("BM_Toeplitz/karatsuba_pclmul128")
    ->Arg(1'000'000)->Arg(10'000'000)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Toeplitz<ToeplitzKernel::kFftPortable>)->Name("BM_Toeplitz/fft_portable")
    ->Arg(100'000)->Arg(1'000'000)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Toeplitz<ToeplitzKernel::kKaratsubaPortable>)->Name("BM_Toeplitz/karatsuba_portable")
    ->Arg(100'000)->Arg(1'000'000)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Toeplitz<ToeplitzKernel::kNtt>)->Name("BM_Toeplitz/ntt_before")->Arg(30'000)
    ->Arg(1'000'000)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Toeplitz<ToeplitzKernel::kNaive>)->Name("BM_Toeplitz/naive")->Arg(10'000)
    ->Arg(30'000)->Unit(benchmark::kMillisecond);

// Channel simulation: pulses per second at 20 km.
void BM_Channel(benchmark::State& state) {
  ChannelParams p;
  p.length_km = static_cast<double>(state.range(0));
  std::array<std::uint8_t, 16> key{};
  AlicePrf prf(key);
  ChannelSimulator sim(p, 3);
  std::vector<DetectionEvent> ev;
  for (auto _ : state) {
    ev.clear();
    sim.run(ev, prf, 2'000'000);
    benchmark::DoNotOptimize(ev.data());
  }
  state.counters["pulses/s"] =
      benchmark::Counter(2e6 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Channel)->Arg(20)->Arg(100)->Unit(benchmark::kMillisecond);

// A whole block, both ends (Bob on a second thread), default parameters at 20 km.
void BM_FullBlock(benchmark::State& state) {
  const std::vector<std::uint8_t> psk(32, 1);
  auto q = make_memory_transport_pair();
  auto c = make_memory_transport_pair();
  ChannelParams ch;
  ProtocolParams pp;
  AliceEndpoint alice(ch, pp, psk, 1, *q.a, *c.a);
  BobEndpoint bob(pp, psk, 2, *q.b, *c.b);
  std::uint64_t secret = 0;
  for (auto _ : state) {
    std::optional<Result<BlockResult>> rb;
    std::thread t([&] { rb.emplace(bob.run_block()); });
    auto ra = alice.run_block();
    t.join();
    if (!ra.ok() || !rb->ok()) {
      state.SkipWithError("block failed");
      break;
    }
    secret += ra->secret_bits;
  }
  state.counters["secret_bits/s"] = benchmark::Counter(static_cast<double>(secret),
                                                       benchmark::Counter::kIsRate);
}
BENCHMARK(BM_FullBlock)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
