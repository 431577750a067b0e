// Transparent huge pages for a large, still untouched buffer. Filling a fresh buffer of
// hundreds of MB with 4 KiB pages costs a page fault per page, and random access over tables
// of tens of MB misses the TLB on nearly every access; 2 MiB pages cut both 512-fold. Only a
// hint (kernel THP mode "madvise" or "always"): without THP nothing changes.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace qkd::core::detail {

inline void prefer_huge_pages(void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  if (bytes < 2 * kHuge) {
    return;
  }
  const auto begin = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) {
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace qkd::core::detail
