// Word-level bit operations with x86-64 instructions chosen at run time: POPCNT for the
// population count and BMI2 PEXT / PDEP for the bit compress (the bits of x at the set
// positions of a mask, packed to the low end) and its inverse, the deposit. The build targets baseline x86-64 (no -mpopcnt,
// -mbmi2), where std::popcount compiles to a call into libgcc's software routine and the
// compress is a loop over the mask's set bits. One predictable branch on a flag set once
// at startup selects the instruction (inline assembly, so any function can use it
// whatever its target options) or the portable code. PEXT is not used on AMD families
// 15h and 17h (Excavator, Zen 1/2), which implement it in microcode (slower than the
// loop). Other architectures, and builds that already enable the instructions, use the
// portable code, which the compiler then maps to the instructions itself.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

namespace qkd::core::detail {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if !defined(__POPCNT__)
#define QKD_POPCOUNT_DISPATCH 1
// True when POPCNT is used. Written only at startup and by set_hardware_bit_ops().
extern bool g_hardware_popcount;
#endif
#if !defined(__BMI2__)
#define QKD_PEXT_DISPATCH 1
// True when PEXT is used. Written only at startup and by set_hardware_bit_ops().
extern bool g_hardware_pext;
#endif
#endif

// Whether the instructions are in use.
[[nodiscard]] bool hardware_popcount();
[[nodiscard]] bool hardware_pext();
// Tests: force the portable code (false) or the instructions where the CPU has them and
// the build dispatches (true). Not thread-safe: only while nothing else runs.
void set_hardware_bit_ops(bool on);

[[nodiscard]] inline unsigned popcount64(std::uint64_t x) {
#if defined(QKD_POPCOUNT_DISPATCH)
  if (g_hardware_popcount) {
    std::uint64_t r;
    __asm__("popcntq %1, %0" : "=r"(r) : "rm"(x) : "cc");
    return static_cast<unsigned>(r);
  }
#endif
  return static_cast<unsigned>(std::popcount(x));
}

// Whether PEXT / PDEP are used: always in a BMI2 build, by the startup flag in a dispatching
// one; QKD_BMI2_ASM marks the builds where the instructions can be written at all.
#if defined(__x86_64__) && (defined(__BMI2__) || defined(QKD_PEXT_DISPATCH))
#define QKD_BMI2_ASM 1
[[nodiscard]] inline bool use_bmi2() {
#if defined(__BMI2__)
  return true;
#else
  return g_hardware_pext;
#endif
}
#endif

// The bits of x at the set positions of m, packed to the low end in order.
[[nodiscard]] inline std::uint64_t compress_bits_portable(std::uint64_t x, std::uint64_t m) {
  std::uint64_t r = 0;
  unsigned k = 0;
  while (m != 0) {
    const auto i = static_cast<unsigned>(std::countr_zero(m));
    r |= ((x >> i) & 1U) << k;
    ++k;
    m &= m - 1;
  }
  return r;
}

[[nodiscard]] inline std::uint64_t compress_bits(std::uint64_t x, std::uint64_t m) {
#if defined(QKD_BMI2_ASM)
  if (use_bmi2()) {
    std::uint64_t r;
    __asm__("pextq %2, %1, %0" : "=r"(r) : "r"(x), "rm"(m));
    return r;
  }
#endif
  return compress_bits_portable(x, m);
}

// The inverse: the low bits of x, in order, moved to the set positions of m.
[[nodiscard]] inline std::uint64_t deposit_bits_portable(std::uint64_t x, std::uint64_t m) {
  std::uint64_t r = 0;
  while (m != 0) {
    const std::uint64_t lowest = m & (~m + 1);
    r |= (x & 1U) != 0 ? lowest : 0;
    x >>= 1;
    m &= m - 1;
  }
  return r;
}

[[nodiscard]] inline std::uint64_t deposit_bits(std::uint64_t x, std::uint64_t m) {
#if defined(QKD_BMI2_ASM)
  if (use_bmi2()) {  // PDEP comes with PEXT (BMI2), and is as fast or slow
    std::uint64_t r;
    __asm__("pdepq %2, %1, %0" : "=r"(r) : "r"(x), "rm"(m));
    return r;
  }
#endif
  return deposit_bits_portable(x, m);
}

}  // namespace qkd::core::detail
