// Fuzz target: a quantum frame of detection events (decode_detections), as Bob's engine
// sends them and Alice's decodes them. Input: u8 chunk index, then the frame. Checks: the
// decoder returns (no crash); what it accepts is strictly increasing, at or after the
// smallest pulse allowed and below the block's pulse count, and the next chunk starts after it.
#include <cstdint>
#include <cstdlib>
#include <span>

#include "protocol.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) {
    return 0;
  }
  constexpr std::uint64_t kBlock = 7;
  constexpr std::uint64_t kPulses = 1'000'000;
  const std::uint32_t chunk = data[0] % 4;
  const std::uint64_t first = chunk * 1000;  // as if earlier chunks ended there
  std::uint64_t next = first;
  const std::span<const std::uint8_t> msg(data + 1, size - 1);
  auto r = qkd::core::detail::decode_detections(msg, kBlock, chunk, next, kPulses);
  if (!r.ok()) {
    return 0;
  }
  std::uint64_t prev = first;
  bool any = false;
  for (const auto& e : r->events) {
    if (e.pulse >= kPulses || e.pulse < first || (any && e.pulse <= prev)) {
      std::abort();
    }
    prev = e.pulse;
    any = true;
  }
  if (any && next != prev + 1) {
    std::abort();
  }
  return 0;
}
